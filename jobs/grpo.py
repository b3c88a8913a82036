"""grpo: critic-free RL with several answers per prompt: GRPO, RLOO or REINFORCE++, on
rewards a program checks (verifiable rewards), a reward model, or a weighted sum of both.

Each iteration samples G answers for each of a batch of prompts, scores them with the
configured rewards, and turns the scores into advantages without a critic:

- ``grpo`` (Shao et al., DeepSeekMath): (r - mean of its group) / (std of its group + eps);
- ``rloo`` (Ahmadian et al.): r minus the mean of the other G-1 answers to its prompt;
- ``reinforce_pp`` (Hu, REINFORCE++): the return (r, minus the per-token KL penalty when the
  KL is a reward term) whitened over the whole batch.

The update is the token-level PPO-clip loss (its upper clip optionally apart, DAPO's
clip-higher), plus ``kl_coef`` times an estimate of KL(pi || pi_ref) per token when the KL
is a loss term (k1: log-ratio; k3: the low-variance estimator of Schulman) or as a penalty
in the reward; ``reference_free`` drops the reference model; the ratio may be each
answer's rather than each token's (GSPO). A minibatch's token losses
are averaged over the answer tokens of every rank's minibatch by default (DAPO; TRL's
default loss_type), or per
answer first (the GRPO paper), or summed over a fixed divisor (Dr. GRPO, which also
leaves the group's std out: ``scale_rewards: none``); answers cut at the token limit may be
left out of the loss (DAPO's overlong filtering), and groups whose answers all scored
alike may be replaced by more samples (DAPO's dynamic sampling). The formulas follow verl's
``trainer/ppo/core_algos.py`` (compute_grpo_outcome_advantage, compute_rloo_outcome_advantage,
compute_reinforce_plus_plus_outcome_advantage, kl_penalty) and TRL's GRPOTrainer.

Reads ``prompts/{train,eval}.jsonl`` of a stage output folder (each row a prompt and the
fields its rewards read, e.g. ``answer``); logs per-function rewards, the groups' reward
spread, KL, clip fraction, answer length, the share of answers cut at the token limit and
the time split; evaluates greedy answers to
held-out prompts every ``eval_every`` iterations; resumes exactly from its checkpoints;
writes ``model/``.
"""

from __future__ import annotations

import time
from itertools import chain
from typing import Literal, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator

from jobs import dist, engine
from jobs.batches import ShardedSampler, literals, padded_shard, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.errors import BadInputError
from jobs.generation import Samples, SamplingConfig, decode, eos_ids_of, merge_samples, sample
from jobs.models import InferenceConfig, free_memory, load_tokenizer, model_source
from jobs.rewards import RewardFunction, Rewards
from jobs.rollout import (
    RL_SAMPLING,
    LossAggregation,
    SampleLog,
    loss_weights,
    masked_mean,
    micro_batches,
    over_defaults,
    sample_prompts,
    sample_rows,
    seconds_since,
    token_logprobs,
    token_policy_loss,
    untouched_generators,
    update_config,
    whiten,
)
from jobs.tokens import MessageText

GRPO_SAMPLING = {**RL_SAMPLING, "max_new_tokens": 64}


