"""The few facts about the process group that every stage needs, valid with or without torchrun."""

from __future__ import annotations

import os


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


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend=backend)


def barrier() -> None:
    if world_size() == 1:
        return
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a SIGTERM reaches ranks unevenly)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        return flag
    device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
