"""SAELens folders written by SAELens itself load into SAEs that encode and decode like SAELens."""

import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import SAE  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402

from sae import detect_format, load_sae  # noqa: E402

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)
D_IN, D_SAE = 8, 24


def _meta(hook="blocks.3.hook_resid_post"):
    return SAEMetadata(hook_name=hook, model_name="tiny-llama")


def _randomise(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name == "threshold" else 1.0))
    return model


def _compare(ref, ours, scale=1.0, atol=1e-5):
    torch.manual_seed(123)
    x = torch.randn(16, D_IN) * 2
    with torch.no_grad():
        ref_acts = ref.encode(x * scale)
        our_acts = ours.encode(x)
        assert (ref_acts != 0).any() and (ref_acts == 0).any()
        torch.testing.assert_close(our_acts, ref_acts, atol=atol, rtol=1e-5)
        torch.testing.assert_close(ours.decode(our_acts), ref.decode(ref_acts) / scale, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard(tmp_path, apply_b_dec):
    ref = _randomise(
        StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, metadata=_meta()))
    )
    ref.save_model(tmp_path)
    assert detect_format(tmp_path) == "saelens"
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == "relu" and ours.cfg.b_dec_in_encoder is apply_b_dec
    assert ours.cfg.hook_point == "blocks.3.resid_post" and ours.cfg.model == "tiny-llama"
    _compare(ref, ours)


@pytest.mark.parametrize("rescale", [False, True])
def test_topk(tmp_path, rescale):
    ref = _randomise(
        TopKSAE(
            TopKSAEConfig(
                d_in=D_IN,
                d_sae=D_SAE,
                k=5,
                rescale_acts_by_decoder_norm=rescale,
                metadata=_meta("blocks.2.hook_mlp_out"),
            )
        )
    )
    ref.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert (ours.cfg.architecture, ours.cfg.k, ours.cfg.hook_point) == ("topk", 5, "blocks.2.mlp_out")
    _compare(ref, ours)


def test_jumprelu(tmp_path):
    ref = _randomise(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta("blocks.1.hook_attn_out"))))
    with torch.no_grad():
        ref.threshold[:4] = -0.5  # SAELens still applies relu below a negative threshold
    ref.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == "jumprelu" and ours.cfg.hook_point == "blocks.1.attn_out"
    assert (ours.threshold >= 0).all()
    _compare(ref, ours)


def test_batchtopk_training_and_inference_checkpoints(tmp_path):
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=_meta())
    train = _randomise(BatchTopKTrainingSAE(cfg))
    train.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    train.save_inference_model(tmp_path / "inference")
    train.save_model(tmp_path / "training")
    ref = SAE.load_from_disk(tmp_path / "inference")
    inference = load_sae(tmp_path / "inference")
    training = load_sae(tmp_path / "training")
    assert inference.cfg.architecture == "jumprelu" and training.cfg.architecture == "batchtopk"
    assert training.cfg.k == 4
    _compare(ref, inference)
    _compare(ref, training)


def test_expected_average_norm_uses_scaler_file(tmp_path):
    ref = _randomise(
        StandardSAE(
            StandardSAEConfig(
                d_in=D_IN, d_sae=D_SAE, metadata=_meta(), normalize_activations="expected_average_only_in"
            )
        )
    )
    ref.save_model(tmp_path)
    with pytest.raises(ValueError, match="no scaling factor"):
        load_sae(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    ours = load_sae(tmp_path)
    assert ours.cfg.input_scale == 2.5
    _compare(ref, ours, scale=2.5)


def test_unconvertible_hook_kept_verbatim(tmp_path):
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta("blocks.0.hook_resid_pre"))).save_model(
        tmp_path
    )
    ours = load_sae(tmp_path)
    assert ours.cfg.hook_point == "blocks.0.hook_resid_pre"
    assert load_sae(tmp_path, hook_point="blocks.0.resid_post").cfg.hook_point == "blocks.0.resid_post"


def test_gated_is_unsupported(tmp_path):
    _randomise(GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta()))).save_model(tmp_path)
    with pytest.raises(ValueError, match="unsupported saelens SAE: architecture 'gated'"):
        load_sae(tmp_path)


def test_corrupt_shape_names_tensor(tmp_path):
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta())).save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE + 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'W_enc' has shape \(8, 24\), expected \(8, 25\)"):
        load_sae(tmp_path)
