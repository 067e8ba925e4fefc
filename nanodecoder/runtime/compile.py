"""torch.compile for the runtime: compile the model or each block in place, explain failures.

Modules are compiled in place (``nn.Module.compile``), so parameter names, state
dicts and checkpoints are unchanged and the data-parallel wrap comes after.
One process compiles the whole model (the most fusion: embeddings, norms, the
head and the loss too; the README gives the measured speed-up).
Under DDP / FSDP each transformer block is compiled on its own: a block's
backward is its own graph, so DDP's gradient all-reduce overlaps the backward of
the blocks before it, and FSDP2 shards the same blocks; identical blocks share
one compiled graph, so compile time does not grow with depth.  Shapes start static and become dynamic where they change
(``dynamic=None``); an MoE block's per-expert token counts, which change every
step, are captured as unbacked symbolic sizes (``capture_scalar_outputs``), so
one graph serves every routing instead of a recompile per step.  ``torch._grouped_mm`` rejects fp32
under compile, so ``dispatch: auto`` takes the expert loop there
(``components/moe_experts.py``).

Compilation is lazy: it happens in the first forward and backward, where
:func:`compile_errors` turns a compiler failure into a :class:`CompileFailed`
that names the way out.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..model.block import Block
from .profiles import RuntimeSetupError


class CompileFailed(RuntimeSetupError):
    """torch.compile could not compile the model (the message says how to run without it)."""


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (the units that are compiled and sharded)."""
    return [m for m in model.modules() if isinstance(m, Block)]


def compile_model(model: nn.Module, mode: str = "default", per_block: bool = False) -> list[nn.Module]:
    """Compile ``model`` in place, or each of its transformer blocks (``per_block``); returns the
    compiled modules."""
    if not torch._dynamo.is_dynamo_supported():
        raise CompileFailed("torch.compile is not supported with this Python / torch build; "
                            "run without compiling: --set runtime.compile=false")
    # data-dependent sizes (an MoE's tokens per expert, read with .tolist()) become unbacked
    # symbolic ints inside the graph instead of a graph break whose resumed code is specialised
    # on 0 / 1 / each new size: one graph for every routing instead of a recompile per step
    torch._dynamo.config.capture_scalar_outputs = True
    units = (transformer_blocks(model) if per_block else []) or [model]
    for unit in units:
        unit.compile(mode=None if mode == "default" else mode, dynamic=None)
    return units


def _compiler_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException
    return (TorchDynamoException,)


@contextlib.contextmanager
def compile_errors(enabled: bool = True) -> Iterator[None]:
    """Re-raise torch.compile failures inside the block as :class:`CompileFailed`."""
    if not enabled:
        yield
        return
    try:
        yield
    except _compiler_errors() as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[0] if lines else type(e).__name__
        raise CompileFailed(f"torch.compile failed ({type(e).__name__}: {first[:300]}); run without compiling: "
                            "--set runtime.compile=false (TORCH_LOGS=+dynamo shows the compiler's log)") from e


def graphs_compiled() -> int:
    """Distinct graphs torch.compile has produced in this process (grows on every recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside (sampling with a KV cache would recompile per position)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
