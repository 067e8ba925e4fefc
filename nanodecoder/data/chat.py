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

jinja2 (>= 3.1.6: older versions have known sandbox escapes) is optional: it ships with
``pip install '.[hf]'``.
"""
from __future__ import annotations

import datetime
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

try:                                # optional: pip install '.[hf]'
    import jinja2
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
        try:
            return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self.tokens)
        except jinja2.exceptions.SecurityError as e:
            raise DataError(f"{self.origin}: the chat template tried something the sandbox forbids ({e}); "
                            "it was not run further") from None
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{self.origin}: the chat template raised: {e}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
            raise DataError(f"{self.origin}: the chat template failed ({type(e).__name__}: {e})") from None

    def to_json(self) -> dict[str, Any]:
        return {"chat_template": self.template, **self.tokens}


def _jinja():
    if jinja2 is None:
        raise DataError(f"chat templates need the jinja2 package: {INSTALL}")
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise DataError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2 >= 3.1.6: "
                        f"{INSTALL}")
    return jinja2


@functools.lru_cache(maxsize=1)
def _environment():
    _jinja()

    class Sandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, failing at once on unsafe access (jinja2 would return an undefined value)."""

        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
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
