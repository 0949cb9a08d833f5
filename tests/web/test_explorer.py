"""The feature explorer in headless Debian chromium against the shared live service (SAE `toy`): the steering
playground streams two different answers, feature and SAE pages, activation shading, API errors in plain words,
and a steering flow done with the keyboard alone. Screenshots land in runs/screenshots/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, HOOK, USER_KEY
from tests.helpers import make_random_sae

QUESTION = "Tell me about your weekend."
TEXT = "The harbour was full of ships and the sailors sang."
MAX_TOKENS = 24
STRONG = 150.0
DEMO_SAE = Path(__file__).resolve().parents[2] / "deploy" / "saes" / "smollm2-l15-resid-8x"


def strongest_feature(service) -> int:
    """The `toy` feature firing hardest where the model starts its answer to QUESTION."""
    with service.http() as http:
        r = http.post(
            "/v1/activations", json={"messages": [{"role": "user", "content": QUESTION}], "saes": ["toy"], "top_k": 1}
        )
    assert r.status_code == 200, r.text
    return r.json()["tokens"][-1]["saes"]["toy"]["top"][0][0]


def with_key(page, key: str = USER_KEY) -> None:
    page.add_init_script(f"sessionStorage.setItem('sae-serve-api-key', {json.dumps(key)})")


def count_updates(page) -> None:
    """Count DOM updates of each answer column, to see the answers arrive in pieces (streamed)."""
    page.evaluate("""() => { window.updates = {};
        for (const id of ['pg-plain', 'pg-steered']) {
            window.updates[id] = 0;
            new MutationObserver(() => window.updates[id]++).observe(document.getElementById(id),
                {childList: true, subtree: true, characterData: true});
        } }""")


def answers(page) -> tuple[str, str]:
    page.wait_for_function("""() => !document.querySelector('#pg-send').disabled &&
        document.querySelectorAll('.msg.assistant .text:not(.pending)').length >= 2""")
    assert page.locator(".status.error").count() == 0, page.locator(".status.error").all_inner_texts()
    plain = page.locator("#pg-plain .msg.assistant .text").last.inner_text()
    steered = page.locator("#pg-steered .msg.assistant .text").last.inner_text()
    return plain, steered


def api_answer(service, steering: list) -> str:
    with service.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": service.model,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "steering": steering,
            },
        )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def tab_to(page, selector: str, limit: int = 80) -> None:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => !!document.activeElement && document.activeElement.matches(s)", selector):
            return
    pytest.fail(f"Tab never reached {selector}")


def test_playground_streams_steered_and_unsteered_answers_that_differ(page, service, shot):
    feature = strongest_feature(service)
    with_key(page)
    page.goto("/ui/#/playground?sae=toy")
    page.get_by_label("Find a feature").fill(str(feature))
    page.get_by_label("Find a feature").press("Enter")
    page.get_by_role("button", name=f"Add #{feature}").click()
    page.get_by_label(f"Value for toy #{feature}", exact=True).fill(str(STRONG))
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    count_updates(page)
    page.get_by_label("Message").fill(QUESTION)
    page.get_by_label("Message").press("Enter")
    plain, steered = answers(page)
    shot(page, "playground")
    assert plain and steered and plain != steered
    # The page sends what the API documents: the same answers come back from a direct non-streamed call.
    assert plain == api_answer(service, [])
    assert steered == api_answer(service, [{"sae": "toy", "feature": feature, "value": STRONG, "op": "add"}])
    updates = page.evaluate("window.updates")
    assert updates["pg-plain"] > 2 and updates["pg-steered"] > 2, updates  # message, answer, then deltas


def test_keyboard_only_steering_flow(page, service, shot):
    feature = strongest_feature(service)
    page.goto("/ui/")
    tab_to(page, "#api-key")
    page.keyboard.type(USER_KEY)
    page.keyboard.press("Enter")
    tab_to(page, 'header nav a[href="#/playground"]')
    page.keyboard.press("Enter")
    page.locator("#pg-query").wait_for()
    tab_to(page, "#pg-query")
    page.keyboard.type(str(feature))
    page.keyboard.press("Enter")
    page.locator(f'button.add[data-feature="{feature}"]').wait_for()
    tab_to(page, f'button.add[data-feature="{feature}"]')
    page.keyboard.press("Enter")  # adds the feature and moves focus to its op
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == f"Op for toy #{feature}"
    tab_to(page, "input.value")
    page.keyboard.press("ControlOrMeta+A")
    page.keyboard.type(str(STRONG))
    tab_to(page, "#pg-max")
    page.keyboard.press("ControlOrMeta+A")
    page.keyboard.type(str(MAX_TOKENS))
    tab_to(page, "#pg-prompt")
    page.keyboard.type(QUESTION)
    page.keyboard.press("Enter")
    plain, steered = answers(page)
    shot(page, "playground-keyboard")
    assert plain != steered
    assert page.evaluate("document.activeElement.id") == "pg-prompt"  # ready for the next message


def test_feature_page_shows_contexts_lens_density_and_steers(page, service, shot):
    with service.http() as http:
        card = http.get("/v1/saes/toy/features/7", params={"top_n": 10}).json()
    with_key(page)
    page.goto("/ui/#/sae/toy/feature/7")
    contexts = page.locator("#top-contexts li")
    contexts.first.wait_for()
    shot(page, "feature-page")
    assert contexts.count() == len(card["top_contexts"]) == 1
    assert contexts.first.locator("mark").inner_text() == "b"  # toy's context: tokens ["a", "b"], active at 1
    assert "3" in contexts.first.locator(".act").inner_text()
    lens = page.locator(".lens ol")
    assert lens.nth(0).locator("li").count() == lens.nth(1).locator("li").count() == 10
    assert lens.nth(0).locator("li").first.inner_text().endswith(str(round(card["top_tokens"][0]["logit"], 3)))
    assert page.locator(".chart .bar").count() == 30 and page.locator(".chart .marker").count() == 1
    assert "null" not in page.locator("main").inner_text()  # toy has no explanations: nothing is shown
    page.get_by_role("button", name="Steer with this").click()
    page.locator('.steering li[data-key="toy#7"]').wait_for()
    assert page.evaluate("location.hash") == "#/playground?sae=toy&feature=7"


def test_activation_view_shades_tokens_by_the_feature(page, service, shot):
    with service.http() as http:
        top = http.post("/v1/activations", json={"input": TEXT, "saes": ["toy"], "top_k": 1}).json()
        feature = max((t["saes"]["toy"]["top"][0] for t in top["tokens"]), key=lambda p: p[1])[0]
        ref = http.post(
            "/v1/activations", json={"input": TEXT, "saes": ["toy"], "top_k": 10, "features": {"toy": [feature]}}
        ).json()
    with_key(page)
    page.goto(f"/ui/#/activations?sae=toy&feature={feature}")
    page.get_by_label("Text", exact=True).fill(TEXT)
    page.get_by_role("button", name="Read activations").click()
    tokens = page.locator(".tokens .token")
    tokens.first.wait_for()
    expected = [t["saes"]["toy"]["features"][0][1] for t in ref["tokens"]]
    shown = [float(v) for v in tokens.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert shown == pytest.approx(expected, rel=1e-5, abs=1e-5)
    peak = max(range(len(shown)), key=shown.__getitem__)
    colours = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert colours[peak] == "rgb(255, 120, 0)"  # full strength at the largest activation
    assert all(c.endswith(", 0)") for c, v in zip(colours, shown) if v == 0)  # transparent where silent
    tokens.nth(peak).click()
    listed = page.locator(".detail .top-features li a")
    listed.first.wait_for()
    shot(page, "activations")
    assert listed.all_inner_texts() == [f"#{f}" for f, _ in ref["tokens"][peak]["saes"]["toy"]["top"]]


def test_api_errors_are_stated_in_plain_words(page, service, shot):
    page.goto("/ui/#/")
    assert "Missing API key" in page.locator(".status.error").inner_text()
    page.get_by_label("API key").fill("sk-wrong-key")
    page.get_by_role("button", name="Use key").click()
    page.get_by_text("Incorrect API key provided.").wait_for()
    page.get_by_label("API key").fill(USER_KEY)
    page.get_by_role("button", name="Use key").click()
    page.goto("/ui/#/sae/toy/feature/999999")
    error = page.locator(".status.error")
    error.wait_for()
    shot(page, "error")
    assert error.inner_text() == "Error: feature 999999 out of range for SAE 'toy' with 256 features"
    assert page.locator(".sae-list").count() == 0  # the list the key change re-rendered never lands here
    assert error.get_attribute("role") == "alert"


@pytest.fixture
def carded_sae(service):
    """An SAE with a trainer card (metrics, density histogram, curves plot) and explained features, loaded for
    this test only and unloaded after (the shared service keeps only `toy`)."""
    folder = service.registry / "explorer-carded"
    make_random_sae(folder, HOOK, "relu", d_sae=64, seed=3)
    shutil.copy(DEMO_SAE / "training_curves.png", folder)
    demo_card = json.loads((DEMO_SAE / "card.json").read_text())
    (folder / "card.json").write_text(
        json.dumps(
            {
                "format": "sae-serve-card/1",
                "evaluation": demo_card["evaluation"],
                "density_histogram": demo_card["density_histogram"],
                "files": {"plots": ["training_curves.png"]},
            }
        )
    )
    features = [
        {
            "id": i,
            "density": 0.01,
            "max_activation": 2.0,
            "top_contexts": [],
            "explanation": "ships in a harbour" if i == 3 else f"pattern {i}",
        }
        for i in range(64)
    ]
    (folder / "feature_stats.json").write_text(
        json.dumps({"format": "sae-serve-feature-stats/1", "features": features})
    )
    with service.http(ADMIN_KEY) as admin:
        r = admin.post("/v1/saes", json={"path": "explorer-carded"})
        assert r.status_code == 200, r.text
        try:
            yield "explorer-carded"
        finally:
            assert admin.delete("/v1/saes/explorer-carded").status_code == 200
            shutil.rmtree(folder)


def test_sae_page_shows_card_curves_histogram_and_searches_explanations(page, service, shot, carded_sae):
    with_key(page)
    page.goto(f"/ui/#/sae/{carded_sae}")
    page.locator("figure.plot img").wait_for()
    page.wait_for_function("() => document.querySelector('figure.plot img').naturalWidth > 0")
    rows = dict(zip(page.locator("table.card th").all_inner_texts(), page.locator("table.card td").all_inner_texts()))
    assert rows["FVU (held out)"] == "0.166" and rows["L0"] == "32" and rows["Dead features"] == "1.58%"
    assert rows["Loss recovered"] == "98.78%"
    assert page.locator(".chart .bar").count() == 30
    page.get_by_label("Find a feature").fill("harbour")
    page.get_by_label("Find a feature").press("Enter")
    found = page.locator(".results li")
    found.first.wait_for()
    shot(page, "sae-page")
    assert found.count() == 1 and "ships in a harbour" in found.first.inner_text()
    found.first.get_by_role("link").press("Enter")  # keyboard: a full-page screenshot can leave clicks misplaced
    explanation = page.locator("p.explanation")
    explanation.wait_for()  # the feature page shows it too
    assert explanation.inner_text() == "ships in a harbour"
    assert page.evaluate("location.hash") == f"#/sae/{carded_sae}/feature/3"
