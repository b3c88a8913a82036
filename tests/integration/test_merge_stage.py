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


def test_tied_embeddings_are_merged_once_at_the_input_embeddings_t(tiny, tmp_path):
    """Llama-3.2-1B, Qwen2.5-0.5B and Gemma tie lm_head to the input embeddings: the rule
    for embed_tokens decides the shared tensor (the lm_head key, an alias, used to
    overwrite it with its own t), and a base tied where the other is not is refused."""
    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jobs import merge
    from jobs.contract import StageConfig, run_stage
    from jobs.errors import BadInputError

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")  # the stage keeps the base's

    def write(name: str, seed: int, tied: bool) -> str:
        torch.manual_seed(seed)
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
        config = LlamaConfig(vocab_size=64, num_hidden_layers=2, tie_word_embeddings=tied, **shape)
        model = LlamaForCausalLM(config)

        def save(config, ctx) -> dict:
            model.save_pretrained(ctx.out_dir / "model")
            tokenizer.save_pretrained(ctx.out_dir / "model")
            return {}

        run_stage(name, StageConfig(output=str(tmp_path / name)), save, tmp_path / f"w-{name}")
        return str(tmp_path / name / "model")

    base, other, untied = write("base", 0, True), write("other", 1, True), write("untied", 2, False)
    rules = [{"filter": "embed_tokens", "value": 0.0}, {"value": 0.5}]
    config = merge.Config(output=str(tmp_path / "merged"), base=base, other=other, t=rules)
    metrics = run_stage("merge", config, merge.run, workdir=tmp_path / "w").metrics

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    start = AutoModelForCausalLM.from_pretrained(base)
    embeddings = merged.get_input_embeddings().weight
    assert torch.equal(embeddings, start.get_input_embeddings().weight)  # t = 0 as asked
    assert torch.equal(merged.get_output_embeddings().weight, embeddings)  # still tied
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged.state_dict()[layer], start.state_dict()[layer])  # t = 0.5
    assert metrics["tensors"] == len(start.state_dict()) - 1  # lm_head is no tensor of its own

    untied_config = config.model_copy(update={"other": untied, "output": str(tmp_path / "m2")})
    with pytest.raises(BadInputError, match="ties 'lm_head.weight' to 'model.embed_tokens"):
        run_stage("merge", untied_config, merge.run, workdir=tmp_path / "w2")
