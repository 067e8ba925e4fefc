"""Checkpoints: safetensors + JSON, hashed, written atomically, never pickled.

Layout of ``<run_dir>/ckpt/``::

    step_000100/           one complete checkpoint
        model.safetensors  model weights (uncompiled names, tied weights once)
        state.safetensors  tensors of the training state (optimizer moments, RNG states)
        state.json         the rest of the training state, tensors referenced by key
        manifest.json      format version, step, model fingerprint, sha256 of each file
                           (validated against MANIFEST_SCHEMA before anything is read)
    latest                 name of the newest complete checkpoint (replaced atomically)
    best                   name of the checkpoint with the best validation loss

A checkpoint is written into ``.tmp-step_000100-<pid>/``, every file fsynced,
then renamed into place; only then is ``latest`` updated, and only then are old
checkpoints pruned.  A crash at any point leaves the previous checkpoint loadable;
leftover ``.tmp-*`` folders are ignored and removed by the next save.

A *sharded* checkpoint (``train.checkpoint_format: sharded``, the default of FSDP and expert-parallel runs)
holds ``shards/`` instead of ``model.safetensors`` and the optimizer tensors: distributed-checkpoint (DCP)
files that every rank writes its own part of (no rank gathers the full model or optimizer state; see
``runtime/sharded.py``), hashed in the manifest's ``shards`` like the other files.  It reshards: any number of
processes, any expert-parallel degree, resumes from it; sampling, evaluation, fine-tuning and export read its
weights in one process; ``python -m nanodecoder.ckpt consolidate`` turns it into a full checkpoint.

A *weights-only* checkpoint (``weights_only: true`` in its manifest; e.g. imported
pretrained weights) holds ``model.safetensors`` alone: sampling, evaluation and
fine-tuning start from it, resuming refuses it (no optimizer state).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.download import sha256_of as _sha256
from ..model import clean_name
from ..runtime import sharded
from .state_io import flatten, unflatten

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, STATE_JSON, MANIFEST = "model.safetensors", "state.safetensors", "state.json", "manifest.json"
SHARDS, SHARD_METADATA = "shards", ".metadata"      # a sharded checkpoint's DCP folder (runtime/sharded.py)
SHARD_MODEL, SHARD_OPTIM = sharded.MODEL, sharded.OPTIM    # its key prefixes


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, or does not match the model."""


