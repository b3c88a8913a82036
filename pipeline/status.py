"""What a run has done so far, read from the store alone (works for every backend)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobs import store
from jobs.contract import METRICS, PROGRESS, read_manifest
from jobs.errors import BadInputError


@dataclass
class StageStatus:
    name: str
    state: str  # "finished" | "started" | "pending"
    output: str
    metrics: dict[str, Any]


def run_status(run_uri: str) -> list[StageStatus]:
    described = store.join(run_uri, "run.json")
    if not store.exists(described):
        raise BadInputError(f"{run_uri}: no run there (no run.json); check the run id and --store")
    out = []
    for stage in json.loads(store.read_text(described))["stages"]:
        manifest = read_manifest(stage["output"])
        if manifest is not None:
            out.append(StageStatus(stage["name"], "finished", stage["output"], manifest.metrics))
            continue
        progress = store.join(stage["output"], PROGRESS, METRICS)
        if store.exists(progress):
            lines = store.read_text(progress).strip().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            out.append(StageStatus(stage["name"], "started", stage["output"], last))
        else:
            out.append(StageStatus(stage["name"], "pending", stage["output"], {}))
    return out


def summary(metrics: dict[str, Any], limit: int = 6) -> str:
    """The scalar metrics of a stage, one short line."""
    parts = []
    for key, value in metrics.items():
        if key in {"time"} or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts[:limit])
