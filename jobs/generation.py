"""Sampling from a causal LM: batched, left-padded, KV-cached, stopped at EOS.

Shared by the generate stage (candidates for preference data) and, later, PPO rollouts
and evaluation. Left padding keeps every prompt's last token at the end of its row, so
the first generated token of every row follows its own prompt directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs import dist
from jobs.batches import pad
from jobs.compiled import CompileWatch
from jobs.tokens import MessageText, encode, keep_end


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = True
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(
        16,
        ge=1,
        description="prompts per generate call in the generate and evaluate stages; ppo and "
        "grpo generate each rollout in one call (its size is theirs: rollout_batch_size, "
        "prompts_per_iteration x group_size)",
    )
    max_prompt_tokens: int = Field(384, ge=1, description="longer prompts keep their end")
    cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="KV cache: static pre-allocates it, so transformers can compile the "
        "decode step (CUDA graphs) on GPUs; where the step may be compiled, for "
        "max_prompt_tokens + max_new_tokens (one compile for every prompt length, each "
        "step attending over that length); the tokens are the same",
    )
    compile_decode: bool | None = Field(
        None,
        description="compile the decode step (torch.compile, CUDA graphs on GPUs) with the "
        "static cache: unset, transformers does where it can (a GPU); true: on any device; "
        "false: never (to measure what compiling gives); the tokens are the same",
    )
    zero3_gather: bool = Field(
        True,
        description="under ZeRO-3, gather the model's weights once per rollout where they "
        "fit on the device (else layer by layer at every token); the tokens are the same",
    )

    @model_validator(mode="after")
    def _compile_needs_static(self) -> SamplingConfig:
        if self.compile_decode and self.cache != "static":
            raise ValueError(
                "compile_decode needs cache: static (a compiled step has fixed shapes)"
            )
        return self


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


def gathered_per_token(model) -> bool:
    """Whether ``model``'s weights are ZeRO-3 partitions that DeepSpeed's hooks gather
    layer by layer at every forward (``engine.for_generation`` when they do not fit)."""
    return any(
        getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE"
        for p in model.parameters()
    )


def cache_options(config: SamplingConfig, model) -> dict:
    """``generate`` options of the KV cache asked for (transformers' default: dynamic) and
    of compiling its decode step. Never compiled over weights gathered at every token:
    the gathered weights land in new buffers at each forward, which a CUDA graph (replaying
    the addresses it captured) would not read, and dynamo breaks its graph at every hook."""
    if config.cache != "static":
        return {}
    options: dict = {"cache_implementation": "static"}
    gathered = gathered_per_token(model)
    if gathered and config.compile_decode:
        dist.say_once(
            "generation: compile_decode is not used: the actor's ZeRO-3 weights are "
            "gathered at every token (they do not fit on the device at once)"
        )
    if gathered or config.compile_decode is False:
        return {**options, "disable_compile": True}
    if config.compile_decode:
        from transformers import CompileConfig

        # transformers compiles on accelerators only, unless told to on every device
        compiled = CompileConfig()
        compiled._compile_all_devices = True
        options["compile_config"] = compiled
    # Where the step may be compiled: the cache sized once, for the longest prompt and
    # answer there can be (sized to each batch's longest prompt, a longer batch would
    # compile the step again); each step then attends over all of it, a price a compiled
    # step repays and an eager one would not.
    options["max_cache_len"] = config.max_prompt_tokens + config.max_new_tokens
    return options


# What the log says where a compiled decode step is not compiled whole (the GPU tests
# look for these words).
PARTLY_EAGER = "the compiled decode step runs eager in part"
NO_CUDA_GRAPHS = "the compiled decode step runs without CUDA graphs"


def compile_report(watch: CompileWatch, model, on_cuda: bool) -> list[str]:
    """What ``model``'s decode step ran as over ``watch``'s span, a line each. A step
    compiled before the span (an earlier batch) was reported then."""
    if not hasattr(model, "_compiled_call"):
        return ["the static KV cache's decode step runs eager"]
    lines = ["the static KV cache's decode step runs compiled (torch.compile)"]
    eager = watch.eager_parts()
    if eager:
        lines.append(f"{PARTLY_EAGER} or whole: {eager}")
    skips = watch.counts(on_cuda).get("cudagraph_skips", 0)  # (counted on a GPU only)
    if skips:
        lines.append(
            f"{NO_CUDA_GRAPHS}: inductor skipped them {skips} time(s) "
            "(TORCH_LOGS=cudagraphs says why)"
        )
    return lines


def encode_prompts(
    tokenizer,
    prompts: list[str],
    max_tokens: int,
    device,
    literals: list[list[MessageText]] | None = None,
) -> dict:
    """Left-padded prompts (BOS where the tokenizer expects one; an over-long prompt keeps
    its end), on ``device``. ``literals``: per prompt, where its messages' own texts lie
    (:func:`jobs.batches.literals` of its row), in which a special token's text is text,
    as SFT read it."""
    literals = literals or [[] for _ in prompts]
    rows = [
        keep_end(encode(tokenizer, p, literal=lit), max_tokens, tokenizer)
        for p, lit in zip(prompts, literals, strict=True)
    ]
    return {
        "input_ids": pad(rows, tokenizer.pad_token_id, left=True).to(device),
        "attention_mask": pad([[1] * len(r) for r in rows], 0, left=True).to(device),
    }


@dataclass
class Samples:
    sequences: torch.Tensor  # prompt (left-padded) + answer (padding after its EOS)
    attention: torch.Tensor
    mask: torch.Tensor  # float, 1 on answer tokens up to and including the first EOS
    ended: torch.Tensor  # bool per row: the answer has its EOS (not cut at max_new_tokens)
    start: int  # where answers begin
    seconds: float

    @property
    def answers(self) -> torch.Tensor:
        return self.sequences[:, self.start :]

    @property
    def lengths(self) -> list[int]:
        """Each answer's tokens, its EOS included."""
        return self.mask.sum(1).long().tolist()

    def take(self, rows: slice, device: torch.device | str | None = None) -> Samples:
        """These rows alone (on ``device``, else where they are); the sampling's seconds
        stay with the whole call (a merge of these adds none)."""
        return replace(
            self,
            seconds=0.0,
            **{
                name: getattr(self, name)[rows].to(device)
                for name in ("sequences", "attention", "mask", "ended")
            },
        )


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    eos: set[int],
    seed: int,
    num_samples: int = 1,
    synced_gpus: bool = False,
    literals: list[list[MessageText]] | None = None,
) -> Samples:
    """``num_samples`` answers per prompt (a prompt's answers next to each other), in eval
    mode (no dropout); the model's mode is restored after. ``literals``: as
    :func:`encode_prompts` takes them."""
    device = _device(model)
    encoded = encode_prompts(tokenizer, prompts, sampling.max_prompt_tokens, device, literals)
    start = encoded["input_ids"].size(1)
    was_training = model.training
    model.eval()
    # (only the static cache's decode step is ever compiled)
    watch = CompileWatch() if sampling.cache == "static" else None
    timer = time.perf_counter()
    torch.manual_seed(seed)
    try:
        sequences = model.generate(
            **encoded,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            temperature=sampling.temperature if sampling.do_sample else None,
            top_p=sampling.top_p if sampling.do_sample else None,
            # 0, not None, for no cut: transformers versions differ on whether an explicit
            # None falls back to a generation config's top_k (50 in many), and log-probs
            # are taken over the whole softmax
            top_k=sampling.top_k if sampling.do_sample else None,
            repetition_penalty=sampling.repetition_penalty,
            num_return_sequences=num_samples,
            eos_token_id=sorted(eos),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **cache_options(sampling, model),
            # Under ZeRO-3 every rank must run every forward: ranks that finish early keep
            # stepping until all have, or the parameter all-gathers hang.
            synced_gpus=synced_gpus and dist.world_size() > 1,
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - timer
    if watch is not None:
        # what transformers did (it compiles where it judges it can), not what was asked
        for line in compile_report(watch, model, device.type == "cuda"):
            dist.say_once(f"generation: {line}")

    # The answer runs up to and including its first EOS (stopping is an action too).
    prompt_ids = encoded["input_ids"].repeat_interleave(num_samples, 0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_samples, 0)
    answer = sequences[:, start:]
    is_eos = torch.zeros_like(answer, dtype=torch.bool)
    for token in eos:
        is_eos |= answer == token
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    answer_mask = (~after_eos).long()
    sequences = torch.cat([prompt_ids, answer.masked_fill(after_eos, tokenizer.pad_token_id)], 1)
    attention = torch.cat([prompt_mask, answer_mask], dim=1)
    return Samples(sequences, attention, answer_mask.float(), is_eos.any(1), start, seconds)


def merge_samples(rows: list[tuple[Samples, int]], pad_id: int) -> Samples:
    """Rows of several :func:`sample` calls as one batch, padded as one call pads its own:
    prompts on the left to the longest prompt, answers on the right to the longest answer
    (the tokens and their masks are the rows' own; only the padding moves)."""
    start = max(drawn.start for drawn, _ in rows)
    width = max(drawn.sequences.size(1) - drawn.start for drawn, _ in rows)
    sequences, attention, mask = [], [], []
    for drawn, row in rows:
        left = start - drawn.start
        right = width - (drawn.sequences.size(1) - drawn.start)
        sequences.append(F.pad(drawn.sequences[row], (left, right), value=pad_id))
        attention.append(F.pad(drawn.attention[row], (left, right), value=0))
        mask.append(F.pad(drawn.mask[row], (0, right), value=0.0))
    calls = {id(drawn): drawn for drawn, _ in rows}.values()
    return Samples(
        torch.stack(sequences),
        torch.stack(attention),
        torch.stack(mask),
        torch.stack([drawn.ended[row] for drawn, row in rows]),
        start,
        sum(drawn.seconds for drawn in calls),
    )


def decode(tokenizer, answers: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The answers as text, up to (not including) their EOS."""
    texts = []
    for row, keep in zip(answers.tolist(), mask.tolist(), strict=True):
        tokens = [t for t, k in zip(row, keep, strict=True) if k][: int(sum(keep))]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: SamplingConfig,
    num_samples: int = 1,
    seed: int = 0,
    literals: list[list[MessageText]] | None = None,
) -> list[list[Sample]]:
    """``num_samples`` samples per prompt, in prompt order; deterministic in ``seed``.
    ``literals``: as :func:`encode_prompts` takes them."""
    eos_ids = eos_ids_of(model, tokenizer)
    out: list[list[Sample]] = []
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start : start + config.batch_size]
        placed = literals[start : start + config.batch_size] if literals else None
        drawn = sample(
            model, tokenizer, batch, config, eos_ids, seed + start, num_samples, literals=placed
        )
        new_tokens = drawn.answers.tolist()
        for index in range(len(batch)):
            samples = []
            for row in new_tokens[index * num_samples : (index + 1) * num_samples]:
                tokens, reason = cut_at_eos(row, eos_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                samples.append(Sample(tokens, text, reason))
            out.append(samples)
    return out


def timed_generate(*args, **kwargs) -> tuple[list[list[Sample]], dict[str, float]]:
    """:func:`generate`, and how long it took: seconds and generated tokens per second (the
    figures bench/gpu.py reads from the generate and evaluate stages' metrics)."""
    started = time.perf_counter()
    samples = generate(*args, **kwargs)
    seconds = time.perf_counter() - started  # generate() returns tokens read on the host
    tokens = sum(len(s.tokens) for per_prompt in samples for s in per_prompt)
    return samples, {
        "generation_s": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }
