"""Supervised examples, as sft, crlft and ppo's pre-training term use them: prompt/response
pairs tokenised with labels on the response only, packing, collation, and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.batches import IGNORE, pad


def tokenize(rows: list[dict], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; labels are IGNORE on the prompt."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        prompt = prompt[-(max_len // 2) :] if len(prompt) + len(response) > max_len else prompt
        ids = (prompt + response)[:max_len]
        labels = ([IGNORE] * len(prompt) + response)[:max_len]
        out.append((ids, labels))
    return out


def pack(examples: list[tuple[list[int], list[int]]], max_len: int):
    """Greedy packing into rows of at most ``max_len`` tokens, positions restarting per example.

    With eager/SDPA attention a token may attend to an earlier example of its
    row (as TRL's packing does); flash-attention kernels read the restarted
    position ids and keep the examples apart.
    """
    rows, ids, labels, positions = [], [], [], []
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_len:
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + example_ids
        labels = labels + example_labels
        positions = positions + list(range(len(example_ids)))
    if ids:
        rows.append((ids, labels, positions))
    return rows


def collate(items, pad_id: int) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad([i[0] for i in items], pad_id),
        "labels": pad([i[1] for i in items], IGNORE),
        "attention_mask": pad([[1] * len(i[0]) for i in items], 0),
    }
    if len(items[0]) == 3:
        batch["position_ids"] = pad([i[2] for i in items], 0)
    return batch


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every position [batch, len-1] and the response mask."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return losses, targets != IGNORE


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over response tokens, and how many there were (both on
    the model's device: reading them on the host would wait for the GPU every step)."""
    losses, mask = token_losses(model, batch)
    n_tokens = mask.sum()
    return losses.sum() / n_tokens.clamp(min=1), n_tokens
