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


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise BadInputError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])