class Config(StageConfig, SampleLog):
    actor: str = Field(description="the model to train (an SFT model folder or Hub id)")
    reference: str | None = Field(None, description="the KL reference; default: the actor")
    prompts: str = Field(description="a stage output folder with prompts/{train,eval}.jsonl")
    algorithm: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    group_size: int = Field(8, ge=2, description="answers sampled per prompt")
    prompts_per_iteration: int = Field(16, ge=1, description="per process")
    iterations: int = Field(100, ge=1)
    epochs: int = Field(1, ge=1, description="passes over each rollout")
    minibatch_size: int = Field(
        32,
        ge=1,
        description="answers per optimiser step, in forwards of train.micro_batch_size answers",
    )
    clip_range: float = Field(0.2, gt=0)
    clip_range_high: float | None = Field(
        None,
        gt=0,
        description="the ratio's upper clip apart from clip_range (DAPO's clip-higher, "
        "0.28 there; TRL's epsilon_high); unset: clip_range",
    )
    importance_sampling: Literal["token", "sequence"] = Field(
        "token",
        description="the ratio clipped: each token's, or each answer's (the geometric mean "
        "of its tokens', GSPO; TRL's importance_sampling_level)",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="grpo: divide (r - group mean) by its group's reward std, the whole "
        "batch's, or nothing (Dr. GRPO: a group of near-equal rewards is not blown up to "
        "unit advantages); as TRL's scale_rewards",
    )
    loss_aggregation: LossAggregation = Field(
        "token_mean",
        description="how a minibatch's token losses become its loss: token_mean (DAPO; "
        "over the answer tokens of every rank's minibatch), sequence_mean (TRL's grpo: each "
        "answer's mean, then the mean over answers) or max_length (Dr. GRPO: the sum "
        "over answers x max_new_tokens)",
    )
    mask_truncated_answers: bool = Field(
        False,
        description="answers cut at max_new_tokens (no EOS) take no part in the loss "
        "(DAPO's overlong filtering; TRL's mask_truncated_completions); they still count "
        "in their group's baseline",
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling (verl's filter_groups): a group whose answers "
        "all scored alike has no advantage (grpo, rloo; with kl_in: reward only its KL "
        "penalty), so it is dropped and more prompts are sampled, up to "
        "max_sampling_rounds rollouts an iteration, the groups of every rank one pool; a "
        "batch still short is filled with dropped groups",
    )
    max_sampling_rounds: int = Field(3, ge=1, description="rollouts an iteration at most")
    dynamic_sampling_reward: str | None = Field(
        None,
        description="the reward whose spread in a group keeps it (a reward's name, as verl's "
        "filter_groups.metric: acc, DAPO's choice where shaping rewards are in the sum); "
        "default: the weighted sum",
    )
    kl_coef: float = Field(0.04, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    reference_free: bool = Field(False, description="no reference model and no KL term")
    rewards: list[RewardFunction] = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig(**GRPO_SAMPLING)
    eval_every: int = Field(10, ge=1)
    eval_prompts: int = Field(200, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    scorer: InferenceConfig = Field(
        InferenceConfig(), description="where reward models score (the actor's device)"
    )
    train: EngineConfig = EngineConfig(learning_rate=1e-6)

    @field_validator("sampling", mode="before")
    @classmethod
    def _over_grpo_defaults(cls, value):
        return over_defaults(GRPO_SAMPLING, value)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        labels = [spec.label for spec in self.rewards]
        if self.dynamic_sampling_reward not in (None, *labels):
            raise ValueError(
                f"dynamic_sampling_reward {self.dynamic_sampling_reward!r} is not a reward's "
                f"name: {labels}"
            )
        for spec in self.rewards:
            if spec.kind == "overlong" and spec.overlong_buffer > self.sampling.max_new_tokens:
                raise ValueError(
                    f"rewards: {spec.label!r}: overlong_buffer {spec.overlong_buffer} is more "
                    f"than sampling.max_new_tokens {self.sampling.max_new_tokens}, the limit "
                    "it counts back from"
                )
        if (
            self.kl_estimator == "k1"
            and self.kl_in == "loss"
            and self.kl_coef > 0
            and not self.reference_free
        ):
            raise ValueError(
                "kl_estimator k1 as a loss term has no gradient in expectation (on the "
                "policy's own samples E[grad log pi] = 0, as verl's kl_penalty notes): use k3, "
                "or k1 with kl_in: reward"
            )
        if (
            self.importance_sampling == "sequence"
            and self.kl_in == "reward"
            and self.kl_coef > 0
            and not self.reference_free
        ):
            raise ValueError(
                "importance_sampling: sequence with kl_in: reward: GSPO clips an answer's "
                "ratio against one advantage per answer, and the per-token KL penalty would "
                "be averaged into it; use kl_in: loss"
            )
        if self.dynamic_sampling and self.algorithm == "reinforce_pp":
            raise ValueError(
                "dynamic_sampling with reinforce_pp: its batch-whitened advantages give a "
                "group whose answers all scored alike an advantage too, which dropping it "
                "would lose"
            )
        if self.algorithm != "grpo" and self.scale_rewards != "group":
            raise ValueError(
                f"scale_rewards is grpo's: {self.algorithm} has its own baseline "
                "(rloo: the other answers' mean; reinforce_pp: the batch's whitening)"
            )
        rollout = self.prompts_per_iteration * self.group_size
        if rollout % self.minibatch_size:
            raise ValueError(
                f"prompts_per_iteration * group_size ({rollout}) must be a multiple of "
                f"minibatch_size ({self.minibatch_size})"
            )
        update_config(self.train, self.minibatch_size, "train")
        if not self.sampling.do_sample:
            raise ValueError(
                "sampling.do_sample: false would give every answer of a group the same tokens "
                "(and transformers samples no groups greedily); the advantages need samples"
            )
        if self.train.compile:
            raise ValueError(
                "train.compile: the policy also generates the rollouts, whose every length "
                "a compiled forward would compile anew"
            )
        return self


def group_advantages(
    rewards: torch.Tensor, group: int, algorithm: str, scale: str = "group"
) -> torch.Tensor:
    """One advantage per answer from its reward and its group's (answers to one prompt are
    next to each other): GRPO's group-normalised reward or RLOO's leave-one-out baseline.
    GRPO's ``scale`` (TRL's scale_rewards): the std of its group, of the whole batch (every
    rank's answers), or none."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1, keepdim=True)
    if algorithm == "rloo":
        return ((grouped - mean) * group / (group - 1)).view(-1)
    if scale == "none":
        return (grouped - mean).view(-1)
    std = dist.all_gather_cat(rewards).std() if scale == "batch" else grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + 1e-4)).view(-1)


# A group's reward std below this is no spread (its advantages are 0 under grpo and rloo)
FLAT_STD = 1e-6


def spread_out(total: list[float], group: int) -> list[bool]:
    """Per group of ``group`` answers: whether their rewards differ (else the group's
    advantages are 0 under grpo and rloo, but for a KL penalty in the reward)."""
    return (torch.tensor(total).view(-1, group).std(1) >= FLAT_STD).tolist()


def pool_groups(spreads: list[list[list[bool]]], wanted: int) -> list[list[tuple[int, int, int]]]:
    """Dynamic sampling's batches, ``wanted`` groups on each rank, from every rank's
    rollouts, given whether each of their groups' rewards differ (:func:`spread_out`;
    ``spreads[rank][rollout][group]``): each rank's batch as (rank, rollout, group). A
    rank keeps its first ``wanted`` groups that differ, in the order they were sampled;
    its further ones go, in rank order, to the ranks that have fewer (the groups of all
    ranks are one pool, as verl's filter_groups pools one global batch); a batch still
    short is filled with the rank's own groups that do not differ (it keeps its size)."""
    varied, flat = [], []
    for rank, rollouts in enumerate(spreads):
        groups = [
            ((rank, number, index), differ)
            for number, spread in enumerate(rollouts)
            for index, differ in enumerate(spread)
        ]
        varied.append([g for g, differ in groups if differ])
        flat.append([g for g, differ in groups if not differ])
    batches = [own[:wanted] for own in varied]
    extra = [group for own in varied for group in own[wanted:]]
    for rank, batch in enumerate(batches):
        given, extra = extra[: wanted - len(batch)], extra[wanted - len(batch) :]
        batch += given
        batch += flat[rank][: wanted - len(batch)]
    return batches


def pooled_batch(
    drawn: list[Rollout], spreads: list[list[list[bool]]], config: Config, pad_id: int
) -> tuple[Samples, list[float], dict[str, list[float]]]:
    """This rank's batch of :func:`pool_groups`: the answers, rewards and rewards per
    function of its groups, those of other ranks' rollouts sent over (collective where
    any group changes rank; every rank reads the same ``spreads``)."""
    group, me = config.group_size, dist.rank()
    batches = pool_groups(spreads, config.prompts_per_iteration)
    received: list[dict] = [{}]
    if any(owner != rank for rank, batch in enumerate(batches) for owner, _, _ in batch):
        sent = {}
        for rank, batch in enumerate(batches):
            for owner, number, index in batch:
                if owner == me != rank:
                    part, ours = slice(index * group, (index + 1) * group), drawn[number]
                    sent[number, index] = (
                        ours.samples.take(part, "cpu"),
                        ours.total[part],
                        {label: values[part] for label, values in ours.each.items()},
                    )
        received = dist.all_gather_object(sent)
    device = drawn[0].samples.mask.device
    rows, total, each = [], [], {label: [] for label in drawn[0].each}
    for owner, number, index in batches[me]:
        if owner == me:
            first, ours = index * group, drawn[number]
            answers, scores = ours.samples, ours.total[first : first + group]
            by_function = {label: v[first : first + group] for label, v in ours.each.items()}
        else:
            answers, scores, by_function = received[owner][number, index]
            first, answers = 0, answers.take(slice(None), device)
        rows += [(answers, first + k) for k in range(group)]
        total += scores
        for label, values in by_function.items():
            each[label] += values
    return merge_samples(rows, pad_id), total, each


def loss_tokens(mask: torch.Tensor, ended: torch.Tensor, config: Config) -> torch.Tensor:
    """The answer tokens the loss reads: every one, or with ``mask_truncated_answers`` only
    those of answers that ended with their EOS, as TRL's mask_truncated_completions keeps
    them (so a cut answer is neither in the loss nor in its token count)."""
    return mask * ended[:, None] if config.mask_truncated_answers else mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs."""
    if estimator == "k1":
        return logp - ref_logp
    # The log-ratio bounded so exp cannot overflow; the estimate itself is not clamped, as
    # TRL's is not. verl (low_var_kl) and OpenRLHF clamp it at 10, which takes the penalty's
    # gradient away from exactly the tokens furthest from the reference: on the GPU suite's
    # copy task (bf16, tests/gpu) held-out accuracy rose 0.82 -> 0.86 with that clamp and
    # 0.82 -> 0.91 without.
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(log_ratio) - log_ratio - 1


def token_advantages(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, config: Config
) -> torch.Tensor:
    """Advantages of every answer token [answers, len] from the answers' rewards and the
    per-token KL to the reference (used here when the KL is part of the reward: its value
    clamped to [-10, 10] as OpenRLHF's and verl's are there, so one token far from the
    reference cannot swamp every answer's reward)."""
    penalty = (
        config.kl_coef * kl.clamp(-10, 10) * mask
        if config.kl_in == "reward"
        else torch.zeros_like(kl)
    )
    if config.algorithm == "reinforce_pp":
        token_rewards = -penalty
        last = (mask.sum(1).long() - 1).clamp(min=0)
        token_rewards[torch.arange(len(rewards), device=rewards.device), last] += rewards
        returns = token_rewards.flip(1).cumsum(1).flip(1)  # gamma 1
        return whiten(returns, mask)
    penalty_returns = penalty.flip(1).cumsum(1).flip(1)  # the penalty still to come
    # The group baseline on the rewards alone, the KL penalty added per token after it, as
    # OpenRLHF does: normalising a penalty-shaped reward would blow a group's small KL
    # differences up to unit advantages when its answers' rewards are all the same.
    group = group_advantages(rewards, config.group_size, config.algorithm, config.scale_rewards)
    return (group[:, None] - penalty_returns) * mask


class RewardModels:
    """Reward models of ``reward_model`` rewards, loaded once on first use."""

    def __init__(self, ctx: StageContext, settings: InferenceConfig) -> None:
        self.ctx, self.settings, self.loaded = ctx, settings, {}

    def __call__(
        self,
        spec: RewardFunction,
        prompts: list[str],
        completions: list[str],
        finished: list[bool] | None = None,
        placed: list[list[MessageText]] | None = None,
    ):
        from jobs.scoring import load_reward_model, score_texts

        if spec.model not in self.loaded:
            path = model_source(self.ctx, spec.model)
            self.loaded[spec.model] = (
                load_reward_model(path, self.settings),
                load_tokenizer(path),
            )
        model, tokenizer = self.loaded[spec.model]
        return score_texts(
            model, tokenizer, prompts, completions, finished=finished, literals=placed
        )


@torch.no_grad()
def logprobs_of(model, samples, size: int, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled answers, ``size`` rows per forward, without dropout (those
    of the policy that sampled)."""
    was_training = model.training
    model.eval()
    rows = range(0, samples.sequences.size(0), size)
    try:
        return torch.cat(
            [
                token_logprobs(
                    model,
                    samples.sequences[i : i + size],
                    samples.attention[i : i + size],
                    samples.start,
                    temperature,
                )[0]
                for i in rows
            ]
        )
    finally:
        model.train(was_training)


def reference_logprobs(
    reference: engine.Reference | None, samples, size: int, temperature: float, policy
) -> torch.Tensor:
    """The reference's log-probs of the sampled answers (``policy``'s, the policy's own,
    where there is no reference: no KL)."""
    if reference is None:
        return policy
    with reference.model() as model:
        return logprobs_of(model, samples, size, temperature)


class Rollout(NamedTuple):
    samples: Samples
    total: list[float]  # each answer's reward
    each: dict[str, list[float]]  # each answer's reward per function
    scoring_s: float  # the rewards' seconds
    spread: list[bool]  # per group: whether its rewards differ (dynamic_sampling_reward's)


def train_minibatch(
    ds, samples: Samples, rows, old_logp, ref_logp, advantages, config: Config
) -> dict:
    """One optimiser step on the answers ``rows`` of a rollout, in the engine's
    micro-batches: the minibatch's loss as ``config`` aggregates it (each micro-batch
    backpropagates its tokens' part), plus the KL term per token where ``ref_logp`` is
    given. Returns the loss and the means over every answer token of the clip fraction,
    entropy and KL (the loss may read fewer: ``mask_truncated_answers``)."""
    mask, steps = samples.mask, ds.gradient_accumulation_steps()
    temperature = config.sampling.temperature
    read = loss_tokens(mask, samples.ended, config)
    weights = loss_weights(read, rows, config.loss_aggregation, config.sampling.max_new_tokens)
    sums = dict.fromkeys(("loss", "clip_fraction", "entropy", "kl_loss"), 0.0)
    for idx, _, share in micro_batches(ds, rows, mask):
        m = mask[idx]
        logp, entropy = token_logprobs(
            ds, samples.sequences[idx], samples.attention[idx], samples.start, temperature
        )
        per_token, clipped = token_policy_loss(
            logp,
            old_logp[idx],
            advantages[idx],
            config.clip_range,
            config.clip_range_high,
            # (a cut answer left out has ratio 1, as in TRL: its own could overflow,
            # and inf x 0 would spoil the step)
            read[idx] if config.importance_sampling == "sequence" else None,
        )
        terms = {"clip_fraction": masked_mean(clipped, m), "entropy": masked_mean(entropy, m)}
        if ref_logp is not None:
            kl = kl_estimate(logp, ref_logp[idx], config.kl_estimator)
            per_token = per_token + config.kl_coef * kl
            terms["kl_loss"] = masked_mean(kl, m)
        # this micro-batch's part of the minibatch's loss; DeepSpeed divides each backward
        # by its accumulation steps, which the product undoes
        loss = (per_token * weights[idx]).sum()
        ds.backward(loss * steps)
        ds.step()
        sums["loss"] = sums["loss"] + loss.detach()
        for key, value in terms.items():
            sums[key] = sums[key] + value.detach() * share
    return sums


@torch.no_grad()
def evaluate(ds, tokenizer, eos, rows, where, rewards: Rewards, config: Config):
    """Mean reward of greedy answers to held-out prompts, per function, over all ranks."""
    greedy = config.sampling.model_copy(update={"do_sample": False})
    indices, real = padded_shard(len(rows), dist.rank(), dist.world_size())
    totals = {"eval_reward": 0.0, **{f"eval_{s.label}": 0.0 for s in rewards.specs}}
    size = config.prompts_per_iteration * config.group_size
    answered = []
    with engine.for_generation(ds, config.sampling.zero3_gather) as (model, synced):
        for first in range(0, len(indices), size):
            chunk, keep = indices[first : first + size], real[first : first + size]
            prompts = [rows[i]["prompt"] for i in chunk]
            placed = [literals(rows[i]) for i in chunk]
            answers = sample(
                model, tokenizer, prompts, greedy, eos, 0, synced_gpus=synced, literals=placed
            )
            texts = decode(tokenizer, answers.answers, answers.mask)
            answered.append((chunk, keep, prompts, texts, answers))
    # scored once the weights are partitioned again (a reward model loads on first use)
    for chunk, keep, prompts, texts, answers in answered:
        chosen = [rows[i] for i in chunk]
        total, each = rewards(
            prompts,
            texts,
            chosen,
            [where[i] for i in chunk],
            answers.ended.tolist(),
            answers.lengths,
        )
        totals["eval_reward"] += sum(v for v, k in zip(total, keep, strict=True) if k)
        for label, values in each.items():
            totals[f"eval_{label}"] += sum(v for v, k in zip(values, keep, strict=True) if k)
    summed = dist.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64))
    return {k: float(v) / len(rows) for k, v in zip(totals, summed.tolist(), strict=True)}


@torch.no_grad()
def policy_samples(ds, reference, tokenizer, eos, rows, where, rewards, config):
    """The policy's greedy answers to the sample prompts, with their reward (every reward
    function's sum) and KL to the reference."""
    greedy = config.sampling.model_copy(update={"do_sample": False})
    prompts = [row["prompt"] for row in rows]
    gather = config.sampling.zero3_gather
    placed = [literals(row) for row in rows]
    with untouched_generators(), engine.for_generation(ds, gather) as (model, synced):
        answers = sample(
            model, tokenizer, prompts, greedy, eos, 0, synced_gpus=synced, literals=placed
        )
    texts = decode(tokenizer, answers.answers, answers.mask)
    total, _ = rewards(prompts, texts, rows, where, answers.ended.tolist(), answers.lengths)
    size, temperature = ds.train_micro_batch_size_per_gpu(), config.sampling.temperature
    logp = logprobs_of(ds.module, answers, size, temperature)
    ref = reference_logprobs(reference, answers, size, temperature, logp)
    return sample_rows(prompts, texts, total, logp, ref, answers.mask)


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    data_dir = ctx.input_dir(config.prompts)
    splits = {}
    for split in ("train", "eval"):
        path = data_dir / "prompts" / f"{split}.jsonl"
        if path.is_file():
            rows = read_jsonl(path, ("prompt",))
            splits[split] = (
                rows,
                [f"{config.prompts}/prompts/{split}.jsonl:{i + 1}" for i in range(len(rows))],
            )
    if "train" not in splits:
        raise BadInputError(f"{config.prompts}: no prompts/train.jsonl")
    train_rows, train_where = splits["train"]
    eval_rows, eval_where = splits.get("eval", ([], []))
    eval_rows, eval_where = eval_rows[: config.eval_prompts], eval_where[: config.eval_prompts]
    held_out, held_out_where = sample_prompts(data_dir, config.prompts, config.sample_prompts)

    actor_path = model_source(ctx, config.actor)
    tokenizer = load_tokenizer(actor_path)
    cfg = config.train
    rollout_size = config.prompts_per_iteration * config.group_size
    total_steps = config.iterations * config.epochs * (rollout_size // config.minibatch_size)
    cfg = update_config(cfg, config.minibatch_size, "train")
    ds = engine.initialize(
        engine.load_model(AutoModelForCausalLM, actor_path, cfg), cfg, total_steps
    )
    engine.train_without_dropout(ds.module)
    zero3 = cfg.zero_stage == 3
    reference = None
    if not config.reference_free:
        frozen_reference = None
        if not engine.adapters_as_reference(cfg, config.reference, "grpo"):
            path = model_source(ctx, config.reference) if config.reference else actor_path
            frozen = engine.frozen_config(3 if zero3 else 0, False, cfg.precision)
            frozen_reference = engine.initialize_frozen(
                engine.load_frozen(AutoModelForCausalLM, path, frozen, cfg.precision), frozen
            )
        reference = engine.Reference(ds, frozen_reference)
    eos = eos_ids_of(ds.module, tokenizer)
    rewards = Rewards(
        config.rewards, RewardModels(ctx, config.scorer), config.sampling.max_new_tokens
    )
    rewards.check_examples(train_rows + eval_rows, train_where + eval_where)
    sampler = ShardedSampler(
        len(train_rows), config.prompts_per_iteration, config.seed, dist.rank(), dist.world_size()
    )

    state = engine.resume(ds, ctx)
    iteration = state.get("step", 0)
    first_eval = state.get("first_eval")
    if first_eval is None and eval_rows:
        first_eval = evaluate(ds, tokenizer, eos, eval_rows, eval_where, rewards, config)
        ctx.log(0, **first_eval)
    # a run resumed from its last checkpoint reports what the run it continues ended with
    last_eval = state.get("last_eval") or first_eval or {}
    summary: dict = state.get("summary", {})
    # prompt batches drawn so far: one an iteration, more with dynamic sampling
    consumed = state.get("consumed", iteration)
    batches = sampler.micro_batches(start=consumed)

    def rollout(seed: int) -> Rollout:
        """One batch of prompts, group_size answers each, and their rewards."""
        indices = next(batches)
        prompts = [train_rows[i]["prompt"] for i in indices]
        with engine.for_generation(ds, config.sampling.zero3_gather) as (model, synced):
            samples = sample(
                model,
                tokenizer,
                prompts,
                config.sampling,
                eos,
                seed,
                config.group_size,
                synced,
                literals=[literals(train_rows[i]) for i in indices],
            )
        timer = time.perf_counter()
        texts = decode(tokenizer, samples.answers, samples.mask)
        repeat = [i for i in indices for _ in range(config.group_size)]
        total, each = rewards(
            [train_rows[i]["prompt"] for i in repeat],
            texts,
            [train_rows[i] for i in repeat],
            [train_where[i] for i in repeat],
            samples.ended.tolist(),
            samples.lengths,
        )
        seconds = time.perf_counter() - timer
        judged = each[config.dynamic_sampling_reward] if config.dynamic_sampling_reward else total
        return Rollout(samples, total, each, seconds, spread_out(judged, config.group_size))

    progress = ctx.progress(config.iterations, iteration)
    while iteration < config.iterations:
        seed = config.seed * 100003 + iteration * 1009 + dist.rank()
        drawn = [rollout(seed)]
        if config.dynamic_sampling:
            # every rank's groups are one pool: all ranks sample again while the pool lacks
            # groups whose rewards differ (ZeRO-3's generation is collective: ranks sample
            # in step)
            spreads = [[spread] for spread in dist.all_gather_object(drawn[0].spread)]
            while (
                len(drawn) < config.max_sampling_rounds
                and sum(map(sum, chain.from_iterable(spreads)))
                < config.prompts_per_iteration * dist.world_size()
            ):
                drawn.append(rollout(seed + 7919 * len(drawn)))
                for rank, spread in enumerate(dist.all_gather_object(drawn[-1].spread)):
                    spreads[rank].append(spread)
            samples, total, each = pooled_batch(drawn, spreads, config, tokenizer.pad_token_id)
        else:
            samples, total, each = drawn[0].samples, drawn[0].total, drawn[0].each
        consumed += len(drawn)
        generation_s = sum(d.samples.seconds for d in drawn)
        mask = samples.mask
        # scoring: every rollout's rewards, then the log-probs and advantages
        timer = time.perf_counter() - sum(d.scoring_s for d in drawn)
        scores = torch.tensor(total, device=mask.device)
        micro, temperature = ds.train_micro_batch_size_per_gpu(), config.sampling.temperature
        old_logp = logprobs_of(ds.module, samples, micro, temperature)
        ref_logp = reference_logprobs(reference, samples, micro, temperature, old_logp)
        kl = kl_estimate(old_logp, ref_logp, config.kl_estimator) * mask
        advantages = token_advantages(scores, kl, mask, config)
        scoring_s = seconds_since(timer, mask.device)

        kl_term = config.kl_in == "loss" and reference is not None and config.kl_coef > 0
        timer = time.perf_counter()
        stats = {"loss": [], "clip_fraction": [], "entropy": [], "kl_loss": []}
        generator = torch.Generator().manual_seed(seed)
        for _ in range(config.epochs):
            order = torch.randperm(rollout_size, generator=generator)
            for minibatch in order.split(config.minibatch_size):
                sums = train_minibatch(
                    ds,
                    samples,
                    minibatch.to(mask.device),
                    old_logp,
                    ref_logp if kl_term else None,
                    advantages,
                    config,
                )
                for key, value in sums.items():
                    if torch.is_tensor(value):
                        stats[key].append(value)
        training_s = seconds_since(timer, mask.device)
        iteration += 1

        # every rank's answers (groups stay whole on one rank), as ppo reports them
        everyone = dist.all_gather_cat(scores.float())
        spread = everyone.view(-1, config.group_size).std(1)
        by_function = {
            label: float(dist.all_gather_cat(torch.tensor(v, device=mask.device)).mean())
            for label, v in each.items()
        }
        answer_kl = dist.all_gather_cat(((old_logp - ref_logp) * mask).sum(1).float())
        summary = {
            "reward_mean": float(everyone.mean()),
            "reward_std": float(everyone.std()),
            **{f"reward.{label}": value for label, value in by_function.items()},
            "group_reward_std": float(spread.mean()),
            "zero_variance_groups": float((spread < FLAT_STD).float().mean()),
            "kl": float(answer_kl.mean()),
            **{
                k: float(dist.all_reduce_sum(torch.stack(v).mean())) / dist.world_size()
                for k, v in stats.items()
                if v
            },
            "response_length": float(dist.all_gather_cat(mask.sum(1).float()).mean()),
            # answers cut at max_new_tokens (TRL's completions/clipped_ratio): with
            # mask_truncated_answers, the share the loss leaves out
            "truncated_fraction": float(1 - dist.all_gather_cat(samples.ended.float()).mean()),
            **(
                {
                    "sampling_rounds": float(len(drawn)),
                    # what the policy drew (the batch trained on leans to groups that differ:
                    # its reward_mean and zero_variance_groups describe that batch)
                    "sampled_reward_mean": float(
                        dist.all_gather_cat(
                            torch.tensor([r for d in drawn for r in d.total], device=mask.device)
                        ).mean()
                    ),
                    # (every rank's spreads are here already: the pool gathered them)
                    "sampled_zero_variance_groups": float(
                        torch.tensor(
                            [not differ for own in spreads for one in own for differ in one]
                        )
                        .float()
                        .mean()
                    ),
                }
                if config.dynamic_sampling
                else {}
            ),
            "generation_s": generation_s,
            "scoring_s": scoring_s,
            "training_s": training_s,
        }
        ctx.log(iteration, **summary)
        if eval_rows and (iteration % config.eval_every == 0 or iteration == config.iterations):
            last_eval = evaluate(ds, tokenizer, eos, eval_rows, eval_where, rewards, config)
            ctx.log(iteration, **last_eval)
        if held_out and config.due(iteration, config.iterations):
            ctx.samples(
                iteration,
                policy_samples(
                    ds, reference, tokenizer, eos, held_out, held_out_where, rewards, config
                ),
            )
        progress.update(1)
        kept = {
            "first_eval": first_eval,
            "last_eval": last_eval,
            "summary": summary,
            "consumed": consumed,
        }
        engine.checkpoint_or_stop(ds, ctx, iteration, config.checkpoint_every, kept)
    progress.close()
    del reference
    free_memory()
    engine.export_hf(ds, tokenizer, ctx.out_dir / "model", cfg)
    return {
        "iterations": iteration,
        **{f"{k}_start": v for k, v in (first_eval or {}).items()},
        **last_eval,
        **{k: v for k, v in summary.items() if not k.endswith("_s")},
    }
