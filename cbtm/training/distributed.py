"""The process layout of a training job: torch.distributed world, device, CPU threads."""

from __future__ import annotations

import contextlib
import os

import torch

from ..models import parse_device


def process_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def barrier() -> None:
    if process_world()[0] > 1:
        torch.distributed.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


@contextlib.contextmanager
def num_threads(n: int | None):
    """Set torch's intra-op threads for the block (restored after)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
