"""Inside a CUDA image (`make images-cuda-local` runs it there, on a machine without a GPU):
DeepSpeed's fused Adam and CPU Adam were built into the image for CUDA and load as installed
modules, not JIT-compiled; CPU Adam's steps equal torch's AdamW. Prints one JSON object.

Run with DS_ACCELERATOR=cuda: without a GPU DeepSpeed would pick its CPU accelerator, as it
does in a build, and a GPU node picks CUDA."""

from __future__ import annotations

import json
import os

import torch
from deepspeed.git_version_info import accelerator_name, installed_ops
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder


def installed_module(builder) -> str:
    """The op's module file, loaded the way a stage loads it; an op that was not built into
    the image would be JIT-compiled here instead, into TORCH_EXTENSIONS_DIR."""
    module = builder.load()
    path = os.path.realpath(module.__file__)
    ops_dir = os.path.realpath(os.path.dirname(__import__("deepspeed").ops.__file__))
    assert path.startswith(ops_dir + os.sep), f"{builder.name} was compiled at run time: {path}"
    return path


def cpu_adam_matches_torch() -> float:
    """Largest difference between CPU Adam's and torch's AdamW parameters after 5 steps."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(4099))  # odd length: the SIMD loop's tail too
    reference = torch.nn.Parameter(ours.detach().clone())
    settings = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    optimisers = (
        DeepSpeedCPUAdam([ours], adamw_mode=True, **settings),
        torch.optim.AdamW([reference], **settings),
    )
    for _ in range(5):
        grad = torch.randn(4099)
        for parameter, optimiser in zip((ours, reference), optimisers, strict=True):
            parameter.grad = grad.clone()
            optimiser.step()
    return (ours - reference).abs().max().item()


def main() -> None:
    assert accelerator_name == "cuda", f"DeepSpeed's ops were built for {accelerator_name!r}"
    missing = [op for op in ("fused_adam", "cpu_adam") if not installed_ops.get(op)]
    assert not missing, f"not built into the image: {missing}"
    figures = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fused_adam": installed_module(FusedAdamBuilder()),
        "cpu_adam": installed_module(CPUAdamBuilder()),
        "cpu_adam_vs_torch_adamw_max_abs_diff": cpu_adam_matches_torch(),
    }
    assert figures["cpu_adam_vs_torch_adamw_max_abs_diff"] < 1e-5, figures
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
