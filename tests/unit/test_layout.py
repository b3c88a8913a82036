"""The shape the style guide asks for: a stage does not import another stage; what two
stages share lives in a shared module."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_suite_hands_out_its_longest_modules_first():
    """As pytest collects them (the order xdist hands modules out in, under the Makefile's
    --no-loadscope-reorder): a module renamed, or node ids that stop matching the list, would
    be started last again, unnoticed."""
    from tests.conftest import LONGEST_FIRST

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    modules = list(dict.fromkeys(line.split("::")[0] for line in done.stdout.splitlines()))
    assert modules[: len(LONGEST_FIRST)] == list(LONGEST_FIRST)
    suite = next(
        line for line in (ROOT / "Makefile").read_text().splitlines() if "SUITE :=" in line
    )
    assert "--dist loadfile --no-loadscope-reorder" in suite
