"""`serve.engine.live.LiveFeatures`: engine outputs go out in order, each once all its tokens' rows are in."""

from __future__ import annotations

import pytest

from serve.engine.engine import GenerationUpdate, OutputDelta
from serve.engine.live import LiveFeatures

pytestmark = pytest.mark.fast


def update(tokens: list[int], prompt: list[int], finished: bool = False) -> GenerationUpdate:
    out = OutputDelta(
        index=0, text="".join(f"<{t}>" for t in tokens), token_ids=tokens, logprobs=None, finish_reason=None
    )
    return GenerationUpdate(request_id="r", prompt_token_ids=prompt, outputs=[out], finished=finished)


def rows(positions: list[int], sae: str = "s") -> dict:
    return {
        sae: {
            "positions": positions,
            "top_indices": [[p] for p in positions],
            "top_values": [[float(p)] for p in positions],
            "feature_values": [[] for _ in positions],
        }
    }


def test_an_output_waits_for_its_tokens_rows_and_the_prompt_comes_first():
    live = LiveFeatures(["s"], include_prompt=True)
    live.add(update([7], prompt=[1, 2]))
    assert live.ready() == []  # the prompt's rows and token 7's (position 2) are not in
    live.add_rows(rows([0, 1]))
    assert live.ready() == []
    live.add(update([8], prompt=[1, 2]))
    live.add_rows(rows([2]))
    (first,) = live.ready()
    assert [(t.position, t.token_id, t.rows["s"][0]) for t in first.live] == [(0, 1, [0]), (1, 2, [1]), (2, 7, [2])]
    live.add(update([9], prompt=[1, 2], finished=True))
    live.add_rows(rows([3]))
    (second,) = live.ready()
    assert [(t.position, t.token_id) for t in second.live] == [(3, 8)]
    (last,) = live.ready(final=True)
    assert [(t.position, t.token_id, t.rows) for t in last.live] == [(4, 9, None)]  # never read by the model


def test_every_sae_must_have_a_row_and_the_prompt_can_be_left_out():
    live = LiveFeatures(["a", "b"], include_prompt=False)
    live.add(update([5, 6], prompt=[1]))
    live.add_rows(rows([1, 2], "a"))
    assert live.ready() == []
    live.add_rows(rows([1], "b"))
    assert live.ready() == []
    live.add_rows(rows([2], "b"))
    (out,) = live.ready()
    assert [t.position for t in out.live] == [1, 2] and set(out.live[0].rows) == {"a", "b"}
