"""Every collective goes through jobs/dist.py, which hands each backend the tensors it takes;
evaluation shards are the same length on every rank."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from jobs import dist
from jobs.batches import padded_shard, shard

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# (gather and scatter are tensor methods too; the import check catches torch.distributed's)
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "init_process_group",
}


def distributed_uses(path: Path) -> list[str]:
    """Where a module imports torch.distributed (the collectives' module; its launcher
    submodules, torchrun's, are not collectives) or calls a collective on any object."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found.append(f"{path.name}:{node.lineno} from {node.module} import")
        if isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno} import {a.name}"
                for a in node.names
                if a.name == "torch.distributed"
            ]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in COLLECTIVES
            and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "dist")
        ):
            found.append(f"{path.name}:{node.lineno} .{node.func.attr}(")
    return found


def test_every_collective_in_the_stages_goes_through_jobs_dist():
    modules = [p for p in JOBS.rglob("*.py") if p.name != "dist.py"]
    assert len(modules) > 10
    offenders = [use for path in modules for use in distributed_uses(path)]
    assert offenders == [], "call the helpers in jobs/dist.py instead: " + ", ".join(offenders)


def test_the_scan_sees_a_direct_collective(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text(
        "import torch.distributed as torch_dist\n\ndef f(t):\n    torch_dist.all_reduce(t)\n"
    )
    assert len(distributed_uses(module)) == 2


@pytest.mark.parametrize(("n", "world"), [(17, 2), (5, 4), (3, 8), (16, 4)])
def test_padded_shards_are_equally_long_and_cover_every_example_once(n, world):
    shards = [padded_shard(n, rank, world) for rank in range(world)]
    assert len({len(indices) for indices, _ in shards}) == 1
    assert all(len(indices) == len(real) for indices, real in shards)
    real = sorted(i for indices, flags in shards for i, r in zip(indices, flags, strict=True) if r)
    assert real == list(range(n))
    assert [i for i, _ in zip(shards[0][0], range(len(shard(n, 0, world))), strict=False)] == (
        shard(n, 0, world)
    )


def test_without_a_process_group_the_helpers_are_the_identity():
    value = torch.tensor([1.5, 2.0])
    assert dist.all_reduce_sum(value) is value
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.all_ranks(True) and not dist.all_ranks(False)
