"""Hugging Face model directory <-> run folder.

``import_hf(model_dir, out)``   ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``) -> a run folder:
                               ``blueprint.yaml`` (the architecture), ``tokenizer/``, ``run.json`` and a
                               weights-only checkpoint ``ckpt/step_000000`` (its manifest says
                               ``weights_only: true``: no optimizer state to resume from).
``export_hf(model, tokenizer, out)``  a loaded run model -> ``config.json`` + ``model.safetensors``
                               (+ ``tokenizer.json``) in the layout ``save_pretrained`` writes.

Weights are read tensor by tensor with ``safetensors.safe_open`` (the shape checked from the header
before the data is read); nothing in the model directory is executed or unpickled, and
``transformers`` is not needed.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config.declare import to_yaml
from ..config.diff import differences
from ..config.loader import dotted
from ..config.validate import problems
from ..components import model_catalog
from ..model import build_model, build_model_spec
from ..model.spec import ModelSpec
from ..model.plan import human_bytes, human_count, param_report
from ..runtime import available_memory
from ..train.memory import WontFit
from ..train.checkpoint import _fsync, model_tensors
from ..train.rundir import RunDir, RunLock
from .families import FAMILIES, TRAINING_ONLY, Family, family
from .rules import HFError, Rule
from ..data import DataError
from ..data.bpe import TiktokenTokenizer
from ..data.chat import read_model_chat
from ..data.hf_bpe import GPT2_PATTERN, MERGES_FILE, VOCAB_FILE, gpt2_from_files, write_files
from ..data.hf_export_tokenizer import hf_tokenizer_config, write_hf_tokenizer
from ..data.hf_tokenizer import HF_CONFIG, HFTokenizer

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEEP = "keep"           # --dtype keep: the dtype the files store (that of the embedding matrix)


# ----------------------------------------------------------------------------------- reading
def read_config(model_dir: Path) -> dict:
    f = model_dir / "config.json"
    if not f.is_file():
        raise HFError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{f}: not valid JSON ({e})") from None


class Weights:
    """The tensors of a model directory's safetensors files, opened lazily, read one at a time."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self._handles: dict[str, Any] = {}
        index = self.inside(model_dir, model_dir / INDEX)
        if index.is_file():
            try:
                doc = json.loads(index.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
                raise HFError(f"{index}: not valid JSON ({e})") from None
            weight_map = (doc.get("weight_map") if isinstance(doc, dict) else None) or {}
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise HFError(f"{index}: weight_map should map each tensor name to a shard's file name")
            for f in sorted(set(weight_map.values())):
                if f in (".", "..") or "/" in f or "\\" in f:
                    raise HFError(f"{index}: weight_map names the shard {f[:80]!r}, which is not a file name in "
                                  f"{model_dir}; a shard is read only from the model's own folder")
                self.inside(model_dir, model_dir / f)
            missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
            if missing:
                some = next(n for n, f in weight_map.items() if f == missing[0])
                raise HFError(f"{model_dir}: shard {missing[0]} listed in {INDEX} is missing (it holds {some}"
                              f"{' and more' if len(missing) > 1 else ''}); download every shard")
            self.file_of = dict(weight_map)
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
                hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
                raise HFError(f"{model_dir}: no *.safetensors weights{hint}")
            self.file_of = {}
            for f in files:
                self.inside(model_dir, f)
                for name in self._open(f.name).keys():
                    self.file_of[name] = f.name

    @staticmethod
    def inside(model_dir: Path, path: Path) -> Path:
        """``path``, refused unless it stays inside ``model_dir`` once links are followed (a link into the
        ``blobs/`` of the same model is allowed where ``model_dir`` is a Hugging Face cache snapshot,
        ``models--ORG--NAME/snapshots/REVISION``, whose files are such links)."""
        real, home = Path(path).resolve(), Path(model_dir).resolve()
        roots = [home]
        if home.parent.name == "snapshots" and (home.parent.parent / "blobs").is_dir():
            roots.append((home.parent.parent / "blobs").resolve())
        if not any(real == r or r in real.parents for r in roots):
            raise HFError(f"{path} leads to {real}, outside the model folder {home}: nothing outside it is read; "
                          "copy the file into the folder instead of linking it")
        return Path(path)

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.dir / file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise HFError(f"cannot read {self.dir / file}: {e}") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._open(self.file_of[name]).get_slice(name).get_dtype()
        found = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored)
        if found is None:
            raise HFError(f"{self.dir / self.file_of[name]}: tensor {name} is stored as {stored}; --dtype keep "
                          "needs float32, bfloat16 or float16 weights")
        return found

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read through a handle of its own: closing it unmaps the pages just read, so the
        process holds the converted model and one tensor at a time, not also the whole file's mapping."""
        try:
            with safe_open(str(self.dir / self.file_of[name]), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise HFError(f"{self.dir / self.file_of[name]}: cannot read tensor {name}: {e}") from None


# ----------------------------------------------------------------------------------- import
def hf_model_section(config: dict, shown: str = "config.json") -> tuple[Family, dict]:
    """The family of ``config`` and the ``model:`` section it describes, validated like a blueprint's (a
    config.json with, say, more heads than its hidden size is refused here, before anything is built)."""
    fam = family(config.get("model_type"))
    section = fam.to_model(config)
    found = problems(section, {}, shown, ModelSpec, model_catalog())
    if found:
        raise HFError(f"{shown} describes a {fam.model_type} model that cannot be built: "
                      + "; ".join(f"model.{p.path}: {p.message}" for p in found[:5])
                      + (f" (+{len(found) - 5} more)" if len(found) > 5 else ""))
    return fam, section


def _check_rules(rules: list[Rule], tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of ours has exactly one rule (a family bug otherwise, not a user error)."""
    ours = [r.ours for r in rules]
    if sorted(ours) != sorted(tensors):
        raise RuntimeError(f"mapping table mismatch: no rule for {sorted(set(tensors) - set(ours))}, "
                           f"rules for unknown {sorted(set(ours) - set(tensors))}")


def load_hf_weights(model, fam: Family, weights: Weights, tied: bool, config: dict | None = None) -> None:
    """Fill ``model``'s tensors from ``weights`` by the family's rules; refuse missing, misshaped, unused tensors.
    ``config``: the directory's config.json (some layouts depend on it, e.g. DeepSeek's ``rope_interleave``).
    Every tensor of the files is used, ignored by the family (buffers, layers outside the causal LM), or, for a
    ``tied`` model, a head equal to the embedding; anything else is refused."""
    names = weights.names()
    config = fam.with_defaults(config) if config is not None else None
    tensors, _ = model_tensors(model)
    state = model.state_dict()
    rules = fam.rules(model.spec, names, config)
    _check_rules(rules, tensors)
    used: set[str] = set()
    for rule in rules:
        target = state[rule.ours]
        for name, shape in rule.hf_shapes(target.shape).items():
            if name not in names:
                raise HFError(f"{weights.dir}: tensor {name} is missing (config.json's {fam.model_type} "
                              f"architecture needs it, for our {rule.ours})")
            got = weights.shape(name)
            if got != shape:
                raise HFError(f"{weights.dir}: tensor {name} has shape {list(got)}, config.json implies "
                              f"{list(shape)}; the checkpoint does not match its config")
        with torch.no_grad():
            target.copy_(rule.to_ours([weights.get(n) for n in rule.hf]))
        used.update(rule.hf)
    if tied and fam.head in names - used:
        used.add(_tied_head(fam, weights, rules))
    ignored = [re.compile(p) for p in (*fam.ignored, *(fam.skipped(config) if config is not None else ()))]
    unused = sorted(n for n in names - used if not any(p.search(n) for p in ignored))
    if unused:
        more = f" (+{len(unused) - 3} more)" if len(unused) > 3 else ""
        raise HFError(f"{weights.dir}: tensor{'s' if len(unused) > 1 else ''} {', '.join(unused[:3])}{more} "
                      f"not used by the {fam.model_type} architecture of config.json; converting would "
                      "silently drop weights")


def _tied_head(fam: Family, weights: Weights, rules: list[Rule]) -> str:
    """The name of a tied model's head that the files hold anyway (``save_pretrained`` leaves it out; some files on
    the hub keep a copy of the embedding): accepted when it equals the embedding, refused otherwise (transformers
    would then load the model untied, which is not the model config.json describes)."""
    embedding = next(r.hf[0] for r in rules if r.ours == "wte.weight")
    head, emb = weights.get(fam.head), weights.get(embedding)
    if head.shape != emb.shape or not torch.equal(head.float(), emb.float()):
        raise HFError(f"{weights.dir}: tensor {fam.head} differs from the embedding {embedding}, but config.json ties "
                      f"them (tie_word_embeddings true, or absent: the {fam.model_type} default); if the model has its "
                      "own output head, set tie_word_embeddings to false in config.json")
    return fam.head


def _eot_id(config: dict, model_dir: Path) -> int | None:
    eos = config.get("eos_token_id")
    gen = model_dir / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None


#: Text on which a GPT-2 folder's tokenizer.json must agree with tiktoken's gpt2 built from its vocab.json/merges.txt.
GPT2_CHECK_TEXT = ("Hello world! It's 2024: we'll see 3.14159 and 1,000,000 numbers.\n\n\tIndented  code()  \n"
                   "naïve café, Ünïcödé, 日本語, emoji 🎉👍🏽 and   runs of   spaces   \r\n")


def import_tokenizer(model_dir: Path, eot_id: int | None):
    """The tokenizer of a model folder: tiktoken's ``gpt2`` encoding when its vocab.json + merges.txt are
    GPT-2's (and its tokenizer.json, if any, encodes like it), else its tokenizer.json (kind ``hf``); with
    the folder's chat template, if it ships one."""
    has_json = (model_dir / "tokenizer.json").is_file()
    tok = None
    if (model_dir / VOCAB_FILE).is_file() and (model_dir / MERGES_FILE).is_file():
        try:
            tok = TiktokenTokenizer(gpt2_from_files(model_dir))
        except DataError as e:
            if not has_json:
                raise HFError(f"{model_dir} has no tokenizer.json, and its {VOCAB_FILE}/{MERGES_FILE} do not give "
                              f"GPT-2's tokenizer: {e}") from None
        if tok is not None and has_json and not _same_as_hf(tok, model_dir / "tokenizer.json"):
            tok = None                       # the model's own tokenizer.json differs from plain GPT-2: keep it
    if tok is None:
        if not has_json:
            raise HFError(f"{model_dir} has no tokenizer.json (only the fast-tokenizer file, or GPT-2's vocab.json "
                          "+ merges.txt, is read; a sentencepiece tokenizer.model is not converted): save it with "
                          "transformers' AutoTokenizer(...).save_pretrained first, or import without a tokenizer "
                          "(--no-tokenizer)")
        tok = HFTokenizer.from_file(model_dir / "tokenizer.json", eot_id)
    tok.chat = read_model_chat(model_dir)
    return tok


