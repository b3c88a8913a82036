"""What a run has done so far, read from the store alone (works for every backend)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs import store
from jobs.contract import METRICS, PROGRESS, STATUS, Manifest, read_manifest
from jobs.errors import BadInputError

CANCELLED = "cancelled.json"  # in the run's folder: `rlhf cancel` was here


@dataclass
class Progress:
    """A running stage as its ``_progress/status.json`` says (pushed every sync)."""

    step: int
    total: int | None
    elapsed_s: float
    remaining_s: float | None  # None until two steps of this attempt were timed
    metrics: dict[str, Any] = field(default_factory=dict)
    # "running"; "failed" (for good) or "interrupted" (retried): the attempt ended on error
    state: str = "running"
    error: str | None = None
    started: float = 0.0  # when the run this attempt belongs to began (seconds since 1970)

    def of_total(self) -> str:
        """``/300 (13%)``, or nothing when the stage did not say its total."""
        return f"/{self.total} ({100 * self.step / self.total:.0f}%)" if self.total else ""

    def line(self) -> str:
        """``step 40/300 (13%), 2m10s elapsed, about 6m05s left``, or for an attempt that
        ended: ``failed at step 40/300 (13%) after 2m10s: BadInputError: ...``."""
        of = self.of_total()
        if self.state != "running":
            retried = {
                "interrupted": " (retried from its newest checkpoint)",
                "cancelled": " (rlhf cancel; running the file again resumes it)",
            }.get(self.state, "")
            return (
                f"{self.state} at step {self.step}{of} after {duration(self.elapsed_s)}"
                f"{retried}: {self.error}"
            )
        left = f", about {duration(self.remaining_s)} left" if self.remaining_s is not None else ""
        return f"step {self.step}{of}, {duration(self.elapsed_s)} elapsed{left}"

    def short(self) -> str:
        """``step 40/300 (13%)``, or ``failed at step 40``."""
        if self.state != "running":
            return f"{self.state} at step {self.step}"
        return f"step {self.step}{self.of_total()}"


def read_progress(output: str, now: float | None = None) -> Progress | None:
    """The progress of the stage writing ``output``; None before its first sync."""
    uri = store.join(output, PROGRESS, STATUS)
    if not store.exists(uri):
        return None
    status = json.loads(store.read_text(uri))
    state = status.get("state", "running")
    # an attempt that ended stopped its clock
    now = status.get("ended") or (time.time() if now is None else now)
    step, total, first = status["step"], status.get("total"), status.get("first")
    remaining = None
    if state == "running" and total and first and step > first[0]:
        per_step = (status["time"] - first[1]) / (step - first[0])
        # the time since the newest sync is spent on the steps after it
        remaining = max((total - step) * per_step - (now - status["time"]), 0.0)
    metrics = status.get("metrics") or {}
    return Progress(
        step,
        total,
        now - status["started"],
        remaining,
        metrics,
        state,
        status.get("error"),
        status["started"],
    )


def mark_given_up(output: str, reason: str) -> None:
    """The submitter stopped retrying the stage: its newest attempt's status, which said
    interrupted (or running, if it died unannounced), now says failed, with the reason."""
    uri = store.join(output, PROGRESS, STATUS)
    try:
        if not store.exists(uri):
            return
        status = json.loads(store.read_text(uri))
        if status.get("state") == "failed":
            return
        ended = status.get("ended") or status.get("time") or time.time()
        status |= {"state": "failed", "ended": ended, "error": reason}
        store.write_text(uri, json.dumps(status))
    except Exception:  # noqa: BLE001, S110 - the stage's failure is what the run reports
        pass


@dataclass
class StageStatus:
    name: str
    state: str  # "finished" | "started" | "failed" | "pending"
    output: str
    metrics: dict[str, Any]
    manifest: Manifest | None = None
    progress: Progress | None = None
    replaces: Manifest | None = None  # a re-run's: the finished output it will replace

    def line(self) -> str:
        """What ``rlhf status`` prints after the name and state."""
        if self.manifest is not None:
            took = seconds_between(self.manifest.started_at, self.manifest.finished_at)
            return f"in {duration(took)}; {summary(self.metrics)}"
        if self.progress is not None:
            rerun = (
                f" (a re-run; the output of {self.replaces.finished_at} stays until it ends)"
                if self.replaces is not None
                else ""
            )
            return f"{self.progress.line()}{rerun}; {summary(self.metrics)}"
        return summary(self.metrics)


def run_stages(run_uri: str) -> list[dict[str, Any]]:
    """The stages of a run, as ``run.json`` describes them."""
    described = store.join(run_uri, "run.json")
    if not store.exists(described):
        raise BadInputError(f"{run_uri}: no run there (no run.json); check the run id and --store")
    return json.loads(store.read_text(described))["stages"]


def run_status(run_uri: str) -> list[StageStatus]:
    out = []
    cancelled = store.exists(store.join(run_uri, CANCELLED))
    for stage in run_stages(run_uri):
        name, output = stage["name"], stage["output"]
        manifest = read_manifest(output)
        progress = read_progress(output)
        # a re-run (another config) keeps the old manifest until it publishes: its own
        # progress, begun after that output finished, is the stage's state
        if manifest is not None and (
            progress is None
            or progress.started <= datetime.fromisoformat(manifest.finished_at).timestamp()
        ):
            out.append(StageStatus(name, "finished", output, manifest.metrics, manifest))
            continue
        if progress is not None:
            if cancelled and progress.state == "interrupted":  # no one retries it now
                progress.state = "cancelled"
            state = "failed" if progress.state == "failed" else "started"
            out.append(
                StageStatus(
                    name, state, output, progress.metrics, progress=progress, replaces=manifest
                )
            )
            continue
        metrics_uri = store.join(output, PROGRESS, METRICS)
        if store.exists(metrics_uri):
            lines = store.read_text(metrics_uri).strip().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            out.append(StageStatus(name, "started", output, last))
        else:
            out.append(StageStatus(name, "pending", output, {}))
    return out


def summary(metrics: dict[str, Any], limit: int = 6) -> str:
    """The scalar metrics of a stage, one short line."""
    parts = []
    for key, value in metrics.items():
        if key in {"time", "step"} or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts[:limit])


def duration(seconds: float) -> str:
    """``45s``, ``2m05s``, ``1h02m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
