"""Architecture registry: name -> activation function `(pre [..., d_sae], sae) -> acts [..., d_sae]`.

An architecture only decides how pre-activations become activations; the affine encoder/decoder
around it is shared. `register_architecture` adds one; `needs_threshold` says whether it owns a
per-latent `threshold [d_sae]` parameter and `needs_k` whether `cfg.k` must be set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

ActivationFn = Callable[[torch.Tensor, Any], torch.Tensor]  # (pre, an SAE with .cfg and .threshold) -> acts


class UnknownArchitectureError(ValueError, KeyError):
    """An architecture name that is not registered (a ValueError; a KeyError too, so `Mapping` idioms work)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ArchitectureRegistry(Mapping[str, ActivationFn]):
    """Read-only mapping of registered architectures; unknown names raise a ValueError listing the known ones."""

    def __init__(self) -> None:
        self._fns: dict[str, ActivationFn] = {}
        self._threshold: set[str] = set()
        self._k: set[str] = set()

    def __getitem__(self, name: str) -> ActivationFn:
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise UnknownArchitectureError(
                f"unknown SAE architecture {name!r}; known: {', '.join(sorted(self._fns))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def register(self, name: str, fn: ActivationFn, *, threshold: bool, k: bool) -> None:
        if name in self._fns:
            raise ValueError(f"SAE architecture {name!r} is already registered")
        self._fns[name] = fn
        if threshold:
            self._threshold.add(name)
        if k:
            self._k.add(name)


ARCHITECTURES = ArchitectureRegistry()


def register_architecture(
    name: str, *, threshold: bool = False, k: bool = False
) -> Callable[[ActivationFn], ActivationFn]:
    """Decorator: register `fn(pre, sae) -> acts` under `name`."""

    def decorate(fn: ActivationFn) -> ActivationFn:
        ARCHITECTURES.register(name, fn, threshold=threshold, k=k)
        return fn

    return decorate


def get_architecture(name: str) -> ActivationFn:
    return ARCHITECTURES[name]


def needs_threshold(name: str) -> bool:
    get_architecture(name)
    return name in ARCHITECTURES._threshold


def needs_k(name: str) -> bool:
    get_architecture(name)
    return name in ARCHITECTURES._k


@register_architecture("relu")
def _relu(pre: torch.Tensor, sae: Any) -> torch.Tensor:
    return torch.relu(pre)


@register_architecture("topk", k=True)
def _topk(pre: torch.Tensor, sae: Any) -> torch.Tensor:
    # Top k of relu(pre): rows with fewer than k positive pre-activations keep only those.
    acts = torch.relu(pre)
    values, indices = acts.topk(sae.cfg.k, dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter_(-1, indices, values)


def _jump(pre: torch.Tensor, sae: Any) -> torch.Tensor:
    return pre * (pre > sae.threshold).to(pre.dtype)


# BatchTopK selects across the batch only while training; its learned cut-off turns it into a
# per-latent threshold at inference, so serving never depends on what else is in the batch.
register_architecture("jumprelu", threshold=True)(_jump)
register_architecture("batchtopk", threshold=True)(_jump)
