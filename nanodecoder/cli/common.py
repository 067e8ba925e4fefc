"""What the command-line entry points share: their exit codes and how an error is printed.

Exit codes: 0 done; 2 bad input (blueprint, data, checkpoint, a profile this machine cannot run); 3 training
stopped at a non-finite loss (``train.loop.EXIT_NONFINITE``); 4 the run does not fit in memory
(``--dry-run``'s memory plan, and training's refusal before anything is built); 5 under torchrun, another rank
was lost during a collective (``train.loop.EXIT_RANK_LOST``); 128 + N a signal N
(checkpoint saved); 130 Ctrl-C during set-up.
"""
from __future__ import annotations

import sys

from ..config import BlueprintError, RegistryError
from ..data import DataError
from ..runtime import RuntimeSetupError
from ..train.checkpoint import CheckpointError
from ..train.optim import OptimizerSetupError
from ..train.rundir import RunDirError
from ..train.trainer import StateMismatch
from ..train.wandb_log import WandbError
from ..api.preflight import PreflightError

EXIT_USAGE = 2
EXIT_WONT_FIT = 4


def fail(err: Exception, code: int = EXIT_USAGE) -> int:
    """Print a user-facing error (no traceback) and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return code


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: printed without a traceback, exit 2."""
    return (BlueprintError, DataError, RegistryError, RuntimeSetupError, CheckpointError, RunDirError,
            StateMismatch, WandbError, OptimizerSetupError, PreflightError)
