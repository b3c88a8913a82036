"""The local backend: every stage as a subprocess through the container's entrypoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from jobs import store
from jobs.contract import Manifest
from pipeline.backends import run_in_order, run_with_retries
from pipeline.config import Plan, PlannedStage
from pipeline.launch import stage_launch


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """The user's environment (S3 settings among it) with the launch's variables on top;
    ``python`` and ``torchrun`` resolve to this interpreter's installation."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class LocalBackend:
    def __init__(self, echo: Callable[[str], None] = print, runner=subprocess.run) -> None:
        self.echo, self.runner = echo, runner

    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]:
        return run_in_order(
            plan, only, self.echo, lambda stage, head: self.run_stage(plan, stage, head)
        )

    def run_stage(self, plan: Plan, stage: PlannedStage, head: str) -> None:
        config_uri = plan.config_uri(stage)
        store.write_text(config_uri, json.dumps(stage.config.model_dump(mode="json"), indent=2))
        launch = stage_launch(plan, stage)
        # The one local difference: the config comes from the store, not a ConfigMap.
        env = _environment({**launch.env, "KUBERLHF_CONFIG": config_uri})
        self.echo(f"{head}: running {' '.join(launch.argv)}")
        run_with_retries(
            plan, stage, head, self.echo, lambda: self.runner(launch.argv, env=env).returncode
        )

    def delete(self, plan: Plan) -> int:
        """Nothing to cancel: local stages run in the foreground and end with ``rlhf run``."""
        return 0
