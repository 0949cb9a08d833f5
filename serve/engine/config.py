"""Typed configuration of the SAE engine (one vLLM AsyncLLM plus the SAE worker extension)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Everything needed to start one engine; part of the service config."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="embedded", description="'embedded' (SmolLM2-135M-Instruct) or a local Llama folder.")
    dtype: str = Field(
        default="float32", description="Model dtype; keep float32 on CPU (compiled bf16 gave nonsense there)."
    )
    enforce_eager: bool = Field(default=False, description="Skip torch.compile (faster start, slightly slower steps).")
    max_model_len: int = Field(default=2048, ge=16, description="Longest prompt + completion in tokens.")
    max_num_seqs: int = Field(default=64, ge=1, description="Most requests in one continuous batch.")
    max_num_batched_tokens: int | None = Field(
        default=None, description="Token budget per step (vLLM default if unset)."
    )
    kv_cache_gib: float = Field(default=2.0, gt=0, description="KV cache size in GiB.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="Engine workers splitting each layer (TP).")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Engine workers splitting the layers (PP).")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None,
        description="How vLLM runs TP x PP workers: 'mp' local processes (one node), 'ray' actors in the model "
        "replica's placement group (several nodes); None: vLLM's choice.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Fraction of each GPU vLLM may use (leave room for SAE weights)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Share KV of equal prefixes (steering is salted).")
    load_dummy_weights: bool = Field(default=False, description="Random weights (tests of large configs).")
    saes: dict[str, str] = Field(default_factory=dict, description="SAE id -> folder loaded at start.")
    max_steering_entries: int = Field(default=32, ge=0, description="Most steering entries in one request.")
    max_abs_steering_value: float = Field(default=1000.0, gt=0, description="Bound on |value| of a steering entry.")
    seed: int = Field(default=0, description="Engine seed.")
    aot_compile: bool = Field(
        default=True,
        description="Save the compiled model to vLLM's AOT compile cache and load it at the next start of the same "
        "model and config (skips Dynamo's trace and Inductor's compile).",
    )
    static_steering: bool | None = Field(
        default=None,
        description="Steering and capture as fixed-shape work at every hook site in every step, as captured CUDA "
        "graphs need; None: on exactly when vLLM captures CUDA graphs (True on CPU runs the graph path eagerly).",
    )
    steering_slots: int = Field(
        default=128,
        ge=1,
        description="Steering entries one hook site holds in one step, summed over the batch; an entry left out of a "
        "step is reported over_capacity.",
    )
    condition_slots: int = Field(
        default=32,
        ge=1,
        description="Distinct steering conditions (`when`) one step evaluates, over the batch; an entry whose "
        "conditions find no room in a step is reported over_capacity.",
    )
    capture_sites: int = Field(
        default=8, ge=1, description="Hook points one step can capture at, over the batch (a tap buffer each)."
    )
    sae_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="Dtype SAE weights are held in (products accumulate in float32); None: the model's dtype on CUDA, "
        "float32 on CPU.",
    )
    sae_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Device memory for SAE weights per worker, beside the explicitly sized KV cache; beyond it the "
        "least recently used SAEs wait in host memory and are paged in on demand. None: all resident.",
    )
    residency_wait_s: float = Field(
        default=30.0, ge=0, description="How long a request waits for its SAEs to be paged in before a 503."
    )
    probe_steering: bool = Field(
        default=True, description="At each new hook point, prove that steering changes decode steps, else refuse it."
    )
