"""`sae-serve chat|complete|activations|saes|features` against the live shared service, through serve.launch.cli's
parser (the same dispatch as the console script); URL and key from the environment as a user would set them.
"""

from __future__ import annotations

import json

import pytest

from clients import SteeringEntry
from serve.launch.cli import main

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture
def env(service, monkeypatch):
    monkeypatch.setenv("SAE_SERVE_URL", service.base_url)
    monkeypatch.setenv("SAE_SERVE_API_KEY", service.user_key)
    return service


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_plain_and_streamed_print_the_same_answer(env, capsys):
    code, plain, _ = run(capsys, "chat", "What is the capital of France?", "--max-tokens", "12")
    assert code == 0 and "Paris" in plain
    code, streamed, _ = run(capsys, "chat", "What is the capital of France?", "--max-tokens", "12", "--stream")
    assert code == 0 and streamed == plain


def test_complete_with_steer_flags_changes_the_text(env, capsys):
    code, out, _ = run(capsys, "activations", PROMPT, "--sae", "toy", "--top-k", "1", "--json")
    feature = json.loads(out)["tokens"][-1]["saes"]["toy"]["top"][0][0]
    _, plain, _ = run(capsys, "complete", PROMPT, "--max-tokens", "10")
    code, steered, _ = run(capsys, "complete", PROMPT, "--max-tokens", "10", "--steer", f"toy:{feature}@add=+150")
    assert code == 0 and steered != plain
    code, as_json, _ = run(capsys, "complete", PROMPT, "--max-tokens", "10", "--json", "--steer", f"toy:{feature}=150")
    assert json.loads(as_json)["choices"][0]["text"] + "\n" == steered


def test_activations_table_has_one_row_per_token_with_features(env, capsys):
    code, out, _ = run(
        capsys, "activations", "I had pizza for dinner", "--sae", "toy", "--top-k", "2", "--feature", "7"
    )
    assert code == 0
    header, *rows = out.rstrip("\n").split("\n")
    assert header.split() == ["pos", "token", "gen", "toy:", "top", "toy:", "requested"]
    tokens = [json.JSONDecoder().raw_decode(r, r.index('"'))[0] for r in rows]  # the JSON-quoted token column
    assert tokens == ["I", " had", " pizza", " for", " dinner"]
    for row in rows:
        assert row.count("=") == 3 and "7=" in row  # two top features and the requested one, FEATURE=VALUE
    code, out, _ = run(capsys, "activations", "I had pizza for dinner", "--sae", "toy", "--json")
    assert code == 0 and len(json.loads(out)["tokens"]) == 5


def test_chat_with_features_prints_a_line_per_token_then_the_answer(env, capsys):
    args = ["chat", "What is the capital of France?", "--max-tokens", "6"]
    _, plain, _ = run(capsys, *args)
    code, out, _ = run(capsys, *args, "--features", "toy:1,2", "--features-top-k", "3")
    assert code == 0
    *lines, answer = out.rstrip("\n").split("\n")
    assert answer + "\n" == plain
    assert len(lines) == 6 and all("*" in line for line in lines)  # six generated tokens, no prompt
    for line in lines[:-1]:
        top, chosen = line.split("toy: ")[1].split(" | ")
        assert top.count("=") == 3 and chosen.startswith("1=") and " 2=" in chosen
    assert lines[-1].endswith("-")  # the last token is never read by the model
    code, out, _ = run(capsys, *args, "--features", "toy", "--features-prompt")
    assert code == 0 and len(out.rstrip("\n").split("\n")) > 7


def test_saes_and_features(env, capsys):
    code, out, _ = run(capsys, "saes")
    assert code == 0 and out.split("\n")[1].split()[:5] == ["toy", "blocks.10.resid_post", "relu", "576", "256"]
    code, out, _ = run(capsys, "features", "toy", "5", "--top-n", "3")
    assert code == 0 and out.startswith("toy feature 5") and "density 0.005" in out
    assert out.count("promotes:") == 1 and "context 3:" in out
    code, out, _ = run(capsys, "features", "toy", "5", "--json")
    assert json.loads(out)["feature"] == 5


def test_errors_are_one_line_with_the_server_message_and_never_the_key(env, capsys, monkeypatch):
    code, out, err = run(capsys, "chat", "Hi", "--max-tokens", "4", "--steer", "nope:1=2")
    assert code == 1 and out == ""
    assert err.strip() == (
        "sae-serve chat: error: 400 invalid_request_error: steering[0].sae: unknown SAE 'nope' "
        "(loaded: toy) (param steering[0].sae)"
    )
    code, _, err = run(capsys, "features", "toy", "100000")
    assert code == 1 and "404" in err
    monkeypatch.setenv("SAE_SERVE_API_KEY", "sk-not-a-key-42")
    code, out, err = run(capsys, "saes")
    assert code == 1 and "401" in err and "sk-not-a-key-42" not in out + err
    code, out, err = run(capsys, "saes", "--api-key", "sk-flag-key-43")
    assert code == 1 and "sk-flag-key-43" not in out + err


def test_steer_syntax():
    assert SteeringEntry.parse("l15:1234=+8") == SteeringEntry(sae="l15", feature=1234, value=8.0)
    assert SteeringEntry.parse("l15:1234@clamp=3").op == "clamp"
    assert SteeringEntry.parse("my:sae:7@generated@mul=-0.5") == SteeringEntry(
        sae="my:sae", feature=7, value=-0.5, op="mul", positions="generated"
    )
    for bad in ("toy=3", "toy:x=3", "toy:1@scale=3", "toy:1@add@clamp=3", "toy:1=abc", ":1=3"):
        with pytest.raises(ValueError):
            SteeringEntry.parse(bad)
