"""Prompts to token ids (chat template applied) with character offsets, and token ids back to display text.

Lives in the model deployment, next to the engine, so the ingress needs neither torch nor transformers. The
engine is given token ids, so the offsets reported by /v1/activations describe exactly the tokens the model read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .calls import CallError, PromptInput


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

    def render(self, prompt: PromptInput, param: str) -> RenderedPrompt | CallError:
        if prompt.token_ids is not None:
            bad = [t for t in prompt.token_ids if not 0 <= t < self.vocab_size]
            if bad:
                return CallError(400, f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                                 param)
            return RenderedPrompt(list(prompt.token_ids), None, None)
        if prompt.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    prompt.messages, tokenize=False, add_generation_prompt=prompt.add_generation_prompt
                )
            except Exception as e:  # jinja raises its own types for conversations a template refuses
                return CallError(400, f"{param}: the chat template rejected the conversation: {e}", param)
            # The template already wrote the special tokens (as vLLM does for chat).
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        else:
            text = prompt.text or ""
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if not enc["input_ids"]:
            return CallError(400, f"{param}: the prompt is empty", param)
        return RenderedPrompt(list(enc["input_ids"]), text, [tuple(o) for o in enc["offset_mapping"]])

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)
