"""Data handling shared by the training stages: JSONL rows, a resumable sampler, padding."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from jobs.data.readers import rows_from_file
from jobs.errors import BadInputError
from jobs.tokens import MessageText

IGNORE = -100  # label of tokens the loss skips (prompt, padding)


def read_jsonl(
    path: Path, required: tuple[str, ...], check: Callable[[dict, str], None] | None = None
) -> list[dict]:
    """Rows of a stage-written JSONL file, each checked for the fields the stage needs (text
    fields by name, others by ``check(row, where)``); a bad one named with its folder
    (``pairs/train.jsonl:3``: sft/, pairs/ and prompts/ all have a train.jsonl)."""
    rows = []
    for row in rows_from_file(path, "/".join(path.parts[-2:])):
        for name in required:
            if not isinstance(row.data.get(name), str):
                raise BadInputError(f"{row.where}: field {name!r} missing or not text")
        check_spans(row.data, row.where)
        if check is not None:
            check(row.data, row.where)
        rows.append(row.data)
    return rows


def row_text(row: dict) -> str | None:
    """The text a row's ``message_spans`` index: its conversation's segments, else its
    prompt (None where those are malformed: their own checks name the fault)."""
    segments = row.get("segments")
    if segments is None:
        return row.get("prompt") if isinstance(row.get("prompt"), str) else None
    if isinstance(segments, list) and all(
        isinstance(piece, dict) and isinstance(piece.get("text"), str) for piece in segments
    ):
        return "".join(piece["text"] for piece in segments)
    return None


def literals(row: dict) -> list[MessageText]:
    """Where a special token's text is text in a row's text (its segments', else its prompt
    and, for an SFT row, its answer): the messages' own texts, placed where the data stage
    found them (``message_spans``), else to be sought in order (a row written by hand or
    before the data stage placed them); an SFT row's answer right after its prompt."""
    answer = row.get("response") if "segments" not in row else None
    spans = row.get("message_spans")
    if spans is not None:  # checked against the text by read_jsonl
        text = row_text(row) or ""
        found: list[MessageText] = [(start, text[start:stop]) for start, stop in spans]
    else:
        found = list(contents(row))
        if isinstance(answer, str) and found and found[-1] == answer:
            found.pop()
    if isinstance(answer, str):
        found.append((len(row["prompt"]), answer))
    return found


def placement(row: dict) -> dict:
    """A row's question turns and where their texts lie in its prompt: carried from a
    prompts row to the rows made from it (candidates, labelled pairs), whose prompt is the
    same text, so that they read its special-token text as the data stage placed it."""
    return {key: row[key] for key in ("messages", "message_spans") if key in row}


def contents(row: dict) -> list[str]:
    """A row's messages' own texts, in order (an SFT row's answer last): what a template
    wraps, in which a special token's text is text; an SFT row without them, its answer."""
    turns = row.get("messages")
    if isinstance(turns, list) and all(isinstance(t, dict) for t in turns):
        return [t["content"] for t in turns if isinstance(t.get("content"), str)]
    return [row["response"]] if isinstance(row.get("response"), str) else []


def check_spans(row: dict, where: str) -> None:
    """A row's ``message_spans`` (written by the data stage: where the messages' own texts
    lie) are offsets into its text, in order: a wrong one would read the template's own
    tokens as text."""
    spans, text = row.get("message_spans"), row_text(row)
    if spans is None or text is None:
        return
    stop = 0
    for span in spans if isinstance(spans, list) else [spans]:
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(type(value) is int for value in span)
            and stop <= span[0] < span[1] <= len(text)
        ):
            name = "segments'" if "segments" in row else "prompt's"
            raise BadInputError(
                f"{where}: field 'message_spans' should list [start, stop] offsets into the "
                f"{name} {len(text)} characters, in order; {span!r} is not one"
            )
        stop = span[1]


class ShardedSampler:
    """Micro-batches of example indices: a seeded shuffle per epoch, this rank's share of it.

    Position is counted in micro-batches consumed, so a resumed run continues
    with exactly the batches the interrupted run would have seen next.
    """

    def __init__(
        self,
        n: int,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.per_epoch = (n // world) // micro_batch
        if self.per_epoch == 0:
            raise BadInputError(
                f"{n} examples cannot fill one micro-batch of {micro_batch} on each of {world} "
                "processes; lower micro_batch_size or add data"
            )

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def micro_batches(self, start: int = 0) -> Iterator[list[int]]:
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            mine = self._order(epoch)[self.rank :: self.world]
            for b in range(offset, self.per_epoch):
                yield mine[b * self.micro_batch : (b + 1) * self.micro_batch]
            epoch, offset = epoch + 1, 0


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of 0..n-1 (every example seen once across ranks)."""
    return list(range(rank, n, world))


def padded_shard(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's share of 0..n-1, padded to the same length on every rank, and which of
    its entries are real. Under ZeRO-3 every forward is a collective (parameters are
    gathered layer by layer), so every rank must run as many batches as the others; the
    padding repeats example 0 and is masked out of the metrics."""
    mine = shard(n, rank, world)
    length = -(-n // world)
    return mine + [0] * (length - len(mine)), [True] * len(mine) + [False] * (length - len(mine))


def compact(ids: Iterable[int]) -> array:
    """Token ids (or labels, positions) as a training stage holds a data set's examples
    until it runs: 4 bytes a token. A Python list takes 8 for its pointer and 28 more for
    each int above 256, 36 in all: a 100M-token SFT set would hold 3.6 GB on every rank
    of a node, 0.4 GB so."""
    return array("i", ids)


def pad(sequences: Iterable[Iterable[int]], value: int, left: bool = False) -> torch.Tensor:
    sequences = [list(s) for s in sequences]
    width = max(len(s) for s in sequences)
    rows = [
        ([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s)))
        for s in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)