def _same_as_hf(tok, tokenizer_json: Path) -> bool:
    try:
        hf = HFTokenizer.from_file(tokenizer_json)
    except DataError:                        # no tokenizers package: the GPT-2 files alone decide
        return True
    return (hf.vocab_size == tok.vocab_size and hf.special_tokens() == tok.special_tokens()
            and hf.encode(GPT2_CHECK_TEXT) == tok.encode(GPT2_CHECK_TEXT))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "imported"


def import_hf(model_dir: str | Path, out: str | Path, *, dtype: str = "float32", tokenizer: bool = True) -> RunDir:
    """Convert a local Hugging Face model directory into a new run folder ``out``; returns it."""
    model_dir, out = Path(model_dir), Path(out)
    for read in ("config.json", "generation_config.json", "tokenizer.json", HF_CONFIG, "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json", VOCAB_FILE, MERGES_FILE):
        Weights.inside(model_dir, model_dir / read)          # nothing is read through a link out of the folder
    config = read_config(model_dir)
    fam, model_section = hf_model_section(config, str(model_dir / "config.json"))
    spec = build_model_spec(model_section)
    tok = None
    if tokenizer:
        tok = import_tokenizer(model_dir, _eot_id(config, model_dir))
        if tok.vocab_size > spec.vocab_size:
            raise HFError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                          f"vocab_size {spec.vocab_size}")
    weights = Weights(model_dir)
    _refuse_filled(out)

    if dtype == KEEP:
        name = next(r.hf[0] for r in fam.rules(spec, weights.names()) if r.ours == "wte.weight")
        torch_dtype = weights.dtype(name)
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise HFError(f"dtype '{dtype}' is not one of {', '.join([*DTYPES, KEEP])}")
    n_params = param_report(spec).total                   # planned from config.json before anything is allocated
    budget = available_memory(torch.device("cpu"))
    if budget.bytes is not None and n_params * torch_dtype.itemsize > budget.bytes:
        smaller = "; --dtype bfloat16 would fit" if n_params * 2 <= budget.bytes < n_params * torch_dtype.itemsize \
            else ""
        raise WontFit(f"{model_dir}: the model does not fit in memory: config.json describes "
                      f"{human_count(n_params)} parameters, {human_bytes(n_params * torch_dtype.itemsize)} of "
                      f"{str(torch_dtype).removeprefix('torch.')} weights, {human_bytes(budget.bytes)} available "
                      f"({budget.source}). Nothing was built{smaller}")
    model = build_model(spec, device="meta").to(torch_dtype).to_empty(device="cpu")
    if spec.tie_embeddings:
        model.head.weight = model.wte.weight
    load_hf_weights(model, fam, weights, spec.tie_embeddings, config)

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, doing="written"):         # a second import into the same folder is refused
        _refuse_filled(out)                      # (or finds the first one's files, once it is done)
        run = RunDir(out)
        name = _safe_name(model_dir.resolve().name)
        blueprint = {"name": name, "description": f"{fam.model_type} imported from {model_dir.resolve()}",
                     "model": model_section}
        header = (f"# Imported from the Hugging Face model {model_dir.resolve()} ({fam.model_type}); the weights are "
                  "a\n# weights-only checkpoint: fine-tune it with finetune: {from: THIS_FOLDER} (no --resume).\n")
        (out / RunDir.BLUEPRINT).write_text(header + yaml.safe_dump(blueprint, sort_keys=False))
        if tok is not None:
            tok.save(out / RunDir.TOKENIZER)
        tensors, _ = model_tensors(model)                   # tied weights once
        run.write_meta({"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "base_dir": str(out.resolve()),
                        "imported_from": {"path": str(model_dir.resolve()), "model_type": fam.model_type,
                                          "architectures": config.get("architectures"),
                                          "parameters": sum(tensors[n].numel() for n in tensors),
                                          "weights_bytes": sum(tensors[n].nbytes for n in tensors),
                                          "dtype": str(torch_dtype).removeprefix("torch.")},
                        "weights_only": True})
        run.checkpoints.save_weights(0, model, source=f"huggingface:{fam.model_type}")
    return run


