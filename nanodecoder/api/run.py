"""One run of a blueprint on one object: prepare -> plan -> train.

    run = Run(bp, base_dir)        # the blueprint's RunSpec (built here, once) and the run's strategy
    run.dry_run()                  # --dry-run: the checks that need no prepared data, then the plan (an exit code)
    run.train()                    # the checks, the data, the memory check, the model, the loop (an exit code)

What differs between pre-training and fine-tuning is the run's *strategy*, chosen once here:
:class:`Pretraining` learns from token data (``data:``): the prepared shards supply the batches, the model is
built fresh and the validation loss is the evaluator; :class:`Finetuning` starts from a trained run
(``finetune:``): its task supplies the source weights (adapted), its batches and its evaluator.  Each strategy
checks its own inputs before step 1 (:func:`~nanodecoder.api.preflight.preflight`) and plans its own dry run.
The loop's hooks (``train/hooks.py``) log, evaluate, checkpoint, keep the time budget and run the periodic
evaluations.  The command line (``cli/run.py``) parses the arguments, loads the blueprint and calls this.
"""
from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from ..config import Blueprint, BlueprintError
from ..config.declare import to_yaml
from ..config.diff import differences
from ..config.loader import dotted
from ..data import (DataError, check_fits, check_source, check_vocab, find_prepared, load_tokenizer, prepare_data,
                    tokenizer_before_data, tokenizer_vocab_size)
from ..data.builtin import builtin_file, is_builtin
from ..finetune import dry_run as finetune_dry_run
from ..finetune import prepare_finetune
from ..finetune.source import open_source
from ..model import build_model
from ..model.plan import flops_per_token, param_report
from ..runtime import RuntimeSetupError, describe_plan, setup_runtime
from ..train.checkpoint import write_atomic_text
from ..train.hooks import standard_hooks
from ..train.loop import (ALLOW_ARCHITECTURE_CHANGE, TrainingLoop, architecture_changes, refuse_architecture_change,
                          resume_trainer)
from ..train.memory import WontFit, planned_check, refuse_if_too_big
from ..train.rundir import RunDir, RunLock, lock_for_training
from ..train.summary import start_summary
from ..train.trainer import Trainer, seed_everything
from ..train.wandb_log import start_wandb
from .blueprint import load_blueprint, run_spec
from .preflight import Preflight, check_prompt, data_checks, preflight, regular_file


def changed_keys(old, new) -> list[str]:
    """Dotted keys whose values differ between two resolved blueprints (an absent key equals a null one)."""
    return [dotted(d.path) for d in differences(old, new, missing=None)]


