"""Data handling shared by the training stages: JSONL rows, a resumable sampler, padding."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from jobs.data.readers import rows_from_file
from jobs.errors import BadInputError

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
        if check is not None:
            check(row.data, row.where)
        rows.append(row.data)
    return rows


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
