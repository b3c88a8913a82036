"""RLHF with PPO on the tiny demo: the reward it optimises rises, the KL stays bounded, the
learning follows the reward model's sign, two processes under ZeRO-3 generate without
hanging and resume exactly, and the PPO model beats the SFT model by a held-out judge. The
single-process kills and resumes are in tests/faults.

The demo runs with a real MLflow tracking server on localhost, so the same run shows what
a user watches: MLflow runs, TensorBoard event files, PPO's sample answers, and the run's
report page in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import store
from jobs.contract import read_manifest, run_stage
from jobs.generation import PARTLY_EAGER
from tests import warm
from tests.conftest import (
    ROOT,
    TWO_PROCESSES,
    free_port,
    run_entrypoint,
    run_two_processes,
    with_dropout,
)

pytestmark = pytest.mark.slow


# A secret's value in the environment of the run: no sink may carry it anywhere.
CANARY = "canary-5e1f0c9a2b7d"
EXPERIMENT = "demo-test"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> tuple[str, Path]:
    """A real MLflow tracking server on localhost (SQLite store, artifacts it serves)."""
    import requests

    folder = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - the server's, until it stops
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            url.rsplit(":", 1)[1],
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the MLflow server did not start in 5 minutes"
        time.sleep(1)
    yield url, folder
    server.terminate()
    server.wait(30)
    log.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tracking) -> Path:
    """The whole demo pipeline (examples/demo.yaml) run once: bootstrap to evaluate."""
    runs = tmp_path_factory.mktemp("runs")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking[0],
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "KUBERLHF_TEST_TOKEN": CANARY,
    }
    result = warm.run(  # its stages forked warm too (tests/warm.py)
        [sys.executable, "-m", "pipeline.cli", "run", "examples/demo.yaml", "--store", str(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MLflowSink" not in result.stderr, result.stderr[-3000:]  # no stage dropped it
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


def scaled_reward_model(source: Path, output: Path, factor: float) -> str:
    """The reward model with its scores multiplied by ``factor``, as a finished stage
    output."""
    from transformers import AutoModelForSequenceClassification

    from jobs.contract import StageConfig
    from jobs.models import load_tokenizer

    def scale(config, ctx):
        model = AutoModelForSequenceClassification.from_pretrained(source)
        model.score.weight.data.mul_(factor)
        model.save_pretrained(ctx.out_dir / "model")
        load_tokenizer(str(source)).save_pretrained(ctx.out_dir / "model")
        return {"scaled": str(source), "factor": factor}

    work = output.parent / f"w-{output.name}"
    run_stage("scale", StageConfig(output=str(output)), scale, workdir=work)
    return str(output / "model")


def test_a_policy_that_games_its_reward_model_wins_by_the_proxy_and_loses_by_the_judge(
    demo, tmp_path
):
    # PPO against the reward model with its sign flipped: the reward it optimises rises.
    # (10 iterations: at 8 the proxy already says 0.69 and the judge 0.19, at 12 0.91/0.06)
    flipped = scaled_reward_model(demo / "reward" / "model", tmp_path / "flipped", -1.0)
    config = ppo_config(demo, tmp_path / "ppo", flipped, iterations=10)
    result = run_entrypoint("ppo", config, tmp_path)
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
    """Actor, critic and frozen models partitioned over two ranks. The actor generates with
    its weights gathered once for the rollout (they fit) and, told not to, layer by layer
    at every token (ranks stepping together): the same answers, scores and update."""
    runs = {}
    for gather in (True, False):
        name = "gathered" if gather else "per-token"
        config = ppo_config(
            demo,
            tmp_path / name,
            str(demo / "reward" / "model"),
            iterations=1,
            rollout_batch_size=8,
            minibatch_size=4,
            frozen_zero_stage=3,
            sampling={"max_new_tokens": 16, "zero3_gather": gather},
            actor_train={"zero_stage": 3, "learning_rate": 1e-4},
            critic_train={"zero_stage": 3, "learning_rate": 1e-4},
        )
        result = run_two_processes("ppo", config, tmp_path / f"{name}.yaml")
        assert result.returncode == 0, result.stderr[-3000:]
        how = "gathered once per rollout" if gather else "gathered layer by layer at every token"
        assert f"the actor's ZeRO-3 parameters are {how}" in result.stdout
        assert read_manifest(str(tmp_path / name)).metrics["iterations"] == 1
        assert store.exists(str(tmp_path / name / "model" / "model.safetensors"))
        [line] = [m for m in metrics_lines(tmp_path / name) if "reward_mean" in m]
        # the greedy sample answers after the update: the very tokens, as text
        answers = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        runs[name] = line, [json.loads(x)["answer"] for x in answers]
    (a, said), (b, again) = runs["gathered"], runs["per-token"]
    assert said == again and len(said) == 4
    for key in ("response_length", "eos_fraction", "reward_mean", "kl", "policy_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_two_processes_preempted_resume_to_the_same_metrics(demo, tmp_path):
    """Two ranks, reward normalisation, adaptive KL and the SFT loss (ptx): the statistics
    are the batch's (all ranks'), each rank keeps its own generators, and a run preempted
    and resumed logs what an uninterrupted one logs. ZeRO-2, where DeepSpeed keeps rank 0's
    client state only: with per-rank statistics a resumed rank 1 took rank 0's and the
    runs drifted apart (under ZeRO-3 each rank's file holds its own). The preempted run
    also writes sample answers at every iteration and the straight one none: the samples
    change nothing the training does."""
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
        sample_every=0,
    )
    sampled = {"sample_every": 1, "sample_prompts": 2}

    def launch(output: Path, name: str) -> subprocess.Popen:
        path = tmp_path / f"{name}.yaml"
        extra = sampled if name == "b" else {}
        path.write_text(yaml.safe_dump({**config, **extra, "output": str(output)}))
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
    assert not (tmp_path / "a" / "samples.jsonl").exists()
    samples = [json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]


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


def test_a_lora_actor_is_its_own_reference_with_its_adapters_off(demo, tmp_path):
    """An actor trained with LoRA takes its reference from its own weights, adapters off
    (no second copy loaded), as TRL's trainers take a peft model's: the first rollout's
    KL is exactly 0 and the trained policy moves away from it."""
    config = ppo_config(
        demo,
        tmp_path / "lora",
        str(demo / "reward" / "model"),
        iterations=3,
        rollout_batch_size=8,
        minibatch_size=4,
        actor_train={"learning_rate": 2e-3, "lora": {"r": 4}},
    )
    result = run_entrypoint("ppo", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppo: the reference is the actor with its LoRA adapters off" in result.stdout
    kls = [m["kl"] for m in metrics_lines(tmp_path / "lora")]
    assert kls[0] == 0.0 and kls[-1] > 0.0, kls


def test_normalised_ppo_is_the_same_whatever_the_reward_models_scale(demo, tmp_path):
    """With normalize_reward, the critic (the reward model at first) is read in the units
    the rewards are normalised to, as OpenRLHF's critic is: a reward model whose scores
    are ten times larger trains the same way. Read raw, the critic starts ten times
    further from its returns than the value clip lets it move in an update."""
    runs = {}
    for name, factor in (("as_trained", 1.0), ("ten_times", 10.0)):
        reward_model = scaled_reward_model(
            demo / "reward" / "model", tmp_path / f"rm{name}", factor
        )
        config = ppo_config(
            demo, tmp_path / name, reward_model, iterations=2, rollout_batch_size=16, seed=4
        )
        result = run_entrypoint("ppo", config, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [m for m in metrics_lines(tmp_path / name) if "value_loss" in m]
    for line, scaled in zip(runs["as_trained"], runs["ten_times"], strict=True):
        assert scaled["reward_mean"] == pytest.approx(10 * line["reward_mean"], rel=1e-3)
        for key in ("value_loss", "policy_loss"):
            assert scaled[key] == pytest.approx(line[key], rel=0.05, abs=1e-3), (key, line, scaled)


def test_ppo_updates_actor_and_critic_without_dropout(demo, tmp_path):
    """Actor and critic with dropout 0.3 in their configs: PPO trains them without it (as
    TRL does), so its one update of a rollout sees the policy that sampled the rollout and
    the clip stops no token's gradient (with dropout, the ratio is noise and it stops
    some). At temperature 0.7 that policy is softmax(logits / 0.7), in the rollout's
    scoring and in the update alike."""
    config = ppo_config(
        demo,
        tmp_path / "ppo",
        str(demo / "reward" / "model"),
        actor=with_dropout(demo / "sft" / "model", tmp_path / "actor"),
        critic=with_dropout(demo / "reward" / "model", tmp_path / "critic"),
        iterations=1,
        ppo_epochs=1,
        rollout_batch_size=16,
        minibatch_size=16,
        sampling={"max_new_tokens": 40, "temperature": 0.7, "max_prompt_tokens": 128},
    )
    result = run_entrypoint("ppo", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [m for m in metrics_lines(tmp_path / "ppo") if "clip_fraction" in m]
    assert line["clip_fraction"] == 0.0, line


def test_the_missing_eos_penalty_teaches_the_policy_to_finish_its_answers(demo, tmp_path):
    # Answers cut at 28 new tokens often lack their EOS (the demo's answers are 24 to 40
    # tokens: a quarter fit, so both outcomes occur and the penalty has a signal to act
    # on; at 12 none fit); with TRL's missing_eos_penalty the policy learns to end them,
    # against the same run (same seed) without the penalty.
    overrides = {
        "iterations": 10,
        "rollout_batch_size": 16,
        "minibatch_size": 8,
        "seed": 3,
        "sampling": {"max_new_tokens": 28, "temperature": 1.0, "top_p": 1.0},
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
    assert mean(ended["penalised"][-3:]) > mean(ended["control"][-3:]) + 0.15, ended


def test_ppo_trains_the_same_with_the_static_cache_and_the_compiled_decode(demo, tmp_path):
    """The rollout engine's fast paths change how the actor decodes, not what it samples:
    PPO with the static KV cache, run eagerly and with its decode step compiled (as on a
    GPU), logs the same rollouts and the same training as with the dynamic cache."""
    overrides = {
        "iterations": 2,
        "rollout_batch_size": 8,
        "minibatch_size": 4,
        "seed": 5,
    }
    sampling = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}
    decodes = {
        "dynamic": {"cache": "dynamic"},
        "static": {"cache": "static", "compile_decode": False},
        "compiled": {"cache": "static", "compile_decode": True},
    }
    reward_model = str(demo / "reward" / "model")
    runs = {}
    for name, decode in decodes.items():
        config = ppo_config(
            demo, tmp_path / name, reward_model, sampling={**sampling, **decode}, **overrides
        )
        result = run_entrypoint("ppo", config, tmp_path, name=name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [m for m in metrics_lines(tmp_path / name) if "reward_mean" in m]
        # what transformers did with the static cache, as the stage saw it
        said = {"static": "runs eager", "compiled": "runs compiled"}.get(name)
        if said:
            assert f"the static KV cache's decode step {said}" in result.stdout, name
        assert PARTLY_EAGER not in result.stdout, result.stdout[-3000:]  # compiled whole
    keys = ("reward_mean", "kl", "response_length", "eos_fraction", "policy_loss", "value_loss")
    for name in ("static", "compiled"):
        assert len(runs[name]) == len(runs["dynamic"]) == 2
        for line, reference in zip(runs[name], runs["dynamic"], strict=True):
            for key in keys:
                assert line[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), (name, key)


# --- what a run shows: MLflow, TensorBoard, sample answers, the report page -------------

STAGES = [
    "bootstrap",
    "data",
    "sft",
    "reward-v1",
    "generate",
    "label",
    "reward",
    "ppo",
    "judge",
    "evaluate",
]


def test_mlflow_has_a_run_per_pipeline_run_and_a_nested_run_per_stage(demo, tracking):
    from mlflow.tracking import MlflowClient

    url, folder = tracking
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("kuberlhf.kind") == "pipeline"]
    assert parent.data.tags["kuberlhf.run"] == "demo"
    assert parent.info.status == "FINISHED"  # closed by `rlhf run` at its end
    stages = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(stages) == sorted(STAGES)
    for name, run in stages.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, name
        assert run.info.status == "FINISHED", name
        # the manifest as an artifact, byte for byte the stage's
        local = client.download_artifacts(run.info.run_id, "manifest.json", str(folder / name))
        assert Path(local).read_bytes() == (demo / name / "manifest.json").read_bytes(), name

    ppo = stages["ppo"]
    assert ppo.data.params["actor_train.learning_rate"] == "0.0002"
    assert ppo.data.params["sampling.max_new_tokens"] == "40"
    assert (
        ppo.data.tags["kuberlhf.config_hash"]
        == json.loads((demo / "ppo" / "manifest.json").read_text())["config_hash"]
    )
    history = client.get_metric_history(ppo.info.run_id, "reward_mean")
    logged = [m for m in metrics_lines(demo / "ppo") if "reward_mean" in m]
    history = sorted(history, key=lambda h: h.step)
    assert [h.step for h in history] == [m["step"] for m in logged] == list(range(1, 31))
    assert [h.value for h in history] == pytest.approx([m["reward_mean"] for m in logged])
    sft = client.get_metric_history(stages["sft"].info.run_id, "eval_loss")
    assert len(sft) >= 2 and min(h.value for h in sft) < max(h.value for h in sft)

    # nothing of the environment's secrets reached the server's store or its artifacts
    for path in folder.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_tensorboard_reads_every_stage_of_the_run_as_one_experiment(demo):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    # what `tensorboard --logdir runs/demo` loads
    experiment = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    experiment.AddRunsFromDirectory(str(demo))
    experiment.Reload()
    assert sorted(experiment.Runs()) == sorted(f"{name}/tensorboard" for name in STAGES)
    logged = [m for m in metrics_lines(demo / "ppo") if "kl" in m]
    points = experiment.Scalars("ppo/tensorboard", "kl")
    assert [p.step for p in points] == [m["step"] for m in logged]
    assert [p.value for p in points] == pytest.approx([m["kl"] for m in logged], rel=1e-6)
    sft = experiment.Scalars("sft/tensorboard", "eval_loss")
    assert sft[-1].value < sft[0].value
    # the sample answers, as a text summary at each sampled step
    texts = experiment.Tensors("ppo/tensorboard", "samples/text_summary")
    assert [t.step for t in texts] == [10, 20, 30]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert (
        json.loads((demo / "ppo" / "samples.jsonl").read_text().splitlines()[0])["prompt"][:20]
        in first
    )


def test_generate_reports_how_fast_each_model_source_generated(demo):
    """What bench/gpu.py reads for the generate stage: per split and model source, the
    seconds spent sampling and the tokens it made per second (the stage's own count)."""
    [line] = [x for x in metrics_lines(demo / "generate") if "train.sft.generation_s" in x]
    candidates = [
        json.loads(x)
        for x in (demo / "generate" / "candidates" / "train.jsonl").read_text().splitlines()
    ]
    made = sum(r["tokens"] for c in candidates for r in c["responses"] if r["source"] == "sft")
    seconds, rate = line["train.sft.generation_s"], line["train.sft.tokens_per_s"]
    assert seconds > 0
    # the seconds are logged to the millisecond, the rate to a tenth
    assert made / (seconds + 5e-4) - 0.05 <= rate <= made / max(seconds - 5e-4, 1e-9) + 0.05


def test_evaluate_reports_how_fast_each_model_answered_and_was_scored(demo):
    """What bench/gpu.py reads for the evaluate stage: each model's generation seconds and
    tokens/s, and the seconds each reward model (the held-out judge, the proxy) scored."""
    found = {k: v for line in metrics_lines(demo / "evaluate") for k, v in line.items()}
    for model in ("candidate", "baseline"):
        assert found[f"{model}.generation_s"] > 0 and found[f"{model}.tokens_per_s"] > 0
    assert found["held_out.scoring_s"] > 0 and found["proxy.scoring_s"] > 0


def test_ppo_writes_sample_answers_to_held_out_prompts_as_it_trains(demo):
    samples = [json.loads(x) for x in (demo / "ppo" / "samples.jsonl").read_text().splitlines()]
    held_out = [
        json.loads(x)["prompt"]
        for x in (demo / "data" / "prompts" / "eval.jsonl").read_text().splitlines()[:4]
    ]
    assert [s["step"] for s in samples] == [10] * 4 + [20] * 4 + [30] * 4
    assert [s["prompt"] for s in samples] == held_out * 3
    for row in samples:
        assert row["answer"].strip() and row["tokens"] >= 1
        assert isinstance(row["reward"], float) and isinstance(row["kl"], float)
    # the policy moves: its answers at the end are not those of iteration 10
    assert [s["answer"] for s in samples[:4]] != [s["answer"] for s in samples[-4:]]
    assert any(abs(s["kl"]) > 1e-3 for s in samples)  # against the reference, not itself
    listed = json.loads((demo / "ppo" / "manifest.json").read_text())["files"]
    assert "samples.jsonl" in [f["path"] for f in listed]


def colour_pixels(image, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    return sum(
        count
        for count, pixel in image.getcolors(maxcolors=1 << 24)
        if all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], rgb, strict=True))
    )