class Pretraining:
    """A run that learns from token data (``data:``): the prepared shards supply the batches, the model is built
    fresh, the evaluator is the validation loss over the val split."""

    checks_memory = True        # the memory plan is checked before anything is built

    def __init__(self, bp: Blueprint, spec, base_dir: Path):
        self.bp, self.spec, self.base_dir = bp, spec, base_dir

    def check_inputs(self, out: Preflight, attempt) -> None:
        """Preflight: the source's files, and where the tokenizer is known without the corpus (``byte``) the
        vocabulary and the sample prompt against it; what waits for the prepared data."""
        spec = self.spec
        if spec.data is None:
            out.text_waits = "the tokenizer"
            return
        attempt(check_source, spec.data, self.base_dir)
        out.tokenizer = attempt(tokenizer_before_data, spec.data)
        kind = spec.data.tokenizer.kind
        if out.tokenizer is not None:
            if spec.model.vocab_size != "auto":
                attempt(check_vocab, out.tokenizer, spec.model.vocab_size)
            if spec.sample.enabled:
                attempt(check_prompt, out.tokenizer, spec.sample.prompt)
        else:
            if spec.model.vocab_size != "auto":
                out.waiting.append(f"model.vocab_size against the {kind} tokenizer's vocabulary")
            if spec.sample.enabled:
                out.waiting.append(f"sample.prompt against the {kind} tokenizer's vocabulary")
        out.waiting.append("the train and val split sizes against model.context_length")
        out.text_waits = f"the {kind} tokenizer"

    def planned_model(self):
        """The model whose memory plan training checks before preparing the data (byte, bpe, tiktoken: the
        vocabulary is known without the corpus), as ``--dry-run`` plans it."""
        planned = self.spec.model
        if self.spec.data is not None and planned.vocab_size == "auto":
            try:
                planned = planned.with_vocab(tokenizer_vocab_size(self.spec.data))
            except DataError:       # e.g. tiktoken's file not cached: preparing the data says so, or finds it
                pass
        return planned

    def prepare(self, resume: RunDir | None = None):
        """``(prepared data, RunSpec)``: the data tokenized (cached) and the vocabulary resolved from it."""
        spec = self.spec
        if spec.data is None:
            raise BlueprintError([self.bp.problem(("data",), "a training run needs a 'data:' section (source and "
                                                             "tokenizer)")])
        prep = prepare_data(spec.data, base_dir=self.base_dir, progress=True)
        spec = spec.with_vocab(prep.tokenizer.vocab_size)
        check_fits(prep, spec.model.context_length, spec.model.vocab_size)
        return prep, spec

    def make_trainer(self, prep, spec, runtime) -> Trainer:
        """A fresh model on the runtime, the token sampler's batches, the validation-loss evaluator."""
        model = runtime.prepare_model(build_model(spec.model, device=runtime.build_device, seed=spec.train.seed))
        return Trainer(model, spec.train, runtime, prep, context_length=spec.model.context_length,
                       sampling=spec.data.sampling)

    @staticmethod
    def train_tokens(prep) -> int:
        return len(prep.train)

    def dry_run(self, pf: Preflight, resume: RunDir | None = None) -> int:
        """The plan.  The data is not tokenized: it is used when already prepared (then its checks run too), and
        prepared only where the model's vocabulary comes from the corpus (``char`` with ``vocab_size: auto``)."""
        spec, base_dir = self.spec, self.base_dir
        prep = None
        if spec.data is None and spec.model.vocab_size == "auto":
            self.prepare()                      # refuses: the vocabulary has nowhere to come from
        if spec.data is not None and not pf.problems:
            prep = find_prepared(spec.data, base_dir)
            if prep is None and spec.model.vocab_size == "auto" and tokenizer_vocab_size(spec.data) is None:
                print(f"the {spec.data.tokenizer.kind} tokenizer's vocabulary comes from the corpus: preparing the "
                      "data", file=sys.stderr)
                prep = prepare_data(spec.data, base_dir=base_dir, progress=True)
        if prep is not None:
            spec = spec.with_vocab(prep.tokenizer.vocab_size)
            try:
                check_fits(prep, spec.model.context_length, spec.model.vocab_size)
                data_checks(spec, prep.tokenizer, base_dir)
            except DataError as e:
                pf.problems.append(str(e))
            pf.waiting = []
        elif spec.data is not None:
            try:
                spec = spec.with_vocab(tokenizer_vocab_size(spec.data))
            except DataError as e:   # e.g. tiktoken's file not cached: a problem, but a fixed vocabulary still plans
                if spec.model.vocab_size == "auto":
                    raise
                pf.problems.append(str(e))
        check = None
        if spec.model.vocab_size != "auto":
            check = self.print_plan(prep, spec)
        print(pf.waiting_line())
        pf.raise_problems()
        if check is not None and check.fits is False:
            raise WontFit(f"the run does not fit in memory: {check.shortfall()}")
        return 0

    def print_plan(self, prep, spec):
        """The parameter table, the plan, the runtime plan and the memory plan; returns the memory check.

        All of it is arithmetic on the spec (``model.plan``): nothing is built, not even on the meta device, so an
        absurd size plans as fast as a small one and ends in "does not fit"."""
        report = param_report(spec.model)
        t = spec.train
        tokens_per_step = t.tokens_per_step(spec.model.context_length)
        print(report.table())
        if prep is not None:
            data = (f"{len(prep.train):,} train / {len(prep.val):,} val tokens ({prep.tokenizer.vocab_size:,}-token "
                    "vocabulary)")
        elif spec.data is not None:
            data = (f"data not prepared yet ({spec.data.source.kind} source, {spec.data.tokenizer.kind} tokenizer, "
                    f"{spec.model.vocab_size:,}-token model vocabulary)")
        else:
            data = "no data section: the architecture only (training needs one)"
        print(f"\nplan for '{self.bp.name}': {t.steps:,} steps x {tokens_per_step:,} tokens/step "
              f"({t.batch_size} x {spec.model.context_length} x {t.grad_accum} accum) = "
              f"{t.steps * tokens_per_step:,} tokens; {data}")
        print(f"optimizer {to_yaml(t.optimizer)}, lr {t.lr:g}, schedule {to_yaml(t.schedule)}")
        print(f"about {flops_per_token(spec.model) * t.steps * tokens_per_step:.3g} training FLOPs; "
              f"runs go to {spec.logging.runs_dir}/{self.bp.name}/<timestamp>/  (dry run: nothing trained)")
        try:
            print(describe_plan(spec.runtime))
            check = planned_check(spec.model, t, spec.runtime)
        except RuntimeSetupError as e:       # the profile itself is refused (preflight reports it)
            print(f"runtime: no plan: {e}")
            return None
        print(check.report())
        return check


