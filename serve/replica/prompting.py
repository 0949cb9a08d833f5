"""Prompts to token ids (chat template applied) with character offsets, and token ids back to display text.

Lives in the model deployment, next to the engine, so the ingress needs neither torch nor transformers. The
engine is given token ids, so the offsets reported by /v1/activations describe exactly the tokens the model read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve.errors import InvalidRequest


@dataclass
class RenderedPrompt:
    """Token ids of a prompt; `text` and `offsets` ([start, end) per token) unless it was given as ids."""

    token_ids: list[int]
    text: str | None
    offsets: list[tuple[int, int]] | None


class PromptRenderer:
    """A Hugging Face fast tokenizer of the served model, with a cache of single-token texts."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = len(self.tokenizer)
        self._texts: dict[int, str] = {}

    def render_ids(self, token_ids: list[int], param: str) -> RenderedPrompt:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", param
            )
        return RenderedPrompt(list(token_ids), None, None)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool, param: str) -> RenderedPrompt:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raises its own types for conversations a template refuses
            raise InvalidRequest(f"{param}: the chat template rejected the conversation: {e}", param) from None
        # The template already wrote the special tokens (as vLLM does for chat).
        return self._encode(text, False, param)

    def render_text(self, text: str, param: str) -> RenderedPrompt:
        return self._encode(text, True, param)

    def _encode(self, text: str, add_special_tokens: bool, param: str) -> RenderedPrompt:
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        if not enc["input_ids"]:
            raise InvalidRequest(f"{param}: the prompt is empty", param)
        return RenderedPrompt(list(enc["input_ids"]), text, [tuple(o) for o in enc["offset_mapping"]])

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)
