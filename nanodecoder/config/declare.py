"""Declarations: every blueprint parameter written once, as a dataclass field.

A section of the blueprint (``train``, ``model.block``, ...) or the parameters
of a registered kind (``mlp: {kind: swiglu, ...}``) are one frozen dataclass
whose fields say everything about their YAML keys::

    @declared
    class Spec(Kind):
        n_heads: int = param(doc="Query heads.", minimum=1)            # required: no default
        dropout: float = param(0.0, doc="Dropout on the output.", minimum=0, maximum=1)
        router: Kind = choice("router", default="topk", doc="The router.")   # a kind of another category
        expert_kind: str = kind_name("mlp", default="swiglu", doc="...")      # only the name of a kind
        d_model: int = context()                  # not in YAML: handed down by the section above

From these fields come the JSON Schema (:mod:`.schema`), the typed object
(:func:`build`) and the cross-field checks (a ``check()`` method of the class,
yielding ``(relative path, message)``; :data:`PARENT` in a path steps up one
level).  Derived values are properties of the class: computed in one place.

Context: a field declared with :func:`context` is filled from the values of
the enclosing sections (their own parameters, by name or by a dotted path
such as ``"block.attention.head_size"``), so a component's spec is complete
without a second, hand-written constructor.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Literal, Mapping

from .registry import RegistryError

PARENT = ".."          # in a check's path: the enclosing mapping


def declared(cls=None, /):
    """Make ``cls`` a declaration: a frozen, keyword-only dataclass."""
    def wrap(c):
        return dataclass(frozen=True, kw_only=True)(c)
    return wrap if cls is None else wrap(cls)


@dataclass(frozen=True)
class Param:
    """What one field declares beyond its name, type and default."""
    doc: str
    key: str | None = None                  # the YAML key, where it is not the field name
    category: str | None = None             # a kind chosen from this registry category
    names: str | None = None                # the name (only) of a kind of this registry category
    allow: Any = None                       # names: which of its kinds may be named (impl -> bool), None all
    bounds: tuple = ()                       # (("minimum", 1), ("exclusiveMaximum", 1.0), ...)
    keywords: tuple = ()                     # other JSON Schema keywords: (("pattern", "^x$"), ...)
    yaml_default: Any = field(default_factory=lambda: MISSING)   # choices: the default kind's name


def _field(default, factory, meta: Param):
    kw: dict[str, Any] = {"metadata": {"param": meta}}
    if factory is not MISSING:
        kw["default_factory"] = factory
    elif default is not MISSING:
        kw["default"] = default
    return field(**kw)


def param(default: Any = MISSING, *, doc: str, factory: Any = MISSING, key: str | None = None,
          minimum: float | None = None, maximum: float | None = None,
          exclusive_minimum: float | None = None, exclusive_maximum: float | None = None,
          pattern: str | None = None, min_length: int | None = None, min_items: int | None = None,
          max_items: int | None = None) -> Any:
    """A YAML parameter: no ``default`` (and no ``factory``) makes it required."""
    bounds = tuple((k, v) for k, v in (("minimum", minimum), ("maximum", maximum),
                                       ("exclusiveMinimum", exclusive_minimum),
                                       ("exclusiveMaximum", exclusive_maximum)) if v is not None)
    keywords = tuple((k, v) for k, v in (("pattern", pattern), ("minLength", min_length),
                                         ("minItems", min_items), ("maxItems", max_items)) if v is not None)
    return _field(default, factory, Param(doc=doc, key=key, bounds=bounds, keywords=keywords))


def choice(category: str, *, doc: str, default: str | None | Any = MISSING, key: str | None = None) -> Any:
    """A ``{kind: ..., params}`` block whose kind comes from the ``category`` registry.

    ``default``: the kind taken when the key is absent (a name), ``None`` for an
    optional block, or left out for a required one; a block that is written
    always names its ``kind``.
    """
    meta = Param(doc=doc, key=key, category=category, yaml_default=default)
    return _field(None if default is not MISSING else MISSING, MISSING, meta)


def kind_name(category: str, *, doc: str, default: str | Any = MISSING, key: str | None = None,
              allow: Callable[[type], bool] | None = None) -> Any:
    """A string naming a registered kind of ``category``, without its parameters (e.g. the kind of an MoE's experts).

    ``allow(impl)`` keeps the kinds it is true for (every kind when None).  The schema lists the allowed names of
    the catalog in use, plug-ins included; the built value is a :class:`KindName`.
    """
    return _field(default, MISSING, Param(doc=doc, key=key, names=category, allow=allow))


def allowed_kinds(catalog, meta: Param) -> list[str]:
    """The names a :func:`kind_name` parameter accepts in ``catalog``, sorted."""
    reg = catalog[meta.names]
    return [n for n in reg.names() if meta.allow is None or meta.allow(reg.get(n))]


class KindName(str):
    """The value of a :func:`kind_name` parameter: the name as written (a plain ``str`` to every reader), with the
    class it names (``impl``) and what :meth:`spec` needs to build that kind's spec where the name was written."""

    def __new__(cls, name: str, impl: Any, category: str, catalog, ctx: Mapping[str, Any]):
        out = super().__new__(cls, name)
        out.impl, out.category, out._catalog, out._ctx = impl, category, catalog, dict(ctx)
        return out

    def __reduce__(self):
        return KindName, (str(self), self.impl, self.category, self._catalog, self._ctx)

    def spec(self, raw: Mapping[str, Any] | None = None) -> "Kind":
        """The spec of the named kind with the YAML parameters ``raw`` (the others at their defaults), its
        :func:`context` fields taken from the sections around the name (a BuildError when a required one is
        missing)."""
        return build(self.impl.Spec, raw, self._catalog, self._ctx, kind=str(self), impl=self.impl,
                     category=self.category)


def _named_kind(catalog, meta: Param, name: Any, ctx: Mapping[str, Any]) -> KindName | None:
    if name is None:
        return None
    impl = kind_class(catalog, meta.names, name)
    if meta.allow is not None and not meta.allow(impl):
        raise BuildError(f"{meta.names} kind '{name}' cannot be named here (expected one of: "
                         f"{', '.join(allowed_kinds(catalog, meta))})")
    return KindName(name, impl, meta.names, catalog, ctx)


def context(source: str | None = None) -> Any:
    """A value handed down by the enclosing sections (``source``: its name or dotted path there)."""
    return field(default=None, metadata={"context": source})


@declared
class Kind:
    """Base of the parameters of a registered kind: ``kind`` and the class it names are set on build."""
    kind: str = field(default="", metadata={"kind": True})
    impl: Any = field(default=None, compare=False, repr=False, metadata={"impl": True})
    #: the registry category the kind was chosen from (``norm``, ``router``, ...), set on build like ``kind``
    category: str = field(default="", compare=False, repr=False)

    def build(self, *args, **kwargs):
        """The registered object this spec describes (``impl(spec, ...)``)."""
        return self.impl(self, *args, **kwargs)


# ---------------------------------------------------------------- reading declarations
@functools.lru_cache(maxsize=None)
def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def params(cls) -> list[tuple[dataclasses.Field, Param]]:
    """The YAML parameters of a declared class, in declaration order."""
    return [(f, f.metadata["param"]) for f in dataclasses.fields(cls) if "param" in f.metadata]


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata["param"].key or f.name


def is_declared(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
        return typing.get_args(tp)
    return None


def strip_none(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``; ``(tp, False)`` otherwise."""
    args = _union_args(tp)
    if args and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True
    return tp, False


def default_of(f: dataclasses.Field) -> Any:
    """The declared default (MISSING when the parameter is required)."""
    meta: Param = f.metadata["param"]
    if meta.category is not None:
        return meta.yaml_default
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def required(f: dataclasses.Field) -> bool:
    return default_of(f) is MISSING


# ---------------------------------------------------------------- building
class BuildError(ValueError):
    """A declared object could not be built from a (validated) raw value."""


def _lookup(ctx: Mapping[str, Any], source: str) -> Any:
    head, *rest = source.split(".")
    value = ctx.get(head)
    for part in rest:
        value = None if value is None else getattr(value, part, None)
    return value


def kind_class(catalog, category: str, kind: str):
    """The class registered as ``kind`` (a BuildError naming the choices when unknown)."""
    try:
        return catalog[category].get(kind)
    except RegistryError as e:
        raise BuildError(str(e)) from None


def build_choice(catalog, category: str, raw: Any, default_kind: Any, ctx: Mapping[str, Any]):
    """The spec of the kind a ``{kind: ..., ...}`` block names (``None`` for an absent optional block)."""
    if raw is None:
        if default_kind is None or default_kind is MISSING:
            return None
        raw = {"kind": default_kind}
    raw = dict(raw)
    kind = raw.pop("kind", default_kind)
    impl = kind_class(catalog, category, kind)
    return build(impl.Spec, raw, catalog, ctx, kind=kind, impl=impl, category=category)


def convert(tp: Any, value: Any, catalog, ctx: Mapping[str, Any]) -> Any:
    """A validated YAML value as the declared type wants it (tuples, nested declarations, floats)."""
    if value is None:
        return None
    tp, _ = strip_none(tp)
    if is_declared(tp):
        return build(tp, value, catalog, ctx)
    args = _union_args(tp)
    if args:
        for option in args:          # e.g. ``tuple[int, ...] | LayerRange``: the one the value is
            if (isinstance(value, list) and typing.get_origin(option) is tuple) or \
                    (isinstance(value, Mapping) and is_declared(option)):
                return convert(option, value, catalog, ctx)
        return value
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)
        item = inner[0] if inner else Any
        return tuple(convert(item, v, catalog, ctx) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build(cls, raw: Mapping[str, Any] | None, catalog=None, ctx: Mapping[str, Any] | None = None, **fixed):
    """An instance of the declared ``cls`` from a validated raw mapping (defaults for absent keys).

    ``ctx``: values of the enclosing sections (for :func:`context` fields); the
    class's own parameters join it for its children, in declaration order.
    ``fixed``: fields set by the caller (``kind``, ``impl``).
    """
    raw = dict(raw or {})
    th = hints(cls)
    below = dict(ctx or {})
    values: dict[str, Any] = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in fixed or not f.init:
            continue
        if "context" in f.metadata:
            values[f.name] = _lookup(below, f.metadata["context"] or f.name)
            continue
        if "param" not in f.metadata:
            continue
        meta: Param = f.metadata["param"]
        key = meta.key or f.name
        if meta.category is not None:
            value = build_choice(catalog, meta.category, raw.get(key), meta.yaml_default, below)
        elif meta.names is not None and (key in raw or default_of(f) is not MISSING):
            value = _named_kind(catalog, meta, raw[key] if key in raw else default_of(f), below)
        elif key in raw:
            value = convert(th[f.name], raw[key], catalog, below)
        else:
            default = default_of(f)
            if default is MISSING:
                raise BuildError(f"{cls.__qualname__}: missing required '{key}'")
            # an absent section is built like an empty one, so its own kinds and context are filled in
            value = build(type(default), {}, catalog, below) if is_declared(type(default)) else default
        values[f.name] = value
        below[f.name] = value
    unknown = set(raw) - {yaml_key(f) for f, _ in params(cls)}
    if unknown:
        raise BuildError(f"{cls.__qualname__}: unknown keys {sorted(unknown)} (the schema should have caught them)")
    return cls(**values)


def to_yaml(obj: Any) -> Any:
    """A built declaration back as the YAML data it is written as (every parameter, defaults included)."""
    if isinstance(obj, Kind) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        out = {"kind": obj.kind} if isinstance(obj, Kind) else {}
        for f, _ in params(type(obj)):
            out[yaml_key(f)] = to_yaml(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple):
        return [to_yaml(v) for v in obj]
    return str(obj) if isinstance(obj, KindName) else obj


# ---------------------------------------------------------------- checks
def join(path: tuple, rel: tuple) -> tuple:
    """``path`` extended by a check's relative path (:data:`PARENT` steps up)."""
    out = list(path)
    for part in rel:
        if part == PARENT:
            out.pop()
        else:
            out.append(part)
    return tuple(out)


def _context_ready(cls, ctx: Mapping[str, Any]) -> bool:
    return all(_lookup(ctx, f.metadata["context"] or f.name) is not None
               for f in dataclasses.fields(cls) if "context" in f.metadata)


def checks(cls, raw: Any, path: tuple, catalog, clean, ctx: Mapping[str, Any] | None = None,
           kind: tuple = ()) -> list[tuple[tuple, str]]:
    """Every cross-field problem (``check()`` methods) under a raw value that passed the schema.

    A class's ``check`` runs when nothing at or under its path failed the
    schema (``clean(path)``) and its context is known; the walk goes on into
    its nested sections and kinds either way, so every clean part is checked.
    """
    if not isinstance(raw, Mapping):
        return []
    th = hints(cls)
    below = dict(ctx or {})
    nested: list[tuple[Any, Any, tuple, Any]] = []
    sections: dict[tuple, dataclasses.Field] = {}        # path -> field of each nested section
    for f, meta in params(cls):
        key = meta.key or f.name
        at = path + (key,)
        value = raw.get(key, MISSING)
        if meta.category is not None:
            nested.append(("choice", (meta.category, meta.yaml_default), at, value))
            continue
        tp, _ = strip_none(th[f.name])
        if is_declared(tp):
            nested.append(("section", tp, at, value))
            sections[at] = f
            continue
        if typing.get_origin(tp) is tuple and typing.get_args(tp) and is_declared(typing.get_args(tp)[0]):
            nested.append(("list", typing.get_args(tp)[0], at, value))
            continue
        if value is MISSING:
            default = default_of(f)
            if default is not MISSING:
                below[f.name] = default
        elif clean(at):
            below[f.name] = convert(th[f.name], value, catalog, below)
    out: list[tuple[tuple, str]] = []
    for what, tp, at, value in nested:
        if value is MISSING or value is None:
            continue
        if what == "section":
            out += checks(tp, value, at, catalog, clean, below)
            if clean(at):           # later siblings may take context from it (``context("model.n_layers")``)
                try:
                    below[sections[at].name] = build(tp, value, catalog, below)
                except (BuildError, KeyError):
                    pass
        elif what == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                out += checks(tp, item, at + (i,), catalog, clean, below)
        elif what == "choice" and isinstance(value, Mapping):
            category, default_kind = tp
            name = value.get("kind", default_kind)
            if isinstance(name, str) and name in catalog[category]:
                impl = catalog[category].get(name)
                out += checks(impl.Spec, {k: v for k, v in value.items() if k != "kind"}, at, catalog, clean,
                              below, kind=(name, impl))
    if hasattr(cls, "check") and clean(path) and _context_ready(cls, ctx or {}):
        fixed = {"kind": kind[0], "impl": kind[1]} if kind else {}
        try:
            obj = build(cls, raw, catalog, ctx, **fixed)
            found = list(obj.check())
        except BuildError:          # a part it builds or reads cannot be built: that part's own check says why
            return out
        out += [(join(path, tuple(rel)), message) for rel, message in found]
    return out


# ---------------------------------------------------------------- hand-downs
def context_problems(root, catalog) -> list[str]:
    """Every :func:`context` field, of every section under ``root`` and every kind a choice there may take,
    whose source names no field that an enclosing section declares before it (a typo such as
    ``context("d_modle")`` would otherwise hand down ``None``); each problem one line naming the class."""
    problems: list[str] = []
    seen: set[tuple] = set()

    def walk(cls, scope: frozenset, where: str) -> None:
        if (cls, scope) in seen:
            return
        seen.add((cls, scope))
        th = hints(cls)
        names = set(scope)
        for f in dataclasses.fields(cls):
            if "context" in f.metadata:
                source = f.metadata["context"] or f.name
                if source.split(".")[0] not in names:
                    problems.append(f"{where}: {f.name} = context({source!r}) names no field of an enclosing "
                                    f"section (there: {', '.join(sorted(names)) or 'none'})")
                continue
            if "param" not in f.metadata:
                continue
            meta = f.metadata["param"]
            if meta.category is not None or meta.names is not None:     # a kind is built here from either
                category = meta.category or meta.names
                kinds = catalog[category].names() if meta.category is not None else allowed_kinds(catalog, meta)
                for kind in kinds:
                    impl = catalog[category].get(kind)
                    origin = catalog[category].origin(kind)
                    walk(impl.Spec, frozenset(names), f"{category} kind '{kind}' ({origin})")
            else:
                tp, _ = strip_none(th[f.name])
                if typing.get_origin(tp) is tuple and typing.get_args(tp):
                    tp = typing.get_args(tp)[0]
                for option in _union_args(tp) or (tp,):
                    if is_declared(option):
                        walk(option, frozenset(names), f"{option.__qualname__}")
            names.add(f.name)

    walk(root, frozenset(), root.__qualname__)
    return problems


# ---------------------------------------------------------------- small helpers for checks
def divisors(n: int) -> str:
    """``1, 2, 4, ...`` (the first twelve divisors of ``n``, looked for up to 4096: head and group counts), for
    "choose among" hints; a constant time for any ``n``."""
    ds = [k for k in range(1, min(int(n), DIVISOR_SEARCH) + 1) if n % k == 0]
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 or n > DIVISOR_SEARCH else "")


DIVISOR_SEARCH = 4096


def round_up(value: float, multiple: int) -> int:
    """The least multiple of ``multiple`` >= ``value`` (integers exactly, however large)."""
    return -(-value // multiple) * multiple if isinstance(value, int) else int(multiple * math.ceil(value / multiple))


def snake(name: str) -> str:
    """``HellaSwagEvalSpec`` -> ``hella_swag_eval`` (schema definition names of sections)."""
    name = re.sub(r"Spec$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


__all__ = ["PARENT", "BuildError", "Kind", "KindName", "Literal", "Param", "allowed_kinds", "build", "build_choice",
           "checks", "choice", "context", "context_problems", "declared", "default_of", "divisors", "hints",
           "is_declared", "join", "kind_name", "param", "params", "required", "round_up", "snake", "strip_none",
           "to_yaml", "yaml_key"]
