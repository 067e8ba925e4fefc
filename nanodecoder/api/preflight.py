"""What a training run refuses before step 1, checked in one place: at the start of training and by ``--dry-run``
(so the two cannot disagree; both are :class:`~nanodecoder.api.run.Run`'s, whose strategy checks its own data).

:func:`preflight` runs every check that needs no prepared data -- nothing is tokenized, downloaded or written:

* the runtime profile on this machine (``runtime.device: cuda:99``, CUDA or MPS absent, torchrun's variables);
* W&B: ``logging.wandb.mode: online`` without credentials;
* the run folder: ``logging.runs_dir`` (and ``<runs_dir>/<name>``) a folder this process can write (resuming:
  the run's own folder);
* the data source's files (``data.source.path`` missing, a device, an empty folder, unreadable), the fine-tuning
  data files, the ``eval:`` files (read and parsed: HellaSwag records, UTF-8 text);
* where the tokenizer is known without the corpus (``byte``): ``model.vocab_size``, ``sample.prompt`` and the
  ``eval.text`` file against it.

It collects every problem (:class:`PreflightError`, exit 2) and names the checks that wait for the prepared
data (the split sizes; the vocabulary, prompt and evaluation text of a tokenizer built from the corpus).
:func:`data_checks` runs those once the tokenizer is known: training calls it after preparing the data,
``--dry-run`` when the data is already prepared (in the cache) or had to be prepared for its vocabulary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError, Tokenizer
from ..data.sources import file_type
from ..eval import PeriodicEval, build_periodic_evals, load_items
from ..eval.hellaswag import SOURCE as HELLASWAG_SOURCE
from ..eval.text import read_text
from ..model.generate import encode_prompt
from ..model.plan import expert_layout_problem
from ..runtime import RuntimeSetupError, resolve_target
from ..train.rundir import RunDir
from ..train.wandb_log import WandbError
from ..train.wandb_log import preflight as wandb_preflight
from ..config.loader import blueprint_path


class PreflightError(Exception):
    """Problems found before training, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} problems before training:\n"
                         + "\n".join(f"  {p}" for p in self.problems))


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)   # checks that need the prepared data
    tokenizer: Tokenizer | None = None                   # the tokenizer, where known without the corpus
    text_waits: str | None = None   # the tokenizer an eval text waits for, where it is not known yet (None: none)

    def raise_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)

    def waiting_line(self) -> str:
        return "checks that wait for the prepared data: " + ("; ".join(self.waiting) or "none")


def preflight(spec, base_dir: Path, *, name: str, inputs, resume: RunDir | None = None, env=None) -> Preflight:
    """Every check of the module docstring for the RunSpec ``spec`` (``name``: the run's name; ``inputs``: the
    run's strategy, whose ``check_inputs(out, attempt)`` checks the data it learns from; ``resume``: the run
    folder being continued)."""
    out = Preflight()

    def attempt(check, *args):
        try:
            return check(*args)
        except (DataError, RuntimeSetupError, WandbError) as e:
            out.problems.append(str(e))
            return None

    attempt(_runtime, spec.runtime, env)
    attempt(_expert_layout, spec, env)
    attempt(_background_checkpoints, spec)
    attempt(wandb_preflight, spec.logging.wandb)
    if resume is None:
        runs, before = Path(spec.logging.runs_dir), len(out.problems)
        attempt(writable_folder, runs, "logging.runs_dir")
        if len(out.problems) == before:          # <runs_dir>/<name> only once runs_dir itself is fine
            attempt(writable_folder, runs / name, f"logging.runs_dir (<runs_dir>/{name})")
    else:
        attempt(writable_folder, Path(resume.path), "the run folder")
    inputs.check_inputs(out, attempt)      # the data a run learns from: its strategy's checks
    if spec.eval is not None:
        if spec.eval.hellaswag is not None:
            hs = spec.eval.hellaswag
            if attempt(regular_file, hs.data, base_dir, "eval.hellaswag.data", f"; HellaSwag data comes from "
                                                                                f"{HELLASWAG_SOURCE}"):
                attempt(load_items, blueprint_path(hs.data, base_dir), hs.limit)
        if spec.eval.text is not None:
            path = attempt(regular_file, spec.eval.text.data, base_dir, "eval.text.data")
            text = attempt(read_text, path) if path is not None else None
            if text is not None and out.tokenizer is not None:
                attempt(_encodes, out.tokenizer, text, path)
            elif text is not None and out.text_waits is not None:
                out.waiting.append(f"eval.text.data against {out.text_waits}")
    return out


