"""Rendering the stage charts with Helm's own engine: the single source of what runs."""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.config_file import describe_validation_error
from jobs.errors import BadInputError
from pipeline.chart_values import CHARTS, StageValues
from pipeline.config import Plan, PlannedStage

HOOK = "helm.sh/hook"


def charts_dir() -> Path:
    return Path(os.environ.get("KUBERLHF_CHARTS", CHARTS))


@cache
def _load(path: str):
    import helm_python

    # Helm's loader notes every linked library chart on the process's stderr (Go's default
    # logger, not the SDK's log handler); load errors still arrive as exceptions.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            return helm_python.Chart.load(path)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def merge(base: dict, override: dict) -> dict:
    """Helm's way: maps merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def stage_values(plan: Plan, stage: PlannedStage) -> dict[str, Any]:
    """The chart values of one stage of a run: pipeline-wide values, the stage's own, and
    what the run decides (run id, stage, config, output, nodes)."""
    values = merge(plan.kubernetes.values, stage.spec.values)
    values = merge(
        values,
        {
            "stage": stage.stage,
            "name": stage.name,
            "run": plan.run_id,
            "output": stage.output,
            "config": stage.config.model_dump(mode="json"),
            "nodes": stage.spec.nnodes,
            "nprocPerNode": stage.spec.nproc_per_node,
        },
    )
    try:
        StageValues.model_validate(values)
    except ValidationError as exc:
        where = f"stages.{stage.name}.values (with kubernetes.values)"
        raise BadInputError(describe_validation_error(exc, plan.source, where)) from None
    return values


def render_stage(plan: Plan, stage: PlannedStage, hooks: bool = False) -> list[dict[str, Any]]:
    """Every manifest the stage's chart makes for this run, as objects: what a run creates,
    and with ``hooks`` the `helm test` pod too."""
    chart_path = charts_dir() / stage.stage
    if not (chart_path / "Chart.yaml").is_file():
        raise BadInputError(f"no chart for stage {stage.stage!r} in {charts_dir()}")
    rendered = _load(str(chart_path)).render(
        stage_values(plan, stage),
        name=f"{plan.run_id}-{stage.name}",
        namespace=plan.kubernetes.namespace,
    )
    manifests = []
    for name, text in sorted(rendered.items()):
        if name.endswith("NOTES.txt"):
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    if not hooks:
        manifests = [m for m in manifests if HOOK not in m["metadata"].get("annotations", {})]
    return manifests


def pod_template(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    [job] = [m for m in manifests if m["kind"] == "Job"]
    return job["spec"]["template"]


def launch_of(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The entrypoint command and environment the chart gives the stage container."""
    return json.loads(pod_template(manifests)["metadata"]["annotations"]["kuberlhf.io/launch"])


def client_model(manifest: dict[str, Any]):
    """``manifest`` as the Kubernetes Python client's own request model (V1Job, V1Pod, ...),
    which validates it the way the client does before it sends anything: stricter than the
    API server in places (resource quantities must be strings)."""
    import kubernetes.client as k8s
    from pydantic import ValidationError as ClientValidationError

    model = getattr(k8s, f"V1{manifest['kind']}")
    try:
        return model.model_validate(manifest)
    except ClientValidationError as exc:
        raise BadInputError(
            f"{manifest['kind']} {manifest['metadata']['name']}: the Kubernetes client refuses it: "
            + "; ".join(
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors()
            )
        ) from None
