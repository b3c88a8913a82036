"""RLHF with PPO on the tiny demo: the reward it optimises rises, the KL stays bounded, the
learning follows the reward model's sign, two processes under ZeRO-3 generate without
hanging and resume exactly, and the PPO model beats the SFT model by a held-out judge. The
single-process kills and resumes are in tests/faults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import store
from jobs.contract import read_manifest, run_stage
from tests.conftest import ROOT, run_entrypoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The whole demo pipeline (examples/demo.yaml) run once: bootstrap to evaluate."""
    runs = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "examples/demo.yaml", "--store", str(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "demo"


def metrics_lines(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_ppo_raises_the_reward_and_keeps_kl_bounded(demo):
    lines = [m for m in metrics_lines(demo / "ppo") if "reward_mean" in m]
    assert [m["step"] for m in lines] == list(range(1, 31))
    first, last = (
        mean(m["reward_mean"] for m in lines[:5]),
        mean(m["reward_mean"] for m in lines[-5:]),
    )
    # Seed 0, 30 iterations of 32 prompts: about 1.6 -> 2.6.
    assert last - first > 0.5
    assert max(m["kl"] for m in lines) < 8.0
    for key in (
        "entropy",
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "response_length",
        "generation_s",
        "scoring_s",
        "training_s",
        "reward_std",
    ):
        assert key in lines[-1]


def test_the_ppo_model_wins_over_the_sft_model_by_a_held_out_judge(demo):
    report = json.loads((demo / "evaluate" / "report.json").read_text())
    # Judged by a reward model trained on pairs of prompts that neither PPO nor its reward
    # model saw, not by the reward model PPO optimised (that one is the proxy, beside it).
    assert report["judged_by"] == "held_out"
    held_out = report["held_out"]
    assert report["win_rate"] == held_out["win_rate"] > 0.5
    low, high = held_out["win_rate_ci95"]
    assert low <= held_out["win_rate"] <= high
    assert held_out["reward_candidate"] > held_out["reward_baseline"]
    assert report["proxy"]["win_rate"] > 0.5
    assert set(report["plots"]) == {"sft", "reward", "ppo"}
    assert "reward_mean" in report["plots"]["ppo"]["curves"]
    assert (demo / "evaluate" / "plots" / "ppo.png").stat().st_size > 1000


def ppo_config(demo: Path, output: Path, reward_model: str, **overrides) -> dict:
    config = {
        "output": str(output),
        "actor": str(demo / "sft" / "model"),
        "reward_model": reward_model,
        "prompts": str(demo / "data"),
        "iterations": 30,
        "rollout_batch_size": 32,
        "minibatch_size": 16,
        "checkpoint_every": 100,
        "sampling": {
            "max_new_tokens": 40,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_prompt_tokens": 128,
        },
        "actor_train": {"learning_rate": 2e-4},
        "critic_train": {"learning_rate": 2e-4},
    }
    return {**config, **overrides}


def flipped_reward_model(source: Path, output: Path) -> str:
    """The reward model with its sign flipped, as a finished stage output."""
    from transformers import AutoModelForSequenceClassification

    from jobs.contract import StageConfig
    from jobs.models import load_tokenizer

    def flip(config, ctx):
        model = AutoModelForSequenceClassification.from_pretrained(source)
        model.score.weight.data.neg_()
        model.save_pretrained(ctx.out_dir / "model")
        load_tokenizer(str(source)).save_pretrained(ctx.out_dir / "model")
        return {"flipped": str(source)}

    run_stage("flip", StageConfig(output=str(output)), flip, workdir=output.parent / "w-flip")
    return str(output / "model")


def test_a_policy_that_games_its_reward_model_wins_by_the_proxy_and_loses_by_the_judge(
    demo, tmp_path
):
    # PPO against the reward model with its sign flipped: the reward it optimises rises.
    flipped = flipped_reward_model(demo / "reward" / "model", tmp_path / "flipped")
    result = run_entrypoint("ppo", ppo_config(demo, tmp_path / "ppo", flipped), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [m for m in metrics_lines(tmp_path / "ppo") if "reward_mean" in m]
    assert mean(m["reward_mean"] for m in lines[-5:]) > mean(m["reward_mean"] for m in lines[:5])

    evaluation = {
        "output": str(tmp_path / "eval"),
        "prompts": str(demo / "data"),
        "candidate": str(tmp_path / "ppo" / "model"),
        "baseline": str(demo / "sft" / "model"),
        "reward_model": flipped,  # the proxy: what this PPO run optimised
        "judge_model": str(demo / "judge" / "model"),
    }
    result = run_entrypoint("evaluate", evaluation, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    # Judged by its own reward model the run looks like a success; the held-out judge,
    # which decides the win rate, sees it for what it is.
    assert report["proxy"]["win_rate"] > 0.5
    assert report["judged_by"] == "held_out"
    assert report["win_rate"] == report["held_out"]["win_rate"] < 0.5
    assert report["held_out"]["reward_candidate"] < report["held_out"]["reward_baseline"]


def test_two_processes_under_zero3_complete_an_iteration(demo, tmp_path):
    config = ppo_config(
        demo,
        tmp_path / "z3",
        str(demo / "reward" / "model"),
        iterations=1,
        rollout_batch_size=8,
        minibatch_size=4,
        frozen_zero_stage=3,
        actor_train={"zero_stage": 3, "learning_rate": 1e-4},
        critic_train={"zero_stage": 3, "learning_rate": 1e-4},
    )
    path = tmp_path / "z3.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "jobs.launch", "ppo", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=TWO_PROCESSES,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(str(tmp_path / "z3"))
    assert manifest.metrics["iterations"] == 1
    assert store.exists(str(tmp_path / "z3" / "model" / "model.safetensors"))


TWO_PROCESSES = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PET_NPROC_PER_NODE": "2",
    "PET_STANDALONE": "1",
    "PET_NNODES": "1",
    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
}


def test_two_processes_preempted_resume_to_the_same_metrics(demo, tmp_path):
    """Two ranks, reward normalisation, adaptive KL and the SFT loss (ptx): the statistics
    are the batch's (all ranks'), each rank keeps its own generators, and a run preempted
    and resumed logs what an uninterrupted one logs. ZeRO-2, where DeepSpeed keeps rank 0's
    client state only: with per-rank statistics a resumed rank 1 took rank 0's and the
    runs drifted apart (under ZeRO-3 each rank's file holds its own)."""
    config = ppo_config(
        demo,
        tmp_path / "a",
        str(demo / "reward" / "model"),
        iterations=4,
        checkpoint_every=2,
        rollout_batch_size=8,
        minibatch_size=4,
        adaptive_kl=True,
        target_kl=0.5,
        kl_horizon=100,
        ptx_coef=0.5,
        sampling={"max_new_tokens": 16, "max_prompt_tokens": 64},
        actor_train={"zero_stage": 2, "learning_rate": 1e-4},
        critic_train={"zero_stage": 2, "learning_rate": 1e-4},
        seed=3,
    )

    def launch(output: Path, name: str) -> subprocess.Popen:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "output": str(output)}))
        command = [sys.executable, "-m", "jobs.launch", "ppo", "--config", str(path)]
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=TWO_PROCESSES,
        )

    straight = launch(tmp_path / "a", "a")
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    preempted = launch(tmp_path / "b", "b")
    for line in preempted.stdout:  # SIGTERM to the pod's process, as the kubelet sends it
        if line.startswith("{") and json.loads(line).get("step", 0) >= 1:
            preempted.send_signal(signal.SIGTERM)
            break
    out, err = preempted.communicate(timeout=600)
    assert preempted.returncode == 75, err[-3000:]
    saved = re.search(r"checkpoint saved at step (\d+)", err).group(1)  # the workers stopped
    resumed = launch(tmp_path / "b", "b")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from the checkpoint at step {saved}" in out

    a, b = metrics_lines(tmp_path / "a"), metrics_lines(tmp_path / "b")
    assert [m["step"] for m in b] == [m["step"] for m in a] == [1, 2, 3, 4]
    assert len({m["kl_coef"] for m in a}) > 1  # the adaptive coefficient moved
    for x, y in zip(a, b, strict=True):
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "ptx_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-4), (x["step"], key)
    assert store.exists(str(tmp_path / "b" / "model" / "model.safetensors"))


