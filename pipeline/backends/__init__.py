"""One interface, several backends (as the Kubeflow SDK's TrainerClient has): each runs
the stages of a plan in order, skipping finished ones, and can cancel a run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from jobs import store
from jobs.contract import Manifest, read_manifest, up_to_date
from jobs.errors import EXIT_BAD_INPUT, StageError
from pipeline.config import Plan, PlannedStage
from pipeline.status import CANCELLED, mark_given_up
from pipeline.watch import BAD_INPUT, EXIT_CANCELLED


class StageFailed(StageError):
    def __init__(self, stage: str, exit_code: int, why: str) -> None:
        super().__init__(f"stage {stage!r} failed with exit code {exit_code}: {why}")
        self.exit_code = exit_code


class Backend(Protocol):
    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]: ...

    def delete(self, plan: Plan) -> int: ...


def run_in_order(
    plan: Plan,
    only: list[str] | None,
    echo: Callable[[str], None],
    run_stage: Callable[[PlannedStage, str], None],
) -> dict[str, Manifest]:
    """What every backend does around its own way of running one stage: record the run,
    skip stages whose finished output matches, and collect the manifests."""
    store.write_text(store.join(plan.run_uri, "run.json"), json.dumps(plan.describe(), indent=2))
    marker = store.join(plan.run_uri, CANCELLED)
    if store.exists(marker):  # running the file again starts what a cancel stopped
        store.delete(marker)
    results: dict[str, Manifest] = {}
    try:
        for number, stage in enumerate(plan.stages, start=1):
            head = f"[{number}/{len(plan.stages)}] {stage.name}"
            if only and stage.name not in only:
                continue
            if (done := up_to_date(stage.stage, stage.config)) is not None:
                echo(f"{head}: up to date, skipped ({stage.output})")
                results[stage.name] = done
                continue
            check_not_cancelled(plan, stage.name)
            run_stage(stage, head)
            manifest = read_manifest(stage.output)
            if manifest is None:
                # exit 1, not the stage's 0: `rlhf run && next-step` must not go on
                raise StageFailed(stage.name, 1, "ended without writing its manifest")
            results[stage.name] = manifest
    except BaseException:
        end_tracking(plan, False, echo)
        raise
    end_tracking(plan, True, echo)
    return results


def mark_cancelled(plan: Plan) -> None:
    """Say in the store that the run is cancelled, before its Jobs are deleted: a submitter
    between two stages, or about to create a Job, stops instead of going on."""
    store.write_text(store.join(plan.run_uri, CANCELLED), json.dumps({"cancelled": True}))


def check_not_cancelled(plan: Plan, stage: str) -> None:
    if store.exists(store.join(plan.run_uri, CANCELLED)):
        raise StageFailed(
            stage,
            EXIT_CANCELLED,
            "the run was cancelled (rlhf cancel); run the file again to go on",
        )


def end_tracking(plan: Plan, succeeded: bool, echo: Callable[[str], None]) -> None:
    """Close the run's MLflow run (each stage closes its own nested one); a tracking server
    that cannot be reached costs a warning, not the run."""
    from jobs.secrets import redact
    from jobs.sinks import end_pipeline_run

    try:
        end_pipeline_run(plan.run_id, succeeded)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises
        echo(f"warning: MLflow run of {plan.run_id} not closed: {redact(str(exc))[:300]}")


def run_with_retries(
    plan: Plan,
    stage: PlannedStage,
    head: str,
    echo: Callable[[str], None],
    attempt: Callable[[], int],
) -> None:
    """One stage as one process (a subprocess, a container), started again on a retryable
    exit code up to the stage's ``retries``, as a Job's backoffLimit and podFailurePolicy
    would: a bad config or input (exit 65) is never retried, nor a stage that `rlhf
    cancel` stopped (it checkpoints and exits 75 like a preempted one)."""
    for number in range(stage.spec.retries + 1):
        code = attempt()
        if code == 0:
            return
        if code == EXIT_BAD_INPUT:
            raise StageFailed(stage.name, code, BAD_INPUT)
        check_not_cancelled(plan, stage.name)
        if number == stage.spec.retries:
            reason = f"gave up after {number + 1} attempts (exit code {code})"
            mark_given_up(stage.output, reason)
            raise StageFailed(stage.name, code, reason)
        echo(
            f"{head}: exit code {code}; retrying ({number + 1}/{stage.spec.retries})"
            ", resuming from its newest checkpoint"
        )


def get_backend(name: str, **options) -> Backend:
    if name == "local":
        from pipeline.backends.local import LocalBackend

        return LocalBackend(**options)
    if name == "kubernetes":
        from pipeline.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(**options)
    if name == "container":
        from pipeline.backends.container import ContainerBackend

        return ContainerBackend(**options)
    raise ValueError(f"unknown backend {name!r}")
