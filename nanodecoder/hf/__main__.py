"""``python -m nanodecoder.hf import|export``: the command line of ``nanodecoder.hf`` (see its docstring)."""
from __future__ import annotations

import argparse
import json
import sys

try:
    import resource
except ImportError:                       # Windows: no peak to report
    resource = None
from pathlib import Path

from ..cli.blueprint import load_blueprint
from ..cli.common import EXIT_WONT_FIT, fail, user_errors
from ..cli.sample import load_run_model
from . import export_hf, import_hf
from ..model.plan import human_bytes, human_count
from ..train.memory import WontFit
from .convert import DTYPES, KEEP


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux/macOS ``ru_maxrss``), 0 where unknown."""
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanodecoder.hf", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a local Hugging Face model directory -> a run folder")
    imp.add_argument("model_dir", type=Path)
    imp.add_argument("--out", type=Path, required=True, help="the new run folder")
    imp.add_argument("--dtype", choices=[*DTYPES, KEEP], default="float32",
                     help="dtype of the stored weights (default float32, what the CPU profile computes in; "
                          "keep: the dtype of the files)")
    imp.add_argument("--no-tokenizer", action="store_true", help="import the weights without tokenizer.json")
    exp = sub.add_parser("export", help="a run folder -> a Hugging Face model directory")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--out", type=Path, required=True, help="the new Hugging Face model folder")
    exp.add_argument("--checkpoint", default="best", help="best, latest, or a folder name like step_000500")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            run = import_hf(args.model_dir, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer)
            load_blueprint(run / "blueprint.yaml")          # the written blueprint validates like any other
            info = json.loads((run / "run.json").read_text())["imported_from"]
            print(f"imported {args.model_dir} -> {run}: {human_count(info['parameters'])} parameters, "
                  f"{human_bytes(info['weights_bytes'])} of {info['dtype']} weights; peak memory of the import "
                  f"{human_bytes(peak_rss())}")
        else:
            model, tokenizer, path, _ = load_run_model(args.run_dir, args.checkpoint, lm_only=True, task="export")
            hint = None
            meta = args.run_dir / "run.json"
            if meta.is_file():
                hint = (json.loads(meta.read_text()).get("imported_from") or {}).get("model_type")
            out = export_hf(model, tokenizer, args.out, hint=hint)
            print(f"exported {path} -> {out}")
    except (*user_errors(), ValueError) as e:
        return fail(e)
    except WontFit as e:                 # config.json describes more than this machine holds
        return fail(e, EXIT_WONT_FIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
