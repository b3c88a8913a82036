"""The shape the style guide asks for: a stage does not import another stage; what two
stages share lives in a shared module."""

from __future__ import annotations

import ast
from pathlib import Path

from jobs.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_no_stage_imports_another_stage():
    stages = set(STAGES.values())
    offenders = {}
    for module in stages:
        path = ROOT / (module.replace(".", "/") + ".py")
        others = (imported_modules(path) & stages) - {module}
        if others:
            offenders[module] = sorted(others)
    assert offenders == {}


def test_the_modules_the_suite_starts_first_are_its_own():
    """A renamed module dropped from the list would be started last again, unnoticed."""
    from tests.conftest import LONGEST_FIRST

    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [m for m in LONGEST_FIRST if not (ROOT / m).is_file()] == []
