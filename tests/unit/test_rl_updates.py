"""How ppo and grpo turn a rollout into optimiser steps, on a CPU machine: a minibatch taken
in micro-batches is one optimiser step with the gradient one forward over it would give (the
memory of a forward is a micro-batch's); the clip fraction counts the tokens whose gradient
the clip stopped; the KL estimators are unbiased and finite; configs that would silently
mislead are refused. And the supervised stages' shared loop, resumed after its last step."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from jobs import engine, grpo, ppo, rollout
from jobs.rollout import (
    loss_weights,
    micro_batches,
    policy_loss,
    token_logprobs,
    token_policy_loss,
    update_config,
)


def ppo_loss(batch: dict, weighted: bool = True):
    """PPO's micro-batch loss as ppo backpropagates it: the token mean, times its weight."""

    def loss(_ds, idx, weight, logp):
        mask = batch["mask"]
        value, _ = policy_loss(
            logp, batch["old_logp"][idx], batch["advantages"][idx], mask[idx], 0.2
        )
        return value * weight if weighted else value

    return loss


def tiny_engine(tiny, micro: int, minibatch: int):
    """The tiny model in a real DeepSpeed engine taking minibatches of ``minibatch`` rows in
    forwards of at most ``micro``, and the rows of each forward it runs."""
    from transformers import AutoModelForCausalLM

    cfg = update_config(engine.EngineConfig(micro_batch_size=micro), minibatch, "train")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))
    ds = engine.initialize(model, cfg, total_steps=10)
    rows: list[int] = []
    ds.module.register_forward_hook(
        lambda _m, args, kwargs, _o: rows.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    return ds, rows


def minibatch_gradient(tiny, micro: int, batch: dict, loss_of):
    """One PPO-clip minibatch update of the tiny model by a real DeepSpeed engine with
    ``micro`` rows per forward, each backpropagating ``loss_of(engine, rows, weight,
    log-probs)``: the gradient of the step, the rows of each forward and the optimiser
    steps taken."""
    ds, rows = tiny_engine(tiny, micro, len(batch["sequences"]))
    mask = batch["mask"]
    parts = list(micro_batches(ds, torch.arange(len(mask)), mask))
    for number, (idx, weight, _) in enumerate(parts):
        logp, _ = token_logprobs(
            ds, batch["sequences"][idx], batch["attention"][idx], batch["start"]
        )
        ds.backward(loss_of(ds, idx, weight, logp))
        if number < len(parts) - 1:
            ds.step()  # within the accumulation: no optimiser step
    gradient = torch.cat([p.grad.flatten().clone() for p in ds.module.parameters()])
    ds.step()
    return gradient, rows, ds.global_steps


def one_process(monkeypatch) -> None:
    from tests.conftest import free_port

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def rollout_minibatch() -> dict:
    """12 answers of unequal lengths (micro-batches then hold unequal numbers of tokens)."""
    generator = torch.Generator().manual_seed(1)
    rows, prompt, answer = 12, 4, 10
    sequences = torch.randint(5, 100, (rows, prompt + answer), generator=generator)
    # answers of unequal lengths, so that micro-batches hold unequal numbers of tokens
    lengths = torch.tensor([1, 10, 2, 9, 3, 8, 10, 1, 10, 2, 5, 6])
    mask = (torch.arange(answer)[None] < lengths[:, None]).float()
    attention = torch.cat([torch.ones(rows, prompt), mask], 1).long()
    return {
        "sequences": sequences,
        "attention": attention,
        "mask": mask,
        "start": prompt,
        "old_logp": -3 + torch.randn(rows, answer, generator=generator) * 0.1,
        "advantages": torch.randn(rows, answer, generator=generator) * mask,
    }


def test_a_minibatch_in_micro_batches_is_one_step_with_the_gradient_of_one_forward(
    tiny, monkeypatch
):
    one_process(monkeypatch)
    batch = rollout_minibatch()
    whole, whole_rows, whole_steps = minibatch_gradient(tiny, 12, batch, ppo_loss(batch))
    parts, part_rows, part_steps = minibatch_gradient(tiny, 5, batch, ppo_loss(batch))
    assert whole_rows == [12] and part_rows == [4, 4, 4], part_rows  # ceil(12 / 5) forwards
    assert whole_steps == part_steps == 1  # one optimiser step per minibatch
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-4)
    # the control: averaging the micro-batches' token means, as accumulation alone would,
    # is not the minibatch's gradient
    unweighted, _, _ = minibatch_gradient(tiny, 5, batch, ppo_loss(batch, weighted=False))
    assert not torch.allclose(unweighted, whole, atol=1e-6, rtol=1e-4)