class Finetuning:
    """A run that starts from a trained one (``finetune:``): the task (one class per ``finetune.kind``) supplies
    the model (the source run's weights, adapted), its batches and its evaluator; the tokenizer is the source
    run's."""

    checks_memory = False

    def __init__(self, bp: Blueprint, spec, base_dir: Path):
        self.bp, self.spec, self.base_dir = bp, spec, base_dir

    def check_inputs(self, out: Preflight, attempt) -> None:
        """Preflight: the data files (read, not tokenized, by both paths); the source run is opened when the task
        is prepared."""
        ft = self.spec.finetune
        for key in ("data", "val_data"):
            raw = getattr(ft, key, None)
            if raw and is_builtin(raw):          # a file shipped with the package (data/builtin.py)
                attempt(builtin_file, raw, ft.impl.builtin_data, f"finetune.{key}")
            elif raw:
                attempt(regular_file, raw, self.base_dir, f"finetune.{key}")

    def planned_model(self):
        return None             # the vocabulary is the source run's: known once the task is prepared

    def prepare(self, resume: RunDir | None = None):
        """``(task, RunSpec)``: the source run opened with its saved blueprint's spec (fresh runs; resuming, the
        run's own tokenizer), its checks against this blueprint, the task's data read and encoded."""
        source = None
        if resume is None:
            ft = self.spec.finetune
            source = open_source(ft.source, self.base_dir, ft.from_checkpoint)
            source.spec = run_spec(load_blueprint(source.run / RunDir.BLUEPRINT), source.tokenizer.vocab_size)
            tokenizer = source.tokenizer
        else:
            tokenizer = load_tokenizer(resume / RunDir.TOKENIZER)
        return prepare_finetune(self.bp, self.spec.with_vocab(tokenizer.vocab_size), self.base_dir, tokenizer,
                                source)

    @staticmethod
    def make_trainer(task, spec, runtime) -> Trainer:
        return task.make_trainer(spec, runtime)

    @staticmethod
    def train_tokens(task) -> int:
        return task.train_tokens

    def dry_run(self, pf: Preflight, resume: RunDir | None = None) -> int:
        """The source run and the records read (nothing tokenized), the parameter table and the plan."""
        pf.raise_problems()
        task, spec = self.prepare(resume)
        data_checks(spec, task.tokenizer, self.base_dir)
        code = finetune_dry_run(self.bp, task, spec)
        print(pf.waiting_line())
        return code


