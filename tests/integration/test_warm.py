"""The tests' warm stage processes (tests/warm.py) end as fresh interpreters do: the
harness that runs most stages of the suite changes nothing a stage does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from jobs.errors import EXIT_BAD_INPUT
from tests import warm
from tests.conftest import ROOT
from tests.faults.conftest import timing

pytestmark = pytest.mark.skipif(
    not warm.available(), reason="stages start fresh here (a CUDA machine, or asked to)"
)


def skip_if_refused() -> None:
    if warm.refused():  # a server with threads (more than one OpenMP thread per worker)
        pytest.skip(warm.refused())


def test_a_stage_forked_warm_ends_as_the_fresh_process_ends(tiny, tiny_data, tmp_path):
    """The same SFT run, fresh and warm, each from its own folder (the output is relative
    to it): the same exit, weights, metrics and log lines, timings aside."""
    config = {
        "output": "out",
        "model": str(tiny / "model"),
        "data": str(tiny_data),
        "max_seq_len": 64,
        "max_steps": 4,
        "eval_every": 2,
        "log_every": 1,
        "seed": 5,
        "train": {"learning_rate": 3e-3, "micro_batch_size": 8, "warmup_steps": 1},
    }
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "jobs", "sft", "--config", str(path)]
    results = {}
    for how, start in (("fresh", subprocess.Popen), ("warm", warm.Popen)):
        folder = tmp_path / how
        folder.mkdir()
        env = {**os.environ, "KUBERLHF_WORKDIR": str(tmp_path / f"scratch-{how}")}
        process = start(
            command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        skip_if_refused()
        assert isinstance(process, warm.WarmProcess) == (how == "warm")
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        results[how] = (
            load_file(str(folder / "out" / "model" / "model.safetensors")),
            [{k: v for k, v in line.items() if not timing(k)} for line in lines],
        )
    (weights, logged), (again, logged_again) = results["fresh"], results["warm"]
    assert weights.keys() == again.keys()
    for name, tensor in weights.items():
        assert again[name].equal(tensor), name
    assert logged == logged_again and len(logged) >= 6


def test_a_process_whose_imports_would_differ_starts_fresh(tmp_path):
    """Changed only in what a stage reads as it runs, a process is forked warm; changed in
    what a library reads while it is imported (threads, PYTHONPATH), it starts fresh. Either
    way a bad config ends in the same exit and the same error line."""
    missing = tmp_path / "missing.yaml"
    command = [sys.executable, "-m", "jobs", "sft", "--config", str(missing)]
    cases = {
        "stage settings": ({"KUBERLHF_WORKDIR": str(tmp_path)}, warm.WarmProcess),
        "threads": ({"OMP_NUM_THREADS": "7"}, subprocess.Popen),
        "import path": ({"PYTHONPATH": str(tmp_path)}, subprocess.Popen),
    }
    for case, (extra, kind) in cases.items():
        process = warm.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        skip_if_refused()
        assert type(process) is kind, case
        _, err = process.communicate(timeout=300)
        assert process.returncode == EXIT_BAD_INPUT, (case, err[-2000:])
        assert err.strip().splitlines()[-1] == f"error: {missing}: no such config file", case
