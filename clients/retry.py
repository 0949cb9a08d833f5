"""When to retry a call and how long to wait: exponential backoff with full jitter, honouring Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of refused calls (overload, restarting engine); never of calls that got an answer."""

    max_attempts: int = 4
    """Attempts in all, the first included (1 disables retries)."""
    backoff_base_s: float = 0.5
    """Upper bound of the first wait; doubles after each attempt."""
    backoff_max_s: float = 8.0
    """Cap on any single wait, Retry-After included."""
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    """HTTP statuses worth another attempt."""
    retry_connect_errors: bool = True
    """Retry when the connection could not be made (nothing was sent, so a POST is safe to repeat)."""

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def retries(self, attempt: int, status: int | None) -> bool:
        """Whether attempt number `attempt` (1-based) that ended with `status` (None: no connection) is retried."""
        if attempt >= self.max_attempts:
            return False
        return self.retry_connect_errors if status is None else status in self.retry_statuses

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after attempt `attempt`: the server's Retry-After if it gave one (plus up to 10% jitter so
        that refused clients do not return in lockstep), else a uniform draw below base * 2^(attempt-1)."""
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after * (1.0 + 0.1 * random.random()))
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))
