"""Adding a kind is one class and one registration line, built-in or plug-in alike.

A throw-away norm kind is written to a temporary module; once registered (as a
built-in: one more ``register`` function in the catalog; as a plug-in: an entry
point), the same script checks that YAML can use it with full validation
(unknown parameter, wrong type, bound, its own cross-field rule) and that the
generated schema has its entry.  Each run is a fresh subprocess, so the
process-wide catalog of the other tests is untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KIND = '''
import torch
from torch import nn
from nanodecoder.components.base import Component
from nanodecoder.components.contracts import NormKind
from nanodecoder.config.declare import context, declared, param


class ScaledRMSNorm(Component):
    """RMS norm with a fixed output scale and no learned weight."""

    @declared
    class Spec(NormKind):
        eps: float = param(1e-6, doc="Epsilon added to the mean square.", exclusive_minimum=0)
        scale: float = param(1.0, doc="Output scale.", exclusive_minimum=0)
        dim: int = context("d_model")

        @property
        def n_params(self):
            return 0

        def check(self):
            if self.eps >= self.scale:
                yield ("eps",), f"eps ({self.eps}) must be smaller than scale ({self.scale})"

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        return self.spec.scale * torch.nn.functional.rms_norm(x, (self.spec.dim,), eps=self.spec.eps)


def register(catalog):
    catalog["norm"].add("scaled_rms", ScaledRMSNorm)
'''

SCRIPT = '''
import json, sys
import torch
mode = sys.argv[2]
if mode == "builtin":                      # the one registration line, as nanodecoder/api/catalog.py would hold it
    import throwaway_kind
    from nanodecoder.api import catalog as cat
    cat.REGISTERS = (*cat.REGISTERS, throwaway_kind.register)
from nanodecoder.cli.blueprint import RunSpec, load_blueprint, run_spec
from nanodecoder.cli.catalog import catalog
from nanodecoder.config import BlueprintError
from nanodecoder.config.validate import schema_of
from nanodecoder.model import build_model
out = {"origin": catalog()["norm"].origin("scaled_rms")}
bp = load_blueprint(sys.argv[1])
model = build_model(run_spec(bp).model)
x = torch.randint(0, 20, (1, 8))
model(x, x).loss.backward()
out["module"] = type(model.blocks[0].norm1).__name__
out["scale"] = model.blocks[0].norm1.spec.scale
for name, overrides in {"unknown": ["model.block.norm.epz=1.0"], "type": ["model.block.norm.scale=big"],
                        "bound": ["model.block.norm.scale=0"], "check": ["model.block.norm.eps=3.0"]}.items():
    try:
        load_blueprint(sys.argv[1], overrides)
        out[name] = "accepted"
    except BlueprintError as e:
        out[name] = str(e).splitlines()[1].strip()
out["schema"] = schema_of(RunSpec, catalog())["$defs"]["norm.scaled_rms"]
print(json.dumps(out))
'''

BLUEPRINT = """
model:
  vocab_size: 20
  context_length: 8
  d_model: 16
  n_layers: 2
  block:
    norm: {kind: scaled_rms, scale: 2.0}
    attention: {kind: causal, n_heads: 2}
    mlp: {kind: gelu}
"""


@pytest.mark.parametrize("mode", ["builtin", "plugin"])
def test_a_new_kind_is_usable_from_yaml_with_full_validation(tmp_path, mode):
    (tmp_path / "throwaway_kind.py").write_text(KIND)
    if mode == "plugin":
        dist = tmp_path / "throwaway_kind-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-kind\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text("[nanodecoder.components]\nthrowaway = throwaway_kind:register\n")
    (tmp_path / "bp.yaml").write_text(textwrap.dedent(BLUEPRINT))
    (tmp_path / "check.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "bp.yaml"), mode],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["origin"] == ("nanodecoder" if mode == "builtin" else "plug-in 'throwaway'")
    assert out["module"] == "ScaledRMSNorm" and out["scale"] == 2.0
    assert out["unknown"] == ("--set: model.block.norm.epz: unknown key 'epz' for norm kind 'scaled_rms'; "
                              "did you mean 'eps'? (allowed here: eps, kind, scale)")
    assert out["type"] == "--set: model.block.norm.scale: expected a number, got the string 'big'"
    assert out["bound"] == "--set: model.block.norm.scale: 0 is out of range; expected a value > 0"
    assert out["check"] == "--set: model.block.norm.eps: eps (3.0) must be smaller than scale (2.0)"
    schema = out["schema"]
    assert schema["description"] == "RMS norm with a fixed output scale and no learned weight."
    assert schema["additionalProperties"] is False and schema["properties"]["kind"]["const"] == "scaled_rms"
    assert schema["properties"]["scale"] == {"type": "number", "exclusiveMinimum": 0, "description": "Output scale.",
                                             "default": 1.0}
