"""sft: instruction tuning with the loss on response tokens only (seed: VAIV Task 2).

Reads ``sft/{train,eval}.jsonl`` from a data stage output: a templated prompt and its
response (trained, closed with EOS), or, for conversations under the tokenizer's chat
template, the whole conversation in ``segments`` with every assistant turn trained (closed
by the template's end-of-turn). BOS goes first where the tokenizer expects one. With
``packing``, examples share rows but never attend to each other. Trains through the
shared DeepSpeed engine and writes ``model/`` in Hugging Face format.
"""

from __future__ import annotations

import torch
from pydantic import Field

from jobs import dist, engine
from jobs.batches import ShardedSampler, padded_shard, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.errors import BadInputError
from jobs.models import load_tokenizer, model_source, transformers_model
from jobs.supervised import (
    check_packing_isolates,
    collate,
    end_of_turn_ids,
    flattens,
    pack,
    step_share,
    to_device,
    token_losses,
    tokenize,
    trained_targets,
)


class Config(StageConfig, engine.Schedule):
    model: str = Field(description="base model: a stage output folder or a Hugging Face id")
    revision: str | None = None
    data: str = Field(description="a data stage output (reads sft/train.jsonl, sft/eval.jsonl)")
    max_seq_len: int = Field(512, ge=8)
    packing: bool = Field(False, description="concatenate examples into full-length rows")
    train: EngineConfig = EngineConfig()


def train_step(ds, window: list[list], pad_id: int, flatten: bool) -> list[torch.Tensor]:
    """One optimiser step over ``window``, its micro-batches (the engine accumulates them):
    its gradient that of the mean loss over all the step's answer tokens, on every rank.
    Returns each micro-batch's own mean loss, for the metrics."""
    share = step_share(sum(trained_targets(items) for items in window), len(window), ds.device)
    means = []
    for items in window:
        losses, mask = token_losses(ds, to_device(collate(items, pad_id, flatten), ds.device))
        ds.backward(losses.sum() / share)
        ds.step()
        means.append(losses.detach().sum() / mask.sum().clamp(min=1))
    return means


@torch.no_grad()
def evaluate(model, items, pad_id: int, micro_batch: int) -> float:
    """Token-weighted mean loss over all of ``items``, each rank scoring its share."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, device=device)  # loss sum, token count
    indices, real = padded_shard(len(items), dist.rank(), dist.world_size())
    for start in range(0, len(indices), micro_batch):
        batch = collate([items[i] for i in indices[start : start + micro_batch]], pad_id)
        batch = to_device(batch, device)
        losses, mask = token_losses(model, batch)
        keep = torch.tensor(real[start : start + micro_batch], device=device)[:, None] & mask
        total += torch.stack([(losses * keep).sum(), keep.sum().float()])
    model.train()
    total = dist.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    source = model_source(ctx, config.model, config.revision)
    tokenizer = load_tokenizer(source, config.revision)
    data_dir = ctx.input_dir(config.data)
    splits = {}
    for split in ("train", "eval"):
        path = data_dir / "sft" / f"{split}.jsonl"
        if not path.is_file():
            if split == "eval":
                splits[split] = []
                continue
            raise BadInputError(
                f"{config.data}: no sft/train.jsonl; the data stage wrote no SFT rows"
            )
        splits[split] = tokenize(
            read_jsonl(path, ("prompt", "response")),
            tokenizer,
            config.max_seq_len,
            f"{config.data}/sft/{split}.jsonl",
        )
    train_items = pack(splits["train"], config.max_seq_len) if config.packing else splits["train"]
    eval_items = splits["eval"]

    cfg = config.train
    sampler = ShardedSampler(
        len(train_items), cfg.micro_batch_size, config.seed, dist.rank(), dist.world_size()
    )
    total_steps = config.total_steps(sampler, cfg.gradient_accumulation_steps)

    model = engine.load_model(AutoModelForCausalLM, source, cfg, revision=config.revision)
    ds = engine.initialize(model, cfg, total_steps)
    if config.packing:
        check_packing_isolates(ds.module, ds.device)
    flatten = config.packing and flattens(ds.module)
    state = engine.resume(ds, ctx)
    pad_id = tokenizer.pad_token_id

    def eval_loss() -> dict:
        return {"eval_loss": evaluate(ds, eval_items, pad_id, cfg.micro_batch_size)}

    evaluating = eval_loss if eval_items else None
    loop = engine.TrainLoop(ds, ctx, config, total_steps, state, ("loss",), evaluating)
    batches = sampler.micro_batches(start=loop.step * cfg.gradient_accumulation_steps)
    for _ in loop.steps():
        window = [
            [train_items[i] for i in next(batches)] for _ in range(cfg.gradient_accumulation_steps)
        ]
        for items, own in zip(window, train_step(ds, window, pad_id, flatten), strict=True):
            loop.meter.add(sum(len(item[0]) for item in items), own)

    # A chat template's end-of-turn token ends answers as EOS does: generation stops there.
    stops = end_of_turn_ids(splits["train"], tokenizer, config.max_seq_len)
    if stops:
        base = transformers_model(ds)  # a LoRA's base too
        configured = base.generation_config.eos_token_id
        known = configured if isinstance(configured, list) else [configured]
        base.generation_config.eos_token_id = sorted({*stops, *(t for t in known if t is not None)})
    engine.export_hf(ds, tokenizer, ctx.out_dir / "model", cfg)
    return {
        "steps": loop.step,
        "eval_loss_start": loop.first.get("eval_loss"),
        "eval_loss": loop.summary.get("eval_loss"),
        "train_examples": len(splits["train"]),
        "tokens_per_s": loop.meter.rate,
    }