def _refuse_filled(out: Path) -> None:
    """Refuse an ``out`` that holds anything but the lock file of a run folder (a new run goes there)."""
    if out.exists() and any(p.name != RunLock.FILE for p in out.iterdir()):
        raise HFError(f"{out} exists and is not empty; choose a new folder for the run")


# ----------------------------------------------------------------------------------- export
def _layer_view(spec: ModelSpec) -> list:
    """What each layer computes, in comparable form: derived sizes written out, training-only keys dropped."""
    rows = []
    for b in spec.blocks:
        row = to_yaml(b)
        row["positional"] = to_yaml(b.positional)          # the layer's own (not a YAML key of the block)
        a, m = b.attention, b.mlp
        if a.kind == "causal":
            row["attention"].update(head_dim=a.head_size, n_kv_heads=a.kv_heads, bias=sorted(a.biased))
        if hasattr(m, "hidden"):
            row["mlp"]["hidden_size" if m.kind != "moe" else "expert_hidden"] = m.hidden
        rows.append(row)
    return rows


def _strip(tree):
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k not in TRAINING_ONLY}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


def comparable(spec: ModelSpec) -> dict:
    # every layer's positional is in its row; the model's counts beside them only where it adds to the input
    skip = ("block", "overrides", "pad_vocab_to") + (() if spec.positional.additive else ("positional",))
    top = {k: v for k, v in to_yaml(spec).items() if k not in skip}
    top["final_norm"] = to_yaml(spec.final)
    return _strip({**top, "layers": _layer_view(spec)})


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _spans(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _differences(a, b, family: str) -> list[str]:
    """Where ``a`` (ours) and ``b`` (what ``family``'s config.json gives back) differ, one item per key path:
    ``model.layers[0-3].mlp.bias is False here, True in gpt2`` (a difference several layers share is one item)."""
    grouped: dict[tuple, list[int]] = {}
    for d in differences(a, b, missing=None, lists=True):
        layer = d.path[1] if len(d.path) > 2 and d.path[0] == "layers" else None
        rest = d.path[2:] if layer is not None else d.path
        grouped.setdefault((layer is None, rest, _short(d.old), _short(d.new)), []).append(layer)
    items = []
    for (top, rest, old, new), where in grouped.items():
        path = dotted(("model", *rest)) if top else \
            dotted(("model", "layers", -1, *rest)).replace("[-1]", f"[{_spans(where)}]", 1)
        items.append(f"{path} is {old} here, {new} in {family}")
    return items


def hf_family_for(spec: ModelSpec, hint: str | None = None) -> tuple[Family, dict]:
    """The family (and its config.json) that describes exactly ``spec``; ``hint`` is tried first.

    Where none does, the HFError names the closest family and every difference: a family whose config.json
    holds this structure (its ``to_config`` accepts the model) with the fewest differences of the round trip
    (a difference shared by several layers counts once); only where none accepts it, a family that refuses
    the structure (a different kind of norm, MLP, attention or positions: one difference, its refusal),
    ``hint`` first, then in :data:`FAMILIES` order."""
    mine = comparable(spec)
    order = ([hint] if hint in FAMILIES else []) + [t for t in FAMILIES if t != hint]
    ranked = []                                   # (refused, number of differences, order, family, items)
    for pos, t in enumerate(order):
        fam = FAMILIES[t]
        try:
            config = fam.to_config(spec)
            back = build_model_spec(fam.to_model(config))
        except HFError as e:
            ranked.append((True, 1, pos, t, [str(e)]))
            continue
        # MTP modules are a training objective: a config that records them (DeepSeek-V3's num_nextn_predict_layers,
        # whose layers transformers' model drops) describes the model without them
        recorded = spec.mtp is not None and config.get("num_nextn_predict_layers") == spec.mtp.depth
        diffs = _differences({k: v for k, v in mine.items() if k != "mtp"} if recorded else mine, comparable(back), t)
        if not diffs:
            return fam, config
        ranked.append((False, len(diffs), pos, t, diffs))
    refused, n, _, t, items = min(ranked)
    what = f"refuses its structure: {items[0]}" if refused else \
        f"{n} difference{'s' if n > 1 else ''}: {'; '.join(items)}"
    raise HFError(f"no Hugging Face family we export computes this model exactly; closest: {t} ({what})")


def _tmp_sibling(out: Path) -> Path:
    """A new, empty ``.tmp-<name>-<pid>`` beside ``out``; those of exports that died (their process is gone) go."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".tmp-{glob.escape(out.name)}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.name == f".tmp-{out.name}-{pid}" and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False                  # a folder of this process from an earlier, failed export
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # exists, owned by someone else
        pass
    return True


def _export_tokenizer(tokenizer, folder: Path, context_length: int) -> str | None:
    """Write ``tokenizer``'s Hugging Face files into ``folder``; why none were written, or None."""
    if isinstance(tokenizer, HFTokenizer):
        (folder / "tokenizer.json").write_bytes(tokenizer.source.read_bytes())
        cfg = tokenizer.source.with_name(HF_CONFIG)
        if cfg.is_file():
            (folder / HF_CONFIG).write_bytes(cfg.read_bytes())
        else:
            (folder / HF_CONFIG).write_text(json.dumps(hf_tokenizer_config(tokenizer, context_length), indent=2)
                                            + "\n")
        return None
    gpt2 = isinstance(tokenizer, TiktokenTokenizer) and tokenizer.encoding._pat_str == GPT2_PATTERN
    try:
        if gpt2:
            write_files(tokenizer.encoding, folder)    # GPT-2's vocab.json + merges.txt, which GPT2Tokenizer reads
        write_hf_tokenizer(tokenizer, folder, context_length, "GPT2Tokenizer" if gpt2 else "PreTrainedTokenizerFast")
    except DataError as e:
        for name in ("tokenizer.json", HF_CONFIG, VOCAB_FILE, MERGES_FILE):
            (folder / name).unlink(missing_ok=True)
        return str(e)
    return None


def _publish(tmp: Path, out: Path) -> None:
    """fsync every file of ``tmp`` and the folder, then rename it to ``out`` (absent or an empty folder)."""
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    try:
        os.replace(tmp, out)
    except OSError as e:
        raise HFError(f"cannot move the export into {out} ({e.strerror}); choose a new folder") from None
    _fsync(out.parent)


def export_hf(model, tokenizer, out: str | Path, *, hint: str | None = None) -> Path:
    """Write ``model`` (a loaded Decoder) and ``tokenizer`` (None: none) as a Hugging Face model directory ``out``.

    Everything is written into a sibling ``.tmp-<name>-<pid>``, fsynced and renamed to ``out`` at the end, so an
    export that is interrupted leaves no ``out`` at all; an ``out`` that exists and is not an empty folder is
    refused and left as it is.  A tokenizer the ``tokenizers`` library cannot represent is left out, with one
    line on stderr saying why."""
    out = Path(out)
    spec = model.spec
    fam, config = hf_family_for(spec, hint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFError(f"{out} exists and is not an empty folder; choose a new folder for the export")
    eot = getattr(tokenizer, "eot_id", None)
    config.update(bos_token_id=eot, eos_token_id=eot)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for rule in fam.rules(spec, set(), config):
        for name, t in zip(rule.hf, rule.to_hf(state[rule.ours])):
            tensors[name] = t.detach().to("cpu", torch.float32).contiguous()
    tmp = _tmp_sibling(out.absolute())           # absolute: '.' has a name and a parent
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", eot), ("eos_token_id", eot)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        why = _export_tokenizer(tokenizer, tmp, spec.context_length) if tokenizer is not None else None
        if getattr(tokenizer, "chat", None) is not None:
            (tmp / "chat_template.jinja").write_text(tokenizer.chat.template, encoding="utf-8")
        _publish(tmp, out.absolute())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if why is not None:
        print(f"note: {out} has no tokenizer files: the {tokenizer.kind} tokenizer was not exported ({why})",
              file=sys.stderr)
    return out
