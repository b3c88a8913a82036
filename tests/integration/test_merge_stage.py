"""A merged tiny model loads and generates, and its layers follow the schedule."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from jobs.contract import read_manifest
from tests.conftest import run_entrypoint


def test_merged_tiny_model_loads_generates_and_follows_the_schedule(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny / "model")
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1).add_(0.01)
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
    assert not torch.equal(merged["gpt_neox.embed_in.weight"], base["gpt_neox.embed_in.weight"])

    from jobs.generation import SamplingConfig, generate
    from jobs.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    tokenizer = load_tokenizer(str(tmp_path / "merged" / "model"))
    [[sample]] = generate(model, tokenizer, ["Hello"], SamplingConfig(max_new_tokens=5))
    assert sample.finish_reason in {"eos", "length"}