# TRL's GRPOTrainer._compute_loss, by loss_type, over one forward of the whole minibatch
# (dr_grpo divides by max_completion_length, which a batch's answers may fall short of)
TRL_LOSS = {
    "token_mean": lambda loss, mask, _: (loss * mask).sum() / mask.sum().clamp(min=1.0),  # bnpo
    "sequence_mean": lambda loss, mask, _: (  # grpo
        (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    ).mean(),
    "max_length": lambda loss, mask, max_length: (loss * mask).sum() / (loss.size(0) * max_length),
}
# the token limit of the oracle's rollout: above its longest answer (10 tokens)
MAX_NEW_TOKENS = 16


def trl_loss(batch: dict, ref_logp, ended, aggregation: str, sequence: bool, masked: bool):
    """TRL's GRPO loss over one forward of the whole minibatch (its _compute_loss, written
    out here): the ratio per token or per answer (importance_sampling_level), clipped at
    0.8 and 1.28, the k3 KL term at beta 0.04, truncated answers masked or not."""

    def loss(_ds, idx, _weight, logp):
        assert len(idx) == len(batch["mask"])  # one forward
        mask = batch["mask"] * ended[:, None] if masked else batch["mask"]
        log_ratio = logp - batch["old_logp"]
        if sequence:
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
        advantages = batch["advantages"]
        per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
        per_token = per_token + 0.04 * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
        return TRL_LOSS[aggregation](per_token, mask, MAX_NEW_TOKENS)

    return loss


def grpo_step_gradient(tiny, micro: int, batch: dict, ref_logp, ended, config):
    """The gradient of the optimiser step grpo.train_minibatch takes on the whole batch."""
    from jobs.generation import Samples

    ds, rows = tiny_engine(tiny, micro, len(batch["mask"]))
    gradients, step = [], ds.step

    def step_reading_the_gradient():
        if ds.is_gradient_accumulation_boundary():
            gradients.append(torch.cat([p.grad.flatten().clone() for p in ds.module.parameters()]))
        step()

    ds.step = step_reading_the_gradient
    samples = Samples(
        batch["sequences"], batch["attention"], batch["mask"], ended, batch["start"], 0.0
    )
    everything = torch.arange(len(batch["mask"]))
    grpo.train_minibatch(
        ds, samples, everything, batch["old_logp"], ref_logp, batch["advantages"], config
    )
    assert len(gradients) == 1 and ds.global_steps == 1  # one optimiser step
    return gradients[0], rows


def near_the_policy(tiny, batch: dict) -> tuple[dict, torch.Tensor]:
    """``batch`` with old log-probs near the tiny model's own (log-ratios of about 0.15
    around an answer's shift of -0.4, 0 or 0.4: tokens and whole answers past each clip
    bound, and some inside), and reference log-probs near those."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch["sequences"], batch["attention"], batch["start"])
    noise = torch.Generator().manual_seed(2)
    shift = torch.tensor([-0.4, 0.0, 0.4]).repeat(len(logp) // 3 + 1)[: len(logp), None]
    old = logp + shift + 0.15 * torch.randn(logp.shape, generator=noise)
    reference = old + 0.1 * torch.randn(logp.shape, generator=noise)
    mask = batch["mask"]
    for ratio, where in (
        ((logp - old).exp(), mask.bool()),
        ((((logp - old) * mask).sum(1) / mask.sum(1)).exp(), mask.sum(1) > 0),
    ):
        inside = (ratio >= 0.8) & (ratio <= 1.28)
        assert (ratio[where] < 0.8).any() and (ratio[where] > 1.28).any(), ratio
        assert inside[where].any(), ratio
    return {**batch, "old_logp": old}, reference


# (loss_aggregation, the answer's ratio, cut answers masked, a setting whose change must
# change the step: the control that the case reads it)
CASES = [
    ("token_mean", False, False, {"clip_range_high": None}),
    ("token_mean", False, True, {"mask_truncated_answers": False}),
    ("sequence_mean", True, True, {"importance_sampling": "token"}),
    ("max_length", False, True, {"loss_aggregation": "token_mean"}),
]


@pytest.mark.parametrize(("aggregation", "sequence", "masked", "control"), CASES)
def test_grpo_takes_a_minibatch_in_micro_batches_as_trl_takes_it_in_one_forward(
    tiny, monkeypatch, aggregation, sequence, masked, control
):
    """grpo's minibatch step (each micro-batch backpropagates its tokens' part of the
    minibatch's loss, which DeepSpeed divides by its accumulation steps) against TRL's
    loss over one forward: each loss aggregation; the token's ratio and the answer's
    (GSPO); answers cut at the token limit in the loss or out of it; clip-higher; the KL
    term inside the aggregation. The control: the step with one setting changed is not
    the oracle's."""
    one_process(monkeypatch)
    batch, ref_logp = near_the_policy(tiny, rollout_minibatch())
    # the answers of all 10 tokens count as cut (ended is the sampler's to say)
    ended = batch["mask"].sum(1) < 10
    settings = {
        "loss_aggregation": aggregation,
        "importance_sampling": "sequence" if sequence else "token",
        "mask_truncated_answers": masked,
        "clip_range_high": 0.28,
        "kl_coef": 0.04,
        "sampling": {"max_new_tokens": MAX_NEW_TOKENS},
    }
    oracle = trl_loss(batch, ref_logp, ended, aggregation, sequence, masked)
    whole, _, _ = minibatch_gradient(tiny, 12, batch, oracle)
    parts, rows = grpo_step_gradient(tiny, 5, batch, ref_logp, ended, grpo_config(**settings))
    assert rows == [4, 4, 4]  # ceil(12 / 5) forwards
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-4)
    changed = grpo_config(**{**settings, **control})
    other, _ = grpo_step_gradient(tiny, 5, batch, ref_logp, ended, changed)
    assert not torch.allclose(other, whole, atol=1e-6, rtol=1e-4), control


def test_the_loss_aggregations_weigh_long_and_short_answers_as_trl_does():
    """One answer of 1 token and one of 9, the same loss at every token: the token mean
    gives the long answer 9/10 of the weight, the sequence mean half, Dr. GRPO's fixed
    divisor (2 answers x 10 tokens) 9/20 and the short one 1/20; rows outside the
    minibatch weigh nothing."""
    mask = (torch.arange(10)[None] < torch.tensor([[1], [9], [5]])).float()
    rows = torch.tensor([0, 1])
    shares = {
        aggregation: loss_weights(mask, rows, aggregation, 10).sum(1).tolist()
        for aggregation in TRL_LOSS
    }
    assert shares["token_mean"] == pytest.approx([0.1, 0.9, 0.0])
    assert shares["sequence_mean"] == pytest.approx([0.5, 0.5, 0.0])
    assert shares["max_length"] == pytest.approx([0.05, 0.45, 0.0])
    # Dr. GRPO's divisor is the token limit, not the width of the answers sampled
    assert loss_weights(mask, rows, "max_length", 20).sum(1).tolist() == pytest.approx(
        [0.025, 0.225, 0.0]
    )
    # an answer left out of the loss still counts in the sequence mean, as in TRL
    out = loss_weights(
        mask * torch.tensor([[1.0], [0.0], [1.0]]), torch.arange(3), "sequence_mean", 10
    )
    assert out.sum(1).tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])
    loss = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    for aggregation, trl in TRL_LOSS.items():
        weights = loss_weights(mask, rows, aggregation, 10)
        assert float((weights * loss).sum()) == pytest.approx(float(trl(loss[:2], mask[:2], 10)))


