"""How a stage is started: the command and environment the stage's chart gives its
container, read off the rendered chart. The local backend runs exactly this as a
subprocess and the Kubernetes backend creates the rendered Job itself, so the two
cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.errors import BadInputError
from pipeline.charts import launch_of, render_stage
from pipeline.config import Plan, PlannedStage


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def one_machine(plan: Plan, stage: PlannedStage) -> None:
    """Refuse a multi-node stage where there is one machine (local, container backends)."""
    if stage.spec.nnodes > 1:
        raise BadInputError(
            f"{plan.source}: stages.{stage.name}.nnodes: {stage.spec.nnodes} nodes need the "
            "kubernetes backend; on one machine use nproc_per_node"
        )


def stage_launch(plan: Plan, stage: PlannedStage) -> Launch:
    one_machine(plan, stage)
    launch = launch_of(render_stage(plan, stage))
    return Launch(argv=list(launch["command"]), env=dict(launch["env"]))
