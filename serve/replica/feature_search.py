"""Feature summaries of an SAE and a search over them, from the trainer's `feature_stats.json` records.

A summary is what a feature list needs to pick a feature: density, largest activation, the tokens it fires on
(the active token of each top context), the logit-lens tokens it promotes, and an `explanation` if the explain job
(trainer/explain.py) wrote one. A query that is a feature index matches that feature; any other query matches
features whose explanation, activating tokens or logit-lens tokens contain it (case-insensitive), best field first.
"""

from __future__ import annotations

from typing import Any

SUMMARY_TOKENS = 5


def _activating_tokens(record: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for ctx in record.get("top_contexts") or []:
        tokens, index = ctx.get("tokens") or [], ctx.get("index", -1)
        if 0 <= index < len(tokens) and tokens[index] not in seen:
            seen.append(tokens[index])
    return seen[:SUMMARY_TOKENS]


def summary(index: int, record: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of `protocol.FeatureSummary` for feature `index` (record: its feature_stats entry, if any)."""
    record = record or {}
    lens_top = (record.get("logit_lens") or {}).get("top") or []
    return {
        "id": index,
        "density": record.get("density"),
        "max_activation": record.get("max_activation"),
        "activating_tokens": _activating_tokens(record),
        "top_tokens": [pair[0] for pair in lens_top[:SUMMARY_TOKENS]],
        "explanation": record.get("explanation"),
    }


def _score(item: dict[str, Any], needle: str) -> int:
    """3 for an explanation hit, 2 for an activating token, 1 for a logit-lens token, 0 for none."""
    if needle in (item["explanation"] or "").lower():
        return 3
    if any(needle in t.lower() for t in item["activating_tokens"]):
        return 2
    if any(needle in t.lower() for t in item["top_tokens"]):
        return 1
    return 0


def search(records: list[dict[str, Any]] | None, d_sae: int, query: str, limit: int, offset: int) -> dict[str, Any]:
    """`{"total", "data"}`: summaries matching `query` ('' matches all, in index order), one page of them."""
    by_id = {r.get("id", i): r for i, r in enumerate(records or [])}
    query = query.strip()
    if query.isdigit():
        matches = [summary(int(query), by_id.get(int(query)))] if int(query) < d_sae else []
    else:
        items = [summary(i, by_id.get(i)) for i in range(d_sae)]
        if query:
            needle = query.lower()
            scored = [(s, item) for item in items if (s := _score(item, needle))]
            scored.sort(key=lambda pair: (-pair[0], -(pair[1]["max_activation"] or 0.0)))
            matches = [item for _, item in scored]
        else:
            matches = items
    return {"total": len(matches), "data": matches[offset : offset + limit]}