def test_the_token_mean_weighs_every_ranks_answer_tokens_alike(monkeypatch):
    """TRL's dapo (and verl's token-mean) divide by the answer tokens of every rank, since
    the engine averages the gradients over ranks: here one answer of 2 tokens, the other
    rank's minibatch 6 tokens. Each of these tokens weighs 1/8 of the step (the mean of
    the two ranks' weights x 2), not the 1/4 of a rank's own mean (1/2, halved)."""
    mask = (torch.arange(4)[None] < torch.tensor([[2]])).float()
    monkeypatch.setattr(rollout.dist, "world_size", lambda: 2)
    monkeypatch.setattr(rollout.dist, "all_reduce_sum", lambda t: t + 6)
    weights = loss_weights(mask, torch.arange(1), "token_mean", 4)
    assert (weights[0] / 2).tolist() == pytest.approx([1 / 8, 1 / 8, 0.0, 0.0])
    # the control: a rank that sees only itself takes its own mean
    monkeypatch.setattr(rollout.dist, "world_size", lambda: 1)
    monkeypatch.setattr(rollout.dist, "all_reduce_sum", lambda t: t)
    assert loss_weights(mask, torch.arange(1), "token_mean", 4)[0].tolist() == [0.5, 0.5, 0, 0]


def test_clip_higher_lets_an_unlikely_token_with_a_positive_advantage_grow_further():
    """DAPO's decoupled clip (0.2 below, 0.28 above) against the symmetric one, each token's
    loss as TRL writes it: -min(r A, clamp(r, 1 - low, 1 + high) A)."""
    ratio = torch.tensor([[1.25, 1.25, 0.75, 1.35]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    for high, stopped in ((None, [1.0, 0.0, 1.0, 1.0]), (0.28, [0.0, 0.0, 1.0, 1.0])):
        logp = torch.log(ratio).requires_grad_()
        loss, clipped = token_policy_loss(logp, torch.zeros_like(logp), advantages, 0.2, high)
        bound = 1 + (0.2 if high is None else high)
        expected = -torch.min(ratio * advantages, ratio.clamp(0.8, bound) * advantages)
        torch.testing.assert_close(loss, expected)
        loss.sum().backward()
        assert clipped[0].tolist() == stopped
        assert (logp.grad[0] == 0).float().tolist() == stopped  # the clip stopped these


def test_grpo_scales_its_advantages_by_the_group_the_batch_or_not_at_all():
    """TRL's scale_rewards: a group of near-equal rewards (1, 1, 1.01) is blown up to
    unit advantages by its own std, stays near zero unscaled (Dr. GRPO), and is divided by
    the whole batch's std with "batch"."""
    rewards = torch.tensor([1.0, 1.0, 1.01, 0.0, 1.0, 0.0])
    centred = torch.tensor([-1 / 300, -1 / 300, 2 / 300, -1 / 3, 2 / 3, -1 / 3])
    group = grpo.group_advantages(rewards, 3, "grpo", "group")
    none = grpo.group_advantages(rewards, 3, "grpo", "none")
    batch = grpo.group_advantages(rewards, 3, "grpo", "batch")
    torch.testing.assert_close(none, centred)
    torch.testing.assert_close(batch, centred / (rewards.std() + 1e-4))
    stds = rewards.view(2, 3).std(1).repeat_interleave(3)
    torch.testing.assert_close(group, centred / (stds + 1e-4))
    assert group[2] > 1.0 and none[2] < 0.01  # the near-tie: unit-sized against tiny
    # the stage's advantages take the setting
    config = grpo_config(
        group_size=3, minibatch_size=16, scale_rewards="none", kl_in="reward", kl_coef=0.0
    )
    staged = grpo.token_advantages(rewards, torch.zeros(6, 1), torch.ones(6, 1), config)
    torch.testing.assert_close(staged[:, 0], centred)


def test_grpo_scales_by_the_std_of_every_ranks_rewards(monkeypatch):
    """ "batch": the std of the whole batch, every rank's answers (TRL gathers the rewards
    of every process first): another rank's rewards, far apart, shrink these advantages."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    other = torch.tensor([10.0, -10.0, 10.0, -10.0])
    monkeypatch.setattr(grpo.dist, "all_gather_cat", lambda t: torch.cat([t, other]))
    batch = grpo.group_advantages(rewards, 2, "grpo", "batch")
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5])
    torch.testing.assert_close(batch, centred / (torch.cat([rewards, other]).std() + 1e-4))


def test_dynamic_sampling_takes_groups_with_a_reward_spread_first_and_keeps_the_batch_size():
    """DAPO's dynamic sampling (verl's filter_groups): groups whose answers all scored alike
    are left for those that differ, from later rollouts too; a batch still short is filled
    with the left ones, in the order they were sampled."""
    first = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # groups of 2: alike, differ, alike
    second = [1.0, 0.0, 1.0, 1.0, 0.5, 0.5]  # differ, alike, alike
    assert grpo.spread_out(first, 2) == [False, True, False]
    spreads = [grpo.spread_out(first, 2), grpo.spread_out(second, 2)]
    assert grpo.pool_groups([spreads], 3) == [[(0, 0, 1), (0, 1, 0), (0, 0, 0)]]
    assert grpo.pool_groups([spreads], 2) == [[(0, 0, 1), (0, 1, 0)]]
    assert grpo.pool_groups([spreads[:1]], 3) == [[(0, 0, 1), (0, 0, 0), (0, 0, 2)]]


def test_dynamic_sampling_pools_the_groups_of_every_rank():
    """As verl's one global batch: a rank keeps its own groups that differ, gives those it
    has beyond its batch to the ranks short of them (in rank order), and fills what the
    pool cannot give with its own alike groups. Every rank keeps its batch size."""
    spreads = [
        [[True, True], [True, False]],  # rank 0: three that differ, one beyond its batch
        [[False, False], [False, False]],  # rank 1: none
        [[True, True], [True, True]],  # rank 2: two beyond its batch
    ]
    assert grpo.pool_groups(spreads, 2) == [
        [(0, 0, 0), (0, 0, 1)],
        [(0, 1, 0), (2, 1, 0)],  # rank 0's extra, then rank 2's
        [(2, 0, 0), (2, 0, 1)],
    ]
    # a pool too small: the short rank's own alike groups fill its batch
    assert grpo.pool_groups(spreads[:2], 2) == [
        [(0, 0, 0), (0, 0, 1)],
        [(0, 1, 0), (1, 0, 0)],
    ]


# Each rank: two rollouts of 2 groups of 2 answers, every token saying where it was
# sampled (100 x rank + 10 x rollout + row), rollout n's prompts 1 + n tokens wide and its
# answers 3 + n, row r's answer mask r + 1 tokens long, ended where the token is a
# multiple of 3; rank 0's groups differ but the first of rollout 1, rank 1's first alone.
# Prints the batch pooled_batch gives the rank, and the token mean's weights of an
# answer of 2 tokens on rank 0 and of 6 on rank 1 (through the real all-reduce).
POOLING = """
import json, torch
from jobs import dist, grpo
from jobs.generation import Samples
from jobs.rollout import loss_weights

dist.init()
me = dist.rank()
spreads = [[[True, True], [False, True]], [[True, False], [False, False]]]
drawn = []
for number in range(2):
    where = [100 * me + 10 * number + row for row in range(4)]
    width = 3 + number
    sequences = torch.tensor([[w] * (number + 1 + width) for w in where])
    mask = (torch.arange(width)[None] <= torch.arange(4)[:, None]).float()
    ended = torch.tensor([w % 3 == 0 for w in where])
    answers = Samples(sequences, torch.ones_like(sequences), mask, ended, number + 1, 1.0)
    total = [float(w) for w in where]
    drawn.append(grpo.Rollout(answers, total, {"f": total}, 0.0, spreads[me][number]))
config = grpo.Config(
    output="o", actor="a", prompts="p", rewards=[{"kind": "json"}],
    group_size=2, prompts_per_iteration=2, minibatch_size=4,
)
samples, total, each = grpo.pooled_batch(drawn, spreads, config, pad_id=-1)
tokens = torch.ones(1, 8) * (torch.arange(8) < (2 if me == 0 else 6))
print(json.dumps({
    "sequences": samples.sequences.tolist(), "attention": samples.attention.tolist(),
    "mask": samples.mask.tolist(), "ended": samples.ended.tolist(), "start": samples.start,
    "total": total, "each": each, "seconds": samples.seconds,
    "weights": loss_weights(tokens, torch.arange(1), "token_mean", 8)[0].tolist(),
}), flush=True)
dist.shutdown()
"""


def test_pooled_groups_reach_their_rank_with_their_tokens_and_rewards():
    """Two ranks exchanging groups over the process group: rank 1, one group short, is
    given rank 0's one group beyond its batch (rollout 1's second), its tokens, masks,
    ends and rewards as rank 0 sampled them, re-padded beside its own group of narrower
    prompts and answers; rank 0 keeps its first two. And the token mean's divisor is
    every rank's answer tokens: 8, an answer token weighing 1/8 of the step on either
    rank once the engine averages the ranks' gradients."""
    import json

    from tests.conftest import two_ranks

    ranks = two_ranks(POOLING, [], {})
    assert all(code == 0 for code, _, _ in ranks), [err[-2000:] for _, _, err in ranks]
    first, second = (json.loads(out.splitlines()[-1]) for _, out, _ in ranks)
    assert first["total"] == [0.0, 1.0, 2.0, 3.0] and first["start"] == 1
    assert first["sequences"] == [[w] * 4 for w in range(4)]
    # its own group (prompts 1 token wide, answers 3), then rank 0's (2 and 4)
    assert second["total"] == second["each"]["f"] == [100.0, 101.0, 12.0, 13.0]
    assert second["start"] == 2 and second["seconds"] == 1.0  # its own sampling's
    assert second["sequences"] == [
        [-1, 100, 100, 100, 100, -1],
        [-1, 101, 101, 101, 101, -1],
        [12] * 6,
        [13] * 6,
    ]
    assert second["attention"][:2] == [[0, 1, 1, 1, 1, 0]] * 2
    assert second["attention"][2:] == [[1] * 6] * 2
    assert second["mask"] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert second["ended"] == [False, False, True, False]
    for rank, tokens in ((first, 2), (second, 6)):
        assert rank["weights"] == pytest.approx([2 / 8] * tokens + [0.0] * (8 - tokens))


