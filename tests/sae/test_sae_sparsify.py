"""sparsify folders written by sparsify itself load into SAEs that encode and decode like sparsify."""

import json
import os

import pytest
import torch

os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
sparsify = pytest.importorskip("sparsify")

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from sae import detect_format, load_sae  # noqa: E402

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)
D_IN = 8


def _coder(seed=0, **cfg):
    torch.manual_seed(seed)
    coder = SparseCoder(D_IN, SparseCoderConfig(**cfg))
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn_like(coder.encoder.bias) * 0.5)
        coder.b_dec.copy_(torch.randn_like(coder.b_dec))
        coder.W_dec.copy_(torch.randn_like(coder.W_dec))
    return coder


def _compare(coder, ours):
    torch.manual_seed(7)
    x = torch.randn(16, D_IN) * 2
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        dense = torch.zeros(16, ours.cfg.d_sae).scatter_(-1, top_indices, top_acts)
        torch.testing.assert_close(ours.encode(x), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(dense), coder.decode(top_acts, top_indices), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), coder(x).sae_out, atol=1e-5, rtol=1e-5)


def test_num_latents(tmp_path):
    coder = _coder(num_latents=20, k=4)
    coder.save_to_disk(tmp_path / "layers.5")
    assert detect_format(tmp_path / "layers.5") == "sparsify"
    ours = load_sae(tmp_path / "layers.5")
    cfg = ours.cfg
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k, cfg.b_dec_in_encoder) == ("topk", D_IN, 20, 4, True)
    assert cfg.hook_point == "blocks.5.resid_post" and cfg.model == ""
    _compare(coder, ours)


def test_expansion_factor_when_num_latents_is_zero(tmp_path):
    coder = _coder(seed=1, expansion_factor=3, num_latents=0, k=5)
    coder.save_to_disk(tmp_path / "run" / "layers.2.mlp")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert json.loads((tmp_path / "run" / "layers.2.mlp" / "cfg.json").read_text())["num_latents"] == 0
    ours = load_sae(tmp_path / "run" / "layers.2.mlp")
    assert ours.cfg.d_sae == 3 * D_IN and ours.cfg.hook_point == "blocks.2.mlp_out"
    assert ours.cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    _compare(coder, ours)


def test_unknown_folder_name_needs_override(tmp_path):
    _coder(num_latents=16, k=2).save_to_disk(tmp_path / "embed_tokens")
    assert load_sae(tmp_path / "embed_tokens").cfg.hook_point == ""
    assert load_sae(tmp_path / "embed_tokens", hook_point="blocks.0.attn_out").cfg.hook_point == "blocks.0.attn_out"


@pytest.mark.parametrize(("option", "message"), [("transcode", "transcoders"), ("skip_connection", "skip")])
def test_unsupported_variants(tmp_path, option, message):
    _coder(num_latents=16, k=2, **{option: True}).save_to_disk(tmp_path / "layers.0")
    with pytest.raises(ValueError, match=f"unsupported sparsify SAE: {message}"):
        load_sae(tmp_path / "layers.0")
