"""Python 3.11 to 3.13: the package admits each, and each compiles every module (the suite
runs under the virtual environment's Python; CUDA images ship 3.12)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from tests.conftest import ROOT

VERSIONS = ("3.11", "3.12", "3.13")
MAKE_SETTINGS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTHONS")


def test_the_package_admits_python_3_11_to_3_13():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    admitted = SpecifierSet(project["requires-python"])
    assert all(f"{v}.0" in admitted for v in VERSIONS)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in VERSIONS


def interpreter(version: str) -> str | None:
    """A working ``python<version>``: on PATH, or one pyenv installed."""
    candidates = [f"python{version}"] + sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}"))
    )
    for candidate in candidates:
        try:
            done = subprocess.run([candidate, "-c", ""], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", VERSIONS)
def test_every_module_compiles_under_each_supported_python(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    result = subprocess.run(
        [python, "-m", "compileall", "-q", "-j", "1", "jobs", "pipeline", "bench", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)},  # leave the tree clean
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_make_test_runs_the_suite_under_python_3_11_and_3_12():
    """What CI runs (`make test`, dry): the suite once under .venv's Python and again under
    3.12, whichever of the two .venv has."""
    import re
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    missing = [v for v in ("3.11", "3.12") if interpreter(v) is None]
    if missing:
        pytest.skip(f"no python{' or python'.join(missing)} on this machine")
    # as CI calls it: not with the flags or PYTHONS of a make this suite may run under
    env = {k: v for k, v in os.environ.items() if k not in MAKE_SETTINGS}
    dry = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    venv = re.findall(r"^\.venv/bin/python -m pytest .*$", dry.stdout, flags=re.M)
    others = re.findall(r"\.venv-(3\.\d+)/bin/python -m pytest ", dry.stdout)
    assert len(venv) == 1, dry.stdout[-3000:]
    own = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert sorted([".".join(own), *others]) == [
        "3.11",
        "3.12",
    ], dry.stdout[-3000:]