def test_answers_cut_at_the_token_limit_can_be_left_out_of_the_loss():
    mask = torch.ones(3, 4)
    ended = torch.tensor([True, False, True])
    kept = grpo.loss_tokens(mask, ended, grpo_config(mask_truncated_answers=True))
    assert kept.sum(1).tolist() == [4.0, 0.0, 4.0]
    weights = loss_weights(kept, torch.arange(3), "token_mean", 4)
    assert weights[1].sum() == 0 and float(weights.sum()) == pytest.approx(1.0)
    assert grpo.loss_tokens(mask, ended, grpo_config()).sum() == 12  # the default keeps all


def test_rl_configs_refuse_what_would_mislead():
    base = {"output": "o", "actor": "a", "prompts": "p"}
    with pytest.raises(ValidationError, match="train.gradient_accumulation_steps"):
        grpo.Config(**base, rewards=[{"kind": "json"}], train={"gradient_accumulation_steps": 4})
    with pytest.raises(ValidationError, match="critic_train.gradient_accumulation_steps"):
        ppo.Config(**base, reward_model="r", critic_train={"gradient_accumulation_steps": 2})
    with pytest.raises(ValidationError, match="sampling.do_sample"):
        grpo.Config(**base, rewards=[{"kind": "json"}], sampling={"do_sample": False})
    taken = grpo.Config(**base, rewards=[{"kind": "json"}], minibatch_size=32)
    cfg = update_config(taken.train, taken.minibatch_size, "train")  # default micro-batch 8
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (8, 4)
    small = update_config(engine.EngineConfig(micro_batch_size=8), 4, "train")
    assert (small.micro_batch_size, small.gradient_accumulation_steps) == (4, 1)


