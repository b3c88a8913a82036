"""Sampling from a causal LM: batched, left-padded, KV-cached, stopped at EOS.

Shared by the generate stage (candidates for preference data) and, later, PPO rollouts
and evaluation. Left padding keeps every prompt's last token at the end of its row, so
the first generated token of every row follows its own prompt directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = True
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    max_prompt_tokens: int = Field(384, ge=1, description="longer prompts keep their end")
    cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="KV cache: static pre-allocates it, so transformers can compile the "
        "decode step (CUDA graphs) on GPUs; the tokens are the same",
    )


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    text: str
    finish_reason: str  # "eos" | "length"


def cut_at_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """The tokens before the first EOS (nothing after it), and why generation ended."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return row[:index], "eos"
    return row, "length"


def eos_ids_of(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def cache_implementation(config: SamplingConfig) -> str | None:
    """transformers' name for the KV cache asked for (None: its default, dynamic)."""
    return "static" if config.cache == "static" else None


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int, device) -> dict:
    """Left-padded prompts (an over-long one keeps its end), on ``device``."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    encoded = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_tokens,
        add_special_tokens=False,
    )
    return {k: v.to(device) for k, v in encoded.items()}


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: SamplingConfig,
    num_samples: int = 1,
    seed: int = 0,
) -> list[list[Sample]]:
    """``num_samples`` samples per prompt, in prompt order; deterministic in ``seed``."""
    device = next(model.parameters()).device
    eos_ids = eos_ids_of(model, tokenizer)
    out: list[list[Sample]] = []
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start : start + config.batch_size]
        encoded = encode_prompts(tokenizer, batch, config.max_prompt_tokens, device)
        torch.manual_seed(seed + start)
        generated = model.generate(
            **encoded,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None,
            top_k=config.top_k if config.do_sample else None,
            repetition_penalty=config.repetition_penalty,
            num_return_sequences=num_samples,
            eos_token_id=sorted(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            cache_implementation=cache_implementation(config),
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :].tolist()
        for index in range(len(batch)):
            samples = []
            for row in new_tokens[index * num_samples : (index + 1) * num_samples]:
                tokens, reason = cut_at_eos(row, eos_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                samples.append(Sample(tokens, text, reason))
            out.append(samples)
    return out
