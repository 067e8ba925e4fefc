"""What the command-line entry points share: the exit code of bad input and how it is printed."""
from __future__ import annotations

import sys

from ..config import BlueprintError, RegistryError
from ..data import DataError
from ..runtime import RuntimeSetupError
from ..train.checkpoint import CheckpointError
from ..train.rundir import RunDirError
from ..train.trainer import StateMismatch
from ..train.wandb_log import WandbError

EXIT_USAGE = 2


def fail(err: Exception, code: int = EXIT_USAGE) -> int:
    """Print a user-facing error (no traceback) and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return code


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: printed without a traceback, exit 2."""
    return (BlueprintError, DataError, RegistryError, RuntimeSetupError, CheckpointError, RunDirError,
            StateMismatch, WandbError)
