"""The local backend: every stage as a subprocess through the container's entrypoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from jobs import store
from jobs.contract import Manifest, read_manifest, up_to_date
from jobs.errors import EXIT_BAD_INPUT, StageError
from pipeline.config import Plan
from pipeline.launch import stage_launch


class StageFailed(StageError):
    def __init__(self, stage: str, exit_code: int, why: str) -> None:
        super().__init__(f"stage {stage!r} failed with exit code {exit_code}: {why}")
        self.exit_code = exit_code


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
        store.write_text(
            store.join(plan.run_uri, "run.json"), json.dumps(plan.describe(), indent=2)
        )
        results: dict[str, Manifest] = {}
        total = len(plan.stages)
        for number, stage in enumerate(plan.stages, start=1):
            head = f"[{number}/{total}] {stage.name}"
            if only and stage.name not in only:
                continue
            if (done := up_to_date(stage.stage, stage.config)) is not None:
                self.echo(f"{head}: up to date, skipped ({stage.output})")
                results[stage.name] = done
                continue
            config_uri = plan.config_uri(stage)
            store.write_text(config_uri, json.dumps(stage.config.model_dump(mode="json"), indent=2))
            launch = stage_launch(plan, stage)
            # The one local difference: the config comes from the store, not a ConfigMap.
            env = _environment({**launch.env, "KUBERLHF_CONFIG": config_uri})
            self.echo(f"{head}: running {' '.join(launch.argv)}")
            for attempt in range(stage.spec.retries + 1):
                code = self.runner(launch.argv, env=env).returncode
                if code == 0:
                    break
                if code == EXIT_BAD_INPUT:
                    raise StageFailed(stage.name, code, "bad config or input (not retried)")
                if attempt == stage.spec.retries:
                    raise StageFailed(stage.name, code, f"gave up after {attempt + 1} attempts")
                self.echo(
                    f"{head}: exit code {code}; retrying ({attempt + 1}/{stage.spec.retries})"
                    ", resuming from its newest checkpoint"
                )
            manifest = read_manifest(stage.output)
            if manifest is None:
                raise StageFailed(stage.name, 0, "exited 0 without writing its manifest")
            results[stage.name] = manifest
        return results

    def delete(self, plan: Plan) -> int:
        """Nothing to cancel: local stages run in the foreground and end with ``rlhf run``."""
        return 0
