"""pyproject.toml lists every subpackage, and an installed copy finds the shipped schemas, blueprints and corpora
(and runs the shipped experiments from another folder)."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nanodecoder").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_shipped_folders_are_mapped_into_the_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["nanodecoder._shipped.schemas"] == "schemas"
    assert cfg["package-dir"]["nanodecoder._shipped.blueprints"] == "blueprints"
    assert "*.json" in cfg["package-data"]["nanodecoder._shipped.schemas"]


def test_every_shipped_blueprint_folder_is_installed():
    """pip install . copies each blueprints/ folder that holds YAML (profiles/, zoo/, ...) into the package."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in sorted({p.parent for p in (ROOT / "blueprints").rglob("*.yaml")}):
        rel = folder.relative_to(ROOT).as_posix()
        package = "nanodecoder._shipped." + rel.replace("/", ".")
        assert cfg["package-dir"].get(package) == rel, package
        assert package in cfg["packages"] and "*.yaml" in cfg["package-data"][package], package


def test_every_shipped_corpus_file_is_package_data():
    """pip install . copies nanodecoder/data/corpora/ (the builtin corpora, their README and license)."""
    from fnmatch import fnmatch
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = cfg["package-data"]["nanodecoder.data"]
    folder = ROOT / "nanodecoder" / "data"
    files = [p.relative_to(folder).as_posix() for p in (folder / "corpora").iterdir() if not p.name.startswith(".")]
    assert {"corpora/tinyshakespeare.txt", "corpora/instruction_data.json"} <= set(files)
    assert [f for f in files if not any(fnmatch(f, g) for g in globs)] == []


def _relative_paths(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _relative_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from _relative_paths(v)
    elif isinstance(value, str) and value.startswith(".."):
        yield value


def test_no_shipped_blueprint_or_readme_command_names_a_file_outside_the_repository():
    import yaml
    for bp in sorted((ROOT / "blueprints").rglob("*.yaml")):
        for raw in _relative_paths(yaml.safe_load(bp.read_text())):
            target = (bp.parent / raw).resolve()
            assert target.is_relative_to(ROOT), f"{bp.relative_to(ROOT)}: {raw} leaves the repository"
        assert "shared/" not in bp.read_text(), bp
    commands = [line for line in (ROOT / "README.md").read_text().splitlines()
                if line.lstrip().startswith(("python ", "torchrun ", "pip "))]
    assert commands and [c for c in commands if "../" in c or "shared/" in c] == []


# ---------------------------------------------------------------- an installed copy, run from another folder

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           # anything that tried the network would fail at once on these (nothing listens on port 9)
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
FEW_STEPS = ["train.steps=3", "train.eval_every=0", "train.eval_steps=1", "train.log_every=1",
             "train.checkpoint_every=0", "sample.max_new_tokens=4", "logging.progress=false", "logging.plots=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install`` of a copy of the sources into a folder of its own (offline, no dependencies: those of
    this environment are used), and an empty working folder outside the repository."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("nanodecoder", "schemas", "blueprints"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(root / "site"), str(src)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE})
    assert out.returncode == 0, out.stderr[-3000:]
    work = root / "work"
    work.mkdir()
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(root / "site"), "NANODECODER_CACHE": str(root / "cache")}
    return SimpleNamespace(site=root / "site", work=work, env=env)


def _run(installed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=installed.work, env=installed.env, capture_output=True,
                          text=True, timeout=300)


def _last_eval(run_parent: Path) -> dict:
    (metrics,) = run_parent.glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == 3
    return rows[-1]


def test_an_installed_copy_runs_the_shipped_experiments_from_another_folder(installed):
    """nanogpt_cpu_char, the tiny-shakespeare speedrun and SFT on the shipped instruction records, a few steps
    each, from an installed copy (not this checkout), the working folder outside the repository, offline."""
    where = _run(installed, "-c", "import nanodecoder, nanodecoder.resources as r; "
                                  "print(nanodecoder.__file__); print(r.corpora_dir())")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(installed.site), line
    corpora = installed.site / "nanodecoder" / "data" / "corpora"
    for name in ("tinyshakespeare.txt", "instruction_data.json", "LICENSE-instruction_data.txt"):
        assert (corpora / name).read_bytes() == (ROOT / "nanodecoder" / "data" / "corpora" / name).read_bytes()

    runs = installed.work / "runs"
    for blueprint, extra in [("nanogpt_cpu_char.yaml", []),
                             ("blueprints/speedrun/shakespeare_char_cpu.yaml", ["train.time_budget=null"]),
                             # the source run of the SFT, on a small slice of its corpus
                             ("dense_gpt.yaml", ["train.batch_size=4", "data.source.max_bytes=300000"]),
                             ("sft_dense_gpt.yaml", ["train.batch_size=4", f"finetune.from={runs / 'dense_gpt'}"])]:
        out = _run(installed, "-m", "nanodecoder.run", blueprint, "--set", *FEW_STEPS, *extra)
        assert out.returncode == 0, f"{blueprint}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    for name in ("nanogpt_cpu_char", "shakespeare_char_cpu"):
        row = _last_eval(runs / name)
        assert 3.0 < row["val_loss"] < 5.0, row        # ~ln(65) = 4.17 after 3 steps on 65 characters
    assert _last_eval(runs / "sft_dense_gpt")["val_loss"] > 0
    # both tiny-shakespeare blueprints share one prepared folder: same source, same tokenizer
    (prepared,) = (Path(installed.env["NANODECODER_CACHE"]) / "prepared").glob("builtin-char-*")
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "builtin", "name": "tinyshakespeare", "val_fraction": 0.1}
    assert manifest["n_tokens"] == {"train": 1_003_856, "val": 111_538}
