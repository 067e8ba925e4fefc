"""Parameter report for blueprints: total, active per token, embedding split, per component.

    python tools/param_count.py blueprints/*.yaml [--set model.n_layers=2] [--json]

Models are built on the ``meta`` device, so even large blueprints cost no memory.
"""
from __future__ import annotations

import argparse
import json

from ..model.params import count_blueprint, flops_per_token
from .blueprint import blueprint_model_spec
from .common import fail, user_errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/param_count.py", description=__doc__.splitlines()[0])
    ap.add_argument("blueprints", nargs="+", help="blueprint files or shipped names")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override blueprint values, e.g. --set model.n_layers=2 train.lr=3.0e-4")
    ap.add_argument("--json", action="store_true", help="print one JSON object per blueprint")
    args = ap.parse_args(argv)
    results = {}
    for path in args.blueprints:
        try:
            bp, spec = blueprint_model_spec(path, args.overrides)
        except user_errors() as e:
            return fail(e)
        report = count_blueprint(spec)
        flops = flops_per_token(spec)
        if args.json:
            results[str(path)] = {**report.as_dict(), "vocab_size": spec.vocab_size,
                                  "flops_per_token": flops}
        else:
            print(f"== {bp.name} ({path}): {report.total:,} parameters, {report.active:,} active per token, "
                  f"vocab {spec.vocab_size:,}")
            print(report.table())
            print(f"training FLOPs per token: {flops:,.0f}\n")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