def test_ptx_adaptive_kl_ema_and_a_lora_critic(demo, tmp_path):
    config = ppo_config(
        demo,
        tmp_path / "opt",
        str(demo / "reward" / "model"),
        iterations=3,
        rollout_batch_size=8,
        minibatch_size=4,
        ptx_coef=0.5,
        adaptive_kl=True,
        target_kl=0.01,
        kl_horizon=100,
        ema_decay=0.5,
        critic_train={"learning_rate": 2e-4, "lora": {"r": 4}},
    )
    result = run_entrypoint("ppo", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = metrics_lines(tmp_path / "opt")
    assert all(m["ptx_loss"] > 0 for m in lines)
    # Adaptive KL: the coefficient grows after an iteration whose KL is above the target and
    # shrinks after one below it (the first iteration's KL is 0: the policy is the reference).
    previous = 0.05
    for m in lines:
        assert (m["kl_coef"] > previous) == (m["kl"] > 0.01), (m["kl"], m["kl_coef"], previous)
        previous = m["kl_coef"]
    assert any(m["kl"] > 0.01 for m in lines)

    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "opt" / "model" / "model.safetensors"))
    start = load_file(str(demo / "sft" / "model" / "model.safetensors"))
    assert any(not (exported[k] == start[k]).all() for k in start)


def test_the_missing_eos_penalty_teaches_the_policy_to_finish_its_answers(demo, tmp_path):
    # Answers cut at 12 new tokens often lack their EOS; with TRL's missing_eos_penalty the
    # policy learns to end them, against the same run (same seed) without the penalty.
    overrides = {
        "iterations": 10,
        "rollout_batch_size": 16,
        "minibatch_size": 8,
        "seed": 3,
        "sampling": {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0},
    }
    reward_model = str(demo / "reward" / "model")
    ended = {}
    for name, penalty in (("control", None), ("penalised", 3.0)):
        config = ppo_config(
            demo, tmp_path / name, reward_model, missing_eos_penalty=penalty, **overrides
        )
        result = run_entrypoint("ppo", config, tmp_path, name=name)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [m for m in metrics_lines(tmp_path / name) if "eos_fraction" in m]
        ended[name] = [m["eos_fraction"] for m in lines]
    assert ended["penalised"][0] == ended["control"][0]  # the same first rollout
    assert mean(ended["penalised"][-3:]) > mean(ended["control"][-3:]) + 0.15
