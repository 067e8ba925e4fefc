"""The import layering: one direction, no cycles, no function-level imports to dodge them.

    config core -> components -> model -> data | runtime -> train -> eval -> finetune | hf -> api -> cli

A module may import its own package and the layers below it.  The root package (``nanodecoder/__init__.py``,
the public ``nanodecoder.load``) is the face of the api layer: it may import ``api/``, and only the command line
imports it.  The command
modules users type (``nanodecoder.run``, ``nanodecoder.sample``,
``nanodecoder.eval.__main__``, ``nanodecoder.finetune.answer``, ``nanodecoder.compare``) are thin files of
the command-line layer wherever they sit.  Imports inside functions are kept
only for heavy optional parts (plots, W&B, torch.distributed, torch.compile's
internals).  The import graph is read from the source (``ast``), nothing is run.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanodecoder"

LAYERS = {"config": 0, "resources": 0, "": 0, "components": 1, "model": 2, "data": 3, "runtime": 3,
          "train": 4, "eval": 5, "finetune": 6, "hf": 6, "api": 7, "cli": 8}
ROOT = "nanodecoder"      # the root package: the public face of the api layer
COMMANDS = {"nanodecoder.run", "nanodecoder.sample", "nanodecoder.eval.__main__", "nanodecoder.finetune.answer",
            "nanodecoder.hf.__main__", "nanodecoder.compare", "nanodecoder.ckpt"}
#: what runtime/ may take from the config core: its public package, the declaration helpers, shipped files
RUNTIME_CONFIG = {"nanodecoder.config", "nanodecoder.config.declare", "nanodecoder.resources"}
#: heavy optional imports that may stay inside the function that needs them
LAZY_OK = ("matplotlib", "wandb", "transformers", "datasets", "torch.distributed", "torch.nn.parallel",
           "torch._dynamo", "torch.optim.optimizer")


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = modules()


def _target(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def imports() -> list[tuple[str, str, bool, int]]:
    """``(importer, imported module, inside a function?, line)`` for every import in the package."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _target(name, child, path.name == "__init__.py"):
                        while target not in MODULES and "." in target and target.startswith("nanodecoder"):
                            target = target.rsplit(".", 1)[0]
                        found.append((name, target, in_function, child.lineno))
                else:
                    visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
        visit(tree, False)
    return found


def layer(module: str) -> int:
    if module in COMMANDS:
        return LAYERS["cli"]
    if module == ROOT:
        return LAYERS["api"]
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


CORE = {"config", "resources", ""}     # the config core: declarations, loading, where the shipped files are


def package(module: str) -> str:
    if module == ROOT:
        return "api"
    parts = module.split(".")
    name = "cli" if module in COMMANDS else parts[1] if len(parts) > 1 else ""
    return "config" if name in CORE else name


def own_edges() -> list[tuple[str, str, bool, int]]:
    return [e for e in imports() if e[1].startswith("nanodecoder")]


def test_every_package_has_a_layer():
    assert {package(m) for m in MODULES} <= set(LAYERS)


def test_imports_point_down_only():
    wrong = [f"{a} (line {n}) imports {b}" for a, b, _, n in own_edges()
             if package(a) != package(b) and (layer(b) > layer(a) or layer(b) == layer(a))]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_runtime_takes_only_the_public_config_api():
    wrong = [f"{a} imports {b}" for a, b, _, _ in own_edges()
             if package(a) == "runtime" and package(b) == "config" and b not in RUNTIME_CONFIG]
    assert not wrong


def test_no_function_level_imports_but_heavy_optional_ones():
    lazy = [f"{a} (line {n}): {b}" for a, b, inside, n in imports()
            if inside and not b.startswith(LAZY_OK)]
    assert not lazy, "move these imports to the top of the module:\n" + "\n".join(lazy)


def test_the_module_graph_has_no_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in own_edges():
        if b in MODULES and b != a:
            graph[a].add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_scanner_sees_imports():
    """Guards the test itself: the known imports are found, function-level ones too."""
    found = {(a, b, inside) for a, b, inside, _ in imports()}
    assert ("nanodecoder.cli.run", "nanodecoder.train.loop", False) in found
    assert ("nanodecoder.train.plots", "matplotlib", True) in found
    assert len(own_edges()) > 150
