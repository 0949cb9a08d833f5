"""The explain job against the shared live service as its OpenAI-compatible endpoint (a copy of toy's statistics,
so the served SAE is untouched): labels are stored atomically beside the other statistics, and refusals leave the
file as it was."""

from __future__ import annotations

import json
import shutil

import pytest

from trainer.explain import ExplainError, clean_label, explain, feature_prompt, main
from trainer.explain_config import ExplainConfig

KEY_ENV = "SAE_SERVE_TEST_EXPLAIN_KEY"


@pytest.fixture
def sae_dir(service, tmp_path):
    shutil.copy(service.registry / "toy" / "feature_stats.json", tmp_path)
    return tmp_path


def config(service, sae_dir, **overrides) -> ExplainConfig:
    return ExplainConfig(
        sae_dir=sae_dir,
        base_url=f"{service.base_url}/v1",
        model=service.model,
        api_key_env=KEY_ENV,
        max_tokens=8,
        **overrides,
    )


def test_labels_are_stored_beside_the_statistics(service, sae_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, service.user_key)
    before = json.loads((sae_dir / "feature_stats.json").read_text())
    result = explain(config(service, sae_dir, features=[1, 2, 1000 % 256]))
    after = json.loads((sae_dir / "feature_stats.json").read_text())
    assert set(result["explained"]) | set(result["empty"]) == {1, 2, 232}
    assert result["explained"], "the model gave no usable label at all"
    for index, label in result["explained"].items():
        assert after["features"][index].pop("explanation") == label and 0 < len(label) <= 120
    assert after == before  # nothing else changed
    assert sorted(p.name for p in sae_dir.iterdir()) == ["feature_stats.json"]  # no temporary file left
    # Explained features are skipped unless asked to overwrite: no request is made.
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    assert explain(config(service, sae_dir, features=list(result["explained"]))) == {"explained": {}, "empty": []}


def test_a_refused_request_names_the_reason_and_leaves_the_file(service, sae_dir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    original = (sae_dir / "feature_stats.json").read_bytes()
    with pytest.raises(ExplainError, match="401: Incorrect API key provided."):
        explain(config(service, sae_dir, limit=2))
    assert (
        main(
            [
                "--sae-dir",
                str(sae_dir),
                "--base-url",
                f"{service.base_url}/v1",
                "--api-key-env",
                KEY_ENV,
                "--features",
                "3",
                "--max-tokens",
                "4",
            ]
        )
        == 1
    )
    assert "Incorrect API key provided." in capsys.readouterr().err
    assert (sae_dir / "feature_stats.json").read_bytes() == original
    with pytest.raises(ValueError, match="feature 999 is not in feature_stats.json"):
        explain(config(service, sae_dir, features=[999]))


def test_cli_labels_a_feature(service, sae_dir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, service.user_key)
    assert (
        main(
            [
                "--sae-dir",
                str(sae_dir),
                "--base-url",
                f"{service.base_url}/v1",
                "--model",
                service.model,
                "--api-key-env",
                KEY_ENV,
                "--features",
                "5",
                "--max-tokens",
                "8",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((sae_dir / "feature_stats.json").read_text())["features"][5].get("explanation")
    assert printed["explained"] == ({"5": stored} if stored else {}) and printed["empty"] == ([] if stored else [5])


def test_prompt_marks_the_active_token_and_labels_are_cleaned():
    record = {"top_contexts": [{"activation": 3.0, "tokens": ["I", " ate", " pizza", "\n"], "index": 2}]}
    assert feature_prompt(record, 5).splitlines()[1] == "1. I ate<< pizza>>\\n"
    assert clean_label('\n  Label: "food words"\nmore', 120) == "food words"
    assert clean_label("   \n", 120) == ""
    assert clean_label("x" * 300, 50) == "x" * 50
