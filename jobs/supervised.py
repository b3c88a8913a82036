"""Supervised examples, as sft, crlft and ppo's pre-training term use them: prompt/response
pairs or whole conversations tokenised with labels on the answers only, packing without
leakage between examples, collation, and the loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from jobs import dist
from jobs.batches import IGNORE, compact, literals, pad
from jobs.errors import BadInputError
from jobs.tokens import MessageText, bos_prefix, encode_spans, logits_at, predicted_positions


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
    segments: list[tuple[str, bool]],
    tokenizer,
    max_len: int,
    end: list[int],
    literal: Iterable[MessageText] = (),
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: BOS where the tokenizer expects it, the pieces'
    text encoded as one string (the tokens the model meets at inference: SentencePiece-style
    tokenizers encode a piece alone differently), each token labelled when its last
    character lies in a trained piece (TRL's assistant masks work from character spans the
    same way), then ``end`` (trained). An over-long example keeps at most half its length
    before its first trained token (the end of that context), then is cut at ``max_len``.
    ``literal``: the messages' contents, whose special-token look-alikes are text
    (:func:`jobs.tokens.encode_spans`)."""
    text = "".join(piece for piece, _ in segments)
    trained_chars = [False] * len(text)
    at = 0
    for piece, trained in segments:
        trained_chars[at : at + len(piece)] = [trained] * len(piece)
        at += len(piece)
    ids, spans = encode_spans(tokenizer, text, literal)
    labels = [
        token if stop > start and trained_chars[stop - 1] else IGNORE
        for token, (start, stop) in zip(ids, spans, strict=True)
    ]
    prefix = bos_prefix(tokenizer)
    if prefix and ids[:1] != prefix:
        ids, labels = prefix + ids, [IGNORE] + labels
    elif prefix:
        labels[0] = IGNORE  # BOS is context, even before a trained first piece
    ids, labels = ids + end, labels + end
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    if len(ids) > max_len and first > max_len // 2:
        keep = len(prefix) if prefix and ids[:1] == prefix else 0
        cut = first - max_len // 2
        ids, labels = ids[:keep] + ids[keep + cut :], labels[:keep] + labels[keep + cut :]
    return ids[:max_len], labels[:max_len]


