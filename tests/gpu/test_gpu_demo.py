"""The demo pipeline on the GPU (generate, label and evaluate sample and score there; PPO
learns), and PPO on its models: under ZeRO-3, with the compiled decode, preempted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.generation import NO_CUDA_GRAPHS, PARTLY_EAGER
from tests.conftest import ROOT, preempt_and_resume, run_entrypoint
from tests.gpu.common import BF16, GPU, ON_CPU, finished, mean, metrics_lines

pytestmark = GPU


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo pipeline (examples/demo.yaml: bootstrap to evaluate) with every trained
    model in bf16 under ZeRO-2, each stage through `python -m jobs` as in a pod; its outputs
    by stage name."""
    from pipeline.config import plan

    root = tmp_path_factory.mktemp("gpu-demo")
    the_plan = plan(str(ROOT / "examples" / "demo.yaml"), store_uri=str(root / "runs"))
    outputs = {}
    for planned in the_plan.stages:
        config = planned.config.model_dump(mode="json")
        for key in ("train", "actor_train", "critic_train"):
            if key in config:
                config[key].update(precision="bf16", zero_stage=2)
        result = run_entrypoint(planned.stage, config, root, name=planned.name)
        output = Path(config["output"])
        if planned.stage in ("bootstrap", "data"):  # no model: nothing for the GPU to do
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            finished(output, result)
        outputs[planned.name] = output
    return outputs


def test_the_demo_samples_labels_trains_and_evaluates_on_the_gpu(demo):
    """generate, label and evaluate sample and score on the GPU (checked as each finished),
    and PPO's learning claims of the CPU suite hold there."""
    for name in ("sft", "generate", "reward-v1", "label", "reward", "ppo", "evaluate"):
        assert (demo[name] / "manifest.json").is_file(), name
    lines = [m for m in metrics_lines(demo["ppo"]) if "reward_mean" in m]
    assert [m["step"] for m in lines] == list(range(1, 31))
    first = mean(m["reward_mean"] for m in lines[:5])
    last = mean(m["reward_mean"] for m in lines[-5:])
    assert last - first > 0.5
    assert max(m["kl"] for m in lines) < 8.0
    report = json.loads((demo["evaluate"] / "report.json").read_text())
    assert report["judged_by"] == "held_out"
    assert report["held_out"]["win_rate"] > 0.5 and report["proxy"]["win_rate"] > 0.5


def ppo_config(demo, output: Path, **overrides) -> dict:
    config = {
        "output": str(output),
        "actor": str(demo["sft"] / "model"),
        "reward_model": str(demo["reward"] / "model"),
        "prompts": str(demo["data"]),
        "iterations": 6,
        "rollout_batch_size": 16,
        "minibatch_size": 8,
        "checkpoint_every": 100,
        "sampling": {"max_new_tokens": 40, "temperature": 1.0, "top_p": 1.0},
        "actor_train": {**BF16, "zero_stage": 2, "learning_rate": 2e-4},
        "critic_train": {**BF16, "zero_stage": 2, "learning_rate": 2e-4},
    }
    return {**config, **overrides}


@pytest.mark.parametrize(
    ("cache", "gather"), [("dynamic", True), ("static", True), ("static", False)]
)
def test_ppo_under_zero3_with_frozen_models_partitioned(demo, tmp_path, cache, gather):
    """Actor, critic and frozen models all partitioned: the actor generates under ZeRO-3,
    its parameters gathered once for the rollout (where they fit) or layer by layer at
    every token (as where they do not: ``zero3_gather: false``), with either cache. The
    static cache's decode step is compiled on a GPU over weights gathered anew for every
    rollout, and runs eager over weights gathered at every token (a CUDA graph would
    replay the addresses of the first). The EMA, which needs the actor's whole weights,
    is the resume test's."""
    sampling = {
        "max_new_tokens": 40,
        "temperature": 1.0,
        "top_p": 1.0,
        "cache": cache,
        "zero3_gather": gather,
    }
    if ON_CPU and cache == "static" and gather:  # transformers compiles by itself on a GPU only
        sampling["compile_decode"] = True
    config = ppo_config(
        demo,
        tmp_path / "z3",
        iterations=2,
        sampling=sampling,
        frozen_zero_stage=3,
        actor_train={**BF16, "zero_stage": 3, "learning_rate": 2e-4},
        critic_train={**BF16, "zero_stage": 3, "learning_rate": 2e-4},
    )
    result = run_entrypoint("ppo", config, tmp_path)
    assert finished(tmp_path / "z3", result).metrics["iterations"] == 2
    how = "gathered once per rollout" if gather else "gathered layer by layer at every token"
    assert f"the actor's ZeRO-3 parameters are {how}" in result.stdout
    if cache == "static" and (gather or not ON_CPU):
        decode = "compiled (torch.compile)" if gather else "eager"
        assert f"the static KV cache's decode step runs {decode}" in result.stdout
        # whole: without DeepSpeed's hooks, which dynamo does not trace
        assert PARTLY_EAGER not in result.stdout and NO_CUDA_GRAPHS not in result.stdout


def test_ppo_rolls_out_with_the_compiled_decode_on_the_gpu(demo, tmp_path):
    sampling = {"max_new_tokens": 40, "temperature": 1.0, "top_p": 1.0, "cache": "static"}
    if ON_CPU:  # transformers compiles by itself on a GPU only
        sampling["compile_decode"] = True
    config = ppo_config(demo, tmp_path / "static", iterations=2, sampling=sampling)
    result = run_entrypoint("ppo", config, tmp_path)
    assert finished(tmp_path / "static", result).metrics["iterations"] == 2
    # compiled, not fallen back to an eager decode, in whole or in part, with its CUDA graphs
    assert "the static KV cache's decode step runs compiled" in result.stdout
    assert PARTLY_EAGER not in result.stdout and NO_CUDA_GRAPHS not in result.stdout


def test_ppo_preempted_on_the_gpu_resumes_to_the_same_metrics(demo, tmp_path):
    overrides = {"checkpoint_every": 3, "seed": 5, "ema_decay": 0.9, "sample_every": 2}
    # Deterministic kernels (an attention backward's atomics would otherwise move a bf16
    # weight by an ulp now and then, and a sampled token with it) and cuBLAS's fixed
    # workspace: the same numbers from the same inputs.
    env = {"KUBERLHF_DETERMINISTIC": "1"}
    a = ppo_config(demo, tmp_path / "a", **overrides)
    finished(tmp_path / "a", run_entrypoint("ppo", a, tmp_path, env=env, name="a"))

    resumed = preempt_and_resume(
        "ppo", ppo_config(demo, tmp_path / "b", **overrides), tmp_path, after_step=3, env=env
    )
    finished(tmp_path / "b", resumed)

    first, second = metrics_lines(tmp_path / "a"), metrics_lines(tmp_path / "b")
    assert [m["step"] for m in second] == [m["step"] for m in first] == list(range(1, 7))
    for x, y in zip(first, second, strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-2, abs=1e-3), (x["step"], key)
    # the sample answers (greedy, on the GPU, outside the training's CUDA random stream)
    # are kept across the restart: the resumed run has the same ones
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 4 + [4] * 4 + [6] * 4
    assert [s["answer"] for s in again] == [s["answer"] for s in samples]
