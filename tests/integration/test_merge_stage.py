"""A merged tiny model loads and generates, and its layers follow the schedule."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from jobs.contract import read_manifest
from tests.conftest import run_entrypoint


def test_merged_tiny_model_loads_generates_and_follows_the_schedule(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny / "model")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a model at an angle to the base: SLERP differs from LERP there
        for param in other.parameters():
            param.add_(param.abs().mean() * torch.randn(param.shape, generator=generator))
    other.save_pretrained(tmp_path / "other-model")
    from jobs.contract import StageConfig, run_stage

    def keep(config, ctx):
        import shutil

        shutil.copytree(tmp_path / "other-model", ctx.out_dir / "model")
        return {}

    run_stage("other", StageConfig(output=str(tmp_path / "other")), keep, tmp_path / "w")
    config = {
        "output": str(tmp_path / "merged"),
        "base": str(tiny / "model"),
        "other": str(tmp_path / "other" / "model"),
        "t": [{"filter": "attention", "value": [0.0, 1.0]}, {"value": 0.5}],
    }
    result = run_entrypoint("merge", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(str(tmp_path / "merged")).metrics["tensors"] > 0

    merged = load_file(str(tmp_path / "merged" / "model" / "model.safetensors"))
    base = load_file(str(tiny / "model" / "model.safetensors"))
    far = load_file(str(tmp_path / "other" / "model" / "model.safetensors"))
    first = "gpt_neox.layers.0.attention.dense.weight"
    last = "gpt_neox.layers.1.attention.dense.weight"
    assert torch.equal(merged[first], base[first]) and torch.equal(merged[last], far[last])
    # the rest at t = 0.5: spherical interpolation, written out here as mergekit's slerp
    for name in ("gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"):
        v0, v1 = base[name].double(), far[name].double()
        cos = float((v0 / v0.norm() * v1 / v1.norm()).sum())
        theta = math.acos(cos)
        expected = (math.sin(theta / 2) * v0 + math.sin(theta / 2) * v1) / math.sin(theta)
        lerp = (v0 + v1) / 2
        assert not torch.allclose(expected, lerp, atol=1e-4)  # the angle matters here
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-5, rtol=1e-4)

    from jobs.generation import SamplingConfig, generate
    from jobs.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    tokenizer = load_tokenizer(str(tmp_path / "merged" / "model"))
    [[sample]] = generate(model, tokenizer, ["Hello"], SamplingConfig(max_new_tokens=5))
    assert sample.finish_reason in {"eos", "length"}
