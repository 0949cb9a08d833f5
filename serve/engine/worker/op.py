"""The `torch.ops.sae_serve.hook` custom op: an opaque call inside the compiled graph into the SteeringRuntime.

Being a custom op (like vLLM's attention) keeps it out of Dynamo's trace while the rest of the layer stays
compiled. Its body is tensor work on the runtime's persistent buffers (`SteeringRuntime.apply`): in static mode
a fixed sequence of kernels, so that a CUDA graph captured around it replays correctly with new buffer contents.
"""

from __future__ import annotations

import torch
from torch.library import Library

from sae.hookpoints import SITES
from serve.engine.worker import runtime as steering_runtime

_RESID_POST = SITES.index("resid_post")
_lib: Library | None = None


def _hook(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    runtime = steering_runtime.ACTIVE
    if runtime is not None:
        runtime.apply(site, hidden, residual, site % len(SITES) == _RESID_POST)


def _hook_fake(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    return None


def register_op() -> None:
    """Define the op once per process (vLLM loads plugins in every process it starts)."""
    global _lib
    if _lib is not None or hasattr(torch.ops.sae_serve, "hook"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    _lib = Library("sae_serve", "FRAGMENT")
    direct_register_custom_op("hook", _hook, mutates_args=["hidden"], fake_impl=_hook_fake, target_lib=_lib)