def test_the_clip_fraction_counts_the_tokens_whose_gradient_the_clip_stopped():
    # ratios 1.5, 1.5, 0.5, 0.5, 1.0 against advantages +, -, +, -, +: the clip stops the
    # gradient where the ratio left the range in the advantage's direction (1st and 4th)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    logp = torch.log(ratio).requires_grad_()
    loss, clipped = policy_loss(logp, torch.zeros_like(logp), advantages, torch.ones(1, 5), 0.2)
    assert clipped.item() == pytest.approx(2 / 5)
    loss.backward()
    stopped = (logp.grad == 0).float().mean()
    assert clipped.item() == pytest.approx(stopped.item())


def test_the_kl_estimators_are_unbiased_and_bounded():
    """Schulman's k1 and k3 estimate KL(pi || pi_ref) from tokens sampled from pi: their
    means over many samples approach the exact KL of two known distributions."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(
        p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    logp, ref = p.log()[tokens], q.log()[tokens]
    for estimator in ("k1", "k3"):
        mean = float(grpo.kl_estimate(logp, ref, estimator).mean())
        assert mean == pytest.approx(exact, abs=0.01), (estimator, mean, exact)
    # far from the reference the estimate stays finite (the log-ratio bounded at 20) and
    # keeps pulling the policy back: its gradient is not clamped away
    logp = torch.tensor([-200.0, 0.0], requires_grad=True)
    far = grpo.kl_estimate(logp, torch.tensor([-1.0, -15.0]), "k3")  # k3 e^20 - 21, 14
    assert torch.isfinite(far).all() and far[0].item() == pytest.approx(math.exp(20) - 21)
    far.sum().backward()
    assert logp.grad[1].item() == pytest.approx(1.0)  # d/dlogp of e^(ref-logp) - (ref-logp) - 1


def test_deeply_nested_json_scores_zero_rather_than_stopping_the_stage():
    from jobs.rewards import RewardFunction, Rewards

    rewards = Rewards([RewardFunction(kind="json")])
    totals, _ = rewards(["p", "p"], ["[" * 100_000, "[1]"], [{}, {}], ["f:1", "f:2"])
    assert totals == [0.0, 1.0]


def test_a_training_loop_resumed_after_its_last_step_reports_its_last_evaluation():
    """Stopped after the last step's checkpoint (SIGTERM during the final evaluation, a kill
    during the export), the resumed stage has no step left: it reports the evaluation the
    run ended with, not the first; and it reads the first evaluation of checkpoints written
    before the loop was shared (sft's "first_eval_loss", dpo's "first")."""
    from types import SimpleNamespace

    logged: list[tuple] = []
    ctx = SimpleNamespace(
        progress=lambda total, step: SimpleNamespace(update=print, close=lambda: None),
        log=lambda step, **values: logged.append((step, values)),
    )
    ds = SimpleNamespace(device=torch.device("cpu"), module=torch.nn.Linear(1, 1))
    schedule = engine.Schedule(max_steps=4)

    def never() -> dict:
        raise AssertionError("evaluated again")

    state = {"step": 4, "first_eval": {"eval_loss": 3.0}, "last_eval": {"eval_loss": 1.0}}
    loop = engine.TrainLoop(ds, ctx, schedule, 4, state, ("loss",), never)
    assert list(loop.steps()) == [] and logged == []
    assert loop.first == {"eval_loss": 3.0} and loop.summary == {"eval_loss": 1.0}

    for earlier in ({"step": 2, "first_eval_loss": 3.0}, {"step": 2, "first": {"eval_loss": 3.0}}):
        loop = engine.TrainLoop(ds, ctx, schedule, 4, earlier, ("loss",), never)
        assert loop.first == {"eval_loss": 3.0}


def test_the_ptx_loss_trains_whole_answers_up_to_a_prompt_and_answer_length(tiny, tmp_path):
    """PPO's pre-training term reads SFT rows up to max_prompt_tokens + max_new_tokens
    (DeepSpeed-Chat's unsupervised data), so an answer as long as max_new_tokens is
    trained whole, not cut at the prompt's length."""
    import json
    from types import SimpleNamespace

    from jobs.batches import IGNORE
    from jobs.models import load_tokenizer
    from jobs.ppo import ptx_batches
    from jobs.supervised import tokenize

    tokenizer = load_tokenizer(str(tiny / "model"))
    rows = [{"prompt": "Q: say hello\nA: ", "response": "hello there, how are you today?"}] * 4
    [(ids, labels)] = tokenize(rows[:1], tokenizer, 10_000)  # whole
    answer = sum(label != IGNORE for label in labels)
    prompt = len(ids) - answer
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampling = SimpleNamespace(max_prompt_tokens=prompt + 1, max_new_tokens=answer)
    config = SimpleNamespace(sampling=sampling, seed=0)
    actor = SimpleNamespace(train_micro_batch_size_per_gpu=lambda: 2)
    models = SimpleNamespace(actor=actor, tokenizer=tokenizer)
    batch = next(ptx_batches(config, models, tmp_path))
    assert answer > 2 and (batch["labels"] != IGNORE).sum(1).tolist() == [answer, answer]


def sft_step_gradient(tiny, items: list, micro: int, per_micro_mean: bool = False):
    """The gradient of one sft optimiser step over ``items`` taken ``micro`` at a time by a
    real DeepSpeed engine (accumulating len(items) / micro micro-batches)."""
    from transformers import AutoModelForCausalLM

    from jobs import sft
    from jobs.supervised import collate, to_device, token_losses

    gas = len(items) // micro
    cfg = engine.EngineConfig(micro_batch_size=micro, gradient_accumulation_steps=gas)
    torch.manual_seed(0)
    ds = engine.initialize(AutoModelForCausalLM.from_pretrained(str(tiny / "model")), cfg, 10)
    window = [items[i : i + micro] for i in range(0, len(items), micro)]
    captured = []
    real_step = ds.step

    def step():  # the gradient, read at the accumulation boundary before the update
        if ds.is_gradient_accumulation_boundary():
            captured.append(torch.cat([p.grad.flatten().clone() for p in ds.module.parameters()]))
        real_step()

    ds.step = step
    if per_micro_mean:  # the control: each micro-batch's own token mean, accumulated
        for part in window:
            losses, mask = token_losses(ds, to_device(collate(part, 0), ds.device))
            ds.backward(losses.sum() / mask.sum())
            ds.step()
    else:
        sft.train_step(ds, window, 0, flatten=False)
    [gradient] = captured
    return gradient


def test_an_sft_step_in_micro_batches_has_the_gradient_of_its_token_mean(tiny, monkeypatch):
    """A short and a long answer, one micro-batch each with two accumulation steps: the
    step's gradient is that of one forward over both (the mean over all answer tokens, as
    TRL's num_items_in_batch makes it), not the mean of the two micro-batches' means,
    which weighs the short answer's one token as much as the long answer's fifteen."""
    from jobs.batches import IGNORE
    from tests.conftest import free_port

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    short = list(range(10, 16)), [IGNORE] * 5 + [15]
    long = list(range(20, 40)), [IGNORE] * 4 + list(range(24, 40))
    whole = sft_step_gradient(tiny, [short, long], micro=2)
    parts = sft_step_gradient(tiny, [short, long], micro=1)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-4)
    control = sft_step_gradient(tiny, [short, long], micro=1, per_micro_mean=True)
    assert not torch.allclose(control, whole, atol=1e-6, rtol=1e-4)


