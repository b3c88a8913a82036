"""A page opened in a real headless Chromium (Debian's): its screenshot, its DOM after
loading, and what its console said."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Opened:
    screenshot: Path
    dom: str
    console: list[str]  # the page's console messages (uncaught errors among them)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium here (make test installs Debian's, as root)")
    return found


def open_page(page: Path, screenshot: Path, width: int = 1400, height: int = 2000) -> Opened:
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # as root in a container; the page is our own file
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            "--enable-logging=stderr",
            "--v=0",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert screenshot.is_file(), result.stderr[-3000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return Opened(screenshot, result.stdout, console)
