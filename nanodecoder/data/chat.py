"""Chat templates: the Jinja ``chat_template`` a Hugging Face model ships, kept with its tokenizer.

Where a model folder holds one (transformers' order): ``chat_template.jinja``, else
``chat_template.json`` (``{"chat_template": ...}``), else the ``chat_template`` of
``tokenizer_config.json`` (a text, or a list of named templates of which ``default`` is taken).
``bos_token`` / ``eos_token`` (and ``unk_token`` / ``pad_token``) come from ``tokenizer_config.json``
or ``special_tokens_map.json``.  A run's ``tokenizer/`` folder keeps them in ``chat.json``.

The template is untrusted text: it is rendered only in jinja2's ``ImmutableSandboxedEnvironment``
(a subclass that turns any unsafe attribute access, such as ``''.__class__``, into an error
instead of an empty value), with the variables transformers' ``apply_chat_template`` passes:
``messages``, ``add_generation_prompt``, the special tokens' texts, ``raise_exception``,
``strftime_now``, and its ``tojson`` filter (no HTML escaping).  The rendered text is encoded with
its special-token spellings as special tokens (``Tokenizer.encode_special``), like
``apply_chat_template(..., tokenize=True)``.

A render is also bounded (the limits below ``MAX_TEXT``): every loop iteration, call, filter, operator and
attribute lookup is a step (at most ``MAX_STEPS``, and ``MAX_SECONDS``); no text or collection it builds,
and not its output, holds more than ``MAX_TEXT`` characters or items, which is checked *before* the
operations that build more than they are given (``*``, ``**``, ``%`` and ``~``, the widths of ``center``,
``format`` and friends, ``replace``, ``join``, ``indent``, ``wordwrap``); all it emits, the output of
macros and blocks included, is at most ``MAX_EMITTED``.  Going past one is a one-line DataError.

jinja2 (>= 3.1.6: older versions have known sandbox escapes) is optional: it ships with
``pip install '.[hf]'``.
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

try:                                # optional: pip install '.[hf]'
    import jinja2
    from jinja2 import nodes as jinja_nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    jinja2 = None

SAVED_FILE = "chat.json"
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
INSTALL = "pip install '.[hf]'"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens' texts it may use; ``origin`` names its file for messages."""

    template: str
    tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "chat template"

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered in the sandbox; template errors are one-line DataErrors."""
        _jinja()
        compiled = _compile(self.template, self.origin)
        budget = _Budget()
        token = _BUDGET.set(budget)
        try:
            parts = []
            for part in compiled.generate(messages=[dict(m) for m in messages],
                                          add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                                          **self.tokens):
                budget.emit(len(part))
                parts.append(part)
            return "".join(parts)
        except TemplateLimit as e:
            raise DataError(f"{self.origin}: the chat template went past a limit of the sandbox: {e}; it was not "
                            "run further") from None
        except RecursionError:
            raise DataError(f"{self.origin}: the chat template recursed too deeply; it was not run further") from None
        except jinja2.exceptions.SecurityError as e:
            raise DataError(f"{self.origin}: the chat template tried something the sandbox forbids ({e}); "
                            "it was not run further") from None
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{self.origin}: the chat template raised: {e}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError, MemoryError) as e:
            raise DataError(f"{self.origin}: the chat template failed ({type(e).__name__}: {e})") from None
        finally:
            _BUDGET.reset(token)

    def to_json(self) -> dict[str, Any]:
        return {"chat_template": self.template, **self.tokens}


def _jinja():
    if jinja2 is None:
        raise DataError(f"chat templates need the jinja2 package: {INSTALL}")
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise DataError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2 >= 3.1.6: "
                        f"{INSTALL}")
    return jinja2


# ----------------------------------------------------------------------------------- limits of one render
#: characters (or items) of any text or collection a template builds, and of the text it renders
MAX_TEXT = 1 << 21
#: characters a render may emit in all, the output of macros and ``{% set %}`` blocks included
MAX_EMITTED = 4 * MAX_TEXT
#: steps of a render: loop iterations, calls, filters, operators, attribute lookups, outputs
MAX_STEPS = 1_000_000
#: seconds of a render (a backstop: the steps end any loop long before)
MAX_SECONDS = 10.0
#: bits of an integer a template computes (``**`` and ``*`` of integers)
MAX_INT_BITS = 1 << 13
#: characters of a ``tojson`` indent
MAX_INDENT = 64


class TemplateLimit(Exception):
    """A render went past one of the limits above (the message says which)."""


class _Budget:
    """The steps and emitted characters of one render, and its deadline."""

    def __init__(self):
        self.steps = self.emitted = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(f"more than {MAX_STEPS:,} steps (loop iterations, calls, filters, operators)")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"more than {MAX_SECONDS:g} s of rendering")

    def emit(self, n: int) -> None:
        self.step()
        self.emitted += n
        if self.emitted > MAX_EMITTED:
            raise TemplateLimit(f"more than {MAX_EMITTED:,} characters of output")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:           # None while compiling (constant folding): sizes are still checked
        budget.step()


def _size(x, cap: int = MAX_TEXT) -> int:
    """Characters and items of ``x`` (containers count what they refer to), counted up to just past ``cap``."""
    total, todo = 0, [x]
    while todo and total <= cap:
        y = todo.pop()
        if isinstance(y, (str, bytes, bytearray)):
            total += len(y)
        elif isinstance(y, (list, tuple, set, frozenset)):
            total += len(y)
            todo.extend(y)
        elif isinstance(y, dict):
            total += len(y)
            todo.extend(y.keys())
            todo.extend(y.values())
        else:
            total += 1
    return total


def _bounded(x, what: str = "a value"):
    if _size(x) > MAX_TEXT:
        raise TemplateLimit(f"{what} of more than {MAX_TEXT:,} characters or items")
    return x


def _width(n, what: str) -> None:
    if isinstance(n, int) and abs(n) > MAX_TEXT:
        raise TemplateLimit(f"{what} {n:,} (more than {MAX_TEXT:,})")


def _result_chars(n: int, what: str) -> None:
    if n > MAX_TEXT:
        raise TemplateLimit(f"{what} of {n:,} characters (more than {MAX_TEXT:,})")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _format_widths(fmt, args, braces: bool = False) -> None:
    """Refuse a ``%``-format text (``{}``-format: ``braces``) whose widths or precisions ask for more than
    MAX_TEXT characters."""
    if not isinstance(fmt, str):
        return
    numbers, indirect = [], False
    for m in () if braces else _PERCENT_SPEC.finditer(fmt):
        numbers += [g for g in m.groups() if g and g != "*"]
        indirect = indirect or "*" in m.groups()
    if braces:
        for _, _, spec, _ in string.Formatter().parse(fmt):
            numbers += re.findall(r"\d+", spec or "")
            indirect = indirect or "{" in (spec or "")
    for n in numbers:
        _width(int(n), "a format width or precision of")
    if indirect:                     # the width is an argument
        for a in args:
            _width(a, "a format width or precision of")


def _replace(s, old, new, count=-1) -> None:
    found = (len(s) + 1 if not old else s.count(old)) if isinstance(old, type(s)) else 0
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    if isinstance(new, (str, bytes)):
        _result_chars(len(s) + found * (len(new) - len(old or "")), "a replace")


def _joined(sep, items) -> list:
    items = list(items)
    _result_chars(sum(_size(i) for i in items) + len(sep) * max(len(items) - 1, 0), "a join")
    return items


#: pre-checks of the str (and bytes) methods that build more than they are given: ``(s, args, kwargs)`` ->
#: the arguments to call with
def _str_width(s, args, kwargs):
    _width(args[0] if args else kwargs.get("width"), "a width of")


def _str_tabs(s, args, kwargs):
    size = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(size, int):
        _result_chars(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * size, "an expandtabs")


def _str_translate(s, args, kwargs):
    table = args[0] if args else None
    if isinstance(table, dict):
        _result_chars(len(s) * max([_size(v) for v in table.values()] or [1]), "a translate")


_STR_CHECKS = {
    "center": _str_width, "ljust": _str_width, "rjust": _str_width, "zfill": _str_width,
    "expandtabs": _str_tabs, "translate": _str_translate,
    "replace": lambda s, args, kwargs: _replace(s, *args, **kwargs),
    "join": lambda s, args, kwargs: args and (_joined(s, args[0]), *args[1:]),
    "format": lambda s, args, kwargs: _format_widths(s, [*args, *kwargs.values()], braces=True),
    "format_map": lambda s, args, kwargs: _format_widths(s, list(args[0].values()) if args and
                                                         isinstance(args[0], dict) else [], braces=True),
}


def _guard_method(obj, name, value):
    """``obj.name`` as the sandbox found it, pre-checked when it is a str/bytes method that amplifies."""
    check = _STR_CHECKS.get(name) if isinstance(obj, (str, bytes)) and callable(value) else None
    if check is None:
        return value

    def run(*args, **kwargs):
        changed = check(obj, args, kwargs)
        return value(*(changed if isinstance(changed, tuple) else args), **kwargs)
    return run


#: pre-checks of the filters that build more than they are given, in jinja2's signatures (the context,
#: eval context or environment first where the filter takes one): -> the arguments to call with, or None
def _filter_replace(eval_ctx, s, old, new, count=None):
    _replace(str(s), str(old), str(new), -1 if count is None else count)


def _filter_indent(s, width=4, first=False, blank=False):
    lines = str(s).count("\n") + 1
    _width(width, "an indent of")
    _result_chars(len(str(s)) + lines * (_size(width) if isinstance(width, str) else int(width)), "an indent")


def _filter_wordwrap(env, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    wrap = len(wrapstring) if isinstance(wrapstring, str) else 2
    lines = len(str(s)) // max(int(width), 1) + str(s).count("\n") + 1 if isinstance(width, int) else 1
    _result_chars(len(str(s)) + lines * wrap, "a wordwrap")


def _filter_join(eval_ctx, value, *rest, **kwargs):
    d = rest[0] if rest else kwargs.get("d", "")
    return (eval_ctx, _joined(str(d), value), *rest)          # the items, read once, are what is joined


def _filter_sum(env, iterable, *rest, **kwargs):
    items = list(iterable)
    attribute = rest[0] if rest else kwargs.get("attribute")
    start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
    if not isinstance(start, (int, float)) or attribute is None and any(not isinstance(i, (int, float))
                                                                        for i in items):
        raise TemplateLimit("the sum filter adds numbers only here (a sum of lists or texts takes quadratic time)")
    return (env, items, *rest)


_FILTER_CHECKS = {
    "center": lambda value, width=80: _width(width, "a width of"),
    "indent": _filter_indent,
    "format": lambda value, *args, **kwargs: _format_widths(value, [*args, *kwargs.values()]),
    "replace": _filter_replace,
    "wordwrap": _filter_wordwrap,
    "join": _filter_join,
    "sum": _filter_sum,
    "batch": lambda value, linecount, fill_with=None: _width(linecount, "a batch of"),
    "slice": lambda value, slices, fill_with=None: _width(slices, "a slice into"),
}


def _guard_filter(name: str, func):
    """``func`` counted as a step, its arguments and result bounded, pre-checked where it amplifies."""
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)           # keeps jinja2's pass_context / pass_eval_context / pass_environment mark
    def run(*args, **kwargs):
        _step()
        for a in (*args, *kwargs.values()):
            _bounded(a, f"an argument of the {name} filter")
        if check is not None:
            changed = check(*args, **kwargs)
            args = changed if isinstance(changed, tuple) else args
        return _bounded(func(*args, **kwargs), f"a result of the {name} filter")
    return run


def _number_op(operator: str, left, right) -> None:
    """Refuse ``*``, ``+`` and ``**`` whose result would be more than MAX_TEXT long or MAX_INT_BITS wide."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints and right > 0 and left not in (0, 1, -1) \
            and left.bit_length() * right > MAX_INT_BITS:
        raise TemplateLimit(f"an integer power of more than {MAX_INT_BITS:,} bits")
    if operator == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"an integer product of more than {MAX_INT_BITS:,} bits")
        for seq, n in ((left, right), (right, left)):
            if isinstance(n, int) and not isinstance(seq, (int, float)) and n > 0:
                _result_chars(_size(seq, MAX_TEXT // n + 1) * n, "a repetition")
    if operator == "+" and not ints and not isinstance(left, (int, float)):
        _result_chars(_size(left) + _size(right), "a concatenation")
    if operator == "%" and isinstance(left, str):
        _format_widths(left, right if isinstance(right, tuple) else [right])


@functools.lru_cache(maxsize=1)
def _environment():
    _jinja()

    class Codegen(CodeGenerator):
        """jinja2's code, with every loop's items counted, ``~`` and the output of macros and blocks bounded."""

        def visit_Template(self, node, frame=None):
            for loop in list(node.find_all(jinja_nodes.For)):
                loop.iter = jinja_nodes.Call(jinja_nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [],
                                             None, None, lineno=loop.iter.lineno)
            super().visit_Template(node, frame)

        def visit_Concat(self, node, frame):
            self.write("environment.join_text((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def buffer(self, frame):
            frame.buffer = self.temporary_identifier()
            self.writeline(f"{frame.buffer} = environment.text_buffer()")

    class TextBuffer(list):
        """Where a macro or a block collects its output: what it holds counts as emitted."""

        def append(self, text):
            budget = _BUDGET.get()
            if budget is not None:
                budget.emit(len(text))
            super().append(text)

        def extend(self, texts):
            for text in texts:
                self.append(text)

    class Sandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, failing at once on unsafe access (jinja2 would return an undefined value),
        with every step of a render counted and anything it builds bounded (see the limits above)."""

        code_generator_class = Codegen
        intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator, left, right):
            _step()
            _number_op(operator, left, right)
            return _bounded(super().call_binop(context, operator, left, right), f"a result of {operator}")

        def call(__self, __context, __obj, *args, **kwargs):
            _step()
            for a in (*args, *kwargs.values()):
                _bounded(a, "an argument")
            return _bounded(super().call(__context, __obj, *args, **kwargs), "a result")

        def getattr(self, obj, attribute):
            _step()
            return _guard_method(obj, attribute, super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            _step()
            return _guard_method(obj, argument, super().getitem(obj, argument))

        @staticmethod
        def bounded_iter(items):
            for item in items:
                _step()
                yield item

        @staticmethod
        def join_text(parts):
            _step()
            texts = [str(_bounded(p, "a part of a ~ concatenation")) for p in parts]
            _result_chars(sum(map(len, texts)), "a ~ concatenation")
            return "".join(texts)

        @staticmethod
        def text_buffer():
            return TextBuffer()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if _size(indent) > MAX_INDENT if isinstance(indent, str) else isinstance(indent, int) and indent > MAX_INDENT:
            raise TemplateLimit(f"a tojson indent of more than {MAX_INDENT}")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        _format_widths(fmt, [])
        return datetime.datetime.now().strftime(fmt)

    def finalize(value):
        _step()
        return _bounded(value, "an output")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], finalize=finalize)
    env.filters["tojson"] = tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)          # lorem ipsum of any length: no chat template needs it
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str, origin: str):
    _jinja()
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"{origin} line {e.lineno}: not a valid Jinja template ({e.message})") from None
    except jinja2.exceptions.SecurityError as e:
        raise DataError(f"{origin}: the chat template tried something the sandbox forbids ({e})") from None
    except (RecursionError, MemoryError, ValueError, TemplateLimit) as e:   # nested too deep, a literal too long
        raise DataError(f"{origin}: not a usable Jinja template ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------- files
def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    return doc


def _token_text(value) -> str | None:
    if isinstance(value, dict):           # a serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick(path: Path, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):           # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise DataError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none named "
                        "'default'")
    raise DataError(f"{path}: chat_template must be a text or a list of named templates, got "
                    f"{type(value).__name__}")


def read_model_chat(model_dir: str | Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face model folder, or None when it ships none."""
    d = Path(model_dir)
    config = _json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    special = _json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
    if (d / "chat_template.jinja").is_file():
        path = d / "chat_template.jinja"
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable ({e})") from None
    elif (d / "chat_template.json").is_file():
        path = d / "chat_template.json"
        template = _pick(path, _json(path).get("chat_template"))
    elif config.get("chat_template") is not None:
        path = d / "tokenizer_config.json"
        template = _pick(path, config["chat_template"])
    else:
        return None
    tokens = {}
    for key in TOKEN_KEYS:
        text = _token_text(config.get(key)) or _token_text(special.get(key))
        if text is not None:
            tokens[key] = text
    return ChatTemplate(template, tokens, str(path))


def read_saved_chat(directory: str | Path) -> ChatTemplate | None:
    """The chat template saved in a tokenizer folder (``chat.json``), or None."""
    path = Path(directory) / SAVED_FILE
    if not path.is_file():
        return None
    doc = _json(path)
    template = doc.get("chat_template")
    if not isinstance(template, str):
        raise DataError(f"{path}: no chat_template text; import the model again")
    tokens = {k: doc[k] for k in TOKEN_KEYS if isinstance(doc.get(k), str)}
    return ChatTemplate(template, tokens, str(path))


def save_chat(chat: ChatTemplate, directory: str | Path) -> None:
    path = Path(directory) / SAVED_FILE
    path.write_text(json.dumps(chat.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
