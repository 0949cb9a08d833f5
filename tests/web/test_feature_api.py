"""The endpoints the explorer adds: feature summaries with search, training plots, and the page's static files."""

from __future__ import annotations

from tests.conftest import D_SAE


def test_feature_search_by_index_by_token_and_paged(service):
    with service.http() as http:
        one = http.get("/v1/saes/toy/features", params={"q": "3"}).json()
        page = http.get("/v1/saes/toy/features", params={"limit": 10, "offset": 5}).json()
        by_token = http.get("/v1/saes/toy/features", params={"q": "B", "limit": 3}).json()
        none = http.get("/v1/saes/toy/features", params={"q": "no-such-token"}).json()
        out_of_range = http.get("/v1/saes/toy/features", params={"q": str(D_SAE)}).json()
    assert one["object"] == "list" and one["sae"] == "toy" and one["total"] == 1
    assert one["data"] == [
        {
            "id": 3,
            "density": 0.003,
            "max_activation": 3.0,
            "activating_tokens": ["b"],
            "top_tokens": [],
            "explanation": None,
        }
    ]
    assert page["total"] == D_SAE and [f["id"] for f in page["data"]] == list(range(5, 15))
    assert by_token["total"] == D_SAE and len(by_token["data"]) == 3  # every toy feature fires on "b"
    assert none["total"] == 0 and none["data"] == []
    assert out_of_range["total"] == 0


def test_feature_search_and_plots_errors_are_openai_shaped(service):
    with service.http() as http:
        bad_limit = http.get("/v1/saes/toy/features", params={"limit": 0})
        unknown = http.get("/v1/saes/nope/features")
        no_plot = http.get("/v1/saes/toy/plots/training_curves.png")
    with service.http(key=None) as anonymous:
        no_key = anonymous.get("/v1/saes/toy/features")
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["param"] == "limit"
    assert unknown.status_code == 404 and "'nope' is not loaded" in unknown.json()["error"]["message"]
    assert no_plot.status_code == 404
    assert no_plot.json()["error"]["message"] == "SAE 'toy' has no plot 'training_curves.png'"
    assert no_key.status_code == 401


def test_page_is_served_without_a_key_and_root_redirects_to_it(service):
    with service.http(key=None) as http:
        root = http.get("/", follow_redirects=False)
        index = http.get("/ui/")
        script = http.get("/ui/app.js")
        missing = http.get("/ui/nope.js")
        outside = http.get("/ui/..%2Fapi.py")
    assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "sae-serve explorer" in index.text and "default-src 'self'" in index.headers["content-security-policy"]
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no such page asset: 'nope.js'"
    assert outside.status_code == 404
