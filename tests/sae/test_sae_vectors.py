"""Steering-vector math (`sae/vectors.py`) against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.vectors import contrast, decoder_cosine, mean_diff, pca, separation

pytestmark = pytest.mark.fast


def pairs(seed: int, n: int = 24, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=d)
    neg = rng.normal(size=(n, d))
    pos = neg + np.outer(2.0 + rng.normal(scale=0.3, size=n), axis) + rng.normal(scale=0.2, size=(n, d))
    return torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32), axis


def test_mean_diff_equals_numpy():
    pos, neg, _ = pairs(0)
    want = pos.numpy().astype(np.float64).mean(0) - neg.numpy().astype(np.float64).mean(0)
    np.testing.assert_allclose(mean_diff(pos, neg).numpy(), want, rtol=1e-5, atol=1e-5)


def test_pca_is_numpy_first_component_up_to_sign_and_points_positive():
    pos, neg, axis = pairs(1)
    diffs = (pos - neg).numpy().astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(np.cov(diffs, rowvar=False))
    want = eigvecs[:, np.argmax(eigvals)]
    got = pca(pos, neg).numpy()
    assert abs(abs(float(np.dot(got, want))) - 1.0) < 1e-4
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
    assert float(np.dot(got, diffs.mean(0))) > 0  # sign convention
    assert abs(float(np.dot(got, axis / np.linalg.norm(axis)))) > 0.9  # recovers the planted direction


def test_separation_gap_and_sign_accuracy():
    pos, neg, _ = pairs(2)
    v = mean_diff(pos, neg)
    s = separation(v, pos, neg)
    unit = v.numpy() / np.linalg.norm(v.numpy())
    gaps = (pos - neg).numpy() @ unit
    assert s.projection_gap == pytest.approx(float(gaps.mean()), rel=1e-5)
    assert s.accuracy == pytest.approx(float((gaps > 0).mean()))
    assert s.accuracy == 1.0 and s.pairs == 24
    assert separation(-v, pos, neg).accuracy == 0.0


def test_decoder_cosine_ranking_equals_direct_computation():
    rng = np.random.default_rng(3)
    w_dec = rng.normal(size=(64, 16))
    v = rng.normal(size=16)
    cos = (w_dec @ v) / (np.linalg.norm(w_dec, axis=1) * np.linalg.norm(v))
    idx, val = decoder_cosine(torch.tensor(v, dtype=torch.float32), torch.tensor(w_dec, dtype=torch.float32), 5)
    assert idx.tolist() == list(np.argsort(-cos)[:5])
    np.testing.assert_allclose(val.numpy(), np.sort(cos)[::-1][:5], rtol=1e-5)


def test_contrast_ranking_equals_direct_computation():
    rng = np.random.default_rng(4)
    a = np.maximum(rng.normal(size=(10, 32)), 0)
    b = np.maximum(rng.normal(size=(12, 32)), 0)
    a[:, 7] += 3.0  # a feature that separates the sets
    got = contrast(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), 4)
    diff = a.mean(0) - b.mean(0)
    pooled = np.sqrt(((10 - 1) * a.var(0, ddof=1) + (12 - 1) * b.var(0, ddof=1)) / 20)
    d = diff / pooled
    order = np.argsort(-np.abs(d), kind="stable")[:4]
    assert got.features.tolist() == list(order) and got.features[0] == 7
    np.testing.assert_allclose(got.effect_size.numpy(), d[order], rtol=1e-4)
    np.testing.assert_allclose(got.mean_diff.numpy(), diff[order], rtol=1e-4, atol=1e-6)
    freq = (a > 0).mean(0) - (b > 0).mean(0)
    np.testing.assert_allclose(got.frequency_diff.numpy(), freq[order], atol=1e-6)
