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
