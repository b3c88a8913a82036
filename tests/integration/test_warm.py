"""The tests' warm stage processes (tests/warm.py) end as fresh interpreters do: the
harness that runs most stages of the suite changes nothing a stage does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from jobs.errors import EXIT_BAD_INPUT
from tests import warm
from tests.conftest import ROOT, pipeline_file
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


def test_a_pipeline_run_warm_starts_its_stages_warm_and_ends_as_a_fresh_one(
    tiny, tiny_data, tmp_path
):
    """`rlhf run` forked warm starts its local stages through the same server (the stage's
    environment adds the launch's variables, ``PYTHONUNBUFFERED`` and the interpreter's
    folder on PATH, none of them read while a library is imported); the run's outputs, exit
    and output lines are the fresh run's."""
    stages = {
        "sft": {
            "config": {
                "model": str(tiny / "model"),
                "data": str(tiny_data),
                "max_seq_len": 64,
                "max_steps": 3,
                "eval_every": 3,
                "log_every": 1,
                "seed": 5,
                "train": {"learning_rate": 3e-3, "micro_batch_size": 8},
            }
        },
        "merge": {"config": {"base": str(tiny / "model"), "other": "${sft.output}/model"}},
    }
    results = {}
    for how, start in (("fresh", subprocess.run), ("warm", warm.run)):
        path = pipeline_file(tmp_path / how, stages, name="warmth")
        log = tmp_path / f"{how}.log"
        result = start(
            [sys.executable, "-m", "pipeline.cli", "run", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "KUBERLHF_TEST_WARM_LOG": str(log)},
        )
        skip_if_refused()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs = tmp_path / how / "runs" / "warmth"
        lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
        results[how] = (
            {
                stage: load_file(str(runs / stage / "model" / "model.safetensors"))
                for stage in stages
            },
            [{k: v for k, v in line.items() if not timing(k)} for line in lines],
            [  # what it said, but for its folder and the figures that measure the clock
                re.sub(r"([\w.]+)=\S+?(,|$)", lambda m: "" if timing(m[1]) else m[0], x).replace(
                    str(tmp_path / how), "FOLDER"
                )
                for x in result.stdout.splitlines()
                if not x.startswith("{")
            ],
        )
        started = log.read_text().splitlines() if log.exists() else []
        if how == "warm":  # `rlhf run`'s start, then its stages', noted by it
            run = f"warm -m pipeline.cli run {path}"
            assert started == [run, "warm -m jobs sft", "warm -m jobs merge"]
        else:  # a fresh `rlhf run` starts its stages with subprocess, not tests/warm.py
            assert started == []
    (weights, logged, said), (again, logged_again, said_again) = results["fresh"], results["warm"]
    for stage, tensors in weights.items():
        assert again[stage].keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert again[stage][name].equal(tensor), (stage, name)
    assert logged == logged_again and len(logged) >= 4
    assert said == said_again and len(said) >= 4


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
