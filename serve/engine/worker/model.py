"""A vLLM Llama whose decoder layers call the SAE hook op at attn_out, mlp_out and resid_post.

Registered with vLLM under `SAELlamaForCausalLM` by `serve.engine.worker.plugin`; weights and layout are stock Llama.
Hook-point names are defined in `sae.hookpoints`; this is where they meet vLLM's modules.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from sae.hookpoints import SITES
from serve.engine.worker import runtime as steering_runtime
from serve.engine.worker.runtime import SteeringRuntime

_ATTN_OUT, _MLP_OUT, _RESID_POST = (SITES.index(s) for s in ("attn_out", "mlp_out", "resid_post"))


def _layer_index(prefix: str) -> int:
    return int(prefix.rsplit(".", 1)[-1])


class SAELlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with three hook sites; the op is opaque to torch.compile, so it runs at step time."""

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
    """Stock Llama plus a worker-side SteeringRuntime; the outer forward (not compiled) plans each step."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SAELlamaDecoderLayer)
        cfg = vllm_config.model_config.hf_config
        device = torch.device(vllm_config.device_config.device or "cpu")
        self.sae_runtime = SteeringRuntime(cfg.hidden_size, cfg.num_hidden_layers, device)
        steering_runtime.ACTIVE = self.sae_runtime

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self.sae_runtime.begin_step(positions, get_forward_context().attn_metadata is not None)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
