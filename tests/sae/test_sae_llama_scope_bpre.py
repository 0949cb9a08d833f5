"""Llama Scope and b_pre TopK folders, written here in their layouts, against their own formulas."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sae import detect_format, load_sae

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)
D, N = 8, 20  # d_model, d_sae


def _x(seed=5):
    torch.manual_seed(seed)
    return torch.randn(16, D) * 3


# ---------------------------------------------------------------- Llama Scope


def _llama_scope(folder, *, hp=None, weights_at="checkpoints/final.safetensors", seed=0, extra=None):
    torch.manual_seed(seed)
    w = {
        "encoder.weight": torch.randn(N, D),  # nn.Linear [d_sae, d_in]
        "encoder.bias": torch.randn(N) * 0.5,
        "decoder.weight": torch.randn(D, N) * torch.rand(N) * 2,  # [d_in, d_sae], uneven column norms
        "decoder.bias": torch.randn(D),
        **(extra or {}),
    }
    params = {
        "d_model": D,
        "d_sae": N,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.8,
        "top_k": 5,
        "hook_point_in": "blocks.9.hook_resid_post",
        "hook_point_out": "blocks.9.hook_resid_post",
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 6.5, "out": 6.5},
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        **(hp or {}),
    }
    folder.mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(params))
    (folder / weights_at).parent.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / weights_at))
    return params, w


def _lm_saes_reference(params, w, x):
    """lm_saes SparseAutoEncoder.encode/decode for a dataset-wise-normalised SAE."""
    s = math.sqrt(params["d_model"]) / params["dataset_average_activation_norm"]["in"]
    xn = x * s
    if params.get("apply_decoder_bias_to_pre_encoder"):
        xn = xn - w["decoder.bias"]
    hidden_pre = xn @ w["encoder.weight"].T + w["encoder.bias"]
    if params.get("sparsity_include_decoder_norm", True):
        scores = hidden_pre * w["decoder.weight"].norm(dim=0)
    else:
        scores = hidden_pre
    theta = w["log_jumprelu_threshold"].exp() if "log_jumprelu_threshold" in w else params["jump_relu_threshold"]
    acts = hidden_pre * (scores > theta)
    return acts, (acts @ w["decoder.weight"].T + w["decoder.bias"]) / s


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"sparsity_include_decoder_norm": False},
        {"apply_decoder_bias_to_pre_encoder": True},
    ],
)
def test_llama_scope_matches_lm_saes(tmp_path, hp):
    params, w = _llama_scope(tmp_path / "L9R", hp=hp)
    assert detect_format(tmp_path / "L9R") == "llama_scope"
    ours = load_sae(tmp_path / "L9R")
    cfg = ours.cfg
    assert (cfg.architecture, cfg.hook_point, cfg.d_in, cfg.d_sae) == ("jumprelu", "blocks.9.resid_post", D, N)
    assert cfg.input_scale == pytest.approx(math.sqrt(D) / 6.5)
    assert cfg.b_dec_in_encoder is bool(hp.get("apply_decoder_bias_to_pre_encoder", False))
    x = _x()
    ref_acts, ref_out = _lm_saes_reference(params, w, x)
    assert (ref_acts != 0).any() and (ref_acts == 0).any()
    torch.testing.assert_close(ours.encode(x), ref_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), ref_out, atol=1e-5, rtol=1e-5)


def test_llama_scope_log_threshold_and_loose_weights_file(tmp_path):
    torch.manual_seed(3)
    extra = {"log_jumprelu_threshold": torch.randn(N) * 0.3 - 0.5}
    params, w = _llama_scope(
        tmp_path / "s",
        weights_at="sae_weights.safetensors",
        extra=extra,
        hp={"hook_point_in": "blocks.2.hook_attn_out", "hook_point_out": "blocks.2.hook_attn_out"},
    )
    ours = load_sae(tmp_path / "s")
    assert ours.cfg.hook_point == "blocks.2.attn_out"
    ref_acts, ref_out = _lm_saes_reference(params, w, _x())
    torch.testing.assert_close(ours.encode(_x()), ref_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(_x()), ref_out, atol=1e-5, rtol=1e-5)


def test_llama_scope_bf16_file(tmp_path):
    _llama_scope(tmp_path / "s")
    from safetensors.torch import load_file

    sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(tmp_path / "s/checkpoints/final.safetensors")).items()}
    save_file(sd, str(tmp_path / "s/checkpoints/final.safetensors"))
    ours = load_sae(tmp_path / "s")
    assert ours.cfg.dtype == "bfloat16" and ours.threshold.dtype == torch.bfloat16
    assert load_sae(tmp_path / "s", dtype=torch.float32).W_dec.dtype == torch.float32


def test_llama_scope_inference_norm_and_no_decoder_bias(tmp_path):
    _llama_scope(tmp_path / "s", hp={"norm_activation": "inference", "use_decoder_bias": False})
    ours = load_sae(tmp_path / "s")
    assert ours.cfg.input_scale == 1.0 and torch.equal(ours.b_dec, torch.zeros(D))


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        ({"hook_point_out": "blocks.9.hook_mlp_out"}, "transcoders"),
        ({"norm_activation": "token-wise"}, "norm_activation"),
        ({"dataset_average_activation_norm": {"in": 6.5, "out": 3.0}}, "different input and output norms"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"act_fn": "topk"}, "act_fn"),
    ],
)
def test_llama_scope_unsupported(tmp_path, hp, message):
    _llama_scope(tmp_path / "s", hp=hp)
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path / "s")


# ---------------------------------------------------------------- b_pre TopK


def _b_pre(folder, *, config=None, config_name="config.json", seed=0, layout="linear", extra=None):
    torch.manual_seed(seed)
    enc = torch.randn(N, D)  # [d_sae, d_in]
    dec = torch.randn(D, N)  # [d_in, d_sae]
    ref = {"b_pre": torch.randn(D), "enc": enc, "b_enc": torch.randn(N) * 0.5, "dec": dec}
    if layout == "linear":
        w = {"b_pre": ref["b_pre"], "encoder.weight": enc, "b_enc": ref["b_enc"], "decoder.weight": dec}
    else:  # matrices stored the other way round, bias split over latent_bias + an nn.Linear encoder bias
        w = {
            "pre_bias": ref["b_pre"],
            "W_enc": enc.T.contiguous(),
            "latent_bias": ref["b_enc"] - 0.25,
            "encoder.bias": torch.full((N,), 0.25),
            "W_dec": dec.T.contiguous(),
        }
    w.update(extra or {})
    folder.mkdir(parents=True)
    save_file(w, str(folder / "model.safetensors"))
    (folder / config_name).write_text(json.dumps({"d_model": D, "n_latents": N, "k": 4, **(config or {})}))
    return ref


def _openai_reference(ref, x, k=4):
    pre = (x - ref["b_pre"]) @ ref["enc"].T + ref["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    h = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return h, h @ ref["dec"].T + ref["b_pre"]


@pytest.mark.parametrize("layout", ["linear", "matrices"])
def test_b_pre_matches_formula(tmp_path, layout):
    ref = _b_pre(
        tmp_path / "s",
        layout=layout,
        config={"hook_point": "blocks.23.hook_resid_post", "model": "meta-llama/Llama-3.2-3B"},
    )
    assert detect_format(tmp_path / "s") == "b_pre"
    ours = load_sae(tmp_path / "s")
    cfg = ours.cfg
    assert (cfg.architecture, cfg.k, cfg.b_dec_in_encoder) == ("topk", 4, True)
    assert (cfg.hook_point, cfg.model) == ("blocks.23.resid_post", "meta-llama/Llama-3.2-3B")
    assert torch.equal(ours.b_dec, ref["b_pre"])
    h, out = _openai_reference(ref, _x())
    torch.testing.assert_close(ours.encode(_x()), h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(_x()), out, atol=1e-5, rtol=1e-5)


def test_b_pre_any_single_json_and_zero_h_bias(tmp_path):
    ref = _b_pre(tmp_path / "s", config_name="sae_hparams.json", extra={"h_bias": torch.zeros(N)})
    ours = load_sae(tmp_path / "s", hook_point="blocks.3.resid_post")
    assert ours.cfg.hook_point == "blocks.3.resid_post"
    torch.testing.assert_close(ours.encode(_x()), _openai_reference(ref, _x())[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"extra": {"h_bias": torch.ones(N)}}, "h_bias"),
        ({"extra": {"decoder.bias": torch.ones(D)}}, "decoder.bias"),
        ({"config": {"n_latents": N + 1}}, "n_latents=21 but the weights have 20"),
        ({"config": {"normalize": True}}, "normalisation"),
        ({"extra": {"W_enc": torch.zeros(N, D)}}, "exactly one of 'encoder.weight', 'W_enc'"),
    ],
)
def test_b_pre_rejects(tmp_path, kw, message):
    _b_pre(tmp_path / "s", **kw)
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path / "s")
