"""The one place that says how a stage is started: command, arguments, environment.

The local backend runs exactly this as a subprocess; the Kubernetes backend
puts exactly this into the rendered Job. Neither builds its own, so the two
cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import Plan, PlannedStage

# Where a pod mounts its stage config (the ConfigMap); the local backend passes the store URI.
CONFIG_MOUNT = "/etc/kuberlhf/config.json"


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def stage_launch(plan: Plan, stage: PlannedStage, config_path: str) -> Launch:
    """The entrypoint invocation of ``stage``; ``config_path`` is a path or URI of its config."""
    entry = ["-m", "jobs", stage.stage, "--config", config_path]
    if stage.spec.nproc_per_node > 1 or stage.spec.nnodes > 1:
        # torchrun reads the rest of its rendezvous (node rank, master address and
        # port) from PET_* variables, which a multi-node Job sets per pod.
        argv = [
            "torchrun",
            f"--nproc-per-node={stage.spec.nproc_per_node}",
            f"--nnodes={stage.spec.nnodes}",
            *entry,
        ]
    else:
        argv = ["python", *entry]
    env = {
        "KUBERLHF_RUN": plan.run_id,
        "KUBERLHF_STAGE": stage.name,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return Launch(argv=argv, env=env)
