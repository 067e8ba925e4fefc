"""Weights & Biases: start a run for ``logging.wandb`` (disabled | offline | online).

* ``disabled``: nothing is imported or started.
* ``offline``: the run is written under ``<run_dir>/wandb/`` with no network
  access (git, code, console and system-stats capture are off); upload later
  with ``wandb sync <run_dir>/wandb/offline-run-*``.
* ``online``: needs credentials (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``
  or a netrc entry from ``wandb login``); without them :class:`WandbError` is
  raised at once instead of prompting, and ``init_timeout`` bounds the wait for
  the server.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class WandbError(Exception):
    """W&B cannot be used as configured."""


DEFAULT_HOST = "https://api.wandb.ai"
INIT_TIMEOUT_S = 90


def _netrc_has(host: str) -> bool:
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else \
        [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in paths:
        try:
            if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    return False


def has_credentials(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or "api.wandb.ai"
    return _netrc_has(host)


def preflight(spec) -> None:
    """Fail fast (before any data or model work) when ``online`` has no credentials."""
    if spec.mode == "online" and not has_credentials():
        raise WandbError("logging.wandb.mode is 'online' but no W&B credentials were found "
                         "(set WANDB_API_KEY or run `wandb login`); or set logging.wandb.mode: offline "
                         "to log locally and `wandb sync` later")


def start_wandb(spec, run_dir: Path, config: dict[str, Any], default_name: str,
                run_id: str | None = None):
    """Start (or, with ``run_id``, resume) a W&B run; None when disabled."""
    if spec.mode == "disabled":
        return None
    preflight(spec)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
    try:
        import wandb
    except ImportError:
        raise WandbError("logging.wandb.mode is set but the wandb package is not installed "
                         "(pip install wandb), or set logging.wandb.mode: disabled") from None
    settings = wandb.Settings(silent=True, disable_git=True, disable_code=True, save_code=False,
                              console="off", x_disable_stats=True, x_disable_meta=True,
                              init_timeout=INIT_TIMEOUT_S)
    try:
        return wandb.init(mode=spec.mode, dir=str(run_dir), project=spec.project, entity=spec.entity,
                          name=spec.name or default_name, tags=list(spec.tags), config=config,
                          id=run_id, resume="allow" if run_id else None, settings=settings)
    except Exception as e:  # wandb raises several types (CommError, UsageError, timeouts)
        raise WandbError(f"could not start the W&B run ({spec.mode}): {e}") from None


def finish_wandb(run, summary: dict[str, Any], exit_code: int) -> None:
    """Write ``summary``, finish the run and wait for W&B's service to write everything out: ``run.finish()``
    alone can return before an offline run's ``.wandb`` file holds its records (seen with wandb 0.31: the file
    still only its 7-byte header when the command returned, complete a moment later)."""
    import wandb
    run.summary.update(summary)
    run.finish(exit_code=exit_code)
    wandb.teardown()
