"""The ``train``, ``logging`` and ``sample`` sections, declared (each parameter once, here)."""
from __future__ import annotations

import re
from typing import Literal

from ..config.declare import Kind, choice, declared, param


@declared
class TrainSpec:
    """The training loop: length, batch, learning rate, evaluation, checkpoints and guard rails."""
    steps: int = param(1000, doc="Number of optimizer steps to train for (with time_budget: only until the "
                                 "count is fixed from the measured speed).", minimum=1)
    time_budget: str | None = param(
        None, doc="Wall-clock budget of training, e.g. 90s, 10m, 1h30m: the time of the optimizer steps from the "
                  "first one, compilation included, evaluation and checkpoints excluded. It overrides steps: after "
                  "budget_probe_steps the run measures its speed and fixes its total step count from what is left "
                  "(stored in checkpoints, so a resume is exact and the step-based schedule still anneals); while "
                  "the schedule does not yet depend on the count (wsd: until the decay starts; cosine: during "
                  "warm-up) it re-plans it every budget_probe_steps steps from the recent speed, so a drifting "
                  "machine still ends the decay in time; it stops early, with a checkpoint, should the clock run "
                  "out anyway. null: train for steps.",
        pattern=r"^([0-9]+(\.[0-9]+)?[hms])+$")
    budget_probe_steps: int = param(10, doc="With time_budget: steps timed before the step count is fixed (the "
                                            "first one, which may compile, is left out of the speed unless it is "
                                            "the only one); the schedule takes steps as its length until then.",
                                    minimum=1)
    batch_size: int = param(12, doc="Sequences per micro-batch, over all processes: a run launched with torchrun "
                                    "splits it evenly (batch_size / world_size each, refused when it does not "
                                    "divide), so the same blueprint trains on the same batches with 1 or N "
                                    "processes.", minimum=1)
    grad_accum: int = param(1, doc="Micro-batches accumulated per optimizer step (gradients are synchronised "
                                   "across processes on the last one only); tokens per step = batch_size * "
                                   "grad_accum * context_length.", minimum=1)
    lr: float = param(1e-3, doc="Peak learning rate; the schedule scales it (warm-up, decay). With optimizer kind "
                                "muon it is Muon's; a group with a peak of its own (the AdamW part's lr, a rule's "
                                "lr) is scaled in proportion.", exclusive_minimum=0)
    grad_clip: float | None = param(1.0, doc="Clip the global gradient norm to this value; 0 or null disables "
                                             "clipping.", minimum=0)
    eval_every: int = param(250, doc="Evaluate on the validation split every this many steps (and after the last "
                                     "step); 0 evaluates only after the last step.", minimum=0)
    eval_steps: int = param(20, doc="Validation batches per evaluation; the same batches at every evaluation.",
                            minimum=1)
    log_every: int = param(10, doc="Write a metrics row (and sync the loss from the device) every this many "
                                   "steps.", minimum=1)
    checkpoint_every: int = param(500, doc="Save a checkpoint every this many steps (and after the last step); 0 "
                                           "saves only after the last step.", minimum=0)
    keep_checkpoints: int = param(2, doc="How many of the most recent step checkpoints to keep (the best one is "
                                         "kept besides).", minimum=1)
    checkpoint_format: Literal["auto", "full", "sharded"] = param(
        "auto", doc="How checkpoints hold the model and optimizer: 'full' gathers every tensor into one set of "
                    "safetensors files (rank 0 writes them), 'sharded' lets every process write and read only its "
                    "own part (torch.distributed.checkpoint; it resumes on any number of processes, and "
                    "`python -m nanodecoder.ckpt consolidate` makes a full one of it); 'auto' is sharded for FSDP "
                    "and expert-parallel runs, full otherwise.")
    async_checkpoint: bool = param(False, doc="Write sharded checkpoints in the background "
                                              "(torch.distributed.checkpoint's async_save): training goes on once "
                                              "the tensors are copied to host memory, and the checkpoint is sealed "
                                              "(hashed, renamed into place, 'latest' moved) at the next save or the "
                                              "end of the run; a crash before that leaves the previous one as "
                                              "'latest'. Sharded checkpoints only: refused with checkpoint_format "
                                              "full; where 'auto' resolves to full (one process, DDP) they are "
                                              "written as usual.")
    keep_best: bool = param(True, doc="Save a checkpoint whenever the validation loss improves and keep it as "
                                      "'best'.")
    seed: int = param(1337, doc="Seed of model initialisation, dropout and batch sampling.", minimum=0)
    nan_policy: Literal["stop", "skip"] = param("stop", doc="What a non-finite loss does: 'stop' ends the run "
                                                            "naming the step, 'skip' drops that batch's update and "
                                                            "continues.")
    max_skipped_steps: int = param(10, doc="With nan_policy 'skip': stop anyway after this many skipped steps.",
                                   minimum=0)
    optimizer: Kind = choice("optimizer", default="adamw", doc="The optimizer (kind and its parameters).")
    schedule: Kind = choice("schedule", default="cosine", doc="The learning-rate schedule (kind and its "
                                                              "parameters).")

    @property
    def time_budget_s(self) -> float | None:
        """``time_budget`` in seconds (``1h30m`` -> 5400.0)."""
        if self.time_budget is None:
            return None
        unit = {"h": 3600.0, "m": 60.0, "s": 1.0}
        return sum(float(n) * unit[u] for n, u in re.findall(r"([0-9.]+)([hms])", self.time_budget))

    @property
    def provisional_steps(self) -> int:
        """The step count before a time budget fixes it."""
        return max(self.steps, self.budget_probe_steps) if self.time_budget else self.steps

    @property
    def clip(self) -> float | None:
        """The gradient-norm clip value, or None when clipping is off."""
        return self.grad_clip if self.grad_clip else None

    def tokens_per_step(self, context_length: int) -> int:
        """Tokens per optimizer step of the whole job (``batch_size`` is the global micro-batch)."""
        return self.batch_size * self.grad_accum * context_length

    def is_eval_step(self, step: int, total: int | None = None) -> bool:
        """Evaluate after optimizer step ``step`` (1-based) of ``total`` (default: steps)?"""
        return step == (total or self.steps) or (self.eval_every > 0 and step % self.eval_every == 0)

    def is_checkpoint_step(self, step: int, total: int | None = None) -> bool:
        return step == (total or self.steps) or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)

    def is_log_step(self, step: int, total: int | None = None) -> bool:
        return step == 1 or step == (total or self.steps) or step % self.log_every == 0


