"""Supervised examples, as sft, crlft and ppo's pre-training term use them: prompt/response
pairs or whole conversations tokenised with labels on the answers only, packing without
leakage between examples, collation, and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.batches import IGNORE, pad
from jobs.errors import BadInputError
from jobs.tokens import bos_prefix, encode


def segments_of(row: dict, where: str) -> list[tuple[str, bool]]:
    """A row's text as (piece, trained) in order. A data stage writes ``segments`` for a
    conversation under the tokenizer's chat template (every assistant turn trained, its
    end-of-turn included); other rows are one prompt and one response."""
    if "segments" not in row:
        return [(row["prompt"], False), (row["response"], True)]
    segments = row["segments"]
    if not isinstance(segments, list) or not segments:
        raise BadInputError(f"{where}: field 'segments' should be a non-empty list")
    out = []
    for index, piece in enumerate(segments):
        if (
            not isinstance(piece, dict)
            or not isinstance(piece.get("text"), str)
            or not isinstance(piece.get("train"), bool)
        ):
            raise BadInputError(
                f"{where}: field 'segments[{index}]' needs text 'text' and true/false 'train'"
            )
        out.append((piece["text"], piece["train"]))
    return out


def encode_segments(
    segments: list[tuple[str, bool]], tokenizer, max_len: int, end: list[int]
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: BOS where the tokenizer expects it, the pieces in
    order with labels on the trained ones, then ``end`` (trained). Pieces are encoded one by
    one, so a label boundary is a token boundary (as OpenChat and DeepSpeed-Chat encode
    turns). An over-long example keeps at most half its length before its first trained
    token (the end of that context), then is cut at ``max_len``."""
    ids: list[int] = []
    labels: list[int] = []
    for index, (text, trained) in enumerate(segments):
        piece = encode(tokenizer, text, bos=index == 0)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
        if index == 0 and piece[:1] == bos_prefix(tokenizer):
            labels[0] = IGNORE  # BOS is context, even before a trained first piece
    ids, labels = ids + end, labels + end
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    if len(ids) > max_len and first > max_len // 2:
        keep = len(bos_prefix(tokenizer)) if ids[:1] == bos_prefix(tokenizer) else 0
        cut = first - max_len // 2
        ids, labels = ids[:keep] + ids[keep + cut :], labels[:keep] + labels[keep + cut :]
    return ids[:max_len], labels[:max_len]


def tokenize(
    rows: list[dict], tokenizer, max_len: int, where: str = "sft"
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row; labels are IGNORE outside the trained pieces. A plain
    response ends with the tokenizer's EOS; a templated conversation with what its
    template closes each turn with (already in its segments)."""
    out = []
    for number, row in enumerate(rows, start=1):
        end = [] if "segments" in row else [tokenizer.eos_token_id]
        out.append(encode_segments(segments_of(row, f"{where}:{number}"), tokenizer, max_len, end))
    return out


def pack(examples: list[tuple[list[int], list[int]]], max_len: int):
    """Greedy packing into rows of at most ``max_len`` tokens, positions restarting per
    example. The collated batch carries these position ids and no attention mask, which
    transformers reads as packed sequences (``masking_utils.find_packed_sequence_indices``):
    SDPA and eager attention get a block-diagonal causal mask, flash-attention its
    variable-length kernel, so no example attends to another."""
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
    """Right-padded rows; packed rows (with their positions) without an attention mask
    (see :func:`pack`; the padding after the last example is never attended to by a real
    token, being later in the row, and carries no labels)."""
    batch = {
        "input_ids": pad([i[0] for i in items], pad_id),
        "labels": pad([i[1] for i in items], IGNORE),
    }
    if len(items[0]) == 3:
        batch["position_ids"] = pad([i[2] for i in items], 0)
    else:
        batch["attention_mask"] = pad([[1] * len(i[0]) for i in items], 0)
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