def data_checks(spec, tokenizer: Tokenizer, base_dir: Path) -> list[PeriodicEval]:
    """The checks that need the run's tokenizer (once the data is prepared): the sample prompt, and the
    evaluations (their files read and encoded), returned ready to run."""
    if spec.sample.enabled:
        check_prompt(tokenizer, spec.sample.prompt)
    return build_periodic_evals(spec.eval, tokenizer, base_dir)


def check_prompt(tokenizer, prompt: str) -> None:
    """Refuse, before training, a final-sample prompt the tokenizer cannot encode."""
    try:
        encode_prompt(tokenizer, prompt)
    except (DataError, ValueError) as e:
        raise DataError(f"sample.prompt {prompt!r}: {e}") from None


def writable_folder(path: Path, key: str) -> None:
    """Raise DataError unless ``path`` is a folder this process may write into, or can be created."""
    fix = "; choose another with --set logging.runs_dir=PATH" if key.startswith("logging") else ""
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    where = f"{path}" if probe == path else f"{path} cannot be created: {probe}"
    if probe.is_dir():
        if not os.access(probe, os.W_OK | os.X_OK):
            raise DataError(f"{key}: {where} is not writable{fix}")
        return
    what = file_type(probe) if os.path.exists(probe) else "a broken link"
    raise DataError(f"{key}: {where} is {what}, not a folder{fix}")


def regular_file(raw: str, base_dir: Path, key: str, hint: str = "") -> Path:
    """The file a blueprint names (relative paths start at its folder), or DataError saying what is wrong."""
    path = blueprint_path(raw, base_dir)
    if not os.path.exists(path):
        raise DataError(f"{key}: {path} does not exist (relative paths start at the blueprint's folder){hint}")
    if not path.is_file():
        raise DataError(f"{key}: {path} is not a regular file ({file_type(path)}){hint}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key}: cannot read {path} (permission denied)")
    return path


def _runtime(spec, env) -> None:
    problem = resolve_target(spec, env).problem
    if problem is not None:
        raise RuntimeSetupError(problem)


def _background_checkpoints(spec) -> None:
    """``train.async_checkpoint`` writes sharded checkpoints in the background: refused with the full format
    (``auto`` resolving to full, e.g. a sharded run resumed on one process, writes them as usual)."""
    if spec.train.async_checkpoint and spec.train.checkpoint_format == "full":
        raise RuntimeSetupError("train.async_checkpoint: true writes sharded checkpoints in the background, and "
                                "train.checkpoint_format is full; set train.checkpoint_format: sharded (or auto), "
                                "or train.async_checkpoint: false")


def _expert_layout(spec, env) -> None:
    """``runtime.expert_parallel`` must divide every MoE layer's ``n_experts`` (the process count is the
    runtime check's)."""
    try:
        target = resolve_target(spec.runtime, env)
    except RuntimeSetupError:            # the runtime check names it
        return
    problem = expert_layout_problem(spec.model, target.profile.expert_parallel, target.launch.world_size)
    if target.problem is None and problem:
        raise RuntimeSetupError(f"runtime.expert_parallel: {problem}")


def _encodes(tokenizer, text: str, path: Path) -> None:
    try:
        tokenizer.encode(text)
    except (DataError, ValueError) as e:
        raise DataError(f"eval.text.data {path}: the {tokenizer.kind} tokenizer cannot encode it: {e}") from None
