"""The process group, as every stage needs it, valid with or without torchrun.

Every collective a stage runs goes through this module: NCCL accepts only CUDA tensors and
gloo only CPU ones, so the tensor is moved to the device the group's backend takes and
back. A stage that called ``torch.distributed`` directly with a CPU tensor died at its
first evaluation on GPUs ("No backend type associated with device type cpu").
"""

from __future__ import annotations

import math
import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_node_main() -> bool:
    return local_rank() == 0


def device():
    """The device this process computes on: its GPU under torchrun, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# How long a collective may take before its ranks give up. For the tensors' group:
# DeepSpeed's and TRL's default (torch's own for NCCL is 10 minutes). For the waits: the
# ranks that wait at a barrier while one rank per node moves a model or a checkpoint through
# the store (a 13B model's checkpoint is some 200 GB) or rank 0 publishes the output.
COLLECTIVE_TIMEOUT = ("KUBERLHF_COLLECTIVE_TIMEOUT_S", 1800)
WAIT_TIMEOUT = ("KUBERLHF_WAIT_TIMEOUT_S", 4 * 3600)

# The group the waits and the object collectives run on: gloo, on the host, whatever the
# backend of the tensors' group. On NCCL a barrier is an all-reduce on the GPU that NCCL's
# watchdog aborts (SIGABRT, every rank) once it has waited longer than the group's timeout;
# a gloo barrier waits on the host as long as its own group allows, and a peer that died
# ends it at once (its connection closes).
_host_group = None  # None: the default group (one that DeepSpeed started itself)


def timeout(setting: tuple[str, int]):
    """The timeout ``setting`` names: its environment variable's seconds, else its default."""
    from datetime import timedelta

    from jobs.errors import BadInputError

    name, default = setting
    raw = os.environ.get(name, "").strip()
    if not raw:
        return timedelta(seconds=default)
    try:
        seconds = float(raw)
        if math.isfinite(seconds) and seconds > 0:
            return timedelta(seconds=seconds)
    except (ValueError, OverflowError):
        pass
    raise BadInputError(f"{name}={raw!r}: give a number of seconds above 0")


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs), with the
    collective timeout, and the host group for the waits."""
    global _host_group
    collective, wait = timeout(COLLECTIVE_TIMEOUT), timeout(WAIT_TIMEOUT)  # checked in any case
    if world_size() == 1:
        return
    import torch
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend, timeout=collective)
    if _host_group is None:  # every rank gets here at the same point: creating it is collective
        _host_group = torch_dist.new_group(backend="gloo", timeout=wait)


_had_group = False  # a group was up before this stage began (main() called in-process)


def begin() -> None:
    """Note, as a stage begins, whether this process is in a group already: :func:`shutdown`
    leaves only a group the stage joined. (DeepSpeed keeps the groups it derives from the
    default one: a caller whose group were destroyed under it could not start another
    engine, "Group ... is not registered".)"""
    global _had_group, _host_group
    _had_group = _initialized()
    if not _had_group:  # a host group kept from a caller's earlier group is gone with it
        _host_group = None


def _initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # no stage of this process started one
        return False
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized()


def shutdown() -> None:
    """Leave the process group before the interpreter ends. A gloo group left to
    interpreter finalisation may abort the process ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489), turning a stage's exit code into -6 and
    its 0, 65 or 75 into a bug for torchrun; NCCL warns and may block a peer. Called on the
    stage's own exits only (done, bad input, retry): after an unexpected error a rank may be
    inside a collective, where destroying the group can hang (torchtitan #1342). One
    process has a group too where DeepSpeed started (:func:`jobs.engine.init_distributed`
    gives it one of its own, NCCL on a GPU), left to finalisation just the same. A group
    that was up before the stage began (:func:`begin`) is its caller's, and stays."""
    global _host_group
    if _had_group or not _initialized():
        return
    # Every group, the host group with it; through DeepSpeed where it holds the default
    # group, so that it forgets the groups it derived from it too (an engine started later
    # in this process would otherwise take those: "Group ... is not registered").
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        import torch.distributed as torch_dist

        torch_dist.destroy_process_group()
    _host_group = None


_SAID: set[str] = set()


def say_once(line: str) -> None:
    """Print ``line`` from the main rank, the first time only: which path a stage takes,
    said once per process rather than at every step."""
    if line not in _SAID and is_main():
        _SAID.add(line)
        print(line, flush=True)


def _group():
    """torch.distributed when a group of more than one process is up, else None."""
    if world_size() == 1 or not _initialized():
        return None
    import torch.distributed as torch_dist

    return torch_dist


def _collective_device(torch_dist):
    import torch

    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank, on the host: as long as the wait timeout allows, since a rank
    may be moving a model or a checkpoint through the store meanwhile."""
    group = _group()
    if group is not None:
        group.barrier(group=_host_group)


def all_reduce_sum(tensor):
    """The sum of ``tensor`` over all ranks, on ``tensor``'s own device and dtype."""
    group = _group()
    if group is None:
        return tensor
    moved = tensor.detach().to(_collective_device(group), dtype=tensor.dtype, copy=True)
    group.all_reduce(moved)
    return moved.to(tensor.device)


def all_gather_cat(tensor):
    """Every rank's ``tensor`` (one shape on all), concatenated along dim 0 in rank order,
    on ``tensor``'s own device: statistics that must be the batch's, not a rank's."""
    group = _group()
    if group is None:
        return tensor
    import torch

    moved = tensor.detach().to(_collective_device(group), copy=True).contiguous()
    parts = [torch.empty_like(moved) for _ in range(world_size())]
    group.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a SIGTERM reaches ranks
    unevenly). Agreed on the host group: on NCCL the answer is read from the GPU once the
    kernels queued before the all-reduce have run, so the host would queue nothing while
    the GPU drains, after every optimiser step (where the stop flag is asked; the cost of
    the gap is not measured: no GPU yet). Its wait is the host group's (a rank that died
    ends it at once; one hung in an NCCL collective is aborted by the watchdog, which ends
    it too), as the barriers' is."""
    import torch

    group = _group()
    if group is None or _host_group is None:  # (no host group: a group DeepSpeed started)
        return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)
    flags = torch.tensor([1 if flag else 0])
    group.all_reduce(flags, group=_host_group)
    return bool(flags.item() > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    return not any_rank(not flag)


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (tensors inside are best on the CPU)."""
    group = _group()
    if group is None:
        return [obj]
    gathered: list = [None] * world_size()
    group.all_gather_object(gathered, obj, group=_host_group)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    group = _group()
    if group is None:
        return obj
    box = [obj]
    group.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]
