"""Registries: closed, duplicate-proof, in agreement with the schemas, open to entry-point plug-ins."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanodecoder.cli.catalog import catalog as registries
from nanodecoder.config.registry import Registry, RegistryError
from nanodecoder.config.validate import schema_of
from nanodecoder.cli.blueprint import RunSpec

ROOT = Path(__file__).resolve().parent.parent


def test_duplicate_registration_is_an_error():
    reg = Registry("norm")
    reg.add("rmsnorm", object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("rmsnorm", object)


def test_unknown_kind_lists_choices_with_a_suggestion():
    with pytest.raises(RegistryError) as e:
        registries()["norm"].get("rmsnrom")
    assert "did you mean 'rmsnorm'?" in str(e.value)
    assert "layernorm, rmsnorm" in str(e.value)


def test_schema_kinds_and_registry_agree_exactly():
    defs = schema_of(RunSpec, registries())["$defs"]
    checked = 0
    for category, reg in registries().items():
        if category not in defs:
            assert not reg.names(), f"registry '{category}' has kinds but no schema block"
            continue
        assert defs[category]["properties"]["kind"]["enum"] == reg.names(), category
        checked += 1
    assert checked == len(registries())


PLUGIN = '''
import torch
from torch import nn
from nanodecoder.components.base import Component
from nanodecoder.config.declare import Kind, context, declared, param


class ScaleNorm(Component):
    """||x|| normalisation with one learned scale (Nguyen & Salazar 2019)."""

    @declared
    class Spec(Kind):
        eps: float = param(1e-5, doc="Epsilon.", exclusive_minimum=0)
        dim: int = context("d_model")

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.g = nn.Parameter(torch.tensor(float(spec.dim) ** 0.5))

    def reset_parameters(self):
        with torch.no_grad():
            self.g.fill_(float(self.spec.dim) ** 0.5)

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.spec.eps)


def register(catalog):
    catalog["norm"].add("scalenorm", ScaleNorm)
'''

SCRIPT = '''
import sys, torch
from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.config import BlueprintError
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.cli.catalog import catalog as registries
bp = load_blueprint(sys.argv[1])
m = build_model(build_model_spec(bp.raw["model"]))
x = torch.randint(0, 20, (1, 8))
m(x, x).loss.backward()
print("origin:", registries()["norm"].origin("scalenorm"))
print("ok", type(m.blocks[0].norm1).__name__)
try:
    load_blueprint(sys.argv[1], ["model.block.norm.epz=1.0"])
except BlueprintError as e:
    print(e)
'''


def test_entry_point_plugin_is_usable_from_yaml(tmp_path):
    (tmp_path / "scalenorm_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "scalenorm_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scalenorm-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nanodecoder.components]\nscalenorm = scalenorm_plugin:register\n")
    (tmp_path / "bp.yaml").write_text(textwrap.dedent("""
        model:
          vocab_size: 20
          context_length: 8
          d_model: 16
          n_layers: 2
          block:
            norm: {kind: scalenorm, eps: 1.0e-6}
            attention: {kind: causal, n_heads: 2}
            mlp: {kind: gelu}
    """))
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "bp.yaml")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok ScaleNorm" in out.stdout
    assert "plug-in 'scalenorm'" in out.stdout
    assert "unknown key 'epz' for norm kind 'scalenorm'; did you mean 'eps'?" in out.stdout
