"""What the RL stages (ppo, grpo) share beyond sampling (jobs.generation.sample): per-token
log-probs and the clipped policy loss, as DeepSpeed-Chat's step 3 and verl's
``trainer/ppo/core_algos.py`` compute them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from jobs import dist
from jobs.batches import read_jsonl
from jobs.engine import EngineConfig
from jobs.tokens import padded_logits

# TRL's RL sampling (PPO and GRPO alike): the update's log-probs are the temperature-scaled
# policy's, so no top-p or top-k cut by default; a sampling block given in a config changes
# only what it names (SamplingConfig's own defaults, temperature 0.8 and top-p 0.95, are
# the generate stage's).
RL_SAMPLING = {"temperature": 1.0, "top_p": 1.0}


def over_defaults(defaults: dict, value):
    """A config's ``sampling`` block over the stage's defaults (for a "before" validator)."""
    return {**defaults, **value} if isinstance(value, dict) else value


class SampleLog(BaseModel):
    """How often an RL stage writes its policy's answers to a few held-out prompts."""

    sample_every: int = Field(
        10, ge=0, description="iterations between sample answers in samples.jsonl (0: none)"
    )
    sample_prompts: int = Field(
        4, ge=1, description="how many: the first prompts of prompts/eval.jsonl (else train)"
    )

    def due(self, iteration: int, last: int) -> bool:
        return self.sample_every > 0 and (iteration % self.sample_every == 0 or iteration == last)


def sample_prompts(data_dir: Path, uri: str, count: int) -> tuple[list[dict], list[str]]:
    """The fixed prompts of the sample answers, and where each is (``uri``'s file and row):
    held out where the data has an eval split, else the first training prompts; the same
    at every iteration so that answers read side by side over time."""
    for split in ("eval", "train"):
        path = data_dir / "prompts" / f"{split}.jsonl"
        rows = read_jsonl(path, ("prompt",))[:count] if path.is_file() else []
        if rows:
            return rows, [f"{uri}/prompts/{split}.jsonl:{i + 1}" for i in range(len(rows))]
    return [], []


def sample_rows(
    prompts: list[str], answers: list[str], rewards, policy_logp, reference_logp, mask
) -> list[dict]:
    """One samples.jsonl row per answer: its reward and its KL to the reference (the sum
    over its tokens of log pi - log pi_ref, the per-answer KL the stages report)."""
    kl = ((policy_logp - reference_logp) * mask).sum(1).tolist()
    lengths = mask.sum(1).tolist()
    return [
        {
            "prompt": p,
            "answer": a,
            "reward": round(float(r), 4),
            "kl": round(k, 4),
            "tokens": int(n),
        }
        for p, a, r, k, n in zip(prompts, answers, rewards, kl, lengths, strict=True)
    ]


def untouched_generators():
    """The RNG of CPU and GPU restored, after the block, to what they were before it:
    sample answers for the log draw no numbers from the stream training goes on with."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def token_logprobs(
    model, sequences, attention_mask, start: int, temperature: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """Log-prob of every token from position ``start`` on under the sampling temperature
    (the distribution the tokens were drawn from, as TRL and verl compute it), and the
    policy's entropy there (a metric: computed without a graph, which would hold a
    vocabulary-wide tensor)."""
    kept = torch.arange(start - 1, sequences.size(1) - 1, device=sequences.device)
    logits = padded_logits(model, sequences, attention_mask, kept).float() / temperature
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, sequences[:, start:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def seconds_since(start: float, device: torch.device) -> float:
    """Seconds since ``start`` (``time.perf_counter()``) once ``device`` has run what was
    queued on it: CUDA runs asynchronously, so without the wait one phase's kernels (scoring)
    would be timed in whichever later call reads a result back."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the answer tokens of the whole batch, every rank's:
    a rank's own statistics would give each rank its own baseline (and a resumed rank
    could not rebuild them)."""
    count = dist.all_reduce_sum(mask.sum()).clamp(min=1)
    mean = dist.all_reduce_sum((values * mask).sum()) / count
    var = dist.all_reduce_sum((((values - mean) ** 2) * mask).sum()) / count
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def token_policy_loss(
    logp,
    old_logp,
    advantages,
    clip: float,
    clip_high: float | None = None,
    sequence_mask: torch.Tensor | None = None,
):
    """PPO's clipped surrogate at every token, and where the clip stopped its gradient.
    ``clip_high``: the ratio's upper bound apart from its lower one, DAPO's "clip-higher"
    (TRL's epsilon_high, verl's clip_ratio_high): a token the old policy found unlikely
    may grow further when its advantage is positive. With ``sequence_mask`` (the answer
    tokens the loss reads) every token of an answer takes the answer's ratio, the geometric
    mean of its tokens' (GSPO, Zheng et al.; TRL's importance_sampling_level "sequence"):
    with one advantage per answer, an answer is clipped whole."""
    log_ratio = logp - old_logp
    if sequence_mask is not None:
        log_ratio = (log_ratio * sequence_mask).sum(-1, keepdim=True) / sequence_mask.sum(
            -1, keepdim=True
        ).clamp(min=1)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    limited = -advantages * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    # clipped: the tokens whose gradient the clip stopped (verl's pg_clipfrac), not every
    # ratio outside the range (half of those keep theirs, by their advantage's sign)
    return torch.max(unclipped, limited), (limited > unclipped).float()


def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """PPO's clipped surrogate, averaged over answer tokens; and the clipped fraction."""
    loss, clipped = token_policy_loss(logp, old_logp, advantages, clip)
    return masked_mean(loss, mask), masked_mean(clipped, mask)


