"""reward: a reward model from a language model (seed: VAIV Task 3, RM v1/v2).

A scalar head on the LM reads the score at the last non-padding token (left or right
padding alike); the loss is the pairwise ranking loss -log sigmoid(r_chosen - r_rejected)
of InstructGPT, for one epoch by default (the seed found over-fitting hurts). Reads
``pairs/{train,eval}.jsonl`` of a data or label stage output; writes ``model/``, a Hugging
Face sequence-classification checkpoint (``num_labels=1``) any later stage can load.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from jobs import dist, engine
from jobs.batches import ShardedSampler, compact, literals, padded_shard, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.errors import BadInputError
from jobs.models import load_tokenizer, model_source, quiet_load_report
from jobs.scoring import batch_scores, encode


class Config(StageConfig, engine.Schedule):
    model: str = Field(description="base LM: a stage output folder (e.g. the SFT model) or Hub id")
    revision: str | None = None
    data: str | list[str] = Field(
        description="data or label stage outputs (reads pairs/{train,eval}.jsonl of each)"
    )
    train_split: Literal["train", "judge"] = Field(
        "train",
        description="the pairs file to train on: judge trains a held-out judge for evaluate "
        "on pairs/judge.jsonl, prompts that neither the policy's reward model nor its "
        "training saw",
    )
    max_seq_len: int = Field(512, ge=8)
    epochs: int = Field(1, ge=1, description="one by default: reward models over-fit")
    train: EngineConfig = EngineConfig(learning_rate=1e-5)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected).mean()


def pair_scores(model, items, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and the rejected answers of a batch of pairs, in one forward."""
    scores = batch_scores(model, [i[0] for i in items] + [i[1] for i in items], pad_id)
    return scores[: len(items)], scores[len(items) :]


@torch.no_grad()
def evaluate(model, items, pad_id: int, micro_batch: int) -> dict[str, float]:
    """Held-out accuracy, mean margin and the score distributions, over all ranks."""
    model.eval()
    indices, real = padded_shard(len(items), dist.rank(), dist.world_size())
    chosen, rejected = [], []
    for start in range(0, len(indices), micro_batch):
        c, r = pair_scores(model, [items[i] for i in indices[start : start + micro_batch]], pad_id)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train()
    keep = torch.tensor(real, dtype=torch.bool)
    mine = (torch.cat(chosen)[keep], torch.cat(rejected)[keep]) if chosen else (None, None)
    gathered = [g for g in dist.all_gather_object(mine) if g[0] is not None]
    chosen_t = torch.cat([g[0] for g in gathered]) if gathered else torch.zeros(0)
    rejected_t = torch.cat([g[1] for g in gathered]) if gathered else torch.zeros(0)
    margin = chosen_t - rejected_t
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    return {
        "eval_accuracy": float((margin > 0).float().mean()),
        "eval_margin": float(margin.mean()),
        "eval_loss": float(-F.logsigmoid(margin).mean()),
        "chosen_mean": float(chosen_t.mean()),
        "chosen_std": float(chosen_t.std()),
        "rejected_mean": float(rejected_t.mean()),
        "rejected_std": float(rejected_t.std()),
        **{
            f"chosen_q{int(q * 100)}": float(v)
            for q, v in zip(quantiles, torch.quantile(chosen_t, quantiles), strict=True)
        },
        **{
            f"rejected_q{int(q * 100)}": float(v)
            for q, v in zip(quantiles, torch.quantile(rejected_t, quantiles), strict=True)
        },
    }


def load_pairs(
    ctx: StageContext, sources: list[str], tokenizer, max_len: int, train_split: str = "train"
):
    """Train and eval pairs of every source (StableVicuna mixed three preference sets)."""
    splits: dict[str, list] = {"train": [], "eval": []}
    for source in sources:
        data_dir = ctx.input_dir(source)
        for split in splits:
            name = train_split if split == "train" else split
            path = data_dir / "pairs" / f"{name}.jsonl"
            if not path.is_file():
                if split == "train":
                    hint = (
                        "set the data stage's judge_fraction"
                        if name == "judge"
                        else "give a data or label stage output"
                    )
                    raise BadInputError(f"{source}: no pairs/{name}.jsonl; {hint}")
                continue
            rows = read_jsonl(path, ("prompt", "chosen", "rejected"))
            splits[split] += [
                (
                    compact(encode(tokenizer, r["prompt"], r["chosen"], max_len, True, asked)),
                    compact(encode(tokenizer, r["prompt"], r["rejected"], max_len, True, asked)),
                )
                for r in rows
                for asked in [literals(r)]
            ]
    return splits


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(config.seed)
    source = model_source(ctx, config.model, config.revision)
    tokenizer = load_tokenizer(source, config.revision)
    sources = [config.data] if isinstance(config.data, str) else config.data
    splits = load_pairs(ctx, sources, tokenizer, config.max_seq_len, config.train_split)
    train_items, eval_items = splits["train"], splits["eval"]

    cfg = config.train
    sampler = ShardedSampler(
        len(train_items), cfg.micro_batch_size, config.seed, dist.rank(), dist.world_size()
    )
    total_steps = config.total_steps(sampler, cfg.gradient_accumulation_steps)

    with quiet_load_report():  # the new score head is "missing" from a causal LM, as intended
        model = engine.load_model(
            AutoModelForSequenceClassification, source, cfg, revision=config.revision, num_labels=1
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    ds = engine.initialize(model, cfg, total_steps, task_type="SEQ_CLS")
    state = engine.resume(ds, ctx)
    pad_id = tokenizer.pad_token_id

    def eval_metrics() -> dict:
        return evaluate(ds.module, eval_items, pad_id, cfg.micro_batch_size)

    evaluating = eval_metrics if eval_items else None
    names = ("loss", "accuracy")
    loop = engine.TrainLoop(ds, ctx, config, total_steps, state, names, evaluating)
    batches = sampler.micro_batches(start=loop.step * cfg.gradient_accumulation_steps)
    for _ in loop.steps():
        for _ in range(cfg.gradient_accumulation_steps):
            items = [train_items[i] for i in next(batches)]
            chosen, rejected = pair_scores(ds, items, pad_id)
            loss = pairwise_loss(chosen, rejected)
            ds.backward(loss)
            ds.step()
            tokens = sum(len(c) + len(r) for c, r in items)
            loop.meter.add(tokens, loss, (chosen > rejected).float().mean())
    engine.export_hf(ds, tokenizer, ctx.out_dir / "model", cfg)
    return {
        "steps": loop.step,
        "train_pairs": len(train_items),
        "eval_pairs": len(eval_items),
        "eval_accuracy_start": loop.first.get("eval_accuracy"),
        **loop.summary,
        "tokens_per_s": loop.meter.rate,
    }
