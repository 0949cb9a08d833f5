"""The steering delta (sparse: selected columns, TopK via thresholds and k+2m candidates) against a dense
definition: encode every latent, apply each op, decode the change."""

from __future__ import annotations

import pytest
import torch

from sae import load_sae
from sae.steering import LATENT_OPS, FoldedSAE, SteeringTable, SteerOp, steering_delta
from tests.helpers import make_random_sae

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

FEATURE_OPS = [SteerOp.ADD, *LATENT_OPS]  # the ops the reference steering_delta defines


def dense_delta(sae: FoldedSAE, t: SteeringTable, x: torch.Tensor) -> torch.Tensor:  # [n, d_in]
    pre = x @ sae.W_enc + sae.b_enc  # [n, d_sae]
    f = sae.activate(pre)
    bias = torch.zeros_like(pre)
    coef = torch.zeros(x.shape[0], len(t.features))
    for e, (feature, op, value) in enumerate(zip(t.features.tolist(), t.ops.tolist(), t.values.tolist())):
        on = t.mask[:, e]
        if op == SteerOp.H_BIAS:
            bias[:, feature] += on * value
            continue
        fe = f[:, feature]
        coef[:, e] = on * {SteerOp.ADD: value, SteerOp.CLAMP: value - fe, SteerOp.MUL: (value - 1.0) * fe}[op]
    return coef @ sae.W_dec[t.features] + (sae.activate(pre + bias) - f) @ sae.W_dec


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("ops", [[SteerOp.CLAMP], [SteerOp.MUL], [SteerOp.H_BIAS], FEATURE_OPS])
def test_sparse_delta_equals_the_dense_definition(tmp_path, architecture, ops):
    make_random_sae(tmp_path, "blocks.3.resid_post", architecture, d_in=64, d_sae=512, k=16, seed=3)
    sae = FoldedSAE.build(load_sae(tmp_path), torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    n, entries = 24, 40
    x = 3 * torch.randn(n, 64, generator=g)
    features = torch.randint(0, 512, (entries,), generator=g)
    features[:6] = features[6:12]  # the same feature in several entries, in the same rows too
    # Mostly active features, so that h_bias moves latents in and out of the TopK set.
    features[12:20] = (x @ sae.W_enc + sae.b_enc).argmax(dim=1)[:8]
    values = 6 * torch.randn(entries, generator=g)
    mask = (torch.rand(n, entries, generator=g) < 0.3).float()
    table = SteeringTable(features, torch.tensor([int(ops[e % len(ops)]) for e in range(entries)]), values, mask)
    expected = dense_delta(sae, table, x)
    assert expected.abs().max() > 1.0  # the case really steers
    torch.testing.assert_close(steering_delta(sae, table, x), expected, atol=1e-4, rtol=1e-4)


def test_nothing_steered_is_exactly_zero(tmp_path):
    make_random_sae(tmp_path, "blocks.3.resid_post", "topk", d_in=64, d_sae=512, k=16, seed=3)
    sae = FoldedSAE.build(load_sae(tmp_path), torch.device("cpu"))
    x = torch.randn(5, 64)
    table = SteeringTable(
        torch.tensor([1, 2]),
        torch.tensor([int(SteerOp.CLAMP), int(SteerOp.ADD)]),
        torch.tensor([3.0, 4.0]),
        torch.zeros(5, 2),
    )
    assert torch.equal(steering_delta(sae, table, x), torch.zeros(5, 64))


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_folded_sae_holds_its_weights_once_and_encodes_like_the_module(tmp_path, architecture):
    make_random_sae(tmp_path, "blocks.3.resid_post", architecture, d_in=64, d_sae=512, k=16, seed=5)
    module = load_sae(tmp_path)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    folded = FoldedSAE.build(module, torch.device("cpu"))
    assert folded.resident_bytes() <= weight_bytes
    x = torch.randn(7, 64)
    torch.testing.assert_close(folded.encode(x), module.encode(x), atol=1e-5, rtol=1e-5)
