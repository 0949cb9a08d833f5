"""HookPoint naming, the transformers module map, and validate_for_model."""

import pytest
import torch
from torch import nn

from sae import SAEConfig, SparseAutoencoder, validate_for_model
from sae.hookpoints import SITES, HookPoint, hf_module_and_output

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["blocks.0.resid_post", "blocks.15.attn_out", "blocks.29.mlp_out"])
def test_parse_and_format(name):
    hp = HookPoint.parse(name)
    assert str(hp) == name and hp.site in SITES


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "blocks.1",
        "blocks.-1.resid_post",
        "blocks.01.resid_post",
        "blocks.1.resid_pre",
        "blocks.1.hook_resid_post",
        "layers.1.resid_post",
        "blocks.1.resid_post ",
        "blocks.x.mlp_out",
        None,
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        HookPoint.parse(bad)


def test_constructor_validates_and_is_frozen():
    with pytest.raises(ValueError):
        HookPoint(-1, "mlp_out")
    with pytest.raises(ValueError):
        HookPoint(1, "resid_mid")
    hp = HookPoint(3, "attn_out")
    with pytest.raises(AttributeError):
        hp.layer = 4
    assert hp == HookPoint.parse("blocks.3.attn_out") and len({hp, HookPoint(3, "attn_out")}) == 1


@pytest.mark.parametrize(
    ("tl", "ours"),
    [
        ("blocks.7.hook_resid_post", "blocks.7.resid_post"),
        ("blocks.7.hook_attn_out", "blocks.7.attn_out"),
        ("blocks.7.hook_mlp_out", "blocks.7.mlp_out"),
        ("blocks.7.hook_resid_pre", "blocks.6.resid_post"),
        ("blocks.7.mlp_out", "blocks.7.mlp_out"),
    ],
)
def test_from_transformer_lens(tl, ours):
    assert str(HookPoint.from_transformer_lens(tl)) == ours


@pytest.mark.parametrize(
    "tl", ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.attn.hook_z", "hook_embed"]
)
def test_from_transformer_lens_rejects(tl):
    with pytest.raises(ValueError):
        HookPoint.from_transformer_lens(tl)


class _Attn(nn.Module):
    def forward(self, x):
        return x + 1, None


class _Mlp(nn.Module):
    def forward(self, x):
        return x * 2


class _Layer(nn.Module):
    def __init__(self, tuple_output):
        super().__init__()
        self.self_attn, self.mlp, self.tuple_output = _Attn(), _Mlp(), tuple_output

    def forward(self, x):
        a = x + self.self_attn(x)[0]
        out = a + self.mlp(a)
        return (out,) if self.tuple_output else out


class _Llama(nn.Module):
    def __init__(self, tuple_output):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer(tuple_output) for _ in range(3))

    def forward(self, x):
        for layer in self.model.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


@pytest.mark.parametrize("tuple_output", [False, True])
def test_hf_module_and_output(tuple_output):
    model = _Llama(tuple_output)
    seen = {}
    for name in ("blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post"):
        module, get = hf_module_and_output(model, name)
        module.register_forward_hook(lambda m, i, o, name=name, get=get: seen.__setitem__(name, get(o)))
    x = torch.zeros(1, 2, 4)
    model(x)
    h0 = model.model.layers[0](x)
    h0 = h0[0] if tuple_output else h0
    attn = h0 + 1
    mlp = (h0 + attn) * 2
    torch.testing.assert_close(seen["blocks.1.attn_out"], attn)
    torch.testing.assert_close(seen["blocks.1.mlp_out"], mlp)
    torch.testing.assert_close(seen["blocks.1.resid_post"], h0 + attn + mlp)
    assert hf_module_and_output(model, HookPoint(2, "mlp_out"))[0] is model.model.layers[2].mlp
    with pytest.raises(ValueError, match="out of range"):
        hf_module_and_output(model, "blocks.3.resid_post")


def _cfg(**kw):
    return SAEConfig(**{"d_in": 8, "d_sae": 16, "architecture": "relu", "hook_point": "blocks.4.resid_post", **kw})


def test_validate_for_model():
    validate_for_model(_cfg(), d_model=8, n_layers=5)
    with pytest.raises(ValueError, match="d_in=8 does not match the model's d_model=16"):
        validate_for_model(_cfg(), d_model=16, n_layers=5)
    with pytest.raises(ValueError, match="out of range"):
        validate_for_model(_cfg(), d_model=8, n_layers=4)
    with pytest.raises(ValueError, match="malformed"):
        validate_for_model(_cfg(hook_point="blocks.4.hook_resid_pre"), d_model=8, n_layers=5)
    with pytest.raises(ValueError, match="no hook point"):
        validate_for_model(_cfg(hook_point=""), d_model=8, n_layers=5)


def test_validate_for_model_checks_weights():
    m = SparseAutoencoder(_cfg())
    validate_for_model(m, d_model=8, n_layers=5)
    with torch.no_grad():
        m.W_dec[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'W_dec' has 1 non-finite"):
        validate_for_model(m, d_model=8, n_layers=5)
