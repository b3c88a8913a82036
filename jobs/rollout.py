"""What the RL stages (ppo, grpo) share beyond sampling (jobs.generation.sample): per-token
log-probs and the clipped policy loss, as DeepSpeed-Chat's step 3 and verl's
``trainer/ppo/core_algos.py`` compute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs import dist
from jobs.tokens import padded_logits


def token_logprobs(
    model, sequences, attention_mask, start: int, temperature: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """Log-prob of every token from position ``start`` on under the sampling temperature
    (the distribution the tokens were drawn from, as TRL and verl compute it), and the
    policy's entropy there (a metric: computed without a graph, which would hold a
    vocabulary-wide tensor)."""
    logits = padded_logits(model, sequences, attention_mask)
    logits = logits[:, start - 1 : -1].float() / temperature
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, sequences[:, start:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


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


def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """PPO's clipped surrogate, averaged over answer tokens; and the clipped fraction."""
    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(losses, mask), masked_mean(clipped, mask)
