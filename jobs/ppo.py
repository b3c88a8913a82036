"""ppo: RLHF in the DeepSpeed-Chat shape (seed: VAIV Task 4, StableVicuna).

Four models, each through the DeepSpeed engine: the actor (from the SFT model) and the
critic (from the reward model) are trained; the reference (the SFT model) and the reward
model are frozen, with ZeRO-3 or CPU offload for memory (an actor trained with LoRA is its
own reference, its adapters off). Each iteration:

1. rollouts: the actor samples answers to a batch of prompts (KV cache, stop at EOS;
   ranks generate in lockstep under ZeRO-3);
2. scoring: log-probs of actor and reference, the critic's values, the reward model's
   score; the per-token reward is -kl_coef * (log pi - log pi_ref), with the (normalised,
   clipped) score added at the last generated token;
3. GAE advantages and returns;
4. several epochs of minibatches of the PPO-clip policy loss (plus an optional
   pre-training loss on SFT data) and the clipped value loss.

The KL coefficient is fixed or adaptive (Ziegler et al.); the actor can be exported as an
exponential moving average. Checkpoints hold both engines, the KL coefficient, the reward
normaliser, the RNG and the prompt position, so a preempted run resumes exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from jobs import dist, engine
from jobs.batches import ShardedSampler, literals, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.generation import Samples, SamplingConfig, decode, eos_ids_of, sample
from jobs.models import load_tokenizer, model_source, quiet_load_report
from jobs.rollout import (
    RL_SAMPLING,
    SampleLog,
    masked_mean,
    micro_batches,
    over_defaults,
    policy_loss,
    sample_prompts,
    sample_rows,
    seconds_since,
    token_logprobs,
    untouched_generators,
    update_config,
    whiten,
)
from jobs.scoring import ending_in_eos, head_values, last_token_scores, require_reward_model
from jobs.tokens import MessageText

PPO_SAMPLING = {**RL_SAMPLING, "max_new_tokens": 48}


class Config(StageConfig, SampleLog):
    actor: str = Field(description="the SFT model (a stage output folder or Hub id)")
    reward_model: str = Field(description="a reward stage's model folder")
    critic: str | None = Field(None, description="default: the reward model")
    reference: str | None = Field(None, description="default: the actor's starting point")
    prompts: str = Field(description="a data stage output: prompts/train.jsonl (and sft/ for ptx)")
    iterations: int = Field(20, ge=1)
    rollout_batch_size: int = Field(32, ge=1, description="prompts per iteration and rank")
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)
    sampling: SamplingConfig = SamplingConfig(**PPO_SAMPLING)
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0, description="adaptive KL: the KL per answer aimed at")
    kl_horizon: int = Field(10000, ge=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    gamma: float = 1.0
    lam: float = 0.95
    normalize_reward: bool = True
    reward_clip: float = Field(5.0, gt=0)
    ptx_coef: float = Field(0.0, ge=0, description="weight of the SFT loss on sft/train.jsonl")
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="subtracted from the (normalised, clipped) score of an answer cut at "
        "max_new_tokens without EOS (TRL's missing_eos_penalty)",
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="export an EMA of the actor")
    frozen_zero_stage: Literal[0, 3] = Field(
        0,
        description="ZeRO stage of the frozen reward model and reference (a LoRA actor's "
        "reference is itself)",
    )
    frozen_offload: bool = Field(
        False,
        description="CPU-offload the frozen models' parameters (needs frozen_zero_stage 3)",
    )
    scoring_batch_size: int | None = Field(
        None, ge=1, description="rollout rows scored per forward; default: the actor's micro-batch"
    )
    checkpoint_every: int = Field(10, ge=1, description="iterations")
    actor_train: EngineConfig = EngineConfig(learning_rate=1e-5)
    critic_train: EngineConfig = EngineConfig(learning_rate=1e-5)

    @field_validator("sampling", mode="before")
    @classmethod
    def _over_ppo_defaults(cls, value):
        return over_defaults(PPO_SAMPLING, value)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError("rollout_batch_size must be a multiple of minibatch_size")
        update_config(self.actor_train, self.minibatch_size, "actor_train")
        update_config(self.critic_train, self.minibatch_size, "critic_train")
        if self.ema_decay is not None and self.actor_train.zero_stage == 3:
            raise ValueError("ema_decay needs the actor's full parameters: zero_stage 0-2")
        engine.frozen_config(self.frozen_zero_stage, self.frozen_offload, "fp32")
        if self.actor_train.compile:
            raise ValueError(
                "actor_train.compile: the actor also generates the rollouts, whose every "
                "length a compiled forward would compile anew"
            )
        if self.critic_train.compile:
            raise ValueError(
                "critic_train.compile: the critic reads every rollout, whose every length a "
                "compiled forward would compile anew"
            )
        return self


class RunningMoments:
    """Mean and std of every reward seen so far (Welford), for normalisation."""

    def __init__(self, count: float = 0.0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.count, self.mean, self.m2 = count, mean, m2

    def update(self, values: torch.Tensor) -> None:
        for value in values.tolist():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        # 1 while the rewards have shown no spread (all equal so far: a saturated reward
        # model): dividing by ~0 would blow the critic's values, read in these units, up
        std = (self.m2 / max(self.count - 1, 1)) ** 0.5 if self.count > 1 else 0.0
        return std if std > 1e-6 else 1.0


class ExponentialAverage:
    """An exponential moving average of a model's weights (Polyak), exported in place of
    the last weights. Kept in float32 whatever the training precision (a bf16 average
    stops moving once decay * step falls under bf16's resolution) on one fixed device, to
    which a resumed run brings it back."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float, device) -> None:
        self.decay, self.device = decay, torch.device(device)
        self.weights = {
            name: value.detach().to(
                self.device, torch.float32 if value.is_floating_point() else value.dtype, copy=True
            )
            for name, value in weights.items()
        }

    def update(self, module) -> None:
        with torch.no_grad():
            for name, value in module.state_dict().items():
                average = self.weights[name]
                value = value.detach().to(self.device, average.dtype)
                if average.is_floating_point():
                    average.mul_(self.decay).add_(value, alpha=1 - self.decay)
                else:
                    average.copy_(value)


def token_values(critic, sequences, attention_mask, start: int) -> torch.Tensor:
    """The critic's value of the state before each token from ``start`` on."""
    return head_values(critic, sequences, attention_mask)[:, start - 1 : -1]


def in_units(values: torch.Tensor, units: tuple[float, float]) -> torch.Tensor:
    """Raw values in the units ``(mean, std)`` the rewards were normalised with."""
    mean, std = units
    return (values - mean) / std


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the answer tokens; (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def value_loss(values, old_values, returns, mask, clip: float):
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class Models:
    """The four models of PPO and their tokenizer."""

    def __init__(self, config: Config, ctx: StageContext, total_steps: int) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        actor_path = model_source(ctx, config.actor)
        reward_path = model_source(ctx, config.reward_model)
        critic_path = model_source(ctx, config.critic) if config.critic else reward_path
        reference_path = model_source(ctx, config.reference) if config.reference else actor_path
        require_reward_model(reward_path)
        self.tokenizer = load_tokenizer(actor_path)
        precision = config.actor_train.precision
        frozen = engine.frozen_config(config.frozen_zero_stage, config.frozen_offload, precision)
        with quiet_load_report():
            actor = engine.load_model(AutoModelForCausalLM, actor_path, config.actor_train)
            critic = engine.load_model(
                AutoModelForSequenceClassification, critic_path, config.critic_train, num_labels=1
            )
            adapters_off = engine.adapters_as_reference(config.actor_train, config.reference, "ppo")
            reference = (
                None
                if adapters_off
                else engine.load_frozen(AutoModelForCausalLM, reference_path, frozen, precision)
            )
            reward = engine.load_frozen(
                AutoModelForSequenceClassification, reward_path, frozen, precision
            )
        critic.config.pad_token_id = reward.config.pad_token_id = self.tokenizer.pad_token_id
        # one optimiser step per minibatch, in forwards of each model's micro-batch
        actor_train = update_config(config.actor_train, config.minibatch_size, "actor_train")
        critic_train = update_config(config.critic_train, config.minibatch_size, "critic_train")
        self.actor = engine.initialize(actor, actor_train, total_steps)
        self.critic = engine.initialize(critic, critic_train, total_steps, task_type="SEQ_CLS")
        # The update's forwards without dropout too (TRL disables it in every model): with
        # it, the ratio of an unchanged policy is noise and the clip cuts gradients at random.
        engine.train_without_dropout(self.actor.module)
        engine.train_without_dropout(self.critic.module)
        self.reference = engine.Reference(
            self.actor, None if reference is None else engine.initialize_frozen(reference, frozen)
        )
        self.reward = engine.initialize_frozen(reward, frozen)
        self.eos = eos_ids_of(actor, self.tokenizer)


@torch.no_grad()
def rollout(
    models: Models,
    prompts: list[str],
    config: Config,
    seed: int,
    placed: list[list[MessageText]] | None = None,
) -> dict:
    """Sample answers and score them: everything the PPO update needs. ``placed``: where
    each prompt's messages lie (its row's :func:`jobs.batches.literals`)."""
    with engine.for_generation(models.actor, config.sampling.zero3_gather) as (actor, synced):
        samples = sample(
            actor,
            models.tokenizer,
            prompts,
            config.sampling,
            models.eos,
            seed,
            synced_gpus=synced,
            literals=placed,
        )
    # Eval mode while scoring: no activation checkpointing where nothing is trained.
    trained = (models.actor.module, models.critic.module)
    for module in trained:
        module.eval()
    try:
        timer = time.perf_counter()
        micro = update_config(config.actor_train, config.minibatch_size, "actor_train")
        size = config.scoring_batch_size or micro.micro_batch_size
        scored = score(models, samples, size, config.sampling.temperature)
        scoring_s = seconds_since(timer, samples.sequences.device)
    finally:
        for module in trained:
            module.train()
    mask = samples.mask
    return {
        "sequences": samples.sequences,
        "attention": samples.attention,
        "start": samples.start,
        "mask": mask,
        "old_logp": scored["old_logp"] * mask,
        "ref_logp": scored["ref_logp"] * mask,
        "values": scored["values"] * mask,
        "scores": scored["scores"],
        "ended": samples.ended,
        "generation_s": samples.seconds,
        "scoring_s": scoring_s,
        "generated_tokens": int(mask.sum()),
    }


@torch.no_grad()
def score(models: Models, samples: Samples, batch_size: int, temperature: float = 1.0) -> dict:
    """Log-probs of actor and reference under the sampling ``temperature`` (the policy the
    answers were drawn from, as TRL's and OpenRLHF's PPO take them), the critic's values
    and the reward model's score (of each answer as it was trained to read one:
    :func:`ending_in_eos`), ``batch_size`` rows per forward (a whole rollout's logits would
    not fit a GPU)."""
    names = ("old_logp", "ref_logp", "values", "scores")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    start, eos_id = samples.start, models.tokenizer.eos_token_id
    for first in range(0, samples.sequences.size(0), batch_size):
        rows = slice(first, first + batch_size)
        seqs, attn = samples.sequences[rows], samples.attention[rows]
        parts["old_logp"].append(
            token_logprobs(models.actor.module, seqs, attn, start, temperature)[0]
        )
        with models.reference.model() as reference:
            parts["ref_logp"].append(token_logprobs(reference, seqs, attn, start, temperature)[0])
        parts["values"].append(token_values(models.critic, seqs, attn, start))
        judged = ending_in_eos(seqs, attn, samples.ended[rows], eos_id)
        parts["scores"].append(last_token_scores(models.reward.module, judged, attn))
    return {k: torch.cat(v) for k, v in parts.items()}


def shape_rewards(batch: dict, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * (log pi - log pi_ref) per token, plus the score at the last answer token."""
    mask = batch["mask"]
    rewards = -kl_coef * (batch["old_logp"] - batch["ref_logp"]) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards


def policy_samples(models: Models, rows: list[dict], config: Config) -> list[dict]:
    """The policy's greedy answers to the sample prompts (prompts rows), with their reward
    model score (raw) and KL to the reference."""
    greedy = config.model_copy(
        update={"sampling": config.sampling.model_copy(update={"do_sample": False})}
    )
    prompts = [row["prompt"] for row in rows]
    with untouched_generators():
        batch = rollout(models, prompts, greedy, 0, [literals(row) for row in rows])
    answers = decode(models.tokenizer, batch["sequences"][:, batch["start"] :], batch["mask"])
    return sample_rows(
        prompts,
        answers,
        batch["scores"].tolist(),
        batch["old_logp"],
        batch["ref_logp"],
        batch["mask"],
    )


def ptx_batches(config: Config, models: Models, data_dir: Path, start: int = 0):
    """Endless micro-batches of the SFT data, for the pre-training loss, from the
    ``start``-th on."""
    from jobs.supervised import collate, tokenize

    rows = read_jsonl(data_dir / "sft" / "train.jsonl", ("prompt", "response"))
    # a whole example, as long as a prompt and its answer (DeepSpeed-Chat's unsupervised
    # data: max_prompt_seq_len + max_answer_seq_len); the prompt's length alone cut answers
    length = config.sampling.max_prompt_tokens + config.sampling.max_new_tokens
    items = tokenize(rows, models.tokenizer, length)
    micro = models.actor.train_micro_batch_size_per_gpu()  # one per forward of the actor
    sampler = ShardedSampler(len(items), micro, config.seed, dist.rank(), dist.world_size())
    for indices in sampler.micro_batches(start=start):
        yield collate([items[i] for i in indices], models.tokenizer.pad_token_id)


def train_on(
    models: Models, batch: dict, config: Config, ptx, ema: ExponentialAverage | None = None
) -> dict[str, float]:
    """PPO epochs over the rollout in minibatches; the losses and clip fraction. ``ema``
    takes the actor's weights after every optimiser step (one per minibatch), as
    DeepSpeed-Chat's ``moving_average`` follows each ``train_rlhf`` step."""
    mask, start = batch["mask"], batch["start"]
    stats: dict[str, list[float]] = {
        "policy_loss": [],
        "value_loss": [],
        "clip_fraction": [],
        "entropy": [],
        "ptx_loss": [],
    }
    n = mask.size(0)
    generator = torch.Generator().manual_seed(config.seed + int(batch["seed"]))
    actor, critic = models.actor, models.critic
    for _ in range(config.ppo_epochs):
        for minibatch in torch.randperm(n, generator=generator).split(config.minibatch_size):
            minibatch = minibatch.to(mask.device)
            sums = dict.fromkeys(stats, 0.0)
            forwards = actor.gradient_accumulation_steps()
            for idx, weight, share in micro_batches(actor, minibatch, mask):
                seqs, attn, m = batch["sequences"][idx], batch["attention"][idx], mask[idx]
                logp, entropy = token_logprobs(
                    actor, seqs, attn, start, config.sampling.temperature
                )
                pg, clipped = policy_loss(
                    logp, batch["old_logp"][idx], batch["advantages"][idx], m, config.clip_range
                )
                loss = pg * weight
                if ptx is not None:
                    from jobs.supervised import response_loss

                    ptx_batch = {k: v.to(actor.device) for k, v in next(ptx).items()}
                    ptx_loss, _ = response_loss(actor, ptx_batch)
                    loss = loss + config.ptx_coef * ptx_loss  # the mean of the micro-batches'
                    sums["ptx_loss"] += ptx_loss.detach() / forwards
                actor.backward(loss)
                actor.step()
                sums["policy_loss"] += pg.detach() * share
                sums["clip_fraction"] += clipped.detach() * share
                sums["entropy"] += masked_mean(entropy, m) * share
            if ema is not None:  # the minibatch's micro-batches made one optimiser step
                ema.update(actor.module)
            for idx, weight, share in micro_batches(critic, minibatch, mask):
                values = token_values(
                    critic, batch["sequences"][idx], batch["attention"][idx], start
                )
                values = in_units(values, batch.get("value_units", (0.0, 1.0)))
                vf = value_loss(
                    values,
                    batch["values"][idx],
                    batch["returns"][idx],
                    mask[idx],
                    config.clip_range_value,
                )
                critic.backward(vf * weight)
                critic.step()
                sums["value_loss"] += vf.detach() * share
            for key, value in sums.items():
                if torch.is_tensor(value):
                    stats[key].append(float(value))
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


def run(config: Config, ctx: StageContext) -> dict:
    torch.manual_seed(config.seed)
    data_dir = ctx.input_dir(config.prompts)
    prompts = read_jsonl(data_dir / "prompts" / "train.jsonl", ("prompt",))
    updates = config.ppo_epochs * (config.rollout_batch_size // config.minibatch_size)
    models = Models(config, ctx, config.iterations * updates)
    sampler = ShardedSampler(
        len(prompts), config.rollout_batch_size, config.seed, dist.rank(), dist.world_size()
    )

    state = engine.resume({"actor": models.actor, "critic": models.critic}, ctx)
    iteration = state.get("step", 0)
    kl_coef = state.get("kl_coef", config.kl_coef)
    moments = RunningMoments(*state.get("moments", (0.0, 0.0, 0.0)))
    ema = None
    # On the actor's device, back there after a resume; rank 0's only (it alone exports it,
    # and the checkpoint keeps rank 0's state): the other ranks' GPUs hold no fp32 copy.
    if config.ema_decay is not None and dist.is_main():
        weights = state.get("ema") or models.actor.module.state_dict()
        ema = ExponentialAverage(weights, config.ema_decay, models.actor.device)
    # where a resumed run's SFT batches go on from: one per forward of the actor so far
    minibatches = math.ceil(config.rollout_batch_size / config.minibatch_size)
    forwards = minibatches * models.actor.gradient_accumulation_steps()
    ptx_start = iteration * config.ppo_epochs * forwards
    ptx = ptx_batches(config, models, data_dir, ptx_start) if config.ptx_coef > 0 else None
    batches = sampler.micro_batches(start=iteration)
    progress = ctx.progress(config.iterations, iteration)
    held_out, _ = sample_prompts(data_dir, config.prompts, config.sample_prompts)
    first_reward = state.get("first_reward")
    # a run resumed from its last checkpoint reports what the run it continues ended with
    summary: dict = state.get("summary", {})
    while iteration < config.iterations:
        indices = next(batches)
        seed = config.seed * 100003 + iteration * 1009 + dist.rank()
        asked = [prompts[i] for i in indices]
        batch = rollout(
            models, [row["prompt"] for row in asked], config, seed, [literals(r) for r in asked]
        )
        batch["seed"] = seed
        raw = batch["scores"]
        # The whole batch's rewards, every rank's: the normalising moments are the run's,
        # the same on every rank, so rank 0's checkpoint restores them on all.
        everyone = dist.all_gather_cat(raw.float())
        scores = raw
        if config.normalize_reward:
            moments.update(everyone)
            units = (moments.mean, moments.std)
            scores = in_units(raw, units)
            # The critic's values in the same units as the returns it learns (OpenRLHF's
            # CriticModel normalises its values with the reward model's mean and std): it
            # starts as the reward model, whose raw scores can be many value-clip widths
            # away from a normalised return.
            batch["value_units"] = units
            batch["values"] = in_units(batch["values"], units) * batch["mask"]
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
        if config.missing_eos_penalty is not None:
            # After normalising, so the penalty is in the units of the reward's spread
            # whatever the reward model's scale, and after clipping, so it always bites.
            scores = scores - config.missing_eos_penalty * (~batch["ended"]).float()
        rewards = shape_rewards(batch, scores, kl_coef)
        advantages, returns = gae(rewards, batch["values"], batch["mask"], config.gamma, config.lam)
        batch["advantages"] = whiten(advantages, batch["mask"])
        batch["returns"] = returns

        timer = time.perf_counter()
        losses = train_on(models, batch, config, ptx, ema)
        training_s = seconds_since(timer, batch["mask"].device)

        kl_rows = ((batch["old_logp"] - batch["ref_logp"]) * batch["mask"]).sum(1)
        kl = float(dist.all_gather_cat(kl_rows.float()).mean())  # one KL coefficient for all
        if config.adaptive_kl:
            error = max(min(kl / config.target_kl - 1, 0.2), -0.2)
            # the horizon counts the whole batch's samples, as OpenRLHF's AdaptiveKLController
            batch_size = config.rollout_batch_size * dist.world_size()
            kl_coef *= 1 + error * batch_size / config.kl_horizon
        iteration += 1
        if first_reward is None:
            first_reward = float(everyone.mean())
        lengths = dist.all_gather_cat(batch["mask"].sum(1).float())
        ended = dist.all_gather_cat(batch["ended"].float())
        summary = {
            "reward_mean": float(everyone.mean()),
            "reward_std": float(everyone.std()),
            "kl": kl,
            "kl_coef": kl_coef,
            **losses,
            "response_length": float(lengths.mean()),
            "eos_fraction": float(ended.mean()),
            "generation_s": batch["generation_s"],
            "scoring_s": batch["scoring_s"],
            "training_s": training_s,
            "generation_tokens_per_s": batch["generated_tokens"] / batch["generation_s"],
        }
        ctx.log(iteration, **summary)
        if held_out and config.due(iteration, config.iterations):
            ctx.samples(iteration, policy_samples(models, held_out, config))
        progress.update(1)
        engine.checkpoint_or_stop(
            {"actor": models.actor, "critic": models.critic},
            ctx,
            iteration,
            config.checkpoint_every,
            {
                "kl_coef": kl_coef,
                "moments": (moments.count, moments.mean, moments.m2),
                "ema": ema.weights if ema is not None else None,
                "first_reward": first_reward,
                "summary": summary,
            },
        )
    progress.close()

    if ema is not None and dist.is_main():
        models.actor.module.load_state_dict(ema.weights)
    engine.export_hf(models.actor, models.tokenizer, ctx.out_dir / "model", config.actor_train)
    engine.export_hf(models.critic, models.tokenizer, ctx.out_dir / "critic", config.critic_train)
    return {"iterations": iteration, "reward_mean_start": first_reward, **summary}
