"""The fault suite's fixtures: the S3 fault proxy in front of the test's S3 server, and the
record of every fault tried, which ``python -m tests.faults.report`` prints as a table."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import store
from tests import warm
from tests.conftest import ROOT, direct_client
from tests.faults.proxy import FaultProxy, Rule

# One line per fault tried: written by the tests, read by the report (and the README).
RECORD = Path(
    os.environ.get("KUBERLHF_FAULT_RECORD", Path(__file__).parents[2] / "runs" / "faults.jsonl")
)


# KUBERLHF_FAULT_SEED replays another draw of the moments; the table names the seed.
SEED = int(os.environ.get("KUBERLHF_FAULT_SEED", "0"))


def record(fault: str, where: str, outcome: str) -> None:
    """Add a row to the suite's table of faults tried and what became of them (the session
    emptied it at its start, tests/conftest.py; one short append per row, so the workers of
    a parallel run can share it)."""
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    with open(RECORD, "a") as handle:
        handle.write(json.dumps({"fault": fault, "where": where, "outcome": outcome}) + "\n")


def timing(key: str) -> bool:
    """A metric that measures the clock, not the model."""
    return key == "time" or key.endswith(("_s", "per_s", "_per_second")) or "mfu" in key


# A stall outlasts the client's read timeout. The store's own tests keep both short; the
# stage runs (two busy cores, the server in the test's process) leave more room.
READ_TIMEOUT_S, STALL_S = 2.0, 3.0


@pytest.fixture
def proxy(s3_server, s3_env, monkeypatch):
    """A fault proxy in front of the test's S3 server, and the stage's environment pointed at
    it with a short read timeout (a stalled answer is abandoned after READ_TIMEOUT_S; the
    server answers within milliseconds, and a slow answer is retried anyway)."""
    with FaultProxy(s3_server, seed=SEED, stall_s=STALL_S) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
        monkeypatch.setenv("KUBERLHF_S3_READ_TIMEOUT", str(READ_TIMEOUT_S))
        store.reset_clients()
        yield fault_proxy
    store.reset_clients()
    assert fault_proxy.errors == [], f"the proxy itself failed: {fault_proxy.errors[:3]}"


STEPS = 6  # optimiser steps or iterations of every stage below; a checkpoint every 2


def configs(inputs: str) -> dict[str, dict]:
    """Small runs of each stage, on inputs in the bucket (``inputs``)."""
    common = {"checkpoint_every": 2, "seed": 4}
    steps = {"max_steps": STEPS, "log_every": 1, "eval_every": 4}
    model = f"{inputs}/bootstrap/model"
    return {
        "sft": {
            **common,
            **steps,
            "model": model,
            "data": f"{inputs}/data",
            "max_seq_len": 64,
            "train": {"learning_rate": 3e-3, "micro_batch_size": 8},
        },
        "reward": {
            **common,
            **steps,
            "model": model,
            "data": f"{inputs}/data",
            "max_seq_len": 64,
            "train": {"learning_rate": 1e-3, "micro_batch_size": 8},
        },
        "dpo": {
            **common,
            **steps,
            "model": model,
            "data": f"{inputs}/data",
            "max_seq_len": 64,
            "train": {"learning_rate": 1e-3, "micro_batch_size": 8},
        },
        "ppo": {
            **common,
            "actor": model,
            "reward_model": f"{inputs}/reward/model",
            "prompts": f"{inputs}/data",
            "iterations": STEPS,
            "rollout_batch_size": 8,
            "minibatch_size": 8,
            "ppo_epochs": 1,
            "sampling": {"max_new_tokens": 12},
            "sample_every": 2,
            "sample_prompts": 2,
            "actor_train": {"learning_rate": 1e-3},
            "critic_train": {"learning_rate": 1e-3},
        },
        "grpo": {
            **common,
            "actor": model,
            "prompts": f"{inputs}/bootstrap/tasks/copy",
            "rewards": [{"kind": "reward_model", "model": f"{inputs}/reward/model"}],
            "iterations": STEPS,
            "group_size": 4,
            "prompts_per_iteration": 4,
            "minibatch_size": 16,
            "eval_every": 4,
            "eval_prompts": 8,
            "sampling": {"max_new_tokens": 12},
            "sample_every": 2,
            "sample_prompts": 2,
            "train": {"learning_rate": 1e-3},
        },
    }


@pytest.fixture
def inputs(proxy, s3_env, tiny, tiny_data, tiny_rm) -> str:
    """The finished bootstrap, data and reward outputs, copied into the bucket."""
    for name, local in (("bootstrap", tiny), ("data", tiny_data), ("reward", tiny_rm)):
        store.upload_dir(local, f"{s3_env}/inputs/{name}")
    return f"{s3_env}/inputs"


def server_files(s3_server: str, uri: str) -> dict[str, str]:
    """Every object below ``uri`` with its ETag, asked of the server behind the proxy."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = direct_client(s3_server)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def noise() -> list[Rule]:
    """Faults at random on any request, as a busy object store answers: about one request
    in twenty, each retried by the client (five attempts; p^5 makes a spurious outage
    about one in ten million requests)."""
    return [
        Rule("500", p=0.01),
        Rule("slowdown", p=0.01),
        Rule("reset", p=0.01),
        Rule("truncate", method="GET", p=0.02),
        Rule("stall", p=0.003),
    ]


class Attempt:
    """One pod's run of the stage, which the test or the proxy may kill."""

    def __init__(
        self,
        stage: str,
        config: dict,
        tmp_path: Path,
        name: str,
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        fresh: bool = False,
    ) -> None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        workdir = workdir or tmp_path / f"pod-{name}"  # a new pod's empty scratch by default
        env = {**os.environ, "KUBERLHF_WORKDIR": str(workdir), **(env or {})}
        # stderr to a file: a pipe nobody reads while stdout is followed could fill and stall
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.process = warm.Popen(
                [sys.executable, "-m", "jobs", stage, "--config", str(path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
                env=env,
                start_new_session=True,
                fresh=fresh,
            )
        self.stdout = ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.killpg(self.process.pid, sig)

    def signal_at_step(self, step: int, sig: int, rng: random.Random) -> None:
        """``sig`` once the stage logs ``step``, a random moment (up to 50 ms) after."""
        for line in self.process.stdout:
            self.stdout += line
            if line.startswith("{") and json.loads(line).get("step", 0) >= step:
                time.sleep(rng.uniform(0.0, 0.05))
                self.kill(sig)
                return

    def finish(self) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=600)
        self.stdout += out
        return self.process.returncode, self.stderr_path.read_text()
