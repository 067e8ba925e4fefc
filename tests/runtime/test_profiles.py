"""Runtime profiles as data: shipped files, their schema, the blueprint's overrides, clear errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.config import BlueprintError
from nanodecoder.config.declare import build
from nanodecoder.resources import schemas_dir
from nanodecoder.runtime import (Profile, RuntimeSetupError, RuntimeSpec, available_profiles, load_profile,
                                 resolve_profile)
from nanodecoder.runtime.profiles import SETTINGS
from rthelpers import REPO, tiny_raw, write

PROFILE_SCHEMA = json.loads((schemas_dir() / "profile.schema.json").read_text())
RUNTIME = json.loads((schemas_dir() / "blueprint.schema.json").read_text())["$defs"]["runtime"]
SHIPPED = ["cpu", "fsdp", "gpu", "gpu_mixed", "multi_gpu_compile"]


def test_the_issue_s_profiles_are_shipped_and_valid():
    assert available_profiles() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and p.description
        text = (REPO / "blueprints" / "profiles" / f"{name}.yaml").read_text()
        assert text.startswith("# yaml-language-server: $schema=../../schemas/profile.schema.json")
    cpu = load_profile("cpu")
    assert (cpu.device, cpu.precision, cpu.compile) == ("cpu", "fp32", False)
    gpu, mixed = load_profile("gpu"), load_profile("gpu_mixed")
    assert (gpu.device, gpu.precision, gpu.tf32) == ("cuda", "fp32", True)
    assert (mixed.precision, mixed.tf32) == ("mixed", True)
    assert load_profile("multi_gpu_compile").compile and load_profile("multi_gpu_compile").data_parallel == "ddp"
    assert load_profile("fsdp").data_parallel == "fsdp"


def test_schema_dataclasses_and_the_blueprint_section_agree():
    props = PROFILE_SCHEMA["properties"]
    assert set(props) == {"description", *SETTINGS}
    assert {f.name for f in dataclasses.fields(Profile)} == {"name", "overridden", *props}
    for f in dataclasses.fields(Profile):
        if f.name in SETTINGS:
            assert props[f.name]["default"] == f.default, f.name
    assert RUNTIME["properties"]["profile"]["enum"] == ["auto", *SHIPPED]       # kind enums are sorted
    assert set(RUNTIME["properties"]) == {"profile", *SETTINGS}
    for key in SETTINGS:   # every override is exactly the profile field's schema (or null); absent: the profile's
        override = RUNTIME["properties"][key]
        assert bare(override) == nullable(bare(props[key])), key
        assert override["default"] is None and props[key]["description"] in override["description"], key
        assert getattr(RuntimeSpec(), key) is None


def bare(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k not in ("description", "default")}


def nullable(schema: dict) -> dict:
    """``schema`` that also accepts null (how an override of a profile field is written)."""
    out = dict(schema)
    if "enum" in out:
        out["enum"] = [*out["enum"], None] if None not in out["enum"] else out["enum"]
    else:
        types = [out["type"]] if isinstance(out["type"], str) else list(out["type"])
        out["type"] = types if "null" in types else [*types, "null"]
    return out


def test_overrides_apply_and_are_marked():
    p = resolve_profile(RuntimeSpec(profile="gpu_mixed", compile=True, precision="mixed", timeout_s=60))
    assert (p.compile, p.timeout_s, p.device) == (True, 60, "cuda")
    assert set(p.overridden) == {"compile", "timeout_s"}            # precision is the profile's own value
    assert "eager" not in p.summary() and "compile (default)*" in p.summary()
    auto = resolve_profile(RuntimeSpec())
    here = "gpu" if torch.cuda.is_available() else "cpu"
    assert auto.name == f"auto -> {here}" and auto.device == ("cuda" if here == "gpu" else "cpu")
    assert resolve_profile(RuntimeSpec(device="cuda")).name == "auto -> gpu"
    with pytest.raises(RuntimeSetupError, match="profile 'cpu' cannot run on device 'cuda'"):
        resolve_profile(RuntimeSpec(profile="cpu", device="cuda"))
    with pytest.raises(RuntimeSetupError, match=r"unknown runtime profile 'gpx'; did you mean 'gpu'\?"):
        resolve_profile(RuntimeSpec(profile="gpx"))


def test_blueprint_runtime_section_and_set_overrides(tmp_path):
    raw = tiny_raw(tmp_path)
    bp = write(tmp_path, raw, "bp.yaml")
    spec = build(RuntimeSpec, load_blueprint(bp, ["runtime.compile=true", "runtime.profile=gpu"]).raw["runtime"])
    assert resolve_profile(spec).compile and resolve_profile(spec).name == "gpu"
    with pytest.raises(BlueprintError) as e:
        load_blueprint(bp, ["runtime.precision=bf17", "runtime.profil=cpu", "runtime.compile=maybe"])
    text = str(e.value)
    assert text.startswith("invalid blueprint (3 problems):")
    assert "--set: runtime.precision: unknown value 'bf17'; did you mean 'bf16'?" in text
    assert "unknown key 'profil'; did you mean 'profile'?" in text
    assert "--set: runtime.compile: expected true or false or null, got the string 'maybe'" in text   # null: the profile's


def test_a_bad_profile_file_is_reported_like_a_bad_blueprint(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("description: mine\ndevice: gpu\nprecision: fp32\ntf32: false\ncompile: 'no'\n"
                   "compile_mode: default\ndata_parallel: ddp\nthreads: null\npeak_flops: null\n"
                   "timeout_s: 0\ncache_host_memory: false\nsharding: full\n")
    with pytest.raises(BlueprintError) as e:
        load_profile("mine", path=bad)
    assert str(e.value).splitlines() == [
        "invalid blueprint (4 problems):",
        f"  {bad}: device (line 2): 'gpu' does not match the pattern ^(auto|cpu|cuda(:[0-9]+)?|mps)$; expected "
        "torch device: 'cpu', 'cuda' (cuda:LOCAL_RANK under torchrun), 'cuda:N' (one process only), 'mps', or "
        "'auto' (CUDA when available, else the CPU) (default 'auto')",
        f"  {bad}: compile (line 5): expected true or false, got the string 'no'; remove the quotes and write "
        "true or false",
        f"  {bad}: timeout_s (line 10): 0 is out of range; expected a value >= 1",
        f"  {bad}: sharding (line 12): unknown key 'sharding' (allowed here: activation_checkpointing, "
        "cache_host_memory, check_memory, compile, compile_mode, data_parallel, description, device, expert_parallel, "
        "peak_flops, precision, tf32, threads, timeout_s)"]
    bad.write_text(bad.read_text().replace("sharding: full", "timeout_s: 60"))
    with pytest.raises(BlueprintError, match=r"timeout_s \(line 12\): duplicate key 'timeout_s' \(first on line 10\)"):
        load_profile("mine", path=bad)


def test_a_profile_states_only_what_differs_from_the_declared_defaults(tmp_path):
    """Only ``description`` is required; every setting left out takes the Profile class's declared default."""
    assert PROFILE_SCHEMA["required"] == ["description"]
    short = tmp_path / "short.yaml"
    short.write_text("description: too short\ndevice: cpu\n")
    profile = load_profile("short", path=short)
    assert profile.device == "cpu"
    for name in SETTINGS:
        if name != "device":
            assert getattr(profile, name) == PROFILE_SCHEMA["properties"][name].get("default"), name
    bad = tmp_path / "nodoc.yaml"
    bad.write_text("device: cpu\n")
    with pytest.raises(BlueprintError, match="missing required key 'description'"):
        load_profile("nodoc", path=bad)