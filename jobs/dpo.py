"""dpo: Direct Preference Optimization against a frozen reference (seed: Sakura-SOLAR).

The loss of Rafailov et al. on the log-ratio margin
h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):
``sigmoid`` -(1-e) log sigma(beta h) - e log sigma(-beta h) (e: label smoothing, the
conservative DPO of Mitchell), or ``ipo`` (h - 1/(2 beta))^2 on per-token average
log-probs (Azar et al.). The reference's log-probs of every train and eval pair are
computed once, before training, and kept in the output (``reference_logps.pt``).
Reads ``pairs/{train,eval}.jsonl`` of data or label outputs; writes ``model/``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from jobs import dist, engine
from jobs.batches import ShardedSampler, compact, literals, pad, padded_shard, read_jsonl, shard
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.errors import BadInputError
from jobs.models import free_memory, load_tokenizer, model_source
from jobs.tokens import encode, keep_end, padded_logits, predicted_positions


class Config(StageConfig, engine.Schedule):
    model: str = Field(description="the model to align (a stage output folder or Hub id)")
    reference: str | None = Field(None, description="the frozen reference; default: model")
    data: str | list[str] = Field(description="data or label outputs with pairs/")
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    max_seq_len: int = Field(512, ge=8)
    train: EngineConfig = EngineConfig(learning_rate=5e-7)


def encode_pair(tokenizer, row: dict, max_len: int) -> tuple[list[int], ...]:
    """(prompt+chosen, mask, prompt+rejected, mask): answers end as SFT trained them to,
    with what the chat template closes a turn with (a pair's ``end``, written by the data
    stage under ``template: chat``), else with EOS; an over-long pair keeps the end of its
    prompt."""
    # special tokens' texts in the answers (and the question's turns, where the row has
    # them) are text, as SFT encodes them
    prompt = encode(tokenizer, row["prompt"], literal=literals(row))
    end = row.get("end")
    out = []
    for key in ("chosen", "rejected"):
        if isinstance(end, str):  # encoded with its answer, as SFT encodes the turn
            answer = encode(tokenizer, row[key] + end, bos=False, literal=[row[key]])
        else:
            answer = encode(tokenizer, row[key], bos=False, literal=[row[key]])
            answer += [tokenizer.eos_token_id]
        answer = answer[: max_len - 1]
        head = keep_end(prompt, max_len - len(answer), tokenizer)
        out += [head + answer, [0] * len(head) + [1] * len(answer)]
    return tuple(out)


def sequence_logps(
    model, input_ids, attention_mask, answer_mask, average: bool = False, logits_to_keep=None
):
    """Sum (or per-token mean) of the log-probs of the answer tokens of every row, from the
    logits at ``logits_to_keep`` (:func:`collate`'s: the positions before answer tokens;
    by default every position)."""
    kept = logits_to_keep
    if kept is None:
        kept = torch.arange(input_ids.size(1) - 1, device=input_ids.device)
    logp = F.log_softmax(padded_logits(model, input_ids, attention_mask, kept).float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, kept + 1, None]).squeeze(-1)
    mask = answer_mask[:, kept + 1].float()
    total = (token_logp * mask).sum(1)
    return total / mask.sum(1).clamp(min=1) if average else total


def dpo_losses(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """(loss per pair, chosen rewards, rejected rewards): the rewards are beta * log-ratios."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = (
            -F.logsigmoid(beta * margin) * (1 - label_smoothing)
            - F.logsigmoid(-beta * margin) * label_smoothing
        )
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


def dpo_loss(*args, **kwargs):
    """(mean loss, chosen rewards, rejected rewards) of a batch."""
    losses, chosen, rejected = dpo_losses(*args, **kwargs)
    return losses.mean(), chosen, rejected