def grpo_config(**settings) -> grpo.Config:
    base = {"output": "o", "actor": "a", "prompts": "p", "rewards": [{"kind": "json"}]}
    return grpo.Config(**{**base, **settings})


def test_a_kl_reward_penalty_stays_its_own_size_in_a_group_of_equal_rewards():
    """Four answers all right (reward 1) with small KLs to the reference: the group
    baseline leaves nothing, and the penalty (kl_coef 0.001) stays a penalty of that size;
    normalising the penalised reward blew the KL differences up to advantages of +-0.5."""
    config = grpo_config(group_size=4, kl_in="reward", kl_coef=0.001, kl_estimator="k1")
    rewards = torch.ones(4)
    kl = torch.tensor([[0.01, 0.0], [0.02, 0.0], [0.03, 0.0], [0.04, 0.0]])
    mask = torch.tensor([[1.0, 0.0]] * 4)
    advantages = grpo.token_advantages(rewards, kl, mask, config)
    torch.testing.assert_close(advantages[:, 0], -0.001 * kl[:, 0])
    assert (advantages[:, 1] == 0).all()
    # a group with a right and a wrong answer: the group baseline decides, the KL nudges
    mixed = grpo.token_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), kl, mask, config)
    assert mixed[0, 0] > 0.8 and mixed[1, 0] < -0.8


