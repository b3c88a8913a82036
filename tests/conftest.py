"""Shared fixtures: a real S3 server on localhost, and the tiny model and data, made once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

# One core per parallel worker: PyTorch's default, a thread per core in every worker and in
# every stage a worker starts, puts twice as many spinning OpenMP threads as cores on the
# machine, and each waits on the others (set before anything imports torch; the stages the
# tests start inherit it; torchrun sets the same for its processes).
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

import pytest  # noqa: E402
import yaml  # noqa: E402

from jobs import store  # noqa: E402
from tests import warm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _environment_as_found():
    """Each test leaves the process's environment as it found it. Stages, engines and
    entrypoints run in the test process set variables (DeepSpeed's DS_ACCELERATOR and its
    rendezvous, the entrypoint's allocator setting, inductor's cache folder): left behind,
    they made every later stage process of that worker differ from its warm server's
    environment, and start fresh (tests/warm.py)."""
    saved = dict(os.environ)
    warm.between_tests(saved)
    yield
    # but for pytest's own note of the running test, which it removes itself
    saved.pop("PYTEST_CURRENT_TEST", None)
    if (running := os.environ.get("PYTEST_CURRENT_TEST")) is not None:
        saved["PYTEST_CURRENT_TEST"] = running
    warm.set_environment(saved)


def pytest_sessionstart(session) -> None:
    """Once per run (the controller of a parallel run, or the only process): the fault
    suite's table starts empty, so it shows this run's faults only."""
    if not hasattr(session.config, "workerinput"):
        from tests.faults.conftest import RECORD

        RECORD.unlink(missing_ok=True)


# The modules that take longest, slowest first (measured with --durations on the 2-core
# machine: about 320, 190, 150, 100, 90 and 65 s, then under a minute each). A parallel run
# hands out whole modules in collection order (`make test` passes --no-loadscope-reorder):
# started first, the long ones are not what a worker is still running while the other idles.
LONGEST_FIRST = (
    "tests/integration/test_ppo.py",
    "tests/faults/test_kill.py",
    "tests/faults/test_stages_under_faults.py",
    "tests/integration/test_grpo.py",
    "tests/integration/test_recipes.py",
    "tests/integration/test_sft.py",
    "tests/integration/test_dpo.py",
    "tests/faults/test_store_faults.py",
    "tests/integration/test_crlft.py",
    "tests/integration/test_bad_input.py",
    "tests/unit/test_kubernetes_backend.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_terminal_summary(terminalreporter) -> None:
    """The table of the faults this run tried, at its end (on the controller)."""
    from tests.faults.conftest import RECORD

    if RECORD.is_file() and RECORD.stat().st_size:
        from tests.faults.report import rows, table

        terminalreporter.section("faults tried (python -m tests.faults.report)")
        terminalreporter.write_line(table(rows()))


# How long one stage run in a test may take: a hung stage fails its test, not the suite's
# whole time budget (the GPU suite's call on a lent machine sets it lower).
STAGE_TIMEOUT_S = int(os.environ.get("KUBERLHF_STAGE_TIMEOUT_S", "900"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 over HTTP on localhost: boto3 talks to it as to any S3-compatible endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def direct_client(s3_server: str):
    """A boto3 client straight to the test's S3 server: what the server holds, asked past
    any fault proxy and past the store module under test."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="test-access-key",
        aws_secret_access_key="test-secret-key",
    )


S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "KUBERLHF_S3_ADDRESSING_STYLE",
    "KUBERLHF_S3_MAX_ATTEMPTS",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The environment a pod gets from its Secret, pointing at the test server; a fresh bucket."""
    import uuid

    for name in S3_ENV:
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "test-access-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key",
        "AWS_REGION": "us-east-1",
        "KUBERLHF_S3_ADDRESSING_STYLE": "path",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store.reset_clients()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    direct_client(s3_server).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    store.reset_clients()


def run_entrypoint(
    stage: str, config: dict, tmp_path: Path, env: dict | None = None, name: str | None = None
) -> subprocess.CompletedProcess:
    """``python -m jobs STAGE --config FILE`` in a process of its own, as a container runs it
    (forked warm where that is the same: tests/warm.py)."""
    config_path = tmp_path / f"{name or stage}.yaml"
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return warm.run(
        [sys.executable, "-m", "jobs", stage, "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=STAGE_TIMEOUT_S,
    )


def pipeline_file(folder: Path, stages: dict, name: str = "demo", **settings) -> Path:
    """A pipeline file of ``stages`` whose store is ``folder``/runs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    body = {"name": name, "store": str(folder / "runs"), **settings, "stages": stages}
    path.write_text(yaml.safe_dump(body))
    return path


