"""Runtime profiles as data: ``blueprints/profiles/<name>.yaml`` + the blueprint's overrides.

A blueprint's ``runtime`` section (:class:`RuntimeSpec`) names a profile and
may override any of its fields; ``--profile NAME`` and ``--set runtime.X=...``
change the same keys.  :func:`resolve_profile` loads the profile file,
validates it against ``schemas/profile.schema.json`` (the blueprint loader's
YAML reader, duplicate-key checks and messages), applies the overrides and
returns a complete :class:`Profile`.  Nothing here looks at the machine except
``auto``, which becomes ``gpu`` when CUDA is available and ``cpu`` otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..resources import blueprints_dir

PROFILE_SCHEMA = "profile.schema.json"
AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16", "mixed")


class RuntimeSetupError(RuntimeError):
    """The runtime cannot be set up as asked on this machine (the message says what to use instead)."""


@dataclass(frozen=True)
class Profile:
    """A complete runtime profile (every field of ``schemas/profile.schema.json``)."""
    name: str
    description: str
    device: str = "auto"
    precision: str = "fp32"
    tf32: bool = False
    compile: bool = False
    compile_mode: str = "default"
    data_parallel: str = "ddp"
    threads: int | None = None
    peak_flops: float | None = None
    timeout_s: int = 900
    cache_host_memory: bool = False
    overridden: tuple[str, ...] = ()      # fields the blueprint / --set changed

    def summary(self) -> str:
        """``device cuda, precision mixed, tf32, compile, ddp`` (with ``*`` on overridden fields)."""
        def mark(field: str, text: str) -> str:
            return text + ("*" if field in self.overridden else "")
        parts = [mark("device", f"device {self.device}"), mark("precision", f"precision {self.precision}"),
                 mark("tf32", "TF32 on" if self.tf32 else "TF32 off"),
                 mark("compile", f"compile ({self.compile_mode})" if self.compile else "eager"),
                 mark("data_parallel", f"{self.data_parallel} under torchrun")]
        if self.threads:
            parts.append(mark("threads", f"{self.threads} threads"))
        if self.peak_flops:
            parts.append(mark("peak_flops", f"peak {self.peak_flops:.3g} FLOP/s"))
        if self.cache_host_memory:
            parts.append(mark("cache_host_memory", "host memory cached"))
        return ", ".join(parts)


SETTINGS = tuple(f.name for f in dataclasses.fields(Profile) if f.name not in ("name", "description", "overridden"))


@dataclass(frozen=True)
class RuntimeSpec:
    """The blueprint's ``runtime`` section: a profile name and optional overrides (None: the profile's)."""
    profile: str = AUTO
    device: str | None = None
    precision: str | None = None
    tf32: bool | None = None
    compile: bool | None = None
    compile_mode: str | None = None
    data_parallel: str | None = None
    threads: int | None = None
    peak_flops: float | None = None
    timeout_s: int | None = None
    cache_host_memory: bool | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "RuntimeSpec":
        return cls(**dict(raw or {}))

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}


def profiles_dir() -> Path:
    return blueprints_dir() / "profiles"


def available_profiles() -> list[str]:
    """Names of the shipped profiles (``auto`` besides them)."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def _validate(raw: Any, lines: dict, shown: str) -> list:
    from ..config.errors import Problem
    from ..config.loader import dotted, locate
    from ..config.messages import explain
    from ..config.schema import prepared
    from ..config.validate import without_follow_ons
    validator, files = prepared(None, root=PROFILE_SCHEMA)
    problems = []
    for err in without_follow_ons(list(validator.iter_errors(raw))):
        for path, message in explain(err, files):
            file, line = locate(lines, path, shown)
            problems.append(Problem(file, dotted(path), line, message))
    return problems


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict[str, Any]:
    from ..config.errors import BlueprintError, Problem, sort_problems
    from ..config.loader import display, parse_yaml
    shown = display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BlueprintError([Problem(shown, "", None, f"cannot read the runtime profile: {e}")]) from None
    raw, lines = parse_yaml(text, shown)
    problems = _validate(raw, lines, shown)
    if problems:
        raise BlueprintError(sort_problems(problems, [shown]))
    return raw


def load_profile(name: str, path: Path | None = None) -> Profile:
    """The profile ``name`` from ``blueprints/profiles/`` (or the file ``path``), validated.

    Raises ``BlueprintError`` (with file, key and line) for an invalid file and
    ``RuntimeSetupError`` for an unknown name.
    """
    path = Path(path) if path is not None else profiles_dir() / f"{name}.yaml"
    if not path.is_file():
        from ..registry import suggest
        names = available_profiles()
        raise RuntimeSetupError(f"unknown runtime profile '{name}'{suggest(name, names + [AUTO])} "
                                f"(available: {AUTO}, {', '.join(names)})")
    raw = dict(_load(path.resolve()))
    return Profile(name=name, **raw)


def auto_profile_name(device: str | None = None) -> str:
    """``auto``: the profile for an overridden device, else ``gpu`` with CUDA and ``cpu`` without."""
    if device not in (None, "auto"):
        return "cpu" if device == "cpu" else "gpu"
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_profile(spec: RuntimeSpec | None = None) -> Profile:
    """The blueprint's profile (``auto`` resolved on this machine) with its overrides applied."""
    spec = spec or RuntimeSpec()
    name = auto_profile_name(spec.device) if spec.profile == AUTO else spec.profile
    base = load_profile(name)
    overrides = spec.overrides()
    if base.device == "cpu" and overrides.get("device", "cpu") != "cpu":
        raise RuntimeSetupError(f"runtime.profile '{spec.profile}' cannot run on device '{overrides['device']}' "
                                "(the profile is CPU only); use --profile gpu (or gpu_mixed), or runtime.profile: auto")
    changed = tuple(k for k, v in overrides.items() if getattr(base, k) != v)
    profile = dataclasses.replace(base, **overrides, overridden=changed)
    if spec.profile == AUTO:
        profile = dataclasses.replace(profile, name=f"auto -> {name}")
    return profile
