"""Label SAE features in words: show an OpenAI-compatible chat endpoint each feature's top-activating contexts
(active token marked) and store its short answer as `explanation` in the folder's feature_stats.json, which the
service's feature cards and feature search then show (serve/replica/feature_search.py).

    python -m trainer.explain --sae-dir runs/registry/my-sae --base-url http://127.0.0.1:8000/v1 --limit 50

Talks HTTP only (httpx); the key comes from an environment variable, so it never appears in argv or logs. The
stats file is rewritten atomically once all asked features are labelled; a failed request leaves it unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from .explain_config import ExplainConfig

logger = logging.getLogger("sae_serve.explain")

STATS_FILE = "feature_stats.json"
SYSTEM_PROMPT = (
    "You name the features of a sparse autoencoder trained on a language model. You are shown text snippets where "
    "one feature fires; the token where it fires is marked like <<this>>. Reply with a short label of at most eight "
    "words saying what the feature detects. Reply with the label only."
)


class ExplainError(RuntimeError):
    """The endpoint refused or failed a request; the message is the endpoint's own error message."""


def _show(token: str) -> str:
    return token.replace("\n", "\\n")


def feature_prompt(record: dict[str, Any], max_contexts: int) -> str:
    """The user message for one feature: its top contexts with the active token marked."""
    lines = []
    for n, ctx in enumerate((record.get("top_contexts") or [])[:max_contexts], 1):
        tokens = [_show(t) for t in ctx["tokens"]]
        tokens[ctx["index"]] = f"<<{tokens[ctx['index']]}>>"
        lines.append(f"{n}. {''.join(tokens)}")
    return "Snippets where the feature fires:\n" + "\n".join(lines) + "\nLabel:"


def clean_label(answer: str, max_chars: int) -> str:
    """The answer's first non-empty line without quotes or a 'Label:' prefix; '' if nothing is left."""
    line = next((ln.strip() for ln in answer.splitlines() if ln.strip()), "")
    if line.lower().startswith("label:"):
        line = line[6:].strip()
    return line.strip("\"'` ").strip()[:max_chars]


def chosen_features(cfg: ExplainConfig, records: list[dict[str, Any]]) -> list[int]:
    """Indices to label this run: asked (or all with contexts), skipping explained ones unless overwrite."""
    wanted = cfg.features if cfg.features is not None else [i for i, r in enumerate(records) if r.get("top_contexts")]
    for i in wanted:
        if not 0 <= i < len(records):
            raise ValueError(f"feature {i} is not in {STATS_FILE} ({len(records)} features)")
    todo = [i for i in wanted if cfg.overwrite or not records[i].get("explanation")]
    return todo[: cfg.limit] if cfg.limit is not None else todo


def _ask(client: httpx.Client, cfg: ExplainConfig, prompt: str) -> str:
    body = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        **cfg.extra_body,
    }
    try:
        r = client.post("chat/completions", json=body)
    except httpx.HTTPError as e:
        raise ExplainError(f"cannot reach {cfg.base_url}: {e}") from e
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise ExplainError(f"{cfg.base_url} answered {r.status_code}: {message}")
    return r.json()["choices"][0]["message"]["content"] or ""


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers (the service's feature cards) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def explain(cfg: ExplainConfig) -> dict[str, Any]:
    """Label the chosen features and store the labels; returns {"explained": {index: label}, "empty": [index]}."""
    path = Path(cfg.sae_dir) / STATS_FILE
    stats = json.loads(path.read_text())
    records = stats["features"]
    todo = chosen_features(cfg, records)
    key = os.environ.get(cfg.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    explained: dict[int, str] = {}
    empty: list[int] = []
    with httpx.Client(base_url=cfg.base_url.rstrip("/") + "/", headers=headers, timeout=cfg.timeout_s) as client:
        for n, index in enumerate(todo, 1):
            label = clean_label(
                _ask(client, cfg, feature_prompt(records[index], cfg.max_contexts)), cfg.max_label_chars
            )
            if label:
                explained[index] = label
            else:
                empty.append(index)
            logger.info("feature %d (%d/%d): %r", index, n, len(todo), label)
    for index, label in explained.items():
        records[index]["explanation"] = label
    if explained:
        _write_atomic(path, stats)
    return {"explained": explained, "empty": empty}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.explain",
        description="Label SAE features from their top contexts with an OpenAI-compatible model.",
    )
    parser.add_argument("--sae-dir", required=True, type=Path, help="SAE folder with feature_stats.json")
    parser.add_argument("--base-url", default=ExplainConfig.base_url, help="API root including /v1")
    parser.add_argument("--model", default=ExplainConfig.model, help="model name for the chat requests")
    parser.add_argument(
        "--api-key-env", default=ExplainConfig.api_key_env, help="environment variable holding the API key"
    )
    parser.add_argument("--features", help="comma-separated feature indices (default: all with contexts)")
    parser.add_argument("--limit", type=int, help="label at most this many features")
    parser.add_argument("--overwrite", action="store_true", help="relabel features that have an explanation")
    parser.add_argument("--max-tokens", type=int, default=ExplainConfig.max_tokens, help="tokens per answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ExplainConfig(
        sae_dir=args.sae_dir,
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        features=[int(f) for f in args.features.split(",")] if args.features else None,
        limit=args.limit,
        overwrite=args.overwrite,
        max_tokens=args.max_tokens,
    )
    try:
        result = explain(cfg)
    except (ExplainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
