"""The GPU-host code path (a Llama-3.1-style model folder, bf16, a Llama Scope SAE) on a tiny config with vLLM's
dummy weights: the engine must accept a foreign model folder and SAE format, steer and capture in bf16."""

from __future__ import annotations

import json
import shutil

import pytest
import pytest_asyncio
import torch
from safetensors.torch import save_file

from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.engine.model_files import embedded_model_dir
from serve.specs import CaptureSpec, SteeringEntry
from tests.helpers import make_random_sae

D_MODEL, N_LAYERS, D_SAE = 256, 4, 1024

# Llama-3.1-8B-Instruct's config.json, shrunk (same rope scaling type, GQA ratio and tied-ness).
TINY_LLAMA31 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": D_MODEL,
    "intermediate_size": 512,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _llama_scope_sae(folder, layer: int) -> None:
    """A Llama Scope folder (hyperparams.json + checkpoints/final.safetensors) as published for Llama-3.1-8B."""
    g = torch.Generator().manual_seed(0)
    dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_MODEL, generator=g), dim=-1)
    weights = {
        "encoder.weight": dec.clone(),  # [d_sae, d_in]
        # vLLM dummy weights keep activations near 1e-3, so a positive bias makes features fire.
        "encoder.bias": 0.1 * torch.rand(D_SAE, generator=g),
        "decoder.weight": dec.T.contiguous(),  # [d_in, d_sae]
        "decoder.bias": torch.zeros(D_MODEL),
    }
    params = {
        "d_model": D_MODEL,
        "d_sae": D_SAE,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.01,
        "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 4.0, "out": 4.0},
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
    }
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(params))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(folder / "checkpoints/final.safetensors"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tiny_engine(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama31")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA31))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, model / f)
    sae_dir = tmp_path_factory.mktemp("saes") / "l2r"
    _llama_scope_sae(sae_dir, layer=2)
    eng = await SAEEngine.start(
        EngineConfig(
            model=str(model),
            dtype="bfloat16",
            enforce_eager=True,
            load_dummy_weights=True,
            max_model_len=256,
            kv_cache_gib=0.25,
            saes={"l2r": str(sae_dir)},
        )
    )
    yield eng
    eng.shutdown()


async def _tokens(engine, steering=()):
    out: list[int] = []
    async for u in engine.generate("Hello there, how are", Sampling(max_tokens=6, temperature=0.0), list(steering)):
        for o in u.outputs:
            out += o.token_ids
    return out


async def test_foreign_model_and_sae_steer_and_capture_in_bf16(tiny_engine, tmp_path):
    (meta,) = tiny_engine.saes()
    assert (meta.hook_point, meta.d_in, meta.d_sae, meta.architecture) == (
        "blocks.2.resid_post",
        D_MODEL,
        D_SAE,
        "jumprelu",
    )
    assert (tiny_engine.d_model, tiny_engine.n_layers) == (D_MODEL, N_LAYERS)
    assert tiny_engine.steering_refused is None  # the probe at blocks.2.resid_post passed
    res = await tiny_engine.activations("Hello there, how are", CaptureSpec(saes=["l2r"], top_k=4))
    values = torch.tensor(res.per_sae["l2r"]["top_values"])
    assert values.shape == (len(res.token_ids), 4) and torch.isfinite(values).all() and (values > 0).any()
    plain = await _tokens(tiny_engine)
    assert await _tokens(tiny_engine, [SteeringEntry(sae="l2r", feature=0, value=0.0)]) == plain
    feature = res.per_sae["l2r"]["top_indices"][-1][0]
    steered = await _tokens(tiny_engine, [SteeringEntry(sae="l2r", feature=feature, value=500.0)])
    assert steered != plain
    make_random_sae(tmp_path / "embedded-width", "blocks.1.resid_post")  # d_in 576, not 256
    with pytest.raises(ValueError, match="d_in"):
        await tiny_engine.load_sae(tmp_path / "embedded-width", "wrong-width")
    assert [m.sae_id for m in tiny_engine.saes()] == ["l2r"]
