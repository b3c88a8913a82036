"""What every benchmark shares: where results go and how they are printed."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def report(name: str, figures: dict) -> Path:
    """Print ``figures`` and write them, with the machine, to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": machine(), **figures}, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return path