#: a file or folder name inside a checkpoint folder: no path separator, no leading dot (so not ``..``)
NAME_PATTERN = "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
_HASHED = {"type": "object", "required": ["sha256", "bytes"],
           "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                          "bytes": {"type": "integer", "minimum": 0}}}
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format_version", "step", "model_fingerprint", "files"],
    "properties": {
        "format_version": {"type": "integer"},
        "step": {"type": ["integer", "null"], "minimum": 0},
        "created": {"type": "number"},
        "model_fingerprint": {"type": "string"},
        "weights_only": {"type": "boolean"},
        "source": {"type": "string"},
        "files": {"type": "object", "minProperties": 1, "additionalProperties": _HASHED,
                  "propertyNames": {"pattern": NAME_PATTERN}},
        "format": {"enum": ["full", "sharded"]},
        "shards": {"type": "object", "required": [SHARD_METADATA], "additionalProperties": _HASHED,
                   "propertyNames": {"pattern": r"^(\.metadata|__[0-9]+_[0-9]+\.distcp)$"}},
    },
    "if": {"required": ["format"], "properties": {"format": {"const": "sharded"}}},
    "then": {"required": ["shards"]},
}
FULL_FILES = (MODEL_FILE, STATE_FILE, STATE_JSON)
SHARDED_FILES = (STATE_FILE, STATE_JSON)
POINTERS = ("latest", "best")     # files in ckpt/ naming a checkpoint folder
MAX_MANIFEST_BYTES = 1 << 20        # a manifest (or a latest/best pointer) larger than this is not one


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` of parameters registered under several names (a tied head)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[clean_name(name)] = clean_name(first[id(p)])
        else:
            first[id(p)] = name
    return tied


def model_tensors(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Uncompiled state dict with each shared tensor once, and ``{alias: stored name}``.

    ``state_dict``: the model's full state when it is not ``model.state_dict()`` (gathered from
    shards, where a tied weight arrives as two copies)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    tied = tied_names(model) if state_dict is not None else {}
    for raw_name, t in (model.state_dict(keep_vars=False) if state_dict is None else state_dict).items():
        name = clean_name(raw_name)
        if tied.get(name) in tensors:
            aliases[name] = tied[name]
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def fingerprint(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> str:
    """Hash of names, shapes and dtypes: equal for the same architecture (``tensors`` may be meta or DTensors:
    only their global shapes and dtypes are read)."""
    desc = sorted((n, list(t.shape), str(t.dtype)) for n, t in tensors.items())
    return hashlib.sha256(json.dumps([desc, sorted(aliases.items())]).encode()).hexdigest()[:16]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fresh_tmp(path: Path) -> Path:
    """An empty temporary folder beside ``path``, renamed to it once complete (see :func:`_seal`)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


#: free bytes below which a failed write is put down to a full disk (torch's writers do not always say ENOSPC)
DISK_FULL_BYTES = 64 * 2 ** 20


def _says_disk_full(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(root: Path, step_name: str, error: BaseException, resume: str) -> CheckpointError | None:
    """A clear error for a checkpoint write that failed because the disk is full (None for any other failure):
    what failed, the space left, that the previous checkpoint is intact, and how to go on. Removes the failed
    write's temporary folder (every rank may call it)."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    if not (_says_disk_full(error) or (free is not None and free < DISK_FULL_BYTES)):
        return None
    for partial in root.glob(f".tmp-{step_name}-*"):
        shutil.rmtree(partial, ignore_errors=True)
    left = f"{free / 2 ** 20:,.1f} MiB free" if free is not None else "free space unknown"
    latest = root / "latest"
    kept = latest.read_text().strip() if latest.is_file() else None
    before = f"the previous checkpoint ({kept}) is intact" if kept else "no earlier checkpoint exists"
    return CheckpointError(f"writing checkpoint {step_name} in {root} failed: the disk is full ({left}); the "
                           f"partial write was removed and {before}; free some space (or set "
                           f"train.keep_checkpoints lower), then continue with: {resume}")


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any],
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically (see the module docstring);
    ``model_state``: the full weights when they are not ``model.state_dict()`` (FSDP)."""
    path = Path(path)
    tmp = _fresh_tmp(path)
    return _write_full(tmp, path, *model_tensors(model, model_state), state)


def _write_full(tmp: Path, path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                state: dict[str, Any]) -> Path:
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "nanodecoder", "aliases": json.dumps(aliases)})
    _write_state(tmp, state)
    return _seal(tmp, path, FULL_FILES, {"step": state.get("step"),
                                         "model_fingerprint": fingerprint(tensors, aliases)})


def _write_state(tmp: Path, state: dict[str, Any]) -> None:
    """The training state beside the weights: its tensors in safetensors, the rest in JSON."""
    doc, state_tensors = flatten(state)
    save_file(state_tensors, tmp / STATE_FILE, metadata={"format": "nanodecoder"})
    (tmp / STATE_JSON).write_text(json.dumps(doc))


def save_weights_only(path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], source: str) -> Path:
    """Write a weights-only checkpoint (``tensors`` named as ``model_tensors`` names them, tied weights once)
    at ``path`` atomically; ``source``: where the weights come from (shown when resuming is refused)."""
    path = Path(path)
    tmp = _fresh_tmp(path)
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "nanodecoder", "aliases": json.dumps(aliases)})
    return _seal(tmp, path, (MODEL_FILE,), {"step": None, "model_fingerprint": fingerprint(tensors, aliases),
                                            "weights_only": True, "source": source})


def _hashed(folder: Path, names) -> dict[str, dict]:
    out = {}
    for name in names:
        _fsync(folder / name)
        out[name] = {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
    return out


def _seal(tmp: Path, path: Path, names, fields: dict) -> Path:
    """Hash ``names`` in ``tmp``, write the manifest, fsync, and rename ``tmp`` to ``path``."""
    files = _hashed(tmp, names)
    if (tmp / SHARDS).is_dir():
        fields = {**fields, "format": "sharded",
                  "shards": _hashed(tmp / SHARDS, sorted(f.name for f in (tmp / SHARDS).iterdir()))}
        _fsync(tmp / SHARDS)
    manifest = {"format_version": FORMAT_VERSION, "created": time.time(), **fields, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


def inside(path: Path, root: Path) -> Path:
    """``path``, refused unless it stays inside ``root`` once every link is followed: a checkpoint never
    refers outside its folder (a ``..`` name, an absolute path, a symbolic link that leaves it)."""
    real, base = Path(path).resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise CheckpointError(f"{path} leads to {real}, outside {base}: a checkpoint is read only from inside its "
                              "run folder, so it is not followed; remove the link or name a checkpoint of the run")
    return Path(path)


def read_manifest(path: Path) -> dict:
    mf = inside(Path(path) / MANIFEST, path)
    if not mf.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST})")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{mf} is corrupt: {mf.stat().st_size:,} bytes, a manifest is a few hundred; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}")
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mf} is corrupt: {e}") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')} is not supported "
                              f"(this nanodecoder reads format {FORMAT_VERSION})")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(top level)"
        raise CheckpointError(f"{mf} is not a valid checkpoint manifest: {where}: {error.message}; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}")
    required = (MODEL_FILE,) if manifest.get("weights_only") else SHARDED_FILES if is_sharded(manifest) else FULL_FILES
    missing = [n for n in required if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{mf} does not list {', '.join(missing)}, so it cannot be verified; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}")
    return manifest


_ANOTHER = "use another checkpoint of the run (--checkpoint NAME; the complete ones are folders in {parent})"


def _check_files(path: Path, manifest: dict) -> None:
    """The cheap part of the verification: no unlisted tensor file; every listed one inside the folder, present,
    of the size the manifest says (a file that is not is never hashed, nor read)."""
    unlisted = sorted(f.name for f in path.glob("*.safetensors") if f.name not in manifest["files"])
    if (path / SHARDS).is_dir():
        unlisted += sorted(f"{SHARDS}/{f.name}" for f in inside(path / SHARDS, path).iterdir()
                           if f.name not in manifest.get("shards", {}))
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(unlisted)}, which its manifest does not list "
                              f"(so it cannot be verified); {_ANOTHER.format(parent=path.parent)}")
    for name, info in listed_files(manifest).items():
        f = inside(path / name, path)
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size:,} bytes, the manifest says "
                                  f"{info['bytes']:,}; {_ANOTHER.format(parent=path.parent)}")


def is_sharded(manifest: dict) -> bool:
    return manifest.get("format") == "sharded"


def listed_files(manifest: dict) -> dict[str, dict]:
    """Every file the manifest hashes, by its path relative to the checkpoint folder."""
    return {**manifest["files"], **{f"{SHARDS}/{n}": info for n, info in manifest.get("shards", {}).items()}}


def shard_metadata(path: Path) -> dict:
    """``{key: metadata}`` of a sharded checkpoint's tensors (global shapes, dtypes), from its index file."""
    try:
        return sharded.metadata(inside(Path(path) / SHARDS, path))
    except Exception as e:      # a damaged index: say which file, not torch's unpickling traceback
        raise CheckpointError(f"cannot read {Path(path) / SHARDS / SHARD_METADATA}: {str(e).splitlines()[0]}; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}") from None


def shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The names and global shapes of a sharded checkpoint's model tensors."""
    return {k[len(SHARD_MODEL):]: tuple(m.size) for k, m in shard_metadata(path).items() if k.startswith(SHARD_MODEL)}


def read_shards(path: Path, targets: dict[str, torch.Tensor], *, local: bool = False) -> None:
    """Fill ``targets`` (keys of the checkpoint, tensors or DTensors of this process's layout) in place from a
    sharded checkpoint; ``local``: this process alone, also inside a distributed job."""
    sharded.read(inside(Path(path) / SHARDS, path), targets, local=local)


def read_full_shards(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under ``prefix`` of a sharded checkpoint, in this process (named without the prefix)."""
    out = sharded.empty_like_saved(shard_metadata(path), prefix)
    read_shards(path, out, local=True)
    return {k[len(prefix):]: t for k, t in out.items()}


def consolidate(src: Path, out: Path) -> Path:
    """Write the sharded checkpoint ``src`` as a full one at ``out`` (atomically, in this one process, which
    holds the whole model and optimizer state for the time it takes): what a run of any layout resumes from and
    what tools that take safetensors read."""
    src, out = Path(src), Path(out)
    manifest = verify_checkpoint(src)
    if not is_sharded(manifest):
        raise CheckpointError(f"{src} is already a full checkpoint (model.safetensors); nothing to consolidate")
    if (out / MANIFEST).is_file() or (out.exists() and any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty; name a new folder with --out DIR")
    state = load_state(src)
    optim = read_full_shards(src, SHARD_OPTIM)
    names = state["optimizer_params"]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in optim.items():
        name, k = key.rsplit(".", 1)
        per_param.setdefault(names.index(name), {})[k] = t
    state["optimizer"] = {"state": dict(sorted(per_param.items())), "param_groups": state["optimizer"]["param_groups"]}
    tensors = read_full_shards(src, SHARD_MODEL)
    tmp = _fresh_tmp(out)
    if out.exists():
        out.rmdir()
    return _write_full(tmp, out, tensors, {}, state)


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest's size and sha256, and that no tensor file in the folder goes
    unlisted; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_files(path, manifest)
    for name, info in listed_files(manifest).items():
        f = path / name
        digest = _sha256(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has sha256 {digest[:12]}..., "
                                  f"the manifest says {info['sha256'][:12]}...; "
                                  f"{_ANOTHER.format(parent=path.parent)}")
    return manifest


def _header(f: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names and shapes of a safetensors file's tensors and its metadata, from its header alone (safetensors
    refuses a header whose shapes and offsets do not fit the file, before anything is allocated)."""
    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}, sf.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


def _aliases(f: Path, meta: dict[str, str]) -> dict[str, str]:
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: its 'aliases' metadata is not valid JSON ({e})") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{f}: its 'aliases' metadata is not an object of tensor names")
    return aliases


def load_model_weights(model: nn.Module, path: Path, *, verify: bool = True, load=None,
                       shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Load a checkpoint's weights into ``model`` (an unwrapped module); explain any mismatch.

    The names and shapes are checked from the file's header before its data is hashed or read, so a file that
    does not fit the model is refused at once, whatever size it claims.
    ``load(full_state_dict)`` replaces ``model.load_state_dict(..., strict=True)`` (sharded models), ``shapes``
    the names and shapes of the model's full state dict (those of ``model.state_dict()`` unless given: a model
    whose experts are split between processes holds slices)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        _check_files(path, manifest)
    if is_sharded(manifest):
        if verify:
            verify_checkpoint(path)
        check_architecture(path, shard_shapes(path), {}, model, shapes)
        full = read_full_shards(path, SHARD_MODEL)
        (model.load_state_dict(full, strict=True) if load is None else load(full))
        return manifest
    f = inside(path / MODEL_FILE, path)
    try:
        stored, meta = _header(f)
    except CheckpointError:
        if verify:
            verify_checkpoint(path)          # a damaged file: say so by its checksum
        raise
    aliases = _aliases(f, meta)
    check_architecture(path, stored, aliases, model, shapes)
    if verify:
        verify_checkpoint(path)
    tensors = _load_safetensors(f)
    full = dict(tensors)
    full.update({alias: tensors[src] for alias, src in aliases.items() if src in tensors})
    if load is None:
        model.load_state_dict(full, strict=True)
    else:
        load(full)
    return manifest


def check_architecture(path: Path, stored: dict, aliases: dict, model: nn.Module, shapes=None) -> None:
    """Raise CheckpointError listing how the checkpoint's ``stored`` names and shapes (``aliases``: names stored
    once for several) differ from the model's (``shapes``: its full state's, when not ``model.state_dict()``'s)."""
    shape_of = {**stored, **{alias: stored[src] for alias, src in aliases.items() if src in stored}}
    expected = shapes if shapes is not None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shape_of))
    unexpected = sorted(set(shape_of) - set(expected))
    shapes = sorted(f"{n}: checkpoint {shape_of[n]} vs model {tuple(expected[n])}"
                    for n in set(stored) & set(expected) if shape_of[n] != tuple(expected[n]))
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path} does not match this model's architecture:"]
        for label, items in (("missing in checkpoint", missing), ("not in model", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                lines.append(f"  {label}: {', '.join(items[:5])}{more}")
        lines.append("  (was the blueprint's model section changed since the run started?)")
        raise CheckpointError("\n".join(lines))


def load_state(path: Path) -> dict[str, Any]:
    """The training state saved beside the weights (call after verification)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("weights_only"):
        raise CheckpointError(f"checkpoint {path} holds weights only ({manifest.get('source') or 'imported'}): "
                              "there is no optimizer or schedule state to resume; start a new run from it "
                              "with finetune: {from: RUN_DIR}")
    tensors = _load_safetensors(inside(path / STATE_FILE, path))
    try:
        doc = json.loads(inside(path / STATE_JSON, path).read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / STATE_JSON}: {e}") from None
    return unflatten(doc, tensors)


@dataclass
class PendingSave:
    """A sharded checkpoint whose shards are being written in the background (``train.async_checkpoint``)."""
    wait: Callable[[], Any]               # returns once this rank's shards (and, on rank 0, the index) are written
    seal: Callable[[], Path | None]       # then: hashed, renamed into place, ``latest`` moved (rank 0)
    step: int                             # the step it holds

    def finish(self) -> Path | None:
        self.wait()
        return self.seal()


class CheckpointManager:
    """Step checkpoints under one folder, with ``latest``/``best`` pointers and pruning."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def _pointer_name(self, which: str) -> str | None:
        """The folder name the pointer file ``which`` holds (None: no pointer); a pointer that is a link out of
        ``root``, or holds anything but a folder name, is refused."""
        f = inside(self.root / which, self.root)
        if not f.is_file():
            return None
        with open(f, "rb") as h:
            raw = h.read(257)
        name = raw.decode("utf-8", "replace").strip()
        if len(raw) > 256 or not re.fullmatch(NAME_PATTERN, name):
            raise CheckpointError(f"{f} should hold the name of a checkpoint folder in {self.root}, not "
                                  f"{name[:60]!r}; rewrite it (e.g. {self.name(0)}) or pass --checkpoint NAME")
        return name

    def _pointer(self, which: str) -> Path | None:
        """The checkpoint folder the pointer ``which`` names (None: no pointer, or an incomplete folder)."""
        name = self._pointer_name(which)
        if name is None:
            return None
        target = inside(self.root / name, self.root)
        return target if (target / MANIFEST).is_file() else None

    def latest(self) -> Path | None:
        return self._pointer("latest")

    def best(self) -> Path | None:
        return self._pointer("best")

    def resolve(self, which: str) -> Path:
        """``latest``, ``best`` or a checkpoint folder name -> its complete folder."""
        target = self._pointer(which) if which in ("latest", "best") else inside(self.root / which, self.root)
        if target is None or not (target / MANIFEST).is_file():
            have = ", ".join(p.name for p in self.complete()) or "none"
            raise CheckpointError(f"no '{which}' checkpoint in {self.root} (complete checkpoints: {have})")
        return target

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        base = self.root.resolve()
        return sorted(p for p in self.root.glob("step_*")         # a link to a folder elsewhere is none of them
                      if base in p.resolve().parents and (p / MANIFEST).is_file())

    # ---- readers: sampling, evaluation, export, fine-tuning from the run, while it may be training ----------
    def for_reading(self, which: str) -> Path:
        """The checkpoint a reader (which holds no lock) loads for ``which``: as :meth:`resolve`, except that
        ``best`` falls back to ``latest`` where the run has no best one, and that a pointer naming a folder no
        longer complete (a trainer pruned it, or set it aside, since the pointer was written or read) gives the
        newest complete checkpoint."""
        if which not in POINTERS:
            return self.resolve(which)
        target = self._pointer(which)
        if target is None and which == "best" and not (self.root / which).is_file():
            target = self._pointer("latest")
            which = "latest"
        if target is None and (self.root / which).is_file():
            complete = self.complete()
            target = complete[-1] if complete else None
        return target if target is not None else self.resolve(which)

    def read_weights(self, model: nn.Module, which: str, path: Path | None = None, *, attempts: int = 5) -> Path:
        """Load checkpoint ``which`` (``path``: its :meth:`for_reading` answer, when the caller has it) into
        ``model``, verified, and return the folder read.  A trainer of the run may prune or set aside a
        ``latest``/``best`` checkpoint while it is read (its pointer then names another): the read moves to the
        one :meth:`for_reading` names now, up to ``attempts`` times."""
        path, tries = path or self.for_reading(which), 1
        while True:
            try:
                load_model_weights(model, path)
                return path
            except (CheckpointError, OSError) as e:
                now = self.for_reading(which) if which in POINTERS else path
                if now == path or tries >= attempts:
                    if isinstance(e, CheckpointError):
                        raise
                    raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
                path, tries = now, tries + 1

    def save(self, step: int, model: nn.Module, state: dict[str, Any], *, best: bool = False,
             model_state: dict[str, torch.Tensor] | None = None) -> Path:
        path = self._to_write(step)
        if path is not None:
            save_checkpoint(path, model, state, model_state)
        return self._point(step, best)

    def _to_write(self, step: int) -> Path | None:
        """Before saving ``step``: stale temporary folders removed; the folder to write, or None when a complete
        checkpoint of that step is there (the same step of the same run holds the same state)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = self.root / self.name(step)
        if (path / MANIFEST).is_file():
            return None
        if path.exists():
            shutil.rmtree(path)
        return path

    def _point(self, step: int, best: bool) -> Path:
        """After saving ``step``: ``latest`` (and ``best``) name it, old checkpoints are pruned."""
        path = self.root / self.name(step)
        write_atomic_text(self.root / "latest", path.name)
        if best:
            write_atomic_text(self.root / "best", path.name)
        self.prune()
        return path

    def save_sharded(self, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor], *, main: bool,
                     agree, best: bool = False, background=None) -> "Path | None | PendingSave":
        """A sharded checkpoint of ``step`` (every rank calls this, ``tensors`` being its own part; see
        ``runtime/sharded.py``): rank 0 names the temporary folder (``agree(text)`` hands its text to every
        rank), every rank writes its shards there, then rank 0 writes the training state, hashes it all, renames
        the folder into place and moves the pointers.  Returns the folder on rank 0, None elsewhere.

        ``background(tensors, folder)``: starts writing the shards (once it returns, the tensors may change) and
        returns a wait(); the checkpoint is then a :class:`PendingSave` that hashes, renames and points once they
        are written (``finish()``), so training goes on meanwhile and a crash before that leaves the previous
        checkpoint as ``latest``."""
        name = ""
        if main and (path := self._to_write(step)) is not None:
            tmp = _fresh_tmp(path)
            (tmp / SHARDS).mkdir()
            name = tmp.name
        name = agree(name)
        if not name:
            return self._point(step, best) if main else None
        folder = self.root / name
        if main:        # the state of this step, written now: training changes it from the next step on
            _write_state(folder, state)
            model = {k: t for k, t in tensors.items() if k.startswith(SHARD_MODEL)}
            fields = {"step": state.get("step"), "model_fingerprint": fingerprint(model, {})}

        def seal() -> Path | None:
            if not main:
                return None
            _seal(folder, path, SHARDED_FILES, fields)
            return self._point(step, best)
        if background is None:
            sharded.write(tensors, folder / SHARDS)
            return seal()
        return PendingSave(background(tensors, folder / SHARDS), seal, step)

    def set_aside_after(self, path: Path) -> list[str]:
        """Resuming from ``path`` when later checkpoints exist: move those into ``superseded/`` (kept, never
        pruned or resumed from) and point ``latest`` at ``path``; returns the names moved."""
        later = [p for p in self.complete() if p.name > Path(path).name]
        if later:
            aside = self.root / "superseded"
            aside.mkdir(exist_ok=True)
            for p in later:
                target = aside / p.name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(p, target)
            write_atomic_text(self.root / "latest", Path(path).name)
            if self._pointer_name("best") in {p.name for p in later}:
                (self.root / "best").unlink()
        return [p.name for p in later]

    def save_weights(self, step: int, model: nn.Module, source: str) -> Path:
        """A weights-only checkpoint of ``model`` (see :func:`save_weights_only`) as ``latest``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = save_weights_only(self.root / self.name(step), *model_tensors(model), source=source)
        write_atomic_text(self.root / "latest", path.name)
        return path

    def prune(self) -> None:
        keep = set(p.name for p in self.complete()[-self.keep:])
        for which in ("latest", "best"):
            try:
                pointer = self._pointer(which)
            except CheckpointError:          # a pointer that is refused keeps nothing; saving goes on
                continue
            if pointer is not None:
                keep.add(pointer.name)
        for p in self.complete():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
