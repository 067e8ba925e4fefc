"""``--dry-run`` refuses (exit 2, one line per problem, no traceback) what training would refuse before step 1
that shows without tokenizing the corpus -- the same :func:`preflight` runs at the start of training -- and
ends with the checks that wait for the prepared data."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import private_env, run_dirs, tiny_raw, write_blueprint  # noqa: E402

import nanodecoder.api.run as run_api  # noqa: E402
from nanodecoder.cli.blueprint import load_blueprint  # noqa: E402
from nanodecoder.run import main  # noqa: E402

WAITING = "checks that wait for the prepared data: "


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A cache of each test's own: data another test prepared must not change what waits for the data."""
    for key, value in private_env(tmp_path).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def no_tokenizing(monkeypatch):
    """The dry run must not prepare (tokenize) the data of these blueprints."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run prepared the data")
    monkeypatch.setattr(run_api, "prepare_data", refuse)


def hellaswag_file(path: Path) -> Path:
    path.write_text(json.dumps({"ctx": "the king", "endings": ["shall speak", "of love"], "label": 0}) + "\n")
    return path


def dry(tmp_path, capsys, *sets: str) -> tuple[int, str, str]:
    code = main([str(write_blueprint(tmp_path)), "--dry-run", *(x for s in sets for x in ("--set", s))])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert not (tmp_path / "runs").exists()            # a dry run writes no run folder
    return code, captured.out, captured.err


def test_a_sound_blueprint_passes_and_names_what_waits_for_the_data(tmp_path, capsys, no_tokenizing):
    hellaswag_file(tmp_path / "hs.jsonl")
    (tmp_path / "held_out.txt").write_text("the king shall speak\n")
    code, out, err = dry(tmp_path, capsys, "eval={hellaswag: {data: hs.jsonl}, text: {data: held_out.txt}}")
    assert code == 0, err
    assert "data not prepared yet (text source, byte tokenizer" in out
    assert out.rstrip().splitlines()[-1] == WAITING + "the train and val split sizes against model.context_length"


@pytest.mark.parametrize("setting, message", [
    ("data.source.path=/dev/zero", "error: data.source.path: '/dev/zero' is not a regular file (a character device)"),
    ("data.source.path=missing.txt", "error: data.source.path: 'missing.txt' does not exist"),
    ("data.source.path=empty_dir", "error: data.source.path: the directory {tmp}/empty_dir holds no files"),
    ("logging.runs_dir={tmp}/a_file", "error: logging.runs_dir: {tmp}/a_file is a regular file, not a folder; "
                                      "choose another with --set logging.runs_dir=PATH"),
    ("logging.runs_dir={tmp}/a_file/runs", "error: logging.runs_dir: {tmp}/a_file/runs cannot be created: "
                                           "{tmp}/a_file is a regular file, not a folder"),
    ("runtime.device=cuda:99", "error: runtime.profile 'cpu' cannot run on device 'cuda:99'"),
    ("runtime.profile=gpu", "error: runtime profile 'gpu' (device cuda) needs a CUDA GPU"),
    ("runtime.profile=auto & runtime.device=mps", "error: runtime.device is 'mps' but MPS is not available"),
    ("eval={hellaswag: {data: hs.jsonl}}", "error: eval.hellaswag.data: {tmp}/hs.jsonl does not exist"),
    ("eval={hellaswag: {data: empty_dir}}", "error: eval.hellaswag.data: {tmp}/empty_dir is not a regular file "
                                            "(a directory)"),
    ("eval={hellaswag: {data: corpus.txt}}", "error: {tmp}/corpus.txt: record 1 (line 1): not valid JSON"),
    ("eval={text: {data: /dev/zero}}", "error: eval.text.data: /dev/zero is not a regular file (a character device)"),
    ("sample.prompt=''", "error: sample.prompt '': the prompt is empty and the tokenizer has no end-of-text token"),
    ("model.vocab_size=100", "error: the byte tokenizer has 256 tokens but the model's vocab_size is 100"),
])
def test_what_training_would_refuse_fails_the_dry_run(tmp_path, capsys, no_tokenizing, setting, message):
    if "cuda" in setting and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "mps" in setting and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty_dir").mkdir()
    code, out, err = dry(tmp_path, capsys, *setting.replace("{tmp}", str(tmp_path)).split(" & "))
    assert code == 2
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert out.rstrip().splitlines()[-1].startswith(WAITING)
    if setting.startswith(("runtime", "logging", "eval", "sample")):
        assert "plan for 'tiny'" in out                # the plan is still printed, then the refusal


def test_every_problem_is_listed_at_once(tmp_path, capsys, no_tokenizing):
    code, _, err = dry(tmp_path, capsys, "data.source.path=/dev/zero", "sample.prompt=''",
                       "eval={text: {data: gone.txt}}")
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "error: 3 problems before training:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["data.source.path", "sample.prompt ''",
                                                                   "eval.text.data"]


def test_a_runs_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch, no_tokenizing):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    code, _, err = dry(tmp_path, capsys, f"logging.runs_dir={locked}/runs")
    assert code == 2
    assert err == (f"error: logging.runs_dir: {locked}/runs cannot be created: {locked} is not writable; "
                   "choose another with --set logging.runs_dir=PATH\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_runs_dir_is_refused(tmp_path, capsys, no_tokenizing):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = dry(tmp_path, capsys, f"logging.runs_dir={locked}")
    finally:
        locked.chmod(0o755)
    assert code == 2 and f"logging.runs_dir: {locked} is not writable" in err


def test_a_char_prompt_waits_for_the_data_and_is_checked_once_it_is_known(tmp_path, capsys):
    char = ["data.tokenizer={kind: char}", "sample.prompt=Zebra"]
    # an explicit vocab_size: the dry run tokenizes nothing, so the char vocabulary is not known yet
    code, out, err = dry(tmp_path, capsys, *char, "model.vocab_size=64")
    assert code == 0, err
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(WAITING) and "sample.prompt against the char tokenizer's vocabulary" in last
    assert "model.vocab_size against the char tokenizer's vocabulary" in last
    # vocab_size auto: the vocabulary comes from the corpus, so the data is prepared and the prompt checked
    code, out, err = dry(tmp_path, capsys, *char)
    assert code == 2
    assert "error: sample.prompt 'Zebra': character 'Z' (U+005A) is not in the char tokenizer's vocabulary" in err
    assert out.rstrip().splitlines()[-1] == WAITING + "none"
    # the explicit-vocabulary blueprint again: its data is now in the cache, so nothing waits and it fails
    code, out, err = dry(tmp_path, capsys, *char, "model.vocab_size=64")
    assert code == 2 and "sample.prompt 'Zebra': character 'Z'" in err
    assert out.rstrip().splitlines()[-1] == WAITING + "none"


def test_training_runs_the_same_checks_before_any_work(tmp_path, capsys, monkeypatch):
    """The real run refuses what the dry run refuses, before the data is prepared or a run folder made."""
    def refuse(*args, **kwargs):
        raise AssertionError("training prepared the data before its checks")
    monkeypatch.setattr(run_api.Pretraining, "prepare", refuse)
    (tmp_path / "a_file").write_text("")
    bp = write_blueprint(tmp_path)
    for setting in ("data.source.path=/dev/zero", f"logging.runs_dir={tmp_path}/a_file",
                    "eval={hellaswag: {data: missing.jsonl}}"):
        assert main([str(bp), "--dry-run", "--set", setting]) == 2
        dry_err = capsys.readouterr().err
        assert main([str(bp), "--set", setting]) == 2
        assert capsys.readouterr().err == dry_err
    assert run_dirs(tmp_path / "runs") == []


def test_preflight_of_a_sound_run_finds_nothing(tmp_path):
    hellaswag_file(tmp_path / "hs.jsonl")
    raw = tiny_raw(tmp_path)
    raw["eval"] = {"hellaswag": {"data": "hs.jsonl"}}
    bp = load_blueprint(write_blueprint(tmp_path, raw))
    result = run_api.Run(bp, tmp_path).preflight()
    assert result.problems == [] and result.tokenizer is not None and result.tokenizer.kind == "byte"
    assert result.waiting == ["the train and val split sizes against model.context_length"]