def collate(items: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded together, and the positions whose
    logits their answers' log-probs read."""
    ids = [i[0] for i in items] + [i[2] for i in items]
    answer_mask = pad([i[1] for i in items] + [i[3] for i in items], 0)
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(x) for x in ids], 0),
        "answer_mask": answer_mask,
        "logits_to_keep": predicted_positions(answer_mask.bool()),
    }


def pair_logps(model, items, pad_id: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch = {k: v.to(next(model.parameters()).device) for k, v in collate(items, pad_id).items()}
    logps = sequence_logps(model, **batch, average=average)
    return logps[: len(items)], logps[len(items) :]


@torch.no_grad()
def reference_logps(model, items, pad_id: int, average: bool, batch_size: int) -> torch.Tensor:
    """[n, 2]: the reference's log-probs of chosen and rejected of every pair; each rank
    computes its share and every rank gets all of them. The shares are padded to one length
    (a partitioned reference's every forward is a collective); the padding is dropped."""
    indices, real = padded_shard(len(items), dist.rank(), dist.world_size())
    rows = []
    for start in range(0, len(indices), batch_size):
        chunk = [items[i] for i in indices[start : start + batch_size]]
        chosen, rejected = pair_logps(model, chunk, pad_id, average)
        rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    mine = torch.cat(rows)[torch.tensor(real, dtype=torch.bool)] if rows else torch.zeros(0, 2)
    out = torch.zeros(len(items), 2)
    for rank, part in enumerate(dist.all_gather_object(mine)):
        out[shard(len(items), rank, dist.world_size())] = part
    return out


@torch.no_grad()
def evaluate(model, items, ref: torch.Tensor, config: Config, pad_id: int) -> dict[str, float]:
    model.eval()
    indices, real = padded_shard(len(items), dist.rank(), dist.world_size())
    device = next(model.parameters()).device
    totals = torch.zeros(5, device=device)  # loss, accuracy, margin, chosen, rejected (sums)
    size = config.train.micro_batch_size
    for start in range(0, len(indices), size):
        idx = indices[start : start + size]
        keep = torch.tensor(real[start : start + size], device=device).float()
        chosen, rejected = pair_logps(model, [items[i] for i in idx], pad_id, config.loss == "ipo")
        losses, rc, rr = dpo_losses(
            chosen,
            rejected,
            ref[idx, 0].to(device),
            ref[idx, 1].to(device),
            config.beta,
            config.loss,
            config.label_smoothing,
        )
        rows = torch.stack([losses, (rc > rr).float(), rc - rr, chosen, rejected])
        totals += (rows.float() * keep).sum(1)
    model.train()
    totals = dist.all_reduce_sum(totals)
    n = max(len(items), 1)
    names = ("eval_loss", "eval_accuracy", "eval_margin", "eval_logp_chosen", "eval_logp_rejected")
    return {name: float(value / n) for name, value in zip(names, totals.tolist(), strict=True)}


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    source = model_source(ctx, config.model)
    tokenizer = load_tokenizer(source)
    splits: dict[str, list] = {"train": [], "eval": []}
    for uri in [config.data] if isinstance(config.data, str) else config.data:
        data_dir = ctx.input_dir(uri)
        for split in splits:
            path = data_dir / "pairs" / f"{split}.jsonl"
            if path.is_file():
                rows = read_jsonl(path, ("prompt", "chosen", "rejected"))
                splits[split] += [
                    tuple(map(compact, encode_pair(tokenizer, r, config.max_seq_len))) for r in rows
                ]
    if not splits["train"]:
        raise BadInputError(f"dpo: no pairs/train.jsonl in {config.data}")
    average, pad_id, cfg = config.loss == "ipo", tokenizer.pad_token_id, config.train

    # The reference's log-probs, once, on the accelerator in the policy's precision, each
    # rank its share: then the reference leaves memory. Every rank decides alike (another
    # node's scratch may lack the stored file), or the gathers would not pair up.
    stored = ctx.out_dir / "reference_logps.pt"
    digest = hashlib.sha256()
    for split, items in splits.items():
        digest.update(split.encode())
        for item in items:
            digest.update(json.dumps([part.tolist() for part in item]).encode())
    fingerprint = digest.hexdigest()
    kept = torch.load(stored, weights_only=True) if stored.is_file() else {}
    # Reused only for these very pairs (a resumed run), never for other inputs'.
    if dist.all_ranks(kept.get("fingerprint") == fingerprint):
        ref = {split: kept[split] for split in splits}
    else:
        reference_path = model_source(ctx, config.reference) if config.reference else source
        if cfg.zero_stage == 3:
            # Partitioned over the ranks as the policy will be (an inference-only ZeRO-3
            # engine, as PPO's frozen models): a model trained under ZeRO-3 need not fit
            # whole on one GPU, nor a full copy per rank in host memory.
            frozen = engine.frozen_config(3, False, cfg.precision)
            options = {k: v for k, v in engine.model_options(cfg).items() if k != "dtype"}
            reference = engine.initialize_frozen(
                engine.load_frozen(
                    AutoModelForCausalLM, reference_path, frozen, cfg.precision, **options
                ),
                frozen,
            )
            dist.say_once("dpo: the reference is partitioned over the ranks (ZeRO-3)")
        else:
            reference = AutoModelForCausalLM.from_pretrained(
                reference_path, **engine.model_options(cfg)
            ).to(dist.device())
        reference.eval()  # (a DeepSpeed engine's eval returns nothing)
        ref = {
            split: reference_logps(reference, items, pad_id, average, cfg.micro_batch_size)
            for split, items in splits.items()
        }
        if cfg.zero_stage == 3:
            reference.destroy()  # its ZeRO-3 hooks; the partitions go with it below
        del reference
        free_memory()
        if dist.is_main():
            torch.save({**ref, "fingerprint": fingerprint}, stored)

    sampler = ShardedSampler(
        len(splits["train"]), cfg.micro_batch_size, config.seed, dist.rank(), dist.world_size()
    )
    total_steps = config.total_steps(sampler, cfg.gradient_accumulation_steps)
    model = engine.load_model(AutoModelForCausalLM, source, cfg)
    ds = engine.initialize(model, cfg, total_steps)
    # The reference's log-probs were taken without dropout; the policy's are too (TRL's
    # disable_dropout, on by default), or an unchanged policy's margins would be noise.
    engine.train_without_dropout(ds.module)
    state = engine.resume(ds, ctx)

    def eval_metrics() -> dict:
        return evaluate(ds, splits["eval"], ref["eval"], config, pad_id)

    evaluating = eval_metrics if splits["eval"] else None
    names = ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected")
    loop = engine.TrainLoop(ds, ctx, config, total_steps, state, names, evaluating)
    batches = sampler.micro_batches(start=loop.step * cfg.gradient_accumulation_steps)
    for _ in loop.steps():
        for _ in range(cfg.gradient_accumulation_steps):
            idx = next(batches)
            items = [splits["train"][i] for i in idx]
            chosen, rejected = pair_logps(ds, items, pad_id, average)
            ref_c, ref_r = (ref["train"][idx, k].to(chosen.device) for k in (0, 1))
            loss, rc, rr = dpo_loss(
                chosen, rejected, ref_c, ref_r, config.beta, config.loss, config.label_smoothing
            )
            ds.backward(loss)
            ds.step()
            loop.meter.add(
                sum(len(i[0]) + len(i[2]) for i in items),
                loss,
                (rc > rr).float().mean(),
                (rc - rr).mean(),
                chosen.mean(),
                rejected.mean(),
            )
    engine.export_hf(ds, tokenizer, ctx.out_dir / "model", cfg)
    return {
        "steps": loop.step,
        "train_pairs": len(splits["train"]),
        "eval_accuracy_start": loop.first.get("eval_accuracy"),
        "eval_margin_start": loop.first.get("eval_margin"),
        **loop.summary,
        "tokens_per_s": loop.meter.rate,
    }
