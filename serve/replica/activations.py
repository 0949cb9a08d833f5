"""Rows of a `/v1/activations` response: per token, its text, offsets and the captured features of each SAE."""

from __future__ import annotations

from typing import Any

from serve.protocol import ActivationsRequest, ActivationToken
from serve.replica.prompting import PromptRenderer, RenderedPrompt


def activation_rows(
    prompts: PromptRenderer,
    req: ActivationsRequest,
    rendered: RenderedPrompt,
    generated: list[int],
    captures: dict[str, dict[str, list]],
) -> tuple[list[ActivationToken], str, str]:
    """The token rows, the analysed text and the generated text."""
    text = rendered.text or ""
    offsets = list(rendered.offsets or [])
    gen_text = prompts.decode(generated)
    prev = 0
    for j in range(len(generated)):
        end = len(prompts.decode(generated[: j + 1])) if j + 1 < len(generated) else len(gen_text)
        offsets.append((len(text) + prev, len(text) + end))
        prev = end
    rows: dict[str, dict[int, int]] = {
        sae_id: {p: r for r, p in enumerate(cap["positions"])} for sae_id, cap in captures.items()
    }
    ids = rendered.token_ids + generated
    tokens = []
    for i, tid in enumerate(ids):
        saes: dict[str, Any] | None = {}
        for sae_id in req.saes:
            r = rows.get(sae_id, {}).get(i)
            if r is None:
                saes = None
                break
            cap = captures[sae_id]
            saes[sae_id] = {
                "top": list(zip(cap["top_indices"][r], cap["top_values"][r])),
                "features": list(zip(req.features.get(sae_id, []), cap["feature_values"][r])),
            }
        tokens.append(
            ActivationToken(
                index=i,
                id=tid,
                text=prompts.token_text(tid),
                offset=offsets[i],
                generated=i >= len(rendered.token_ids),
                saes=saes,
            )
        )
    return tokens, text, gen_text
