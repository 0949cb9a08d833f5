"""Running activation statistics (Welford / Chan), mergeable across batches and ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RunningStats:
    """Per-dimension mean and variance plus mean activation norm, accumulated in float64."""

    d: int
    """Activation width."""
    count: int = 0
    """Activations seen."""
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """Per-dimension running mean [d]."""
    m2: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """Per-dimension sum of squared deviations from the mean [d]."""
    norm_mean: float = 0.0
    """Running mean of ||x||."""
    norm_m2: float = 0.0
    """Sum of squared deviations of ||x|| from its mean."""

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = torch.zeros(self.d, dtype=torch.float64)
        if self.m2 is None:
            self.m2 = torch.zeros(self.d, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch x [N, d]; batch-wise Chan merge keeps it exact and vectorised."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64)
        norms = x.norm(dim=-1)  # [N]
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        norm_mean = float(norms.mean())
        norm_m2 = float(((norms - norm_mean) ** 2).sum())
        self._merge(n, batch_mean, batch_m2, norm_mean, norm_m2)

    def merge(self, other: RunningStats) -> None:
        """Fold in statistics gathered elsewhere (another rank or shard)."""
        if other.count:
            self._merge(other.count, other.mean, other.m2, other.norm_mean, other.norm_m2)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor, norm_mean: float, norm_m2: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        norm_delta = norm_mean - self.norm_mean
        self.norm_mean += norm_delta * n / total
        self.norm_m2 += norm_m2 + norm_delta**2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        """Unbiased per-dimension variance [d], as torch.var."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def total_variance(self) -> float:
        """Sum of per-dimension (population) variances: the FVU denominator per activation."""
        return float(self.m2.sum()) / max(self.count, 1)

    @property
    def norm_std(self) -> float:
        """Unbiased standard deviation of ||x||."""
        return math.sqrt(self.norm_m2 / max(self.count - 1, 1))

    def input_scale(self) -> float:
        """Scale that makes E[||x||] = sqrt(d) (SAELens' expected-average-norm normalisation)."""
        return math.sqrt(self.d) / self.norm_mean if self.norm_mean > 0 else 1.0

    def to_tensor(self) -> torch.Tensor:
        """Pack into one float64 vector [2d + 3] for collectives."""
        head = torch.tensor([self.count, self.norm_mean, self.norm_m2], dtype=torch.float64)
        return torch.cat([head, self.mean, self.m2])

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> RunningStats:
        """Inverse of to_tensor."""
        d = (packed.numel() - 3) // 2
        return cls(
            d=d,
            count=int(packed[0]),
            norm_mean=float(packed[1]),
            norm_m2=float(packed[2]),
            mean=packed[3 : 3 + d].clone(),
            m2=packed[3 + d :].clone(),
        )

    def summary(self) -> dict[str, float]:
        """JSON-friendly scalars for the card."""
        return {
            "count": self.count,
            "norm_mean": self.norm_mean,
            "norm_std": self.norm_std,
            "total_variance": self.total_variance,
            "mean_norm": float(self.mean.norm()),
        }
