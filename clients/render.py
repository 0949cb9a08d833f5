"""Plain-text renderings of SDK results for the CLI."""

from __future__ import annotations

import json

from .response_models import ActivationsResponse, ActivationToken, FeatureCard, LogitLensToken, SAEList


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r).rstrip() for r in [header, *rows])


def _pairs(pairs: list[tuple[int, float]]) -> str:
    return "  ".join(f"{f}={v:.2f}" for f, v in pairs)


def activations_table(result: ActivationsResponse) -> str:
    """One row per token: position, the token (JSON-quoted so spaces and newlines show), whether it was generated,
    then per SAE its top features and, if asked, the requested features, as FEATURE=VALUE."""
    requested = {s for t in result.tokens if t.saes for s, v in t.saes.items() if v.features}
    header = ["pos", "token", "gen"]
    for sae in result.saes:
        header.append(f"{sae}: top")
        if sae in requested:
            header.append(f"{sae}: requested")
    rows = []
    for t in result.tokens:
        row = [str(t.index), json.dumps(t.text, ensure_ascii=False), "*" if t.generated else ""]
        for sae in result.saes:
            values = (t.saes or {}).get(sae)
            row.append(_pairs(values.top) if values else "-")
            if sae in requested:
                row.append(_pairs(values.features) if values else "-")
        rows.append(row)
    return _table(header, rows, right={0})


def live_token_line(token: ActivationToken) -> str:
    """A token of a live trace: position, the token (JSON-quoted), '*' if generated, then per SAE its top features
    and the chosen ones after '|'; '-' for a token the model never read."""
    cells = [f"{token.index:>5}", f"{json.dumps(token.text, ensure_ascii=False):<14}", "*" if token.generated else " "]
    for sae, values in (token.saes or {}).items():
        chosen = f" | {_pairs(values.features)}" if values.features else ""
        cells.append(f"{sae}: {_pairs(values.top)}{chosen}")
    if token.saes is None:
        cells.append("-")
    return "  ".join(cells)


def saes_table(saes: SAEList) -> str:
    rows = [[s.id, s.hook_point, s.architecture, str(s.d_in), str(s.d_sae), s.version] for s in saes.data]
    return _table(["id", "hook point", "architecture", "d_in", "d_sae", "version"], rows, right={3, 4})


def _tokens(tokens: list[LogitLensToken]) -> str:
    return ", ".join(f"{json.dumps(t.token, ensure_ascii=False)} {t.logit:+.3f}" for t in tokens)


def feature_card(card: FeatureCard) -> str:
    lines = [f"{card.sae} feature {card.feature}  (decoder norm {card.decoder_norm:.3f})"]
    if card.explanation:
        lines.append(f"explanation: {card.explanation}")
    stats = [
        f"{name} {value:.4g}"
        for name, value in (
            ("density", card.density),
            ("mean activation", card.mean_activation),
            ("max activation", card.max_activation),
        )
        if value is not None
    ]
    if stats:
        lines.append("  ".join(stats))
    lines.append(f"promotes:   {_tokens(card.top_tokens)}")
    lines.append(f"suppresses: {_tokens(card.bottom_tokens)}")
    for ctx in (card.top_contexts or [])[:5]:
        tokens, at = ctx.get("tokens", []), ctx.get("index")
        text = "".join(f"[{tok}]" if i == at else str(tok) for i, tok in enumerate(tokens))
        lines.append(f"context {ctx.get('activation', float('nan')):.3g}: {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(lines)
