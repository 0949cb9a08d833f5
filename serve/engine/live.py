"""Live features of one request: line up each delivered token with its captured rows before it goes out.

Runs in the engine facade. A token's activations are computed in the step that reads it, one step after the step
that sampled it, so an engine output is held until the rows of all its tokens have arrived from the workers' drain
(`SAEEngine._drain_once`); the outputs keep their order, and an output is never split. At the end of the request
every held output goes out: a token the model never read (the last sampled one) carries no rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve.engine.engine import GenerationUpdate

# Per SAE id: (top-k feature indices, their values, the chosen features' values) of one token.
FeatureRow = tuple[list[int], list[float], list[float]]


@dataclass
class LiveToken:
    """A token of a live-features request: its position in prompt + generated, its id and its rows (None where the
    model never read it)."""

    position: int
    token_id: int
    rows: dict[str, FeatureRow] | None


class LiveFeatures:
    """Rows received so far by position, and the engine outputs waiting for theirs (one choice: n == 1)."""

    def __init__(self, saes: list[str], include_prompt: bool):
        self.saes = list(saes)
        self.include_prompt = include_prompt
        self._rows: dict[int, dict[str, FeatureRow]] = {}  # position -> SAE id -> row
        self._held: list[tuple[GenerationUpdate, list[tuple[int, int]]]] = []  # update, its (position, token id)
        self._prompt: list[int] | None = None  # prompt token ids, until they went out
        self._next = -1  # position of the next generated token

    def add_rows(self, captures: dict[str, dict[str, list]]) -> None:
        """Rows as the workers' capture store gives them: per SAE, positions and columns."""
        for sae_id, cap in captures.items():
            for r, p in enumerate(cap["positions"]):
                row = (cap["top_indices"][r], cap["top_values"][r], cap["feature_values"][r])
                self._rows.setdefault(p, {})[sae_id] = row

    def add(self, update: GenerationUpdate) -> None:
        """An engine output, held until its tokens' rows are in."""
        if self._next < 0:
            self._next = len(update.prompt_token_ids)
            self._prompt = list(update.prompt_token_ids) if self.include_prompt else []
        tokens = []
        for out in update.outputs:
            for t in out.token_ids:
                tokens.append((self._next, t))
                self._next += 1
        self._held.append((update, tokens))

    def _complete(self, position: int) -> bool:
        have = self._rows.get(position, {})
        return all(s in have for s in self.saes)

    def _token(self, position: int, token_id: int) -> LiveToken:
        return LiveToken(position, token_id, self._rows.pop(position) if self._complete(position) else None)

    def ready(self, final: bool = False) -> list[GenerationUpdate]:
        """The held outputs, in order, whose tokens all have rows (all of them once `final`), with their tokens'
        rows on `update.live`; the first also carries the prompt's tokens when they were asked for."""
        out = []
        while self._held:
            update, tokens = self._held[0]
            prompt = self._prompt or []
            if not final and not all(self._complete(p) for p in [*range(len(prompt)), *(p for p, _ in tokens)]):
                break
            self._held.pop(0)
            update.live = [self._token(p, t) for p, t in enumerate(prompt)] + [self._token(p, t) for p, t in tokens]
            self._prompt = []
            out.append(update)
        return out
