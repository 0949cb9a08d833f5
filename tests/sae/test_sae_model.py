"""SparseAutoencoder forward pass per architecture against hand-computed values."""

import pytest
import torch

import sae
from sae import SAEConfig, SparseAutoencoder

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)

W_ENC = [[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]  # [d_in=2, d_sae=3]
B_ENC = [0.5, -1.0, 0.0]
W_DEC = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # [d_sae=3, d_in=2]
B_DEC = [0.1, -0.2]
X = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])  # [2, d_in]


def tiny(architecture="relu", **kw) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=2,
        d_sae=3,
        architecture=architecture,
        hook_point="blocks.0.resid_post",
        b_dec_in_encoder=kw.pop("b_dec_in_encoder", False),
        **kw,
    )
    m = SparseAutoencoder(cfg)
    with torch.no_grad():
        m.W_enc.copy_(torch.tensor(W_ENC))
        m.b_enc.copy_(torch.tensor(B_ENC))
        m.W_dec.copy_(torch.tensor(W_DEC))
        m.b_dec.copy_(torch.tensor(B_DEC))
    return m


def t(rows):
    return torch.tensor(rows)


def test_relu_encode_decode():
    m = tiny("relu")
    torch.testing.assert_close(m.pre_acts(X), t([[1.5, 3.0, 1.0], [-0.5, -1.0, 1.0]]))
    torch.testing.assert_close(m.encode(X), t([[1.5, 3.0, 1.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(m.decode(m.encode(X)), t([[2.6, 3.8], [1.1, 0.8]]))
    torch.testing.assert_close(m(X), m.decode(m.encode(X)))


def test_b_dec_subtracted_before_encoding():
    m = tiny("relu", b_dec_in_encoder=True)
    torch.testing.assert_close(m.pre_acts(X[:1]), t([[1.4, 3.4, 1.3]]))


def test_input_scale_applies_in_and_out():
    m = tiny("relu", input_scale=2.0)
    torch.testing.assert_close(m.pre_acts(X[:1]), t([[2.5, 7.0, 2.0]]))
    f = t([[1.0, 0.0, 2.0]])
    torch.testing.assert_close(m.decode(f), (t([[3.0, 2.0]]) + t([B_DEC])) / 2.0)


def test_topk_keeps_k_largest_of_relu():
    m = tiny("topk", k=2)
    torch.testing.assert_close(m.encode(X), t([[1.5, 3.0, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("architecture", ["jumprelu", "batchtopk"])
def test_threshold_architectures(architecture):
    m = tiny(architecture)
    with torch.no_grad():
        m.threshold.copy_(t([-0.75, 3.0, 0.5]))
    # strictly above the threshold keeps pre itself, a negative pre included when the threshold is below it
    torch.testing.assert_close(m.encode(X), t([[1.5, 0.0, 1.0], [-0.5, 0.0, 1.0]]))
    assert set(m.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}


def test_threshold_only_where_needed():
    assert tiny("relu").threshold is None
    assert set(tiny("topk", k=1).state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_leading_dims_are_kept():
    m = tiny("topk", k=1)
    x = torch.randn(2, 5, 2)
    assert m.encode(x).shape == (2, 5, 3)
    assert m(x).shape == (2, 5, 2)


def test_encode_topk():
    m = tiny("relu")
    values, indices = m.encode_topk(X, 2)
    torch.testing.assert_close(values, t([[3.0, 1.5], [1.0, 0.0]]))
    assert indices[0].tolist() == [1, 0] and indices[1, 0].item() == 2
    with pytest.raises(ValueError):
        m.encode_topk(X, 4)


@pytest.mark.parametrize("b_dec_in_encoder", [False, True])
def test_folded_encoder_matches_pre_acts(b_dec_in_encoder):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=6, d_sae=10, architecture="relu", hook_point="", input_scale=0.37, b_dec_in_encoder=b_dec_in_encoder
    )
    m = SparseAutoencoder(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    W, b = m.folded_encoder()
    assert W.shape == (6, 10) and b.shape == (10,)
    x = torch.randn(4, 6)
    torch.testing.assert_close(x @ W + b, m.pre_acts(x), atol=1e-5, rtol=1e-5)


def test_registry_and_custom_architecture():
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= set(sae.ARCHITECTURES)
    with pytest.raises(ValueError, match="known: .*jumprelu"):
        sae.architectures.get_architecture("nope")
    assert "nope" not in sae.ARCHITECTURES
    assert sae.ARCHITECTURES.get("nope") is None

    @sae.register_architecture("test_abs_relu")
    def _abs(pre, model):
        return pre.abs()

    try:
        m = tiny("test_abs_relu")
        torch.testing.assert_close(m.encode(X[1:]), t([[0.5, 1.0, 1.0]]))
        with pytest.raises(ValueError, match="already registered"):
            sae.register_architecture("test_abs_relu")(_abs)
    finally:
        sae.ARCHITECTURES._fns.pop("test_abs_relu")


def test_config_dict_round_trip_and_validation():
    cfg = SAEConfig(
        d_in=4,
        d_sae=8,
        architecture="topk",
        hook_point="blocks.1.mlp_out",
        model="m",
        k=3,
        input_scale=2,
        metadata={"fvu": 0.1},
    )
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAEConfig keys: bogus, extra"):
        SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1, "extra": 2})
    with pytest.raises(ValueError, match="missing SAEConfig keys: d_sae"):
        SAEConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "d_sae"})
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", hook_point="")
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", hook_point="", k=9)
    with pytest.raises(ValueError, match="input_scale"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", hook_point="", input_scale=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", hook_point="", dtype="int8")
