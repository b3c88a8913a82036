"""SFT (ZeRO-0, 2 and 3, and its speed levers) and C-RLFT on the GPU; collectives over NCCL
and the waits beside them on two GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, STAGE_TIMEOUT_S, run_entrypoint
from tests.gpu.common import BF16, DEVICE, GPU, ON_CPU, finished, metrics_lines, sft_config, stage
from tests.unit.test_dist import two_ranks_waiting
from tests.unit.test_fidelity import FAMILIES, tiny_lm

pytestmark = GPU


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_sft_lowers_held_out_loss_on_the_gpu(tiny, tiny_data, tmp_path, zero_stage):
    """ZeRO-0 is what ``precision: bf16`` alone gives: DeepSpeed's bf16 path without ZeRO,
    which on a GPU wraps its fused Adam in its FP16_Optimizer (fp32 master weights, bf16
    gradients), a path no CPU run takes (there torch's AdamW gets the unfused one); in one
    process without the all-reduce of its gradients with itself. The manifest keeps the
    stage's start-up (what issue 11's 35 s at 1.3B parameters was made of)."""
    manifest = stage("sft", sft_config(tiny, tiny_data, tmp_path / "sft", zero_stage), tmp_path)
    assert manifest.metrics["eval_loss"] < 0.5 * manifest.metrics["eval_loss_start"]
    assert 0 <= manifest.metrics["startup_inputs_s"] < manifest.metrics["startup_s"]


@pytest.mark.parametrize(
    "lever", ["compile", "compile under zero3", "packing", "flash_attention_2"]
)
def test_sft_speed_levers_train_on_the_gpu(tiny, tiny_data, tmp_path, lever):
    """The levers bench/gpu.py measures: torch.compile inside the engine (ZeRO-2, and
    ZeRO-3, whose parameter hooks run inside the compiled model), packed rows under SDPA
    (a block-diagonal mask; the stage's isolation check runs in bf16 first) and under
    flash-attention (each example its own sequence in the variable-length kernel)."""
    from transformers.utils import is_flash_attn_2_available

    config = sft_config(tiny, tiny_data, tmp_path / "sft", 3 if "zero3" in lever else 2)
    if lever.startswith("compile"):
        config["train"]["compile"] = True
        if ON_CPU:  # inductor's CPU code fails on bf16 reductions (torch 2.13)
            config["train"]["precision"] = "fp32"
    elif lever == "packing":
        config["packing"] = True
    else:
        if not is_flash_attn_2_available():
            pytest.skip("flash-attn is not installed here")
        config["train"]["attn_implementation"] = "flash_attention_2"
        config["packing"] = True
    manifest = stage("sft", config, tmp_path)
    assert manifest.metrics["eval_loss"] < 0.5 * manifest.metrics["eval_loss_start"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_packing_check_tells_isolation_from_bf16_rounding(family):
    """On a GPU, bf16 kernels round a row differently with its shape: the check compares
    rows of one shape, so models that isolate packed examples are not refused for it, and
    OPT (whose mask ignores the position ids) still is."""
    from jobs.errors import BadInputError
    from jobs.supervised import check_packing_isolates

    model = tiny_lm(family).to(DEVICE, torch.bfloat16)
    if family == "opt":
        with pytest.raises(BadInputError, match="does not keep packed examples apart"):
            check_packing_isolates(model, DEVICE)
    else:
        check_packing_isolates(model, DEVICE)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_crlft_trains_on_the_gpu(tiny, tmp_path, zero_stage):
    rows = []
    for line in (tiny / "data" / "dialogues.jsonl").read_text().splitlines():
        d = json.loads(line)
        for source, answer in (("gpt-4", d["chosen"]), ("gpt-3.5-turbo", d["rejected"])):
            turns = [{"from": "human", "value": d["prompt"]}, {"from": "gpt", "value": answer}]
            rows.append({"model": source, "conversations": turns})
    (tmp_path / "sharegpt.json").write_text(json.dumps(rows, ensure_ascii=False))
    data = {
        "output": str(tmp_path / "data"),
        "template": "raw",
        "dedup_threshold": None,
        "eval_fraction": 0.1,
        "sources": [
            {
                "name": "sharegpt",
                "format": "sharegpt",
                "uri": str(tmp_path / "sharegpt.json"),
                "label_field": "model",
            }
        ],
    }
    assert run_entrypoint("data", data, tmp_path).returncode == 0
    config = {
        "output": str(tmp_path / "crlft"),
        "model": str(tiny / "model"),
        "data": str(tmp_path / "data"),
        "max_seq_len": 128,
        "max_steps": 40,
        "eval_every": 20,
        "seed": 0,
        "train": {**BF16, "zero_stage": zero_stage, "learning_rate": 3e-3, "micro_batch_size": 16},
    }
    stage("crlft", config, tmp_path)
    evals = [m["eval_loss"] for m in metrics_lines(tmp_path / "crlft") if "eval_loss" in m]
    assert evals[-1] < evals[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL, one per rank)")
@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_two_gpus_evaluate_across_ranks(name, tiny, tiny_data, tmp_path):
    """Evaluation all-reduces over NCCL (it died there on CPU tensors)."""
    config = sft_config(tiny, tiny_data, tmp_path / name, zero_stage=3)
    config.update({"max_steps": 4, "eval_every": 2})
    if name == "dpo":
        config["train"]["learning_rate"] = 1e-4
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "jobs",
            name,
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=STAGE_TIMEOUT_S,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    finished(tmp_path / name, result)
    # the ranks' shares summed, not one rank's: the first evaluation (the model as loaded)
    # is that of one process on one GPU
    key = "eval_loss" if name == "sft" else "eval_logp_chosen"
    two = [m[key] for m in metrics_lines(tmp_path / name) if key in m]
    stage(name, {**config, "output": str(tmp_path / f"{name}-one")}, tmp_path, f"{name}-one")
    alone = [m[key] for m in metrics_lines(tmp_path / f"{name}-one") if key in m]
    assert two[0] == pytest.approx(alone[0], rel=1e-2, abs=1e-3), (two, alone)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL, one per rank)")
def test_two_gpus_wait_at_a_barrier_longer_than_nccls_timeout(tmp_path):
    """With NCCL for the tensors, the waits still run on the host group: rank 1 waits out
    rank 0's 5 s at a barrier and an object broadcast with a collective timeout of 2 s (an
    all-reduce would have NCCL's watchdog abort both ranks, so none is tried here)."""
    waits = ["barrier", "broadcast_object"]
    assert two_ranks_waiting(waits, busy_s=5, collective_s=2, folder=tmp_path) == [
        "barrier: done",
        "broadcast_object: done",
    ]
