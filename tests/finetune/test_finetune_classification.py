"""Classification heads: last-real-token pooling, accuracy on a separable task, frozen bodies stay bit-identical."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evalhelpers import lm_raw, make_run_dir, write_yaml
from nanodecoder.cli.run import main as run_main


def separable_csv(path, n: int = 200, seed: int = 0):
    """Class 0 texts use letters a-m, class 1 letters n-z; 2-6 words of 2-6 letters."""
    rng = random.Random(seed)
    letters = ("abcdefghijklm", "nopqrstuvwxyz")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            words = ["".join(rng.choice(letters[label]) for _ in range(rng.randint(2, 6)))
                     for _ in range(rng.randint(2, 6))]
            w.writerow([" ".join(words), label])
    return path


def cls_blueprint(tmp_path, **finetune):
    src = make_run_dir(tmp_path, lm_raw(tmp_path))
    separable_csv(tmp_path / "cls.csv")
    raw = lm_raw(tmp_path, name="cls")
    raw["finetune"] = {"kind": "classification", "from": str(src), "data": "cls.csv", "n_classes": 2,
                       "val_fraction": 0.2, **finetune}
    raw["train"] = {"steps": 30, "batch_size": 16, "lr": 2.0e-3, "seed": 1, "eval_every": 15, "log_every": 15,
                    "checkpoint_every": 0, "keep_best": False, "schedule": {"kind": "constant", "warmup_steps": 3}}
    return src, write_yaml(tmp_path / "cls.yaml", raw)


def run_of(tmp_path):
    (path,) = sorted((tmp_path / "runs" / "cls").glob("*/blueprint.yaml"))
    return path.parent


def test_the_head_reads_the_last_real_token_whatever_the_padding():
    from nanodecoder.finetune.classification import DecoderClassifier
    from nanodecoder.model import build_model, build_model_spec
    spec = build_model_spec(lm_raw(Path("."))["model"], 256)
    clf = DecoderClassifier.from_decoder(build_model(spec, seed=0), 3).eval()
    torch.nn.init.normal_(clf.head.weight)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    padded = torch.full((3, 5), -1)
    for r, ids in enumerate(rows):
        padded[r, :len(ids)] = torch.tensor(ids)
    alone = torch.cat([clf(torch.tensor([ids])).logits for ids in rows])
    assert torch.allclose(clf(padded).logits, alone, atol=1e-5)
    assert clf(padded).logits.shape == (3, 3)


def test_a_separable_task_reaches_high_accuracy(tmp_path, capsys):
    _, bp = cls_blueprint(tmp_path)
    assert run_main([str(bp)]) == 0
    assert "val_acc" in capsys.readouterr().err
    run = run_of(tmp_path)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_acc"] > 0.9, evals
    assert not (run / "samples.txt").exists()              # no LM head: no text samples


@pytest.mark.parametrize("n_blocks", [0, 1])
def test_frozen_body_weights_stay_bit_identical(tmp_path, n_blocks):
    src, bp = cls_blueprint(tmp_path, train_last_blocks=n_blocks)
    assert run_main([str(bp), "--set", "train.steps=6", "--set", "train.eval_every=0"]) == 0
    before = load_file(str(src / "ckpt/step_000001/model.safetensors"))
    after = load_file(str(run_of(tmp_path) / "ckpt/step_000006/model.safetensors"))
    trained = ("blocks.1.", "norm.") if n_blocks else ()
    frozen = [k for k in before if not k.startswith(("head.",) + trained)]
    assert "wte.weight" in frozen and any(k.startswith("blocks.0.") for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in after if k not in before or not torch.equal(before[k], after[k])]
    assert "head.weight" in changed and after["head.weight"].shape == (2, 32)
    assert any(k.startswith("blocks.1.") for k in changed) == bool(n_blocks)


@pytest.mark.parametrize("change, message", [
    ({"n_classes": 2, "data": "bad.csv"}, r"bad.csv: record 3 (line 4): label 2 is outside 0..1"),
    ({"train_last_blocks": 5}, "finetune.train_last_blocks"),
])
def test_bad_labels_and_settings_exit_2(tmp_path, capsys, change, message):
    _, bp = cls_blueprint(tmp_path, **change)
    (tmp_path / "bad.csv").write_text("text,label\nabc,0\nnop,1\nxyz,2\n")
    assert run_main([str(bp)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_classification_runs_refuse_text_evaluations(tmp_path, capsys):
    from nanodecoder.cli.eval import main as eval_main
    from nanodecoder.cli.answer import main as answer_main
    _, bp = cls_blueprint(tmp_path)
    raw = yaml.safe_load(bp.read_text())
    raw["eval"] = {"text": {"data": "cls.csv"}}
    write_yaml(bp, raw)
    assert run_main([str(bp)]) == 2
    err = capsys.readouterr().err
    assert "cls.yaml: eval (line " in err and "a classification model has no language-model head" in err
    del raw["eval"]
    write_yaml(bp, raw)
    assert run_main([str(bp), "--set", "train.steps=1"]) == 0
    run = run_of(tmp_path)
    capsys.readouterr()
    assert eval_main([str(run), "--task", "text", "--data", str(tmp_path / "cls.csv")]) == 2
    assert "classification fine-tuning run" in capsys.readouterr().err
    assert answer_main([str(run), "hello"]) == 2
    assert "classification run" in capsys.readouterr().err