def with_dropout(source: Path, output: Path, p: float = 0.3) -> str:
    """The model at ``source`` with dropout ``p`` in every place a GPT-NeoX has one (hidden
    states, attention weights, a classifier's head), as a finished stage output."""
    from jobs.contract import StageConfig, run_stage

    def copy(config, ctx):
        shutil.copytree(source, ctx.out_dir / "model")
        path = ctx.out_dir / "model" / "config.json"
        settings = json.loads(path.read_text())
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            settings[name] = p
        path.write_text(json.dumps(settings))
        return {"dropout": p}

    run_stage(
        "dropout", StageConfig(output=str(output)), copy, workdir=output.parent / f"w-{output.name}"
    )
    return str(output / "model")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A finished bootstrap output: the tiny GPT-NeoX, its tokenizer and the synthetic data."""
    from jobs import bootstrap
    from jobs.contract import run_stage

    out = tmp_path_factory.mktemp("store") / "bootstrap"
    config = bootstrap.Config(output=str(out), daily_per_lang=300, hate_per_lang=150)
    run_stage("bootstrap", config, bootstrap.run, workdir=tmp_path_factory.mktemp("work"))
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny, tmp_path_factory) -> Path:
    """A finished data output built from the synthetic data (KULLM template, 2:1 mix)."""
    from jobs.contract import run_stage
    from jobs.data import stage as data

    out = tiny.parent / "data"
    config = data.Config(
        output=str(out),
        tokenizer=str(tiny / "model"),
        dedup_threshold=0.95,
        eval_fraction=0.1,
        sources=[
            {
                "name": "daily",
                "format": "alpaca",
                "uri": str(tiny / "data/sft_daily.jsonl"),
                "ratio": 2,
            },
            {
                "name": "hate",
                "format": "alpaca",
                "uri": str(tiny / "data/sft_hate.jsonl"),
                "ratio": 1,
            },
            {"name": "pairs", "format": "pairs", "uri": str(tiny / "data/pairs.jsonl")},
        ],
    )
    run_stage("data", config, data.run, workdir=tmp_path_factory.mktemp("work"))
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: to show that nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in store.walk_dir(root)}


@pytest.fixture(scope="session")
def tiny_rm(tiny, tiny_data, tmp_path_factory) -> Path:
    """A small reward model trained on the synthetic pairs: a finished reward output."""
    out = tiny.parent / "reward"
    config = {
        "output": str(out),
        "model": str(tiny / "model"),
        "data": str(tiny_data),
        "max_seq_len": 96,
        "max_steps": 10,
        "eval_every": 1000,
        "train": {"learning_rate": 1e-3, "micro_batch_size": 16},
    }
    result = run_entrypoint("reward", config, tmp_path_factory.mktemp("rm"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# Two ranks on this machine through jobs.launch (torchrun, gloo), as a pod with
# nproc_per_node: 2 runs a stage
TWO_PROCESSES = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PET_NPROC_PER_NODE": "2",
    "PET_STANDALONE": "1",
    "PET_NNODES": "1",
    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
}


def two_ranks(script: str, args: list[str], env: dict[str, str]) -> list[tuple[int, str, str]]:
    """``python -c script *args`` as ranks 0 and 1 of a two-process group on this machine
    (``env`` added to the rendezvous variables): each rank's exit code, stdout and stderr."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            env={**base, "WORLD_SIZE": "2", **env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    return [(rank.returncode, out, err) for rank, (out, err) in zip(ranks, outputs, strict=True)]


def run_two_processes(
    stage: str, config: dict, path: Path, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``stage`` on two ranks (TWO_PROCESSES, and ``env``), its config written to ``path``."""
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "jobs.launch", stage, "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**TWO_PROCESSES, **(env or {})},
        timeout=600,
    )


def preempt_and_resume(
    stage: str, config: dict, tmp_path: Path, after_step: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a stage through the entrypoint, send it SIGTERM once it logs a step past
    ``after_step`` (as a pod being preempted), check it stopped with the retryable code and
    left no finished output, then run it again: the resumed run's result."""
    import json
    import signal
    import threading

    from jobs.contract import read_manifest
    from jobs.errors import EXIT_RETRY

    path = tmp_path / f"{stage}-preempted.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    command = [sys.executable, "-m", "jobs", stage, "--config", str(path)]
    full_env = {**os.environ, **(env or {})}
    # stderr to a file: a pipe nobody reads fills (64 KiB of warnings or compile logs) and
    # blocks the stage, and with it this loop, before the step it waits for
    errors = tmp_path / f"{stage}-preempted.stderr"
    with open(errors, "w") as stderr:
        process = warm.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=full_env
        )
        watchdog = threading.Timer(STAGE_TIMEOUT_S, process.kill)  # a stage that hangs
        watchdog.start()
        try:
            for line in process.stdout:
                if line.startswith("{") and json.loads(line).get("step", 0) > after_step:
                    process.send_signal(signal.SIGTERM)
                    break
            process.communicate(timeout=STAGE_TIMEOUT_S)
        finally:
            watchdog.cancel()
    assert process.returncode == EXIT_RETRY, errors.read_text()[-3000:]
    assert read_manifest(config["output"]) is None
    resumed = warm.run(  # fresh: the run it is compared with was forked (tests/warm.py)
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=STAGE_TIMEOUT_S,
        env=full_env,
        fresh=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step" in resumed.stdout
    return resumed
