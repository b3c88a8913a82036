"""Every collective goes through jobs/dist.py, which hands each backend the tensors it takes;
evaluation shards are the same length on every rank."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import dist
from jobs.batches import padded_shard, shard
from jobs.errors import BadInputError
from tests.conftest import ROOT, two_ranks

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


# Two ranks: rank 0 is busy (as when it moves a checkpoint through the store) for longer
# than the tensors' collective timeout before each wait, while rank 1 waits for it.
WAITING = """
import os, pathlib, sys, time
import torch
from jobs import dist

if torch.cuda.is_available():  # the context made before the two meet
    torch.cuda.set_device(dist.local_rank())
# both ranks at the rendezvous within a moment: its store has the collective timeout too
here = pathlib.Path(sys.argv[2])
(here / f"ready-{dist.rank()}").touch()
while len(list(here.glob("ready-*"))) < 2:
    time.sleep(0.01)
dist.init()
for wait in sys.argv[3:]:
    if dist.rank() == 0:
        time.sleep(float(sys.argv[1]))
    try:
        if wait == "barrier":
            dist.barrier()
        elif wait == "broadcast_object":
            assert dist.broadcast_object({"step": dist.rank()}) == {"step": 0}
        elif wait == "any_rank":
            assert dist.any_rank(dist.rank() == 0) and not dist.any_rank(False)
        else:
            dist.all_reduce_sum(torch.ones(1, device=dist.device()))
    except Exception as exc:
        print(f"{wait}: gave up: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        os._exit(0)
    print(f"{wait}: done", flush=True)
os._exit(0)
"""


def two_ranks_waiting(
    waits: list[str], busy_s: float, collective_s: float, folder: Path
) -> list[str]:
    """What rank 1 printed, waiting ``busy_s`` for rank 0 at each of ``waits``, with the
    collective timeout ``collective_s`` (the wait timeout long)."""
    env = {
        "KUBERLHF_COLLECTIVE_TIMEOUT_S": str(collective_s),
        "KUBERLHF_WAIT_TIMEOUT_S": "120",
    }
    _, out, err = two_ranks(WAITING, [str(busy_s), str(folder), *waits], env)[1]
    return out.splitlines() or [err[-2000:]]


def test_ranks_wait_at_a_barrier_longer_than_a_collective_may_take(tmp_path):
    """The waits (barriers, object collectives, the stop flag's agreement) run on a host
    group with the long wait timeout: on NCCL, a barrier is a GPU collective whose watchdog
    kills every rank after the group's timeout (torch's default 10 minutes), which a rank
    moving a large checkpoint through the store outlasts; and the stop flag read back from
    the GPU would wait for the whole step queued before it, after every optimiser step. The
    tensors' collectives keep the collective timeout: the same wait in an all-reduce gives
    up (the control, showing the timeout is in force)."""
    waits = ["barrier", "broadcast_object", "any_rank", "all_reduce_sum"]
    waited = two_ranks_waiting(waits, busy_s=5, collective_s=2, folder=tmp_path)
    assert waited[:3] == ["barrier: done", "broadcast_object: done", "any_rank: done"], waited
    assert waited[3].startswith("all_reduce_sum: gave up:"), waited
    assert "timed out" in waited[3].lower(), waited[3]


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "1e300"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_a_bad_input(monkeypatch, value):
    monkeypatch.setenv("KUBERLHF_WAIT_TIMEOUT_S", value)
    with pytest.raises(BadInputError, match=f"KUBERLHF_WAIT_TIMEOUT_S='{value}': give a num"):
        dist.init()  # a stage's first step, in one process as in several
    with pytest.raises(BadInputError, match=f"KUBERLHF_WAIT_TIMEOUT_S='{value}': give a num"):
        dist.timeout(dist.WAIT_TIMEOUT)
    monkeypatch.setenv("KUBERLHF_WAIT_TIMEOUT_S", "90")
    assert dist.timeout(dist.WAIT_TIMEOUT).total_seconds() == 90
    monkeypatch.delenv("KUBERLHF_WAIT_TIMEOUT_S")
    assert dist.timeout(dist.WAIT_TIMEOUT).total_seconds() == dist.WAIT_TIMEOUT[1]


ONE_PROCESS = """
import sys
import torch
import torch.distributed as torch_dist
import jobs.contract
from jobs import engine
from jobs.__main__ import main
from jobs.errors import BadInputError


def start_an_engine():
    engine.init_distributed()  # what a stage's DeepSpeed engine starts with, in one process
    model = torch.nn.Linear(2, 2)
    engine.import_deepspeed().initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": 1},
    )


if sys.argv[1] == "before":  # as in a test that calls the entrypoint's main() in-process
    engine.init_distributed()


def stage(*args, **kwargs):
    start_an_engine()
    raise BadInputError("a bad row")  # one of the stage's own exits


jobs.contract.run_stage = stage
code = main(["sft", "--config", sys.argv[2]])
left = not torch_dist.is_initialized()
start_an_engine()  # again in this process, on the group now up
print(f"exit {code}, left {left}, an engine again")
"""


@pytest.mark.parametrize(("group", "left"), [("by the stage", True), ("before", False)])
def test_one_process_leaves_the_group_deepspeed_gave_its_stage(group, left, tmp_path):
    """A single-process stage's group (NCCL on a GPU) is left on its exits as a gang's is,
    not to interpreter finalisation, where torch warns and NCCL may block the exit; a
    group its caller was in before the stage began stays. Left through DeepSpeed, which
    forgets the groups it derived, so that an engine can start again in the process."""
    config = tmp_path / "sft.yaml"
    config.write_text(f"output: {tmp_path / 'sft'}\nmodel: no-model\ndata: no-data\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, group, str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip().splitlines()[-1:] == [f"exit 65, left {left}, an engine again"], (
        result.stdout[-2000:] + result.stderr[-2000:]
    )