def test_a_token_far_from_the_reference_costs_a_bounded_reward_penalty():
    """k3 of a log-ratio of 11 is e^11 - 12 (about 60,000): as a reward penalty its value is
    clamped at 10, as OpenRLHF's and verl's are, so one token cannot swamp the rewards."""
    config = grpo_config(group_size=2, kl_in="reward", kl_coef=0.04, algorithm="reinforce_pp")
    kl = grpo.kl_estimate(torch.tensor([[-12.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), "k3")
    kl = torch.cat([kl, torch.zeros(1, 2)])
    mask = torch.ones(2, 2)
    advantages = grpo.token_advantages(torch.tensor([1.0, 0.0]), kl, mask, config)
    assert kl[0, 0] > 1000
    # the right answer still ranks above the wrong one at every token (unclamped, its
    # first token's penalty, 2,400, made it the worst token of the batch)
    assert (advantages[0] > advantages[1]).all(), advantages


def test_grpo_config_keeps_its_sampling_defaults_and_refuses_a_k1_loss():
    sampling = grpo_config(sampling={"max_new_tokens": 256}).sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (1.0, 1.0, 256)
    with pytest.raises(ValidationError, match="k1 as a loss term has no gradient"):
        grpo_config(kl_estimator="k1", kl_in="loss")
    grpo_config(kl_estimator="k1", kl_in="reward")  # the control: k1 as a reward penalty
    with pytest.raises(ValidationError, match="scale_rewards is grpo's: rloo"):
        grpo_config(algorithm="rloo", scale_rewards="none")
    grpo_config(algorithm="grpo", scale_rewards="none")  # the control
    with pytest.raises(ValidationError, match="importance_sampling: sequence with kl_in: reward"):
        grpo_config(importance_sampling="sequence", kl_in="reward", kl_estimator="k1")
    grpo_config(importance_sampling="sequence", kl_in="loss")  # the control
    # without a reference there is no penalty to average into the answer's advantage
    grpo_config(importance_sampling="sequence", kl_in="reward", reference_free=True)
    with pytest.raises(ValidationError, match="dynamic_sampling with reinforce_pp"):
        grpo_config(dynamic_sampling=True, algorithm="reinforce_pp")
    grpo_config(dynamic_sampling=True, algorithm="rloo")  # the control


def test_a_ppo_sampling_block_changes_only_what_it_names():
    """`sampling: {max_new_tokens: 128}` keeps PPO's temperature 1 and top-p 1 (it gave
    the generate stage's 0.8 and 0.95: a top-p cut the log-probs do not know of)."""
    base = {"output": "o", "actor": "a", "reward_model": "r", "prompts": "p"}
    sampling = ppo.Config(**base, sampling={"max_new_tokens": 128}).sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (1.0, 1.0, 128)
    assert ppo.Config(**base).sampling.max_new_tokens == 48
    assert ppo.Config(**base, sampling={"temperature": 0.7}).sampling.temperature == 0.7


def test_the_policy_trains_in_train_mode_without_dropout(tiny):
    """transformers checkpoints activations only in train mode, and a model from
    from_pretrained is in eval mode; without dropout the training forward is the sampling
    policy's, so the ratio of a first step is exactly 1."""
    from transformers import AutoModelForCausalLM

    # hidden dropout is an nn.Dropout layer, GPT-NeoX's attention dropout a float it hands
    # the attention kernel
    model = AutoModelForCausalLM.from_pretrained(
        tiny / "model", hidden_dropout=0.5, attention_dropout=0.5
    )
    assert not model.training
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        sampled = model(ids).logits
    engine.train_without_dropout(model)
    assert model.training
    torch.testing.assert_close(model(ids).logits, sampled)


@pytest.mark.parametrize("warmup", [0, 4])
def test_the_learning_rate_warms_up_linearly_and_the_first_step_moves_the_weights(tiny, warmup):
    """The rate of each optimiser step, as DeepSpeed-Chat's (transformers.get_scheduler)
    and OpenRLHF's schedules give it: without warm-up the first step trains at the full
    rate; with one, the rate rises by equal parts (DeepSpeed's WarmupCosineLR gave the
    first step 0 either way, and rose on a log curve)."""
    from transformers import AutoModelForCausalLM

    cfg = engine.EngineConfig(learning_rate=1e-3, warmup_steps=warmup, min_lr_ratio=0.1)
    torch.manual_seed(0)
    ds = engine.initialize(AutoModelForCausalLM.from_pretrained(str(tiny / "model")), cfg, 20)
    before = [p.detach().clone() for p in ds.module.parameters()]
    rates = []
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for step in range(6):
        rates.append(ds.get_lr()[0])
        loss = ds(input_ids=ids, labels=ids).loss
        ds.backward(loss)
        ds.step()
        if step == 0:
            moved = any(
                not torch.equal(a, b) for a, b in zip(before, ds.module.parameters(), strict=True)
            )
    if warmup:
        assert rates[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
        assert not moved  # a linear warm-up's first rate is 0, as in transformers
    else:
        assert rates[0] == pytest.approx(1e-3) and moved
    # then a cosine down to 10% at the last step
    progress = (5 - warmup) / (20 - warmup)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    assert rates[5] == pytest.approx(1e-3 * cosine)
    # and held there past it (transformers' cosine alone rises again)
    [rate] = engine.schedule(cfg, 20)(torch.optim.SGD([torch.zeros(1)], lr=1.0)).lr_lambdas
    assert rate(20) == rate(22) == rate(40) == pytest.approx(0.1)


def test_the_runs_state_is_checkpointed_once_not_with_every_engine(tiny, tmp_path):
    """PPO's checkpoint holds actor and critic; the run's state (its EMA a whole fp32 model)
    went into both engines' files (and under ZeRO-3 into every rank's). It goes with the
    first engine only, and a resumed run reads it from there."""
    from transformers import AutoModelForCausalLM

    from jobs.contract import StageConfig, run_stage

    found: dict = {}

    def body(config, ctx) -> dict:
        cfg = engine.EngineConfig(learning_rate=1e-3)
        engines = {
            name: engine.initialize(
                AutoModelForCausalLM.from_pretrained(str(tiny / "model")), cfg, 5
            )
            for name in ("actor", "critic")
        }
        average = {"weight": torch.arange(1000.0)}
        engine.checkpoint(engines, ctx, 1, {"ema": average, "kl_coef": 0.05})
        for path in sorted(ctx.checkpoints.local_dir(1).rglob("*model_states.pt")):
            held = torch.load(path, weights_only=False)
            found[path.relative_to(ctx.checkpoints.local_dir(1)).parts[0]] = "ema" in held
        state = engine.resume(engines, ctx)
        torch.testing.assert_close(state["ema"]["weight"], average["weight"])
        assert state["kl_coef"] == 0.05 and state["step"] == 1
        return {"steps": 1}

    run_stage("ppo-like", StageConfig(output=str(tmp_path / "out")), body, tmp_path / "work")
    assert found == {"actor": True, "critic": False}, found


def test_a_model_that_reads_its_dropout_from_its_config_trains_without_it_too():
    """Falcon's decoder reads its config's rates at every forward, not a module's."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout=0.5,
        attention_dropout=0.5,
    )
    torch.manual_seed(0)
    model = FalconForCausalLM(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        sampled = model(ids).logits
        model.train()
        assert not torch.allclose(model(ids).logits, sampled)  # the control: dropout bites
        engine.train_without_dropout(model)
        torch.testing.assert_close(model(ids).logits, sampled)


def test_the_ema_follows_every_optimiser_step_as_deepspeed_chat_does(tiny):
    """DeepSpeed-Chat moves its EMA after each PPO step (``moving_average`` after every
    ``train_rlhf``); once per iteration, a decay of 0.992 over 100 iterations of 4 steps
    left 45% of the export at the SFT weights instead of 4%. A rollout of 8 answers in
    minibatches of 4 is two steps: the EMA is d²·W0 + d(1-d)·W1 + (1-d)·W2."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = update_config(engine.EngineConfig(learning_rate=1e-2), 4, "train")
    torch.manual_seed(0)
    actor = engine.initialize(AutoModelForCausalLM.from_pretrained(str(tiny / "model")), cfg, 4)
    critic = engine.initialize(
        AutoModelForSequenceClassification.from_pretrained(str(tiny / "model"), num_labels=1),
        cfg,
        4,
        task_type="SEQ_CLS",
    )
    engine.train_without_dropout(actor.module)
    generator = torch.Generator().manual_seed(2)
    rows, prompt, answer = 8, 3, 5
    mask = torch.ones(rows, answer)
    batch = {
        "sequences": torch.randint(5, 100, (rows, prompt + answer), generator=generator),
        "attention": torch.ones(rows, prompt + answer, dtype=torch.long),
        "mask": mask,
        "start": prompt,
        "old_logp": -3 + torch.randn(rows, answer, generator=generator) * 0.1,
        "advantages": torch.randn(rows, answer, generator=generator),
        "values": torch.zeros(rows, answer),
        "returns": torch.randn(rows, answer, generator=generator),
        "seed": 0,
    }
    config = SimpleNamespace(
        ppo_epochs=1,
        minibatch_size=4,
        seed=0,
        sampling=SimpleNamespace(temperature=1.0),
        clip_range=0.2,
        clip_range_value=0.2,
    )
    decay = 0.5
    start = {k: v.clone() for k, v in actor.module.state_dict().items()}
    ema = ppo.ExponentialAverage(start, decay, "cpu")
    seen: list[dict] = []
    update = ema.update

    def recording(module):
        seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        update(module)

    ema.update = recording
    ppo.train_on(SimpleNamespace(actor=actor, critic=critic), batch, config, None, ema)
    assert len(seen) == 2  # one per optimiser step
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    w0, w1, w2 = start[name], seen[0][name], seen[1][name]
    assert not torch.equal(w0, w1) and not torch.equal(w1, w2)  # each step moved it
    expected = decay**2 * w0 + decay * (1 - decay) * w1 + (1 - decay) * w2
    torch.testing.assert_close(ema.weights[name], expected)


def test_the_reward_moments_are_the_runs_and_stay_finite_while_rewards_are_all_equal():
    """PPO's normalising moments: Welford's mean and sample std of every reward seen, across
    batches and through a resume (the state it checkpoints); a reward model that gives every
    answer the same score (saturated) leaves the unit at 1, not at a floor that would
    multiply the critic's values, read in these units, by a million."""
    moments = ppo.RunningMoments()
    moments.update(torch.full((8,), 3.5))
    assert (moments.mean, moments.std) == (3.5, 1.0)
    first, second = torch.randn(16), torch.randn(16) * 4 + 2
    moments = ppo.RunningMoments()
    moments.update(first)
    moments = ppo.RunningMoments(moments.count, moments.mean, moments.m2)  # resumed
    moments.update(second)
    everything = torch.cat([first, second]).double()
    assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-9)
    assert moments.std == pytest.approx(everything.std().item(), abs=1e-9)


def test_a_training_stage_holds_its_tokenised_examples_in_four_bytes_a_token(tiny):
    """SFT's, the pre-training term's and C-RLFT's examples, and packed rows, live in
    memory for the whole run, on every rank of a node: as Python lists (a pointer and an int
    object a token) ids and labels took 36 bytes a token here (9 as arrays), a 100M-token
    set 3.6 GB a rank. Measured with tracemalloc over what the functions return."""
    import gc
    import tracemalloc

    from jobs import crlft
    from jobs.models import load_tokenizer
    from jobs.supervised import pack, tokenize

    tokenizer = load_tokenizer(tiny / "model")
    words = ["안녕하세요", "friendly", "answers", "keep", "everyone", "safe", "and", "calm"]
    rows = [
        {"prompt": f"Question {n}?\n", "response": " ".join(words[(n + i) % 8] for i in range(80))}
        for n in range(40)
    ]
    config = crlft.Config(output="o", model="m", data="d")
    rows = [{**row, "label": "gpt-4"} for row in rows]

    def held(make) -> tuple[float, object]:
        gc.collect()
        tracemalloc.start()
        try:
            made = make()
            gc.collect()
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        tokens = sum(len(item[0]) for item in made)
        return size / tokens, made

    per_token, items = held(lambda: tokenize(rows, tokenizer, max_len=512))
    assert sum(len(ids) for ids, _ in items) > 8_000
    packed_per_token, _ = held(lambda: pack(items, 256))
    crlft_per_token, _ = held(lambda: crlft.prepare(rows, config, tokenizer, "sft/train.jsonl"))
    assert per_token < 12  # ids and labels: 8 bytes, and each example's two small headers
    assert packed_per_token < 18  # ids, labels and positions
    assert crlft_per_token < 12
