"""Live features of one generation stream as the wire's token rows (`ActivationToken`, as in /v1/activations)."""

from __future__ import annotations

from serve.engine.live import LiveToken
from serve.protocol import ActivationToken, FeatureValues, LiveFeaturesRequest
from serve.replica.prompting import PromptRenderer, RenderedPrompt


class LiveRows:
    """Converts the engine's `LiveToken`s of one stream, in order; offsets are [start, end) in the prompt's text +
    the generated text, as in /v1/activations (a prompt given as token ids counts its tokens' texts)."""

    def __init__(self, prompts: PromptRenderer, rendered: RenderedPrompt, spec: LiveFeaturesRequest):
        self._prompts = prompts
        self._spec = spec
        self._prompt_len = len(rendered.token_ids)
        offsets = rendered.offsets
        if offsets is None:  # token ids: each token's text, end to end
            offsets, at = [], 0
            for t in rendered.token_ids:
                width = len(prompts.token_text(t))
                offsets.append((at, at + width))
                at += width
        self._prompt_offsets = offsets
        self._generated_at = len(rendered.text) if rendered.text is not None else (offsets[-1][1] if offsets else 0)

    def rows(self, live: list[LiveToken], text: str) -> list[ActivationToken]:
        """Rows of the tokens of one engine update, whose generated tokens spell `text`."""
        out = []
        generated = [t for t in live if t.position >= self._prompt_len]
        left = len(text)
        for tok in live:
            is_generated = tok.position >= self._prompt_len
            if is_generated:
                # An update of several tokens: each its own text's length, the last one what remains.
                width = left if tok is generated[-1] else min(left, len(self._prompts.token_text(tok.token_id)))
                offset = (self._generated_at, self._generated_at + width)
                self._generated_at += width
                left -= width
            else:
                offset = self._prompt_offsets[tok.position]
            out.append(
                ActivationToken(
                    index=tok.position,
                    id=tok.token_id,
                    text=self._prompts.token_text(tok.token_id),
                    offset=offset,
                    generated=is_generated,
                    saes=None if tok.rows is None else {s: self._values(s, row) for s, row in tok.rows.items()},
                )
            )
        return out

    def _values(self, sae_id: str, row: tuple[list[int], list[float], list[float]]) -> FeatureValues:
        top_i, top_v, chosen = row
        return FeatureValues(
            top=list(zip(top_i, top_v)), features=list(zip(self._spec.features.get(sae_id, []), chosen))
        )
