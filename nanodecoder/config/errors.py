"""Typed blueprint errors that carry every problem found, each with its location."""
from __future__ import annotations

from dataclasses import dataclass


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


class BlueprintError(Exception):
    """A blueprint could not be loaded or is invalid.  ``problems`` lists every issue."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = "1 problem" if n == 1 else f"{n} problems"
        return f"invalid blueprint ({head}):\n" + "\n".join(f"  {p}" for p in self.problems)