LossAggregation = Literal["token_mean", "sequence_mean", "max_length"]


def loss_weights(
    mask: torch.Tensor, rows: torch.Tensor, aggregation: LossAggregation, max_length: int
) -> torch.Tensor:
    """Each answer token's weight in the loss of the minibatch ``rows`` (0 outside it): the
    minibatch's loss is the sum of weight x per-token loss, aggregated as TRL's
    GRPOTrainer does by its loss_type (verl: loss_agg_mode):

    - ``token_mean``: the mean over the answer tokens of every rank's minibatch (DAPO's
      token-level loss; TRL's dapo, verl's token-mean): an answer weighs as many tokens
      as it has, wherever it was sampled. Each rank divides by the ranks' token count
      over the world size, as TRL's dapo does, since the engine averages the gradients
      over ranks (a rank's own mean would give the tokens of a rank with few more weight
      each; collective: every rank calls it for each minibatch);
    - ``sequence_mean``: each answer's token mean, averaged over answers (TRL's grpo, the
      GRPO paper; an answer without a token the loss reads counts as 0, as in TRL, where
      verl's seq-mean-token-mean leaves it out): a long answer's tokens weigh less each,
      so a long wrong answer is penalised less per token than a short one;
    - ``max_length``: the token sum over answers x ``max_length`` (Dr. GRPO; TRL's
      dr_grpo, verl's seq-mean-token-sum-norm up to a constant): no length bias."""
    weights = torch.zeros_like(mask)
    kept = mask[rows]
    if aggregation == "token_mean":
        weights[rows] = kept * dist.world_size() / dist.all_reduce_sum(kept.sum()).clamp(min=1)
    elif aggregation == "sequence_mean":
        weights[rows] = kept / kept.sum(1, keepdim=True).clamp(min=1) / len(rows)
    else:
        weights[rows] = kept / (len(rows) * max_length)
    return weights


def update_config(cfg: EngineConfig, minibatch: int, where: str) -> EngineConfig:
    """The engine config of a model trained on rollout minibatches: one optimiser step per
    minibatch of ``minibatch`` rows, whose forwards take at most ``micro_batch_size`` rows
    each (DeepSpeed accumulates them), so that a forward's memory (the logits of the whole
    vocabulary above all) is a micro-batch's, as verl's ppo_micro_batch_size_per_gpu and
    TRL's per_device_train_batch_size make it."""
    if cfg.gradient_accumulation_steps != 1:
        raise ValueError(
            f"{where}.gradient_accumulation_steps: an RL stage takes one optimiser step per "
            "minibatch_size rows and accumulates micro_batch_size rows at a time; leave it at 1"
        )
    micro = min(cfg.micro_batch_size, minibatch)
    steps = math.ceil(minibatch / micro)
    return cfg.model_copy(update={"micro_batch_size": micro, "gradient_accumulation_steps": steps})


def micro_batches(
    ds, idx: torch.Tensor, mask: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A minibatch's rows in the engine's micro-batches (one optimiser step in all), each with
    the weight of its token-mean loss for the backward: its ``share`` of the minibatch's
    answer tokens times the accumulation steps, which DeepSpeed divides each loss by. The
    step's gradient is then that of the token mean over the whole minibatch, as one forward
    over it would give; summed with ``share``, the micro-batches' metrics are its means."""
    steps = ds.gradient_accumulation_steps()
    tokens = mask[idx].sum().clamp(min=1)
    for part in idx.tensor_split(steps):
        share = mask[part].sum() / tokens
        yield part, share * steps, share
