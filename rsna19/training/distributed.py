"""DistributedDataParallel under ``torchrun``: NCCL on GPUs, gloo on CPU.

A process started by ``torchrun --nproc_per_node N`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; without them training runs in one process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rsna19.engine.runtime import barrier, resolve_device

__all__ = ["DistInfo", "all_gather_object", "barrier", "broadcast_buffers", "init_distributed", "mean_across"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and logs."""
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers (no-op outside a process group).

    DDP broadcasts buffers at the start of each training forward, so after the last step every process holds
    BatchNorm statistics updated by its own last batch; evaluation must use one set (the one saved by rank 0).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src)


def mean_across(value: float) -> float:
    """Mean of a scalar over the processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
