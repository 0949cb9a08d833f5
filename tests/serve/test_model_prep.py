"""Tests of serve/engine/model_files.py and `sae-serve model ...`.

They use the real embedded model in the default cache ($SAE_SERVE_HOME or ~/.cache/sae-serve), preparing it once per
machine if missing (~45 s, needs PyPI). The re-conversion test converts once more into a temporary home (~45 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.engine import model_files as model_prep
from serve.engine.model_files import (
    MARKER_NAME,
    WEIGHTS_NAME,
    ModelPrepError,
    PrepConfig,
    check_prepared,
    embedded_model_dir,
    prepare_model,
    resolve_model,
)
from serve.launch.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prepared() -> Path:
    """The embedded model, prepared in the default cache."""
    return prepare_model(PrepConfig(progress=True))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (only for files that are never written in place), copying across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_prepared(src: Path, home: Path) -> Path:
    """A private copy of a prepared folder under ``home`` (weights hard-linked when possible: they are only read)."""
    dest = embedded_model_dir(home)
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == WEIGHTS_NAME:
            _link_or_copy(p, dest / p.name)
        else:
            shutil.copy2(p, dest / p.name)
    return dest


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.launch.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


# --------------------------------------------------------------------------------------------------------------------
# The prepared folder


def test_prepared_folder_is_dense_fp32_llama(prepared: Path) -> None:
    assert prepared == embedded_model_dir()
    cfg = json.loads((prepared / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    # Readable by transformers 4.x too (which ignores rope_parameters).
    assert cfg["rope_theta"] == pytest.approx(100000.0)

    from safetensors import safe_open

    with safe_open(prepared / WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight")
        assert emb.get_shape() == [49152, 576]
        assert emb.get_dtype() == "F32"
    assert "lm_head.weight" not in keys  # tied to the embedding
    assert sum(k.startswith("model.layers.29.") for k in keys) > 0
    assert not any(k.startswith("model.layers.30.") for k in keys)

    tok_cfg = json.loads((prepared / "tokenizer_config.json").read_text())
    assert (prepared / "chat_template.jinja").is_file() or tok_cfg.get("chat_template")

    marker = json.loads((prepared / MARKER_NAME).read_text())
    assert marker["weights_size"] == (prepared / WEIGHTS_NAME).stat().st_size
    assert "Paris" in marker["smoke_test"]["answer"]
    assert check_prepared(prepared, verify=True).ok


def test_prepare_again_is_fast_and_does_not_reconvert(prepared: Path) -> None:
    weights, marker = prepared / WEIGHTS_NAME, prepared / MARKER_NAME
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.stat().st_mtime_ns)
    t0 = time.monotonic()
    again = prepare_model(PrepConfig())
    assert time.monotonic() - t0 < 1.0
    assert again == prepared
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.stat().st_mtime_ns) == before


def test_cli_prepare_prints_path_last_and_verify_keeps_good_folder(prepared: Path) -> None:
    weights = prepared / WEIGHTS_NAME
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino)
    t0 = time.monotonic()
    r = _run_cli("model", "prepare")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 15  # no torch import on the fast path
    assert r.stdout.strip().splitlines()[-1] == str(prepared)
    assert "already prepared" in r.stderr

    r = _run_cli("model", "prepare", "--verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(prepared)
    assert "verified" in r.stderr
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before


def test_cli_model_path(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(prepared)

    not_llama = tmp_path / "gpt2"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["model", "path", str(not_llama)]) == 1
    err = capsys.readouterr().err
    assert "not a Llama-architecture model" in err and "GPT2LMHeadModel" in err

    # An empty home: `path` never prepares, it says how to.
    assert main(["model", "path", "--home", str(tmp_path / "empty-home")]) == 1
    assert "sae-serve model prepare" in capsys.readouterr().err
    assert not (tmp_path / "empty-home").exists()


# --------------------------------------------------------------------------------------------------------------------
# resolve_model


def test_resolve_embedded_aliases(prepared: Path) -> None:
    for name in ("embedded", "SmolLM2-135M-Instruct", "smollm2-135m-instruct", "default"):
        assert resolve_model(name, prepare=False) == prepared
    assert resolve_model("embedded") == prepared  # prepare=True is a no-op once prepared


def test_resolve_llama_folder(tmp_path: Path) -> None:
    folder = tmp_path / "Llama-3.1-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096})
    )
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(str(folder)) == folder.resolve()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "not a Llama-architecture model"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "not a Llama-architecture model"),
        (None, "has no config.json"),
        ("{not json", "not readable JSON"),
    ],
)
def test_resolve_rejects_non_llama_folder(tmp_path: Path, config, message: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    if isinstance(config, dict):
        (folder / "config.json").write_text(json.dumps(config))
    elif isinstance(config, str):
        (folder / "config.json").write_text(config)
    with pytest.raises(ModelPrepError, match=message):
        resolve_model(folder)


def test_resolve_rejects_unknown_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match="unknown model 'meta-llama/Llama-3.1-8B-Instruct'"):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelPrepError, match="is a file"):
        resolve_model(f)


def test_resolve_embedded_unprepared_without_prepare(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match="not prepared"):
        resolve_model("embedded", home=tmp_path, prepare=False)


# --------------------------------------------------------------------------------------------------------------------
# Checks, corruption, atomicity


def test_fast_check_catches_bad_marker_and_size(prepared: Path, tmp_path: Path) -> None:
    dest = _copy_prepared(prepared, tmp_path)
    assert check_prepared(dest).ok

    marker = json.loads((dest / MARKER_NAME).read_text())
    (dest / MARKER_NAME).write_text(json.dumps({**marker, "weights_size": marker["weights_size"] + 1}))
    res = check_prepared(dest)
    assert not res.ok and "bytes" in res.reason

    (dest / MARKER_NAME).write_text("{truncated")
    res = check_prepared(dest)
    assert not res.ok and MARKER_NAME in res.reason

    (dest / MARKER_NAME).unlink()
    assert not check_prepared(dest).ok


def test_verify_detects_checksum_mismatch_and_reconverts(prepared: Path, tmp_path: Path) -> None:
    dest = _copy_prepared(prepared, tmp_path)
    marker = json.loads((dest / MARKER_NAME).read_text())
    (dest / MARKER_NAME).write_text(json.dumps({**marker, "weights_sha256": "0" * 64}))
    old_ino = (dest / WEIGHTS_NAME).stat().st_ino

    # The fast check only looks at the marker and the size: it does not notice, and changes nothing.
    assert prepare_model(PrepConfig(home=tmp_path)) == dest
    assert (dest / WEIGHTS_NAME).stat().st_ino == old_ino
    bad = check_prepared(dest, verify=True)
    assert not bad.ok and "sha256" in bad.reason

    # --verify recomputes the hash, sees the mismatch, converts again and swaps the folder in.
    assert prepare_model(PrepConfig(home=tmp_path, verify=True)) == dest
    new_marker = json.loads((dest / MARKER_NAME).read_text())
    assert new_marker["weights_sha256"] == json.loads((prepared / MARKER_NAME).read_text())["weights_sha256"]
    assert (dest / WEIGHTS_NAME).stat().st_ino != old_ino
    assert "Paris" in new_marker["smoke_test"]["answer"]
    assert check_prepared(dest, verify=True).ok
    # The shared copy is untouched (the hard link was only read).
    assert check_prepared(prepared).ok
    # No temporary or old folders left beside it.
    assert sorted(p.name for p in dest.parent.iterdir() if p.is_dir()) == [dest.name]


def test_failed_smoke_test_installs_nothing(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that fails its check leaves the destination as it was and no temporary folders."""

    def fake_fetch(workdir: Path, source=None, log=None):
        return workdir / "fake.gguf", {"source": "test"}

    def fake_convert(gguf: Path, out: Path, threads: int = 2, log=None) -> None:
        for p in prepared.iterdir():
            if p.name == WEIGHTS_NAME:
                _link_or_copy(p, out / p.name)
            elif p.name != MARKER_NAME:
                shutil.copy2(p, out / p.name)

    monkeypatch.setattr(model_prep, "fetch_gguf", fake_fetch)
    monkeypatch.setattr(model_prep, "sha256_file", lambda path, chunk=0: "f" * 64)
    monkeypatch.setattr(model_prep, "convert_gguf", fake_convert)
    monkeypatch.setattr(model_prep, "smoke_test", lambda folder, threads=2: "The capital of France is London.")

    with pytest.raises(ModelPrepError, match="smoke test"):
        prepare_model(PrepConfig(home=tmp_path))
    models = tmp_path / "models"
    assert not embedded_model_dir(tmp_path).exists()
    assert [p.name for p in models.iterdir() if p.is_dir()] == []

    # With an existing (broken) folder: it stays in place after a failed re-conversion.
    dest = embedded_model_dir(tmp_path)
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(ModelPrepError, match="smoke test"):
        prepare_model(PrepConfig(home=tmp_path))
    assert (dest / "config.json").read_text() == "{}"
    assert [p.name for p in models.iterdir() if p.is_dir()] == [dest.name]
