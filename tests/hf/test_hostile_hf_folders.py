"""Hostile Hugging Face model folders: shards named outside the folder, links to files elsewhere, safetensors
headers that lie, config.json sizes no machine holds.  Each import ends in one line (exit 2, or 4 for what
does not fit) that names the file, with nothing read outside the folder and nothing built."""
from __future__ import annotations

import json
import resource
import shutil
import struct

import pytest

from nanodecoder.hf import export_hf
from nanodecoder.hf.__main__ import main as hf_main
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.model.plan import human_bytes

LLAMA = {"vocab_size": 40, "context_length": 16, "d_model": 32, "n_layers": 2,
         "block": {"attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}, "mlp": {"kind": "swiglu"},
                   "norm": {"kind": "rmsnorm"}},
         "positional": {"kind": "rope"}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A valid llama folder (config.json + model.safetensors), written by our own export: no transformers."""
    return export_hf(build_model(build_model_spec(LLAMA), seed=3), None, tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture
def folder(exported, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(exported, d)
    return d


def tensor_names(f) -> list[str]:
    data = f.read_bytes()
    return [n for n in json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]]) if n != "__metadata__"]


def write_index(d, first_shard: str) -> None:
    """An index whose first tensor lives in ``first_shard``, the others in model.safetensors."""
    names = tensor_names(d / "model.safetensors")
    weight_map = {n: first_shard if i == 0 else "model.safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def lying_header(f, shape=(2 ** 40,)) -> None:
    """A safetensors file of 4 data bytes whose header claims a tensor of ``shape`` float32."""
    header = json.dumps({"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def import_fails(capsys, d, out, code=2) -> str:
    capsys.readouterr()
    assert hf_main(["import", str(d), "--out", str(out), "--no-tokenizer"]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


def test_the_untouched_folder_imports(folder, tmp_path, capsys):
    assert hf_main(["import", str(folder), "--out", str(tmp_path / "run"), "--no-tokenizer"]) == 0


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", ".."])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(folder, tmp_path, capsys, shard):
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")    # would load, if followed
    write_index(folder, shard)
    err = import_fails(capsys, folder, tmp_path / "run")
    assert "model.safetensors.index.json: weight_map names the shard" in err and "not a file name" in err


@pytest.mark.parametrize("target", ["outside", "/etc/passwd"])
def test_an_index_shard_that_links_out_of_the_folder_is_refused(folder, tmp_path, capsys, target):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    (folder / "model-00002.safetensors").symlink_to(outside if target == "outside" else target)
    write_index(folder, "model-00002.safetensors")
    err = import_fails(capsys, folder, tmp_path / "run")
    assert "model-00002.safetensors leads to" in err and "outside the model folder" in err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_file_that_links_out_of_the_folder_is_refused(folder, tmp_path, capsys, name):
    outside = tmp_path / name
    shutil.move(folder / name, outside)            # a complete model again if the link were followed
    (folder / name).symlink_to(outside)
    err = import_fails(capsys, folder, tmp_path / "run")
    assert f"{name} leads to {outside}, outside the model folder" in err


def test_a_hugging_face_cache_snapshot_links_into_its_blobs_and_imports(folder, tmp_path, capsys):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    assert hf_main(["import", str(snap), "--out", str(tmp_path / "run"), "--no-tokenizer"]) == 0


@pytest.mark.parametrize("how", ["huge_shape", "huge_header_length", "truncated", "truncated_header"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "index"])
def test_a_safetensors_file_that_lies_about_its_size_is_one_line(folder, tmp_path, capsys, how, sharded):
    target = folder / ("model-00002.safetensors" if sharded else "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()
    if how == "huge_shape":
        lying_header(target)
    elif how == "huge_header_length":
        target.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    elif how == "truncated":
        target.write_bytes(data[:len(data) // 2])
    else:
        target.write_bytes(data[:20])
    if sharded:
        write_index(folder, target.name)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = import_fails(capsys, folder, tmp_path / "run")
    assert f"cannot read {target}" in err and "Error while deserializing header" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024      # KiB: no big allocation


@pytest.mark.parametrize("sizes", [{"hidden_size": 10 ** 9}, {"hidden_size": 1e9}, {"vocab_size": 10 ** 12},
                                   {"intermediate_size": 10 ** 15},
                                   {"num_hidden_layers": 10 ** 5, "hidden_size": 8192}],
                         ids=["hidden", "hidden_float", "vocab", "intermediate", "layers"])
def test_absurd_config_sizes_are_refused_by_the_memory_plan(folder, tmp_path, capsys, monkeypatch, sizes):
    monkeypatch.setenv("NANODECODER_AVAILABLE_MEMORY", "64GiB")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = import_fails(capsys, folder, tmp_path / "run", code=4)
    assert f"{folder}: the model does not fit in memory: config.json describes" in err
    assert "64.00 GiB available (NANODECODER_AVAILABLE_MEMORY=64GiB). Nothing was built" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_the_plan_uses_the_memory_available_and_the_dtype(folder, tmp_path, capsys, monkeypatch):
    n = sum(p.numel() for p in build_model(build_model_spec(LLAMA)).parameters())    # 26,016: 102 KiB fp32
    monkeypatch.setenv("NANODECODER_AVAILABLE_MEMORY", "80KiB")
    err = import_fails(capsys, folder, tmp_path / "run", code=4)
    assert f"{human_bytes(4 * n)} of float32 weights, 80.00 KiB available" in err
    assert "--dtype bfloat16 would fit" in err
    assert hf_main(["import", str(folder), "--out", str(tmp_path / "run"), "--no-tokenizer", "--dtype", "bf16"]) == 0


def test_a_config_that_describes_an_invalid_model_is_refused_before_anything_is_written(tmp_path):
    """100,000,000 heads over a hidden size of 32 gave head_dim 0 and an import that wrote a run folder whose
    blueprint then failed to validate; it is refused, naming the key, and nothing is written."""
    import json as _json
    from nanodecoder.hf import import_hf
    from nanodecoder.hf.rules import HFError
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(_json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 10 ** 8, "num_key_value_heads": 10 ** 8, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5}))
    with pytest.raises(HFError, match=r"cannot be built: model\.block\.attention\.n_heads: d_model \(32\) must be "
                                      r"divisible by n_heads"):
        import_hf(folder, tmp_path / "run", tokenizer=False)
    assert not (tmp_path / "run").exists()
