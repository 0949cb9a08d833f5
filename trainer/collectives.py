"""The few collectives the training loop needs; each is a no-op without an initialised multi-rank process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .stats import RunningStats


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max, min or mean); returns t."""
    if not _active():
        return t
    if op == "mean":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    else:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_int(value: int) -> list[int]:
    """Every rank's value, in rank order."""
    if not _active():
        return [value]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64))
    return [int(t) for t in out]


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from src; returns t."""
    if _active():
        dist.broadcast(t, src=src)
    return t


def merge_stats(local: RunningStats) -> RunningStats:
    """Every rank's statistics merged (Chan), identical on all ranks."""
    if not _active():
        return local
    packed = local.to_tensor()
    gathered = [torch.zeros_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    merged = RunningStats(local.d)
    for part in gathered:
        merged.merge(RunningStats.from_tensor(part))
    return merged
