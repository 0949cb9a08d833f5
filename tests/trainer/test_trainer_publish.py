import json

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
from trainer.publish import publish, read_manifest

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier


def sae_folder(path, fill: float):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, architecture="topk", hook_point="blocks.1.resid_post", k=2))
    with torch.no_grad():
        for p in sae.parameters():
            p.fill_(fill)
    save_sae(sae, path)
    (path / "card.json").write_text(json.dumps({"fill": fill}))
    return path


def test_publish_versions_and_replaces_atomically(tmp_path):
    registry = tmp_path / "registry"
    first = publish(sae_folder(tmp_path / "a", 0.5), registry, "demo")
    second = publish(sae_folder(tmp_path / "b", 0.25), registry, "demo")
    publish(sae_folder(tmp_path / "c", 0.1), registry, "other")
    manifest = read_manifest(registry)
    assert (first["version"], second["version"]) == (1, 2)
    assert set(manifest["saes"]) == {"demo", "other"}
    assert manifest["saes"]["demo"]["sha256"] == second["sha256"] != first["sha256"]
    assert (first["path"], second["path"]) == ("demo/v1", "demo/v2")
    assert float(load_sae(registry / second["path"]).W_enc[0, 0]) == 0.25
    assert json.loads((registry / second["path"] / "card.json").read_text()) == {"fill": 0.25}
    # The version a service may still serve (v1, if it rejected v2) keeps its files.
    assert float(load_sae(registry / first["path"]).W_enc[0, 0]) == 0.5
    hidden = [p for p in registry.rglob(".*") if p.name != ".lock"]
    assert hidden == []


def test_only_the_last_versions_are_kept(tmp_path):
    from trainer.publish import KEEP_VERSIONS

    registry = tmp_path / "registry"
    for i in range(KEEP_VERSIONS + 2):
        publish(sae_folder(tmp_path / f"s{i}", 0.1 * (i + 1)), registry, "demo")
    kept = sorted(p.name for p in (registry / "demo").iterdir())
    assert kept == [f"v{v}" for v in range(3, KEEP_VERSIONS + 3)]


def test_a_bad_sae_is_rejected_before_the_registry_changes(tmp_path):
    registry = tmp_path / "registry"
    publish(sae_folder(tmp_path / "good", 0.5), registry, "demo")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "card.json").write_text("{}")
    with pytest.raises(ValueError):
        publish(bad, registry, "demo")
    with pytest.raises(ValueError):
        publish(sae_folder(tmp_path / "x", 0.5), registry, "../escape")
    assert read_manifest(registry)["saes"]["demo"]["version"] == 1
    assert float(load_sae(registry / "demo" / "v1").W_enc[0, 0]) == 0.5
