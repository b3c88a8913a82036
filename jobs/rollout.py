"""What the RL stages (ppo, grpo) share: sampling answers from the policy with the answer mask
cut at the first EOS, per-token log-probs, and the clipped policy loss.

Sampling goes through transformers' ``generate`` (KV cache, per-row stop at EOS, early exit
when every row has stopped); the per-token arithmetic follows DeepSpeed-Chat's step 3 and
verl's ``trainer/ppo/core_algos.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jobs import dist
from jobs.generation import SamplingConfig, cache_implementation, encode_prompts


@dataclass
class Samples:
    sequences: torch.Tensor  # prompt (left-padded) + answer (padding after its EOS)
    attention: torch.Tensor
    mask: torch.Tensor  # float, 1 on answer tokens up to and including the first EOS
    start: int  # where answers begin
    seconds: float

    @property
    def answers(self) -> torch.Tensor:
        return self.sequences[:, self.start :]


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
) -> Samples:
    """``num_samples`` answers per prompt (a prompt's answers next to each other), in eval
    mode (no dropout); the model's mode is restored after."""
    encoded = encode_prompts(tokenizer, prompts, sampling.max_prompt_tokens, _device(model))
    start = encoded["input_ids"].size(1)
    was_training = model.training
    model.eval()
    timer = time.perf_counter()
    torch.manual_seed(seed)
    try:
        sequences = model.generate(
            **encoded,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            temperature=sampling.temperature if sampling.do_sample else None,
            top_p=sampling.top_p if sampling.do_sample else None,
            top_k=(sampling.top_k or None) if sampling.do_sample else None,
            num_return_sequences=num_samples,
            eos_token_id=sorted(eos),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            cache_implementation=cache_implementation(sampling),
            # Under ZeRO-3 every rank must run every forward: ranks that finish early keep
            # stepping until all have, or the parameter all-gathers hang.
            synced_gpus=synced_gpus and dist.world_size() > 1,
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - timer

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
    return Samples(sequences, attention, answer_mask.float(), start, seconds)


def _device(model):
    return next(model.parameters()).device


def token_logprobs(
    model, sequences, attention_mask, start: int, temperature: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """Log-prob of every token from position ``start`` on under the sampling temperature
    (the distribution the tokens were drawn from, as TRL and verl compute it), and the
    policy's entropy there (a metric: computed without a graph, which would hold a
    vocabulary-wide tensor)."""
    logits = model(input_ids=sequences, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, sequences[:, start:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """PPO's clipped surrogate, averaged over answer tokens; and the clipped fraction."""
    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(losses, mask), masked_mean(clipped, mask)
