"""Native folder format: exact round trip, atomic overwrite, and rejection of bad folders."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sae import SAEConfig, SparseAutoencoder, detect_format, load_sae, save_sae

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

torch.set_num_threads(1)


def random_sae(architecture="jumprelu", seed=0, **kw) -> SparseAutoencoder:
    torch.manual_seed(seed)
    k = kw.pop("k", 3 if architecture in ("topk", "batchtopk") else None)
    cfg = SAEConfig(
        d_in=6,
        d_sae=12,
        architecture=architecture,
        hook_point="blocks.2.resid_post",
        model="tiny",
        k=k,
        metadata={"fvu": 0.25, "notes": ["a", "b"]},
        **kw,
    )
    m = SparseAutoencoder(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_round_trip_is_exact(tmp_path, architecture):
    m = random_sae(architecture, input_scale=0.5, b_dec_in_encoder=False)
    save_sae(m, tmp_path / "s")
    assert detect_format(tmp_path / "s") == "native"
    assert json.loads((tmp_path / "s" / "sae.json").read_text())["format"] == "sae-serve/1"
    loaded = load_sae(tmp_path / "s")
    assert loaded.cfg == m.cfg
    for name, value in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.randn(3, 6)
    assert torch.equal(loaded.encode(x), m.encode(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_dtype_and_overrides(tmp_path):
    save_sae(random_sae("relu"), tmp_path / "s")
    loaded = load_sae(tmp_path / "s", dtype="bfloat16", hook_point="blocks.5.mlp_out", model="other")
    assert loaded.W_enc.dtype == torch.bfloat16 and loaded.cfg.dtype == "bfloat16"
    assert loaded.cfg.hook_point == "blocks.5.mlp_out" and loaded.cfg.model == "other"
    assert loaded.cfg.metadata["source_hook_point"] == "blocks.2.resid_post"
    with pytest.raises(ValueError, match="malformed hook point"):
        load_sae(tmp_path / "s", hook_point="layer 5")


def test_overwrite_swaps_and_leaves_no_temporaries(tmp_path):
    save_sae(random_sae("relu", seed=1), tmp_path / "s")
    second = random_sae("topk", seed=2)
    save_sae(second, tmp_path / "s")
    assert load_sae(tmp_path / "s").cfg.architecture == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_sae(second, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").exists()


def test_unserialisable_metadata_writes_nothing(tmp_path):
    m = random_sae("relu")
    m.cfg.metadata["bad"] = object()
    with pytest.raises(ValueError, match="JSON"):
        save_sae(m, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path):
    folder = tmp_path / "s"
    save_sae(random_sae("jumprelu"), folder)
    return folder


def test_unknown_config_key_rejected(tmp_path):
    folder = _saved(tmp_path)
    data = json.loads((folder / "sae.json").read_text())
    data["surprise"] = 1
    (folder / "sae.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown SAEConfig keys: surprise"):
        load_sae(folder)


def test_wrong_format_version_rejected(tmp_path):
    folder = _saved(tmp_path)
    data = json.loads((folder / "sae.json").read_text())
    data["format"] = "sae-serve/99"
    (folder / "sae.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sae-serve/99"):
        load_sae(folder)


def test_wrong_shape_names_tensor(tmp_path):
    folder = _saved(tmp_path)
    m = random_sae("jumprelu")
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["W_dec"] = torch.zeros(6, 12)
    save_file(sd, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(6, 12\), expected \(12, 6\)"):
        load_sae(folder)


def test_missing_threshold_rejected(tmp_path):
    folder = _saved(tmp_path)
    sd = {k: v.detach().clone() for k, v in random_sae("jumprelu").state_dict().items() if k != "threshold"}
    save_file(sd, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*threshold"):
        load_sae(folder)


def test_non_finite_rejected(tmp_path):
    folder = _saved(tmp_path)
    sd = {k: v.detach().clone() for k, v in random_sae("jumprelu").state_dict().items()}
    sd["b_enc"][3] = float("nan")
    save_file(sd, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match="'b_enc' has 1 non-finite"):
        load_sae(folder)


def test_truncated_file_rejected(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_sae(folder)


class _Boom:
    def __reduce__(self):
        return (open, ("UNPICKLED_MARKER", "w"))


def test_pickle_named_like_weights_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _saved(tmp_path)
    with open(folder / "sae.safetensors", "wb") as f:
        pickle.dump({"W_enc": _Boom()}, f)
    with pytest.raises(ValueError, match="safetensors"):
        load_sae(folder)
    assert not (tmp_path / "UNPICKLED_MARKER").exists()


def test_torch_save_file_is_rejected(tmp_path):
    folder = _saved(tmp_path)
    torch.save(random_sae("jumprelu").state_dict(), folder / "sae.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_sae(folder)


def test_unrecognised_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a recognised SAE folder"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


def test_cast_overflow_rejected(tmp_path):
    m = random_sae("relu")
    with torch.no_grad():
        m.W_dec[0, 0] = 1e6
    save_sae(m, tmp_path / "s")
    with pytest.raises(ValueError, match="'W_dec' has 1 non-finite"):
        load_sae(tmp_path / "s", dtype="float16")
