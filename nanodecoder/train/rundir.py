"""The run directory ``<runs_dir>/<blueprint name>/<timestamp>/`` and what lives in it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointManager, write_atomic_text

try:
    import fcntl
except ImportError:                      # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:                      # POSIX
    msvcrt = None


class RunDirError(Exception):
    """A folder given as a run directory is not one."""


class RunLocked(RunDirError):
    """Another process is writing the run folder (training it, or importing into it)."""


class RunLock:
    """An exclusive lock on a run folder, held by the one process that writes it for as long as it does.

    An OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on ``<run>/.lock``: the OS drops it when the
    holder exits, however it exits (kill -9 included), so it is never stale.  The file stays behind and holds
    the last holder's PID, host and start time, named when another process is refused.  Readers (sampling,
    evaluation, export) take no lock.  Within one process the lock is not re-entrant: release it before taking
    it again."""

    FILE = ".lock"
    _WINDOWS_BYTE = 1 << 30              # msvcrt locks bytes that others then cannot read: lock one far away

    def __init__(self, path: str | Path, doing: str = "trained"):
        self.path = Path(path)
        self.doing = doing               # what the holder does, as the refusal names it
        self._fd: int | None = None

    @property
    def file(self) -> Path:
        return self.path / self.FILE

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLocked` naming its holder (never waits)."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot create the lock file {self.file} of the run folder: {e.strerror}; the run "
                              "folder must be writable") from None
        try:
            got = _try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if got is None:
            print(f"note: this platform has no file locks: nothing stops a second process from writing "
                  f"{self.path} at the same time", file=sys.stderr)
        elif not got:
            os.close(fd)
            raise RunLocked(self._refusal())
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "doing": self.doing}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def holder(self) -> dict[str, Any]:
        """What the lock file says of its last holder (empty while a new holder has not written it yet)."""
        try:
            info = json.loads(self.file.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _refusal(self) -> str:
        info = self.holder()
        pid = info.get("pid")
        who = f"process {pid}" if pid is not None else "another process"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        since = f" (since {info['since']})" if info.get("since") else ""
        return (f"{self.path} is being {info.get('doing', self.doing)} by {who}{since}; wait for it to finish or "
                "stop it first")


def _try_lock(fd: int) -> bool | None:
    """Lock ``fd`` without waiting: True when taken, False when another process holds it, None when this
    platform has no file locks."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        os.lseek(fd, RunLock._WINDOWS_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    return None


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, RunLock._WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def lock_for_training(path: str | Path, runtime) -> contextlib.AbstractContextManager:
    """The run folder's lock, taken by the process that writes it (rank 0 under torchrun; ranks share the
    folder and only rank 0 writes); every rank learns the outcome, so a refusal ends all of them with the same
    :class:`RunLocked`, after all of them left the process group together (one that exits still in it can abort
    in gloo's teardown).  Returns the held lock on rank 0, a no-op context elsewhere: leave it when training
    ends."""
    lock, refused = None, ""
    if runtime.is_main:
        try:
            lock = RunLock(path).acquire()
        except RunLocked as e:
            refused = str(e)
    refused = runtime.broadcast_text(refused)
    if refused:
        runtime.close()
        raise RunLocked(refused)
    return lock if lock is not None else contextlib.nullcontext()


class RunDir:
    BLUEPRINT, META, METRICS, SAMPLES = "blueprint.yaml", "run.json", "metrics.jsonl", "samples.txt"
    LOSS_PLOT, LOAD_PLOT, TOKENIZER, CKPT = "loss.png", "expert_load.png", "tokenizer", "ckpt"

    def __init__(self, path: Path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.checkpoints = CheckpointManager(self.path / self.CKPT, keep=keep_checkpoints)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, runs_dir: str | Path, name: str, blueprint_yaml: str, meta: dict[str, Any],
               keep_checkpoints: int = 2) -> "RunDir":
        """A new, empty run folder named by the current time (``-2``, ``-3``... if taken)."""
        parent = Path(runs_dir) / name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = parent / stamp, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                path = parent / f"{stamp}-{n}"
        run = cls(path, keep_checkpoints)
        (path / cls.BLUEPRINT).write_text(blueprint_yaml)
        run.write_meta({"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta})
        return run

    @classmethod
    def open(cls, path: str | Path, keep_checkpoints: int = 2) -> "RunDir":
        path = Path(path)
        if not (path / cls.BLUEPRINT).is_file():
            raise RunDirError(f"{path} is not a run directory (no {cls.BLUEPRINT}); pass the folder "
                              "<runs_dir>/<name>/<timestamp>/ that a training run created")
        return cls(path, keep_checkpoints)

    def meta(self) -> dict[str, Any]:
        f = self.path / self.META
        return json.loads(f.read_text()) if f.is_file() else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_atomic_text(self.path / self.META, json.dumps(meta, indent=2) + "\n")

    def update_meta(self, **changes: Any) -> None:
        self.write_meta({**self.meta(), **changes})
