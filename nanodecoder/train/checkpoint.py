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

A *weights-only* checkpoint (``weights_only: true`` in its manifest; e.g. imported
pretrained weights) holds ``model.safetensors`` alone: sampling, evaluation and
fine-tuning start from it, resuming refuses it (no optimizer state).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.download import sha256_of as _sha256
from .state_io import flatten, unflatten

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, STATE_JSON, MANIFEST = "model.safetensors", "state.safetensors", "state.json", "manifest.json"


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, or does not match the model."""


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
                  "propertyNames": {"pattern": "^[A-Za-z0-9_.-]+$"}},
    },
}
FULL_FILES = (MODEL_FILE, STATE_FILE, STATE_JSON)


def clean_name(name: str) -> str:
    """Strip torch.compile (``_orig_mod.``) and DDP (``module.``) prefixes, wherever they occur."""
    parts = [p for p in name.split(".") if p not in ("_orig_mod", "module")]
    return ".".join(parts)


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
    """Hash of names, shapes and dtypes: equal for the same architecture."""
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


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any],
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically (see the module docstring);
    ``model_state``: the full weights when they are not ``model.state_dict()`` (FSDP)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors, aliases = model_tensors(model, model_state)
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "nanodecoder", "aliases": json.dumps(aliases)})
    doc, state_tensors = flatten(state)
    save_file(state_tensors, tmp / STATE_FILE, metadata={"format": "nanodecoder"})
    (tmp / STATE_JSON).write_text(json.dumps(doc))
    return _seal(tmp, path, FULL_FILES, {"step": state.get("step"),
                                         "model_fingerprint": fingerprint(tensors, aliases)})


def save_weights_only(path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], source: str) -> Path:
    """Write a weights-only checkpoint (``tensors`` named as ``model_tensors`` names them, tied weights once)
    at ``path`` atomically; ``source``: where the weights come from (shown when resuming is refused)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "nanodecoder", "aliases": json.dumps(aliases)})
    return _seal(tmp, path, (MODEL_FILE,), {"step": None, "model_fingerprint": fingerprint(tensors, aliases),
                                            "weights_only": True, "source": source})


def _seal(tmp: Path, path: Path, names, fields: dict) -> Path:
    """Hash ``names`` in ``tmp``, write the manifest, fsync, and rename ``tmp`` to ``path``."""
    files = {}
    for name in names:
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "created": time.time(), **fields, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


def read_manifest(path: Path) -> dict:
    mf = Path(path) / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf} is corrupt: {e}") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')} is not supported "
                              f"(this nanodecoder reads format {FORMAT_VERSION})")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(top level)"
        raise CheckpointError(f"{mf} is not a valid checkpoint manifest: {where}: {error.message}; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}")
    required = (MODEL_FILE,) if manifest.get("weights_only") else FULL_FILES
    missing = [n for n in required if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{mf} does not list {', '.join(missing)}, so it cannot be verified; "
                              f"{_ANOTHER.format(parent=Path(path).parent)}")
    return manifest


_ANOTHER = "use another checkpoint of the run (--checkpoint NAME; the complete ones are folders in {parent})"


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest's sha256, and that no tensor file in the folder goes unlisted;
    return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    unlisted = sorted(f.name for f in path.glob("*.safetensors") if f.name not in manifest["files"])
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(unlisted)}, which its manifest does not list "
                              f"(so it cannot be verified); {_ANOTHER.format(parent=path.parent)}")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        digest = _sha256(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has sha256 {digest[:12]}..., "
                                  f"the manifest says {info['sha256'][:12]}...; "
                                  f"{_ANOTHER.format(parent=path.parent)}")
    return manifest


def _load_safetensors(f: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
        return load_file(str(f)), meta
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


def load_model_weights(model: nn.Module, path: Path, *, verify: bool = True, load=None) -> dict:
    """Load a checkpoint's weights into ``model`` (an unwrapped module); explain any mismatch.

    ``load(full_state_dict)`` replaces ``model.load_state_dict(..., strict=True)`` (sharded models)."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    tensors, meta = _load_safetensors(path / MODEL_FILE)
    aliases = json.loads(meta.get("aliases", "{}"))
    expected = model.state_dict()
    full = dict(tensors)
    full.update({alias: tensors[src] for alias, src in aliases.items() if src in tensors})
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    shapes = sorted(f"{n}: checkpoint {tuple(full[n].shape)} vs model {tuple(expected[n].shape)}"
                    for n in set(tensors) & set(expected) if full[n].shape != expected[n].shape)
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path} does not match this model's architecture:"]
        for label, items in (("missing in checkpoint", missing), ("not in model", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                lines.append(f"  {label}: {', '.join(items[:5])}{more}")
        lines.append("  (was the blueprint's model section changed since the run started?)")
        raise CheckpointError("\n".join(lines))
    if load is None:
        model.load_state_dict(full, strict=True)
    else:
        load(full)
    return manifest


def load_state(path: Path) -> dict[str, Any]:
    """The training state saved beside the weights (call after verification)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("weights_only"):
        raise CheckpointError(f"checkpoint {path} holds weights only ({manifest.get('source') or 'imported'}): "
                              "there is no optimizer or schedule state to resume; start a new run from it "
                              "with finetune: {from: RUN_DIR}")
    tensors, _ = _load_safetensors(path / STATE_FILE)
    try:
        doc = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / STATE_JSON}: {e}") from None
    return unflatten(doc, tensors)


class CheckpointManager:
    """Step checkpoints under one folder, with ``latest``/``best`` pointers and pruning."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def _pointer(self, which: str) -> Path | None:
        f = self.root / which
        if not f.is_file():
            return None
        target = self.root / f.read_text().strip()
        return target if (target / MANIFEST).is_file() else None

    def latest(self) -> Path | None:
        return self._pointer("latest")

    def best(self) -> Path | None:
        return self._pointer("best")

    def resolve(self, which: str) -> Path:
        """``latest``, ``best`` or a checkpoint folder name -> its complete folder."""
        target = self._pointer(which) if which in ("latest", "best") else self.root / which
        if target is None or not (target / MANIFEST).is_file():
            have = ", ".join(p.name for p in self.complete()) or "none"
            raise CheckpointError(f"no '{which}' checkpoint in {self.root} (complete checkpoints: {have})")
        return target

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / MANIFEST).is_file())

    def save(self, step: int, model: nn.Module, state: dict[str, Any], *, best: bool = False,
             model_state: dict[str, torch.Tensor] | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = self.root / self.name(step)
        if not (path / MANIFEST).is_file():  # the same step of the same run holds the same state
            if path.exists():
                shutil.rmtree(path)
            save_checkpoint(path, model, state, model_state)
        write_atomic_text(self.root / "latest", path.name)
        if best:
            write_atomic_text(self.root / "best", path.name)
        self.prune()
        return path

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
            best = self.root / "best"
            if best.is_file() and best.read_text().strip() in {p.name for p in later}:
                best.unlink()
        return [p.name for p in later]

    def save_weights(self, step: int, model: nn.Module, source: str) -> Path:
        """A weights-only checkpoint of ``model`` (see :func:`save_weights_only`) as ``latest``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = save_weights_only(self.root / self.name(step), *model_tensors(model), source=source)
        write_atomic_text(self.root / "latest", path.name)
        return path

    def prune(self) -> None:
        keep = set(p.name for p in self.complete()[-self.keep:])
        for pointer in (self.latest(), self.best()):
            if pointer is not None:
                keep.add(pointer.name)
        for p in self.complete():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