def test_the_report_page_opens_in_a_browser_and_shows_every_stage(demo, tmp_path):
    from PIL import Image

    from tests.browser import open_page

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "report", "demo", "--store", str(demo.parent)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = demo / "report.html"
    assert str(page) in result.stdout
    opened = open_page(page, tmp_path / "report.png")
    assert opened.console == []  # no script error, nothing the page complained of
    # self-contained: everything it loads is inline (links to outputs are only links)
    loads = re.findall(r"<(?:img|script|link|iframe)[^>]*?(?:src|href)=\"([^\"]*)\"", opened.dom)
    assert loads and all(uri.startswith("data:") for uri in loads), loads
    # every stage of the run is in the graph, finished
    stages = re.findall(r'<g class="stage (\w+)">.*?<text[^>]*>([^<]+)</text>', opened.dom)
    assert sorted(stages) == sorted(("finished", name) for name in STAGES)
    assert "95% CI" in opened.dom and "step 30" in opened.dom  # evaluation, samples
    # the browser drew it: the finished stages' green boxes and matplotlib's blue curves
    image = Image.open(opened.screenshot).convert("RGB")
    assert colour_pixels(image, (46, 125, 50)) > len(STAGES) * 3000
    assert colour_pixels(image, (31, 119, 180)) > 500  # a blank panel has none

    # the console check sees a broken page (the control)
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><p>x</p><script>notDefined();</script>")
    assert any("notDefined" in line for line in open_page(broken, tmp_path / "b.png").console)
