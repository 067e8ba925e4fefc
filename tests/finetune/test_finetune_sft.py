"""Instruction tuning end to end: a run that learns its responses, resumes exactly, and refuses mismatches."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evalhelpers import lm_raw, make_run_dir, write_yaml
from nanodecoder.cli.run import main as run_main

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"},
           {"instruction": "Add", "input": "2 3", "output": "5"},
           {"instruction": "Sky color?", "output": "blue"},
           {"instruction": "Reverse", "input": "abc", "output": "cba"}]
TEMPLATE = {"prompt": "Q: {instruction}{input}\nA: ", "input": " [{input}]", "end": "\n"}


def the_run(tmp_path, name: str):
    (path,) = sorted((tmp_path / "runs" / name).glob("*/blueprint.yaml"))
    return path.parent


def sft_blueprint(tmp_path, steps: int = 120, records=RECORDS, **changes) -> tuple:
    src = make_run_dir(tmp_path, lm_raw(tmp_path))
    (tmp_path / "inst.json").write_text(json.dumps(records))
    raw = lm_raw(tmp_path, name="sft")
    raw["finetune"] = {"kind": "instruction", "from": str(src), "data": "inst.json", "val_data": "inst.json",
                       "template": TEMPLATE}
    raw["train"] = {"steps": steps, "batch_size": 4, "lr": 3.0e-3, "seed": 1, "eval_every": 0, "log_every": 20,
                    "checkpoint_every": 0, "keep_best": False, "schedule": {"kind": "constant", "warmup_steps": 5}}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return src, write_yaml(tmp_path / "sft.yaml", raw)


def test_a_short_sft_reproduces_the_trained_responses(tmp_path, capsys):
    from nanodecoder.cli.answer import main as answer_main, run_template
    from nanodecoder.cli.sample import load_run_model
    from nanodecoder.finetune.template import answer
    _, bp = sft_blueprint(tmp_path)
    assert run_main([str(bp)]) == 0
    run = the_run(tmp_path, "sft")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "eval" and rows[-1]["val_loss"] < 0.05 and rows[-1]["val_bpb"] is None
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "ckpt" / "latest").is_file()
    model, tok, _, spec = load_run_model(run)
    assert spec.finetune.kind == "instruction"
    template, tuned = run_template(spec, tok)
    assert tuned
    for rec in RECORDS:
        assert answer(model, template, rec["instruction"], rec.get("input", "")) == rec["output"]
    capsys.readouterr()
    assert answer_main([str(run), "Add", "--input", "2 3"]) == 0
    assert capsys.readouterr().out == "5\n"


def test_sft_resumes_exactly(tmp_path):
    _, bp = sft_blueprint(tmp_path, steps=8)
    assert run_main([str(bp)]) == 0
    assert run_main([str(bp), "--set", "train.steps=4", "--set", "name=half"]) == 0
    half = the_run(tmp_path, "half")
    assert run_main(["--resume", str(half), "--set", "train.steps=8"]) == 0
    full = the_run(tmp_path, "sft")
    a = load_file(str(full / "ckpt/step_000008/model.safetensors"))
    b = load_file(str(half / "ckpt/step_000008/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_weights_start_from_the_source_run(tmp_path):
    from nanodecoder.api.run import Finetuning, Run
    from nanodecoder.cli.blueprint import load_blueprint
    from nanodecoder.runtime import RuntimeSpec, setup_runtime
    src, bp_path = sft_blueprint(tmp_path)
    bp = load_blueprint(bp_path)
    run = Run(bp, tmp_path)
    assert isinstance(run.strategy, Finetuning)
    task, spec = run.prepare()
    trainer = task.make_trainer(spec, setup_runtime(RuntimeSpec(profile="cpu")))
    saved = load_file(str(src / "ckpt/step_000001/model.safetensors"))
    assert all(torch.equal(trainer.raw_model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("change, message", [
    ({"model": {"n_layers": 3}}, "model.n_layers is 3 here, 2 there"),
    ({"data": {"tokenizer": {"kind": "char"}}}, "fine-tuning uses the tokenizer of"),
    ({"finetune": {"template": {"prompt": "Q: {instruction}\nA: "}}}, "finetune.template.prompt"),
    ({"finetune": {"from": "nowhere"}}, "is not a run directory"),
    ({"finetune": {"data": "missing.json"}},
     "missing.json does not exist (relative paths start at the blueprint's folder"),
    ({"finetune": {"templte": {}}}, "unknown key 'templte' for finetune kind 'instruction'; did you mean 'template'?"),
    ({"finetune": {"data": "builtin:instructions"}},
     "finetune.data: unknown built-in 'instructions' (available: instruction_data)"),
    ({"finetune": {"val_data": "builtin:tinyshakespeare"}},
     "finetune.val_data: unknown built-in 'tinyshakespeare' (available: instruction_data)"),
])
def test_mismatches_and_bad_settings_exit_2_before_training(tmp_path, capsys, change, message):
    _, bp = sft_blueprint(tmp_path)
    raw = yaml.safe_load(bp.read_text())
    for section, values in change.items():
        raw[section].update(values)
    write_yaml(bp, raw)
    assert run_main([str(bp)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "sft").exists()


def test_an_instruction_file_that_is_not_a_list_exits_2(tmp_path, capsys):
    _, bp = sft_blueprint(tmp_path)
    (tmp_path / "inst.json").write_text('{"instruction": "a", "output": "b"}')
    assert run_main([str(bp)]) == 2
    assert "expected a JSON list of instruction records" in capsys.readouterr().err


def test_dropout_may_change_and_dry_run_prints_the_plan(tmp_path, capsys):
    _, bp = sft_blueprint(tmp_path, model={"dropout": 0.1}, finetune={"batching": "pack"})
    assert run_main([str(bp), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "instruction tuning from" in out and "4 train / 4 validation records" in out and "packed rows" in out
    assert "nothing trained" in out


def test_the_shipped_instruction_records_are_named_builtin(tmp_path, capsys):
    """finetune.data: builtin:instruction_data reads the 1,100 records shipped in the package (5% held out)."""
    _, bp = sft_blueprint(tmp_path, finetune={"data": "builtin:instruction_data", "val_data": None})
    assert run_main([str(bp), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 1,045 train records (382 fit the 48-token test model, 663 dropped) and 55 validation ones (20 + 35)
    assert "382 train / 20 validation records" in out and "builtin:instruction_data: " in out
    assert "663 dropped" in out and "35 dropped" in out
