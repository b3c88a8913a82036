"""What the GPU suite's modules share (`make test-gpu`: every stage on one NVIDIA GPU in bf16).

Each test checks that the model really ran there (the stage's manifest reports the GPU's peak
memory) and that the learning claims of the CPU suite hold there too. Stages run through
`python -m jobs` on the local store, as in a pod, so the suite needs only what the job image
has (no Helm binding, no S3 test server). The tests are in four modules, which pytest-xdist's
workers (`--dist loadfile`) run side by side on the one GPU: the demo's (which makes the demo
once), the supervised stages', the preference stages' and the rollouts'.

KUBERLHF_GPU_SUITE_ON_CPU=1 runs the same tests on a CPU machine (slowly), to check the
suite itself where no GPU is at hand; the GPU placement checks are then left out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from jobs.contract import Manifest, read_manifest
from tests.conftest import run_entrypoint

ON_CPU = os.environ.get("KUBERLHF_GPU_SUITE_ON_CPU") == "1"
# every module's pytestmark
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not ON_CPU,
        reason="needs an NVIDIA GPU with CUDA PyTorch: `make test-gpu` on a GPU machine",
    ),
]
BF16 = {"precision": "bf16", "warmup_steps": 4}
DEVICE = "cpu" if ON_CPU else "cuda"  # where a test puts a model itself


def finished(output: Path, result: subprocess.CompletedProcess) -> Manifest:
    """The stage's manifest, once it finished and its models ran on the GPU."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    manifest = read_manifest(str(output))
    assert manifest is not None
    if not ON_CPU:
        # any allocation at all: a tiny model's weights are a few MiB, which the figure rounds
        assert manifest.metrics["cuda_peak_memory_gib"] > 0, "the stage left the GPU idle"
        assert manifest.metrics["cuda_device"] == torch.cuda.get_device_name()
    return manifest


def stage(name: str, config: dict, tmp_path: Path, tag: str | None = None) -> Manifest:
    return finished(Path(config["output"]), run_entrypoint(name, config, tmp_path, name=tag))


def metrics_lines(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def sft_config(tiny, tiny_data, output: Path, zero_stage: int) -> dict:
    """The CPU suite's SFT run (tests/integration/test_sft.py), in bf16 under ``zero_stage``."""
    from tests.integration.test_sft import sft_config as cpu_config

    return cpu_config(tiny, tiny_data, output, train={**BF16, "zero_stage": zero_stage})
