"""Typed blueprint errors that carry every problem found, each with its location."""
from __future__ import annotations

import re
from dataclasses import dataclass

SET = "--set"   # the pseudo-file of problems that come from ``--set`` overrides


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a blueprint, formatted as
    ``file: dotted.path (line N): what is wrong; what is expected``."""
    file: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path or "(top level)"
        line = f" (line {self.line})" if self.line else ""
        return f"{self.file}: {where}{line}: {self.message}"


def _set_rank(path: str, keys: list[str]) -> int:
    """Index of the ``--set`` key a problem at ``path`` comes from (``keys`` in the order given)."""
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    if path in keys:
        return keys.index(path)
    for i, key in enumerate(keys):
        if (path + ".").startswith(key + ".") or (key + ".").startswith(path + "."):
            return i
    return len(keys)


def sort_problems(problems: list[Problem], files: list[str] | None = None,
                  set_keys: list[str] | None = None) -> list[Problem]:
    """Unique problems ordered by file (``files`` order, then by name), line and path;
    ``--set`` problems come last, in the order of ``set_keys`` (the overrides as given)."""
    order = {f: i for i, f in enumerate(files or [])}
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (1, _set_rank(p.path, set_keys or [])) if p.file == SET else
                  (0, order.get(p.file, len(order)), p.file, p.line or 0, p.path))


class BlueprintError(Exception):
    """A blueprint could not be loaded or is invalid.  ``problems`` lists every issue."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = "1 problem" if n == 1 else f"{n} problems"
        return f"invalid blueprint ({head}):\n" + "\n".join(f"  {p}" for p in self.problems)
