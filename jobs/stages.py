"""The registry of stages: name -> module holding ``Config`` and ``run(config, ctx)``.

Modules are imported on demand so that ``python -m jobs data`` does not pay for
DeepSpeed's import, and so the submitter can validate configs cheaply.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from jobs.errors import BadInputError

STAGES: dict[str, str] = {
    "bootstrap": "jobs.bootstrap",
    "data": "jobs.data.stage",
    "sft": "jobs.sft",
    "generate": "jobs.generate",
    "label": "jobs.label",
    "reward": "jobs.reward",
    "ppo": "jobs.ppo",
    "evaluate": "jobs.evaluate",
    "dpo": "jobs.dpo",
    "merge": "jobs.merge",
    "crlft": "jobs.crlft",
    "grpo": "jobs.grpo",
}


# Stages that run as one process: they shard nothing over ranks, so under torchrun every
# rank would do (and pay an endpoint for) all the work, and write the same files.
ONE_PROCESS = frozenset({"bootstrap", "data", "generate", "label", "evaluate", "merge"})


def one_process_only(stage: str, processes: int) -> str | None:
    """Why ``stage`` cannot run as ``processes`` processes, or None."""
    if stage in ONE_PROCESS and processes > 1:
        return (
            f"the {stage} stage runs as one process (it shards no work over ranks); "
            f"give it nproc_per_node: 1 and nnodes: 1, not {processes} processes"
        )
    return None


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise BadInputError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])