def end_of_turn_ids(
    items: list[tuple[list[int], list[int]]], tokenizer, max_len: int | None = None
) -> set[int]:
    """The special tokens that close trained answers (a chat template's ``<|eot_id|>`` or
    ``<|im_end|>``): generation must stop at them too, not only at EOS. A token counts
    where nothing but whitespace follows it in its trained span (ChatML trains the "\n"
    after ``<|im_end|>``), and the last span of a row cut at ``max_len`` counts not at
    all: an added token inside a cut answer (Qwen's ``<think>``) is no end of turn."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    found = set()
    for ids, labels in items:
        if max_len is not None and len(ids) >= max_len:
            last = max((i for i, x in enumerate(labels) if x == IGNORE), default=-1)
            labels = labels[: last + 1]  # the span that runs to the cut may be cut short
        span: list[int] = []
        for label in [*labels, IGNORE]:
            if label != IGNORE:
                span.append(label)
                continue
            last = max((i for i, token in enumerate(span) if token in special), default=None)
            if last is not None and not tokenizer.decode(span[last + 1 :]).strip():
                found.add(span[last])
            span = []
    return found


def flattens(model) -> bool:
    """Whether packed batches go to this model as one row (flash-attention's
    variable-length kernel: no padding computed at all) rather than padded rows."""
    return model.config._attn_implementation.startswith("flash_attention")


def check_packing_isolates(model, device) -> None:
    """Refuse packing where this model's attention would let packed examples see each
    other: transformers isolates them only where the model hands its position ids to the
    mask builder (not OPT, BLOOM, Falcon in transformers 5) and, under flash-attention,
    only for a batch of one row (:func:`flattens`). A packed batch as training shapes it
    is compared with its second example alone and with the leaky (plain causal) reading
    of the same rows. "Alone" is that example first in rows of the same shape (where
    nothing comes before it to see): on a GPU, bf16 kernels of another shape round
    differently, which an isolating model must not be refused for."""
    was_training = model.training
    model.eval()  # no dropout in the comparison
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.randint(3, vocab, (2, 6), generator=generator).tolist()

    def packed(row: list[int]) -> dict:
        # two packed rows, collated as training collates them (one row under flash-attention)
        rows = [(row, [IGNORE] * 12, list(range(6)) * 2)] * 2
        batch = to_device(collate(rows, 0, flattens(model)), device)
        del batch["labels"], batch["logits_to_keep"]
        return batch

    batch, reference = packed(first + second), packed(second + first)
    ids = batch["input_ids"]
    with torch.no_grad():
        together = model(**batch, use_cache=False).logits[:, 6:12]
        leaky = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        leaky = leaky.logits[:, 6:12]
        alone = model(**reference, use_cache=False).logits[:, :6]
    model.train(was_training)
    isolated = (together - alone).abs().max().item()
    leaked = (leaky - alone).abs().max().item()
    if isolated > 0.1 * leaked:
        raise BadInputError(
            f"packing: this model's attention ({model.config.model_type}, "
            f"{model.config._attn_implementation}) does not keep packed examples apart "
            f"(logit difference {isolated:.3g}, {leaked:.3g} without isolation); set "
            "packing: false"
        )


def tokenize(
    rows: list[dict], tokenizer, max_len: int, where: str = "sft"
) -> list[tuple[Sequence[int], Sequence[int]]]:
    """(input ids, labels) per row; labels are IGNORE outside the trained pieces. A plain
    response ends with the tokenizer's EOS; a templated conversation with what its
    template closes each turn with (already in its segments)."""
    out = []
    for number, row in enumerate(rows, start=1):
        end = [] if "segments" in row else [tokenizer.eos_token_id]
        pieces = segments_of(row, f"{where}:{number}")
        ids, labels = encode_segments(pieces, tokenizer, max_len, end, literals(row))
        out.append((compact(ids), compact(labels)))
    return out


def pack(examples: list[tuple[Sequence[int], Sequence[int]]], max_len: int):
    """Greedy packing into rows of at most ``max_len`` tokens, positions restarting per
    example. The collated batch carries these position ids and no attention mask, which
    transformers reads as packed sequences (``masking_utils.find_packed_sequence_indices``):
    SDPA and eager attention get a block-diagonal causal mask, flash-attention its
    variable-length kernel, so no example attends to another."""
    rows, ids, labels, positions = [], compact(()), compact(()), compact(())
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_len:
            rows.append((ids, labels, positions))
            ids, labels, positions = compact(()), compact(()), compact(())
        ids.extend(example_ids)
        # An example's first token has nothing of its own before it: in a row it would be
        # "predicted" from the previous example's last token (TRL's flattening collator
        # masks it the same way), so it is not trained on, as alone it could not be.
        labels.append(IGNORE)
        labels.extend(example_labels[1:])
        positions.extend(range(len(example_ids)))
    if ids:
        rows.append((ids, labels, positions))
    return rows


def collate(items, pad_id: int, flatten: bool = False) -> dict:
    """Right-padded rows; packed rows (with their positions) without an attention mask
    (see :func:`pack`; the padding after the last example is never attended to by a real
    token, being later in the row, and carries no labels). ``flatten``: packed rows as one
    row with no padding at all, which flash-attention runs as variable-length sequences,
    with the sequences' boundaries given (as TRL's padding-free collator,
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, gives them): from the
    position ids alone transformers would find them again in every layer, a host sync
    each time. ``logits_to_keep``: the positions :func:`token_losses` reads."""
    flat = flatten and len(items[0]) == 3
    if flat:
        items = [tuple([t for item in items for t in item[part]] for part in range(3))]
    batch: dict = {
        "input_ids": pad([i[0] for i in items], pad_id),
        "labels": pad([i[1] for i in items], IGNORE),
    }
    if len(items[0]) == 3:
        batch["position_ids"] = pad([i[2] for i in items], 0)
    else:
        batch["attention_mask"] = pad([[1] * len(i[0]) for i in items], 0)
    if flat:
        starts = [i for i, position in enumerate(items[0][2]) if position == 0]
        bounds = [*starts, len(items[0][2])]
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        batch["max_length_q"] = batch["max_length_k"] = longest  # a Python int, as flash takes
    batch["logits_to_keep"] = predicted_positions(batch["labels"] != IGNORE)
    return batch


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (its Python numbers stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy [batch, kept] at the batch's ``logits_to_keep`` (positions
    whose next token has a label in some row: :func:`collate`), and its label mask."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    kept = batch["logits_to_keep"]
    logits = logits_at(model, kept, **inputs).float()
    targets = batch["labels"][:, kept + 1]
    losses = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return losses.view_as(targets), targets != IGNORE


def trained_targets(items) -> int:
    """How many tokens of ``items`` (their labels) a next-token loss is taken on."""
    return sum(sum(1 for x in item[1][1:] if x != IGNORE) for item in items)


def step_share(amount: float, accumulation: int, device) -> torch.Tensor:
    """What each micro-batch's summed loss is divided by for the optimiser step's gradient
    to be the mean over the step's whole ``amount`` (answer tokens, or their weights) on
    every rank: DeepSpeed divides each micro-batch's loss by the accumulation steps and
    averages the gradients over ranks. TRL divides by ``num_items_in_batch`` counted the
    same way; a mean per micro-batch would weigh a short answer's tokens as much as a
    long answer's whole."""
    total = dist.all_reduce_sum(torch.tensor(float(amount), device=device))
    return total.clamp(min=1e-8) / (accumulation * dist.world_size())


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over response tokens, and how many there were (both on
    the model's device: reading them on the host would wait for the GPU every step)."""
    losses, mask = token_losses(model, batch)
    n_tokens = mask.sum()
    return losses.sum() / n_tokens.clamp(min=1), n_tokens
