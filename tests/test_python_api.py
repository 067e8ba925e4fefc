"""The Python API: ``nanodecoder.load`` on a trained run, and the README's example run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nanodecoder
from nanodecoder.finetune.spec import TemplateSpec
from nanodecoder.finetune.template import PromptTemplate, answer
from nanodecoder.train.checkpoint import CheckpointError
from nanodecoder.train.rundir import RunDirError

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- python-api example: tests/test_python_api.py runs this block -->"
EXAMPLE_RUN = '"runs/dense_gpt/20250101-120000"'


def readme_example() -> str:
    """The fenced python block right after the marker comment in README.md."""
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"README.md must hold the marker once: {MARKER}"
    found = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert found, "the marker must be followed by a ```python block"
    return found.group(1)


def test_the_readme_example_runs_and_gives_every_positions_logits(trained_run):
    code = readme_example()
    assert code.count(EXAMPLE_RUN) == 1
    ns: dict = {}
    exec(compile(code.replace(EXAMPLE_RUN, repr(str(trained_run))), "README.md (python-api)", "exec"), ns)
    model, tokenizer, ids, logits = ns["model"], ns["tokenizer"], ns["ids"], ns["logits"]
    assert not model.training
    T, V = len(tokenizer.encode("def ")), model.spec.vocab_size
    assert ids.shape == (1, T) and logits.shape == (1, T, V) and T > 1
    with torch.no_grad():
        want = model.logits(model.hidden(ids)[0])
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert ns["next_id"] == int(want[0, -1].argmax())
    assert isinstance(ns["text"], str) and ns["text"].startswith("def ") and len(ns["text"]) > len("def ")


def test_load_result_unpacks_as_the_pair_and_names_the_rest(trained_run):
    run = nanodecoder.load(trained_run)
    assert isinstance(run, nanodecoder.LoadedRun) and "load" in nanodecoder.__all__
    model, tokenizer = run
    assert model is run.model and tokenizer is run.tokenizer
    assert run.checkpoint.name == "step_000008" and run.spec.model == model.spec
    older = nanodecoder.load(str(trained_run), "step_000004")
    assert older.checkpoint.name == "step_000004"
    assert not torch.equal(older.model.head.weight, model.head.weight)     # the weights of that step
    assert nanodecoder.load(trained_run, "latest").checkpoint.name == "step_000008"


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.float16, "torch.float16", "float32"])
def test_load_casts_the_weights_and_keeps_the_buffers(trained_run, dtype):
    want = dtype if isinstance(dtype, torch.dtype) else \
        {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.float16": torch.float16,
         "float32": torch.float32}[dtype]
    ref, _ = nanodecoder.load(trained_run)
    model, tok = nanodecoder.load(trained_run, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert {b.dtype for b in model.buffers()} == {b.dtype for b in ref.buffers()}
    ids = torch.tensor([tok.encode("the king ")])
    with torch.no_grad():
        logits = model(ids).logits
        close = ref(ids).logits
    assert logits.dtype == want and logits.shape == close.shape
    torch.testing.assert_close(logits.float(), close, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int64, "fp33", 16])
def test_load_refuses_a_dtype_it_cannot_cast_to(trained_run, dtype):
    with pytest.raises(ValueError, match=r"is not a weights dtype: use one of float32, bfloat16, float16"):
        nanodecoder.load(trained_run, dtype=dtype)


def test_load_refuses_what_is_not_a_run_or_a_checkpoint(trained_run, tmp_path):
    with pytest.raises(RunDirError, match="is not a run directory"):
        nanodecoder.load(tmp_path)
    with pytest.raises(CheckpointError, match="no 'step_000999' checkpoint"):
        nanodecoder.load(trained_run, "step_000999")


def test_answer_runs_the_head_on_the_last_position_only(trained_run):
    """Instruction answers (finetune/template.py) read only the last position's logits, like generate."""
    model, tok = nanodecoder.load(trained_run)
    rows = []
    handle = model.head.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[1]))
    try:
        answer(model, PromptTemplate(TemplateSpec(end="###"), tok), "say hi", max_new_tokens=4)
    finally:
        handle.remove()
    assert rows and set(rows) == {1}