@declared
class WandbSpec:
    """Weights & Biases settings; the resolved blueprint is the run config, the metrics are those of metrics.jsonl."""
    mode: Literal["disabled", "offline", "online"] = param(
        "disabled", doc="'offline' writes under the run directory without network; 'online' needs WANDB_API_KEY "
                        "or a netrc login.")
    project: str = param("nanodecoder", doc="W&B project name.", min_length=1)
    entity: str | None = param(None, doc="W&B entity (user or team); null uses the account default.")
    name: str | None = param(None, doc="Run name; null uses <blueprint name>-<timestamp>.")
    tags: tuple[str, ...] = param((), doc="Tags attached to the W&B run.")


@declared
class LoggingSpec:
    """Where and how a run reports: run directory, progress bar, Weights & Biases."""
    runs_dir: str = param("runs", doc="Folder under which each run gets <runs_dir>/<blueprint name>/<timestamp>/ "
                                      "(relative paths are taken from the current directory).", min_length=1)
    progress: bool = param(True, doc="Show a tqdm progress bar (step, loss, tokens/s, ETA).")
    plots: bool = param(True, doc="Draw loss.png (and expert_load.png for MoE models) in the run directory at "
                                  "every evaluation.")
    empty_expert_warn_after: int = param(5, doc="Warn when an MoE expert received no tokens for this many "
                                                "consecutive log steps.", minimum=1)
    wandb: WandbSpec = param(factory=WandbSpec, doc="Weights & Biases logging.")


@declared
class SampleSpec:
    """The sample generated from the trained model at the end of training (written to samples.txt)."""
    enabled: bool = param(True, doc="Generate a sample at the end of training.")
    prompt: str = param("\n", doc="Text the sample starts from (an empty prompt starts from the end-of-text token "
                                  "when the tokenizer has one).")
    max_new_tokens: int = param(200, doc="Tokens to generate.", minimum=1)
    num_samples: int = param(1, doc="Number of samples to draw.", minimum=1)
    temperature: float = param(0.8, doc="Softmax temperature; 0 is greedy decoding.", minimum=0)
    top_k: int | None = param(200, doc="Keep only the k most likely tokens; null keeps all.", minimum=1)
    top_p: float | None = param(None, doc="Nucleus sampling: keep the smallest set of tokens whose probability "
                                          "reaches p; null disables.", exclusive_minimum=0, maximum=1)
    seed: int = param(1337, doc="Seed of the sampling random generator.", minimum=0)
