import pytest
import torch

from trainer.capture import ChunkSource, HookedCapture, load_corpus, load_language_model


def test_capture_equals_a_direct_forward(tiny_llama):
    model, _ = load_language_model(tiny_llama)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    got = HookedCapture(model, "blocks.1.resid_post")(ids)  # [2, 24, 64]
    with torch.no_grad():
        # hidden_states[L + 1] is the residual stream after layer L (index 0 is the embedding).
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert got.shape == (2, 24, 64)
    torch.testing.assert_close(got, want)

    seen = {}
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    torch.testing.assert_close(HookedCapture(model, "blocks.0.mlp_out")(ids), seen["mlp"])


def test_chunk_source_drops_special_tokens_and_caches(tiny_config, tmp_path):
    cfg = tiny_config(
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.cache_dtype=float32",
        "data.max_documents=200",
        "data.outlier_norm_factor=null",
    )
    model, tok = load_language_model(cfg.model_path)
    corpus = load_corpus(cfg, tok)
    source = ChunkSource(cfg, corpus)
    chunk = corpus.plan.train[0]
    acts = source(chunk)  # [n_kept, d_model]
    tokens = corpus.chunk_tokens(chunk)
    keep = corpus.keep_mask(tokens, True)
    assert acts.shape == (int(keep.sum()), 64)
    assert int(keep.sum()) < tokens.numel()  # BOS and separators are dropped
    direct = HookedCapture(model, cfg.sae.hook_point)(tokens)[keep]
    torch.testing.assert_close(acts, direct)
    assert source.chunk_file(chunk).exists()
    torch.testing.assert_close(ChunkSource(cfg, load_corpus(cfg, tok))(chunk), acts)  # served from the cache


def test_inlier_mask_drops_attention_sink_norms():
    from trainer.capture import inlier_mask

    norms = torch.tensor([170.0, 180.0, 165.0, 20000.0, 175.0, 1500.0])
    assert inlier_mask(norms, 10.0).tolist() == [True, True, True, False, True, True]
    assert inlier_mask(norms, None).all()


@pytest.mark.fast
def test_bfloat16_capture_math_only_where_the_hardware_has_bf16_units():
    from trainer.capture import compute_dtype

    bf16_cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert compute_dtype("bfloat16", "cpu") == ("bfloat16" if bf16_cpu else "float32")
    assert compute_dtype("bfloat16", "cuda") == "bfloat16"
    assert compute_dtype("float32", "cpu") == "float32"
