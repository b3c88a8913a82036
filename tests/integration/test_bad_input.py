"""Bad input through the container entrypoint: one clear line, the right exit code, and
nothing already in the store changes."""

from __future__ import annotations

import json

import pytest

from jobs import store
from jobs.errors import EXIT_BAD_INPUT, EXIT_RETRY
from tests.conftest import FIXTURES, free_port, run_entrypoint, snapshot


def error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def finished(tmp_path):
    """A store with one finished data output in it, to show bad runs leave it alone."""
    out = tmp_path / "store" / "data"
    config = {
        "output": str(out),
        "min_tokens": 0,
        "dedup_threshold": None,
        "eval_fraction": 0,
        "sources": [{"name": "a", "format": "alpaca", "uri": str(FIXTURES / "alpaca.jsonl")}],
    }
    assert run_entrypoint("data", config, tmp_path).returncode == 0
    return config


def rerun_with(finished, tmp_path, rows: str) -> tuple:
    source = tmp_path / "user.jsonl"
    source.write_text(rows)
    config = {
        **finished,
        "template": "raw",
        "sources": [{"name": "a", "format": "alpaca", "uri": str(source)}],
    }
    before = snapshot(tmp_path / "store")
    result = run_entrypoint("data", config, tmp_path, name="rerun")
    return result, before


def test_malformed_jsonl_line_names_file_and_line(finished, tmp_path):
    result, before = rerun_with(
        finished, tmp_path, '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n'
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert f"{tmp_path}/user.jsonl:2: not valid JSON" in error_line(result)
    assert snapshot(tmp_path / "store") == before


def test_missing_field_names_file_line_and_field(finished, tmp_path):
    result, before = rerun_with(finished, tmp_path, '{"instruction": "a"}\n')
    assert result.returncode == EXIT_BAD_INPUT
    assert "user.jsonl:1: field 'output' is missing or empty" in error_line(result)
    assert snapshot(tmp_path / "store") == before


def test_empty_data_set_after_filtering(finished, tmp_path):
    source = tmp_path / "user.jsonl"
    source.write_text('{"instruction": "hi", "output": "yo"}\n')
    config = {
        **finished,
        "min_tokens": 15,
        "sources": [{"name": "a", "format": "alpaca", "uri": str(source)}],
    }
    before = snapshot(tmp_path / "store")
    result = run_entrypoint("data", config, tmp_path, name="again")
    assert result.returncode == EXIT_BAD_INPUT
    assert "no examples left after filtering (a: read 1, short 1" in error_line(result)
    assert snapshot(tmp_path / "store") == before


def test_unknown_stage(tmp_path):
    result = run_entrypoint("sfft", {"output": str(tmp_path / "o")}, tmp_path)
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result).startswith(
        "error: unknown stage 'sfft'; the stages are: bootstrap, data, sft, "
    )


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("output: /tmp/x\nsources:\n  - name: [unclosed\n")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "jobs", "data", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert f"{path}: line 4: not valid YAML/JSON" in error_line(result)


def test_unknown_config_field_names_its_path(tmp_path):
    config = {
        "output": str(tmp_path / "o"),
        "model": "m",
        "data": "d",
        "train": {"learning_rte": 1e-3},
    }
    result = run_entrypoint("sft", config, tmp_path)
    assert result.returncode == EXIT_BAD_INPUT
    assert "sft.yaml: train.learning_rte: Extra inputs are not permitted" in error_line(result)


def test_unreachable_s3_endpoint_is_retryable(s3_env, finished, tmp_path):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "KUBERLHF_S3_MAX_ATTEMPTS": "2"}
    config = {**finished, "output": f"{s3_env}/data"}
    result = run_entrypoint("data", config, tmp_path, env=env, name="s3")
    # The endpoint may come back (a restarting MinIO): Kubernetes retries this one.
    assert result.returncode == EXIT_RETRY
    assert "cannot reach S3 endpoint http://127.0.0.1:" in error_line(result)


def test_missing_credentials_are_the_users_to_fix(s3_env, finished, tmp_path):
    store.write_text(f"{s3_env}/data/keep.txt", "already here")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    config = {**finished, "output": f"{s3_env}/data"}
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in env}
    import subprocess
    import sys

    path = tmp_path / "s3.yaml"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "data", "--config", str(path)],
        capture_output=True,
        text=True,
        env=full_env,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "S3 credentials missing" in error_line(result)
    assert "test-secret-key" not in result.stderr + result.stdout
    assert store.read_text(f"{s3_env}/data/keep.txt") == "already here"