class Run:
    """One invocation of a blueprint: ``dry_run()`` (prepare + plan) or ``train()`` (prepare + plan + train).

    ``base_dir``: where the blueprint's relative paths start.  Resuming: ``resume`` the run folder, ``saved`` its
    saved blueprint (a raw mapping, to list what changed), ``checkpoint`` the one to continue from; ``meta``:
    what ``run.json`` records about the invocation (command line, version)."""

    def __init__(self, bp: Blueprint, base_dir: Path, *, resume: RunDir | None = None, saved: dict | None = None,
                 checkpoint: str = "latest", meta: dict | None = None):
        self.bp, self.base_dir = bp, base_dir
        self.resume, self.saved, self.checkpoint = resume, saved, checkpoint
        self.meta = dict(meta or {})
        self.spec = run_spec(bp)               # the RunSpec of this invocation, built once
        self.strategy = (Pretraining if self.spec.finetune is None else Finetuning)(bp, self.spec, base_dir)
        self.architecture: list[str] = []      # resuming: model changes allowed by --allow-architecture-change

    # ---- prepare ------------------------------------------------------------------------------------
    def check_architecture(self, allow: bool = False) -> list[str]:
        """Resuming: the changes to the model section (defaults filled in, ``vocab_size: auto`` resolved with the
        run's tokenizer) between the run's saved blueprint and this one; refused unless ``allow``."""
        try:
            vocab = load_tokenizer(self.resume / RunDir.TOKENIZER).vocab_size
        except DataError:
            vocab = None
        changes = architecture_changes(to_yaml(run_spec(self.saved, vocab).model),
                                       to_yaml(self.spec.with_vocab(vocab).model))
        refuse_architecture_change(changes, self.resume, allow)
        self.architecture = changes
        return changes

    def preflight(self, env=None) -> Preflight:
        """Every check that needs no prepared data (``api/preflight.py``), the strategy's inputs included."""
        return preflight(self.spec, self.base_dir, name=self.bp.name, inputs=self.strategy, resume=self.resume,
                         env=env)

    def prepare(self):
        """``(prepared data or task, RunSpec with the vocabulary resolved)``."""
        return self.strategy.prepare(self.resume)

    # ---- plan -----------------------------------------------------------------------------------------
    def dry_run(self) -> int:
        """Training's checks that need no prepared data, then the strategy's plan; the checks' problems are
        raised after the plan (:class:`~nanodecoder.api.preflight.PreflightError`), a plan that does not fit
        raises :class:`WontFit`."""
        return self.strategy.dry_run(self.preflight(), self.resume)

    # ---- train ----------------------------------------------------------------------------------------
    def train(self) -> int:
        """The run folder is locked (:class:`RunLock`) from when this process first changes it to the end: a
        second trainer of the same folder is refused."""
        with ExitStack() as held:
            return self._train(held)

    def _train(self, held: ExitStack) -> int:
        bp, spec, strategy, run = self.bp, self.spec, self.strategy, self.resume
        self.preflight().raise_problems()                # what shows before any data work
        runtime = setup_runtime(spec.runtime)
        if run is not None:      # resuming: before the data, the model or anything in the folder is touched
            held.enter_context(lock_for_training(run.path, runtime))
        planned = strategy.planned_model()        # the memory plan before the data is prepared, as --dry-run's
        checked = planned is not None and planned.vocab_size != "auto"
        memory = refuse_if_too_big(planned, spec.train, runtime) if checked else None
        prep, spec = strategy.prepare(run)
        if strategy.checks_memory and not checked:
            memory = refuse_if_too_big(spec.model, spec.train, runtime)
        evals = data_checks(spec, prep.tokenizer, self.base_dir)   # the prompt and eval files against the tokenizer
        seed_everything(spec.train.seed)
        runtime.note_memory_before_model()
        trainer = strategy.make_trainer(prep, spec, runtime)
        run, resumed_from = self._run_folder(run, spec, runtime, prep, trainer, held)
        meta = run.meta()
        wandb_run = start_wandb(spec.logging.wandb, run.path, config=bp.raw,
                                default_name=f"{bp.name}-{run.path.name}",
                                run_id=meta.get("wandb_id")) if runtime.is_main else None
        if wandb_run is not None and meta.get("wandb_id") != wandb_run.id:
            run.update_meta(wandb_id=wandb_run.id)
        hooks = standard_hooks(trainer, logging=spec.logging, sample=spec.sample, tokenizer=prep.tokenizer,
                               name=bp.name, evals=evals)
        loop = TrainingLoop(trainer, run, hooks, logging=spec.logging, wandb_run=wandb_run,
                            planned_memory=memory.needed if memory is not None else None)
        result = loop(start_summary(name=bp.name, run_dir=run, params=runtime.count_params(trainer.raw_model),
                                    trainer=trainer, runtime=runtime, train_tokens=strategy.train_tokens(prep),
                                    resumed_from=str(resumed_from) if resumed_from else None))
        exit_code = result.exit_code
        # The DDP / FSDP wrapper holds the process group and so gloo's worker threads: drop it first,
        # so that leaving the group stops them now instead of during the interpreter's teardown,
        # where a thread still holding tensors can abort the finished process (pytorch#179291).
        del trainer, result, evals, loop, hooks
        runtime.close()   # leave the process group together (torchrun)
        return exit_code

    def _run_folder(self, run: RunDir | None, spec, runtime, prep, trainer: Trainer, held: ExitStack):
        """``(run folder, checkpoint resumed from or None)``: a new folder (rank 0 creates it, locks it, saves the
        tokenizer, and tells the others its name), or the resumed one with the checkpoint loaded and what changed
        recorded."""
        bp = self.bp
        if run is None:
            if runtime.is_main:
                run = RunDir.create(spec.logging.runs_dir, bp.name, bp.to_yaml(),
                                    {"blueprint": str(Path(bp.path).resolve()), "base_dir": str(self.base_dir),
                                     **self.meta}, keep_checkpoints=spec.train.keep_checkpoints)
                held.enter_context(RunLock(run.path))
                prep.tokenizer.save(run / RunDir.TOKENIZER)
            return RunDir(runtime.broadcast_text(str(run.path) if runtime.is_main else ""),
                          keep_checkpoints=spec.train.keep_checkpoints), None
        run = RunDir(run.path, keep_checkpoints=spec.train.keep_checkpoints)
        resumed_from = resume_trainer(trainer, run, self.checkpoint)
        changed = [k for k in changed_keys(self.saved, bp.raw) if k.split(".")[0] != "model"]
        if changed and runtime.is_main:
            print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
        if self.architecture and runtime.is_main:
            print(f"note: resuming with a changed architecture ({ALLOW_ARCHITECTURE_CHANGE}): "
                  f"{'; '.join(self.architecture)}", file=sys.stderr)
        changed += [c.split(":")[0] for c in self.architecture]
        if changed and runtime.is_main:
            write_atomic_text(run / RunDir.BLUEPRINT, bp.to_yaml())     # a reader sees the old one or the new
            run.update_meta(changed_on_resume=run.meta().get("changed_on_resume", []) + changed)
        return run, resumed_from
