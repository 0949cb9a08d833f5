"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, driver and engine core."""

from __future__ import annotations

MODEL_ARCH = "SAELlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from serve.engine.worker.lifetime import install
    from serve.engine.worker.op import register_op

    install()  # vLLM's engine core outlives a crashed owner otherwise (see lifetime.py)
    register_op()
    if MODEL_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCH, "serve.engine.worker.model:SAELlamaForCausalLM")