def test_bad_input_under_torchrun_exits_65_and_is_not_retried(finished, tmp_path):
    """torchrun exits 1 whatever its worker's code; the launcher passes 65 on, so the
    podFailurePolicy (and the local backend) do not retry a bad input."""
    import subprocess
    import sys

    import yaml

    pipeline = {
        "name": "bad",
        "store": str(tmp_path / "runs"),
        "stages": {
            "sft": {
                "nproc_per_node": 2,
                "retries": 2,
                "config": {"model": str(tmp_path / "no-model"), "data": finished["output"]},
            }
        },
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(pipeline))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stdout[-2000:] + result.stderr[-2000:]
    assert "running python -m jobs.launch sft" in result.stdout
    assert "failed with exit code 65: bad config or input (not retried)" in result.stderr
    assert "retrying" not in result.stdout + result.stderr
    # each rank names it: rank 0 reads the input for all, and tells the others it is bad
    # (left waiting in the broadcast, they died of a closed connection)
    assert result.stderr.count("no-model: not inside a finished stage output") >= 2
    assert "Connection closed by peer" not in result.stderr


@pytest.mark.parametrize(
    ("codes", "expected"), [([0, 65], 65), ([75, 1], 75), ([1, 65, 75], 65), ([0, 0], 0), ([-9], 1)]
)
def test_the_launcher_passes_the_workers_exit_code_on(codes, expected):
    from jobs.launch import exit_code_of

    assert exit_code_of(codes) == expected


PROBE = """
import os
import signal
import sys

import torch.distributed as torch_dist

# torchrun stops the other worker once one has exited non-zero: this one still writes its
# line (the stage installs its own handler while it runs, and restores this one)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

from jobs.__main__ import main

joined = []
init = torch_dist.init_process_group


def recorded_init(*args, **kwargs):
    joined.append(True)
    return init(*args, **kwargs)


torch_dist.init_process_group = recorded_init
code = main(sys.argv[1:])
kept = "kept" if torch_dist.is_initialized() else "left"
# a file per worker: the workers share torchrun's stdout, where their lines interleave
with open(f"{os.environ['PROBE_OUT']}.{os.environ['RANK']}", "w") as out:
    out.write(f"worker exit {code}, process group joined {bool(joined)} and {kept}")
sys.exit(code)
"""


def test_each_worker_leaves_the_process_group_on_its_exits(finished, tmp_path):
    """A gloo group left to interpreter finalisation can abort the worker (SIGABRT,
    "terminate called without an active exception"), which once turned a resumed PPO run's
    exit 0 into -6 in CI. Every exit of a stage's own (done, here an up-to-date skip, and a
    bad input) leaves the group first."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp_path / "sft"),
                "model": str(tmp_path / "no-model"),
                "data": finished["output"],
            }
        )
    )
    done = tmp_path / "done.yaml"
    done.write_text(yaml.safe_dump(finished))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for stage, config, code in [("data", done, 0), ("sft", bad, EXIT_BAD_INPUT)]:
        env["PROBE_OUT"] = str(tmp_path / stage)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc_per_node", "2", str(probe), stage, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env=env,
        )
        exits = [
            (tmp_path / f"{stage}.{rank}").read_text()
            if (tmp_path / f"{stage}.{rank}").is_file()
            else "no line"
            for rank in (0, 1)
        ]
        assert exits == [f"worker exit {code}, process group joined True and left"] * 2, (
            result.stdout[-2000:] + result.stderr[-2000:]
        )


def test_a_bad_input_outlasts_the_sigterm_that_stops_its_gang(finished, tmp_path):
    """In a gang, another pod can fail first (its workers lose their peer) and the Job
    controller then stops this pod while torchrun is still stopping its workers: the
    launcher is signalled after a worker said bad input, and must still exit 65, not 75
    (which would re-create the gang). torchrun looks at its workers every
    PET_MONITOR_INTERVAL seconds: a long one holds it there while the signal comes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import ROOT

    bad = tmp_path / "bad.yaml"
    config = {"output": str(tmp_path / "sft"), "model": str(tmp_path / "no-model")}
    bad.write_text(yaml.safe_dump({**config, "data": finished["output"]}))
    exits = tmp_path / "exits"
    exits.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PET_NPROC_PER_NODE": "2",
        "PET_STANDALONE": "1",
        "PET_MONITOR_INTERVAL": "600",
        "KUBERLHF_WORKER_EXITS": str(exits),
    }
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jobs.launch", "sft", "--config", str(bad)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(exits.glob("rank-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        recorded = sorted(path.read_text() for path in exits.glob("rank-*"))
        assert recorded and set(recorded) == {str(EXIT_BAD_INPUT)}, recorded
        assert launcher.poll() is None  # torchrun has not looked yet
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "got signal" in stderr and f"exit code {EXIT_BAD_INPUT}" in stderr, stderr[-2000:]
    assert launcher.returncode == EXIT_BAD_INPUT


def test_a_one_process_stage_under_torchrun_exits_65(tmp_path):
    """A chart applied by hand with processes: 2 to a stage that shards nothing: each rank
    refuses (exit 65 through the launcher) before it reads or writes anything."""
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "data.yaml"
    source = {"name": "a", "format": "alpaca", "uri": str(FIXTURES / "alpaca.jsonl")}
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "sources": [source]}))
    # what the chart's launch sets for nprocPerNode: 2 on one node
    env = {"PET_NPROC_PER_NODE": "2", "PET_NNODES": "1", "PET_STANDALONE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.launch", "data", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    assert result.stderr.count("the data stage runs as one process") == 2
    assert not (tmp_path / "out").exists()
