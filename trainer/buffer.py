"""Shuffled activation batches for one rank: chunks in, mixed batches out, resumable by chunk position."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data import ChunkPlan


class ActivationStream:
    """Endless batches [batch_size, d] drawn from a shuffle buffer that this rank's chunk schedule refills.

    `position` counts chunks pulled since the start of training (epochs continue the count). Resuming at a
    position restarts with an empty buffer, so the activations buffered at checkpoint time are skipped rather
    than replayed: cheap, and harmless for SAE training.
    """

    def __init__(
        self,
        source: Callable[[int], torch.Tensor],
        plan: ChunkPlan,
        *,
        d: int,
        batch_size: int,
        capacity: int,
        rank: int,
        world: int,
        seed: int,
        position: int = 0,
    ):
        if capacity < 2 * batch_size:
            raise ValueError(f"shuffle buffer ({capacity}) must hold at least two batches ({batch_size})")
        self.source = source
        self.plan = plan
        self.batch_size = batch_size
        self.capacity = capacity
        self.rank, self.world, self.seed = rank, world, seed
        self.position = position
        self._per_epoch = len(plan.rank_schedule(0, rank, world, seed))
        self._schedule: tuple[int, list[int]] | None = None
        self._buf = torch.empty(0, d)  # [rows, d]; grown on demand
        self._n = 0  # valid rows in _buf
        self._ready = 0  # shuffled rows at the end of _buf that may be emitted
        self._gen = torch.Generator().manual_seed(seed * 7919 + rank * 104_729 + position)

    def _next_chunk(self) -> torch.Tensor:
        epoch, index = divmod(self.position, self._per_epoch)
        if self._schedule is None or self._schedule[0] != epoch:
            self._schedule = (epoch, self.plan.rank_schedule(epoch, self.rank, self.world, self.seed))
        self.position += 1
        return self.source(self._schedule[1][index])

    def _append(self, acts: torch.Tensor) -> None:
        need = self._n + acts.shape[0]
        if need > self._buf.shape[0]:
            grown = torch.empty(max(need, self.capacity + acts.shape[0]), self._buf.shape[1])
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = acts
        self._n = need

    def fill(self) -> torch.Tensor:
        """Fill to capacity and shuffle; returns a view of the buffered rows [n, d] (for initial statistics)."""
        while self._n < self.capacity:
            self._append(self._next_chunk())
        perm = torch.randperm(self._n, generator=self._gen)
        self._buf[: self._n] = self._buf[perm]
        # Emit only the top half before refilling, so every batch mixes old and new chunks.
        self._ready = self._n - self.capacity // 2
        return self._buf[: self._n]

    def next_batch(self) -> torch.Tensor:
        """The next batch [batch_size, d] float32."""
        while self._ready < self.batch_size:
            self.fill()
        start = self._n - self.batch_size
        batch = self._buf[start : self._n].clone()
        self._n = start
        self._ready -= self.batch_size
        return batch
