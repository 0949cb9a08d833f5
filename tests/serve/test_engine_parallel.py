"""Tensor and pipeline parallel engines on CPU (a tiny Llama-shaped model with dummy weights and even head counts):
TP=2 and PP=2 steer and capture as TP=1 does, and so does the static steering path that CUDA graphs need (every
site's fixed-shape work in every step, run here without graphs). Each engine worker gets one of the box's cores."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from sae import load_sae
from sae.steering import FoldedSAE
from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.engine.model_files import embedded_model_dir
from serve.errors import SpecError
from serve.specs import CaptureSpec, SteeringEntry
from tests.helpers import make_random_sae
from tests.serve.test_engine_large_config import TINY_LLAMA31

PROMPT = "Hello there, how are you today"
SAMPLING = Sampling(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama-parallel")
    (model / "config.json").write_text(json.dumps({**TINY_LLAMA31, "torch_dtype": "float32"}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, model / f)
    saes = tmp_path_factory.mktemp("saes")
    # Layer 1 lies on the first pipeline stage, layer 3 on the second. ReLU SAEs: ranks sum their partial results
    # in another order (differences of 1e-7), which can flip a TopK or JumpReLU cut-off at a near tie and with it a
    # clamp's coefficient; a ReLU activation moves continuously.
    make_random_sae(saes / "l1", "blocks.1.resid_post", "relu", d_in=TINY_LLAMA31["hidden_size"], seed=1)
    make_random_sae(saes / "l3", "blocks.3.mlp_out", "relu", d_in=TINY_LLAMA31["hidden_size"], seed=3)
    # Only for the paging test: a third SAE of the same size, and one larger than its budget.
    make_random_sae(saes / "l2", "blocks.2.resid_post", "relu", d_in=TINY_LLAMA31["hidden_size"], seed=2)
    make_random_sae(saes / "big", "blocks.2.resid_post", "relu", d_in=TINY_LLAMA31["hidden_size"], d_sae=4096)
    return model, {"l1": str(saes / "l1"), "l3": str(saes / "l3")}


async def outcome(
    tiny,
    tp: int,
    pp: int,
    features: dict[str, int] | None = None,
    static: bool = False,
    after: Callable[[SAEEngine], Awaitable[None]] | None = None,
    **options,
) -> dict:
    """Per steering case: the captures read after steering, the greedy tokens and the steering report. The steered
    features are the strongest ones at the last prompt token unless given (a parallel engine is compared on the
    single engine's specs). `options` go to the engine config; with a `touch` SAE, a capture there runs before
    each case (under an SAE budget it pages another SAE out); `after` runs last, on the same engine."""
    model, saes = tiny
    touch = options.pop("touch", None)
    config = EngineConfig(
        model=str(model),
        enforce_eager=True,
        load_dummy_weights=True,
        max_model_len=256,
        kv_cache_gib=0.25,
        saes=saes,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        static_steering=static,
        **options,
    )
    capture = CaptureSpec(saes=["l1", "l3"], top_k=4)
    async with SAEEngine.started(config) as engine:
        assert engine.steering_refused is None  # the probe passed at both sites
        assert engine.static_steering is static
        if features is None:
            res = await engine.activations(PROMPT, capture)
            features = {s: res.per_sae[s]["top_indices"][-1][0] for s in ("l1", "l3")}
        out: dict = {"features": features}
        for name, steering in {
            "plain": [],
            "add": [SteeringEntry(sae="l1", feature=features["l1"], value=0.5)],
            "clamp": [SteeringEntry(sae="l1", feature=features["l1"], value=3.0, op="clamp")],
            "mul_late": [SteeringEntry(sae="l3", feature=features["l3"], value=3.0, op="mul")],
        }.items():
            if touch:
                await engine.activations(PROMPT, CaptureSpec(saes=[touch], top_k=1))
            res = await engine.activations(PROMPT, capture, steering)
            tokens, report = [], None
            async for u in engine.generate(PROMPT, SAMPLING, steering):
                tokens += [t for o in u.outputs for t in o.token_ids]
                report = u.steering_report or report
            out[name] = {
                "captures": res.per_sae,
                "tokens": tokens,
                "report": [(r.steered_tokens, r.status) for r in report or []],
            }
        if after is not None:
            await after(engine)
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def single(tiny):
    return await outcome(tiny, 1, 1)


@pytest.mark.parametrize("tp, pp, static", [(2, 1, False), (1, 2, False), (1, 1, True)])
async def test_parallel_engine_steers_and_captures_as_one_worker(tiny, single, tp, pp, static):
    got = await outcome(tiny, tp, pp, single["features"], static)
    assert single["add"]["tokens"] != single["plain"]["tokens"], "steering changed nothing: the check is vacuous"
    for case in ("plain", "add", "clamp", "mul_late"):
        want, have = single[case], got[case]
        assert have["report"] == want["report"], case
        for sae_id in ("l1", "l3"):  # read after the steering at that site: steering ran on every rank alike
            assert have["captures"][sae_id]["positions"] == want["captures"][sae_id]["positions"]
            torch.testing.assert_close(
                torch.tensor(have["captures"][sae_id]["top_values"]),
                torch.tensor(want["captures"][sae_id]["top_values"]),
                rtol=1e-3,
                atol=1e-4,
            )
        # Dummy weights give near-tied logits, and ranks sum their partial logits in another order (1e-7): greedy
        # tokens are compared where steering left a margin (the early layer), activations everywhere.
        if case != "mul_late":
            assert have["tokens"] == want["tokens"], case


async def tokens_of(engine: SAEEngine, steering: list[SteeringEntry], max_tokens: int) -> tuple[list, list, float]:
    tokens, report = [], []
    async for u in engine.generate(PROMPT, Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), steering):
        tokens += [t for o in u.outputs for t in o.token_ids]
        report = u.steering_report or report
    return tokens, [(r.sae, r.status) for r in report], time.monotonic()


async def test_paging_under_an_sae_budget_gives_the_all_resident_results(tiny, single):
    """Three SAEs under a budget that holds two: before every case a capture at the third pages one out, so each
    case pages in what it uses. Results equal the all-resident engine's exactly; a request whose SAEs cannot be
    made resident while another request pins the budget waits for it and completes; an SAE larger than the whole
    budget is refused at load."""
    model, saes = tiny
    folder = Path(saes["l1"]).parent
    one = FoldedSAE.bytes_for(load_sae(folder / "l1"), torch.float32)
    checked: dict = {}

    async def after(engine: SAEEngine) -> None:
        checked["page_ins"] = engine.page_ins
        resident = [m for m in engine.saes() if m.resident]
        checked["resident_bytes"] = sum(m.resident_bytes for m in resident)
        pin = [SteeringEntry(sae="l1", feature=1, value=0.5), SteeringEntry(sae="l3", feature=1, value=0.5)]
        slow = asyncio.create_task(tokens_of(engine, pin, 200))
        await asyncio.sleep(0.2)  # the slow request holds l1 and l3: l2 cannot be paged in until it ends
        quick = await tokens_of(engine, [SteeringEntry(sae="l2", feature=1, value=0.5)], 4)
        slow_result = await slow
        checked["waited"] = quick[2] >= slow_result[2]
        checked["reports"] = (slow_result[1], quick[1])
        with pytest.raises(SpecError, match="more than the whole SAE budget") as err:
            await engine.load_sae(folder / "big", "big")
        checked["refused_param"] = err.value.param
        checked["after_refusal"] = sorted(m.sae_id for m in engine.saes())

    budget_gib = 2.5 * one / 2**30
    paged = await outcome(
        (model, {**saes, "l2": str(folder / "l2")}),
        1,
        1,
        single["features"],
        sae_memory_gib=budget_gib,
        touch="l2",
        after=after,
    )
    for case in ("plain", "add", "clamp", "mul_late"):
        assert paged[case] == single[case], case  # the very same tokens, captures and reports
    assert checked["page_ins"] >= 4  # every case paged something in
    assert checked["resident_bytes"] <= budget_gib * 2**30
    assert checked["waited"], "the request on l2 finished before the request pinning the budget"
    assert checked["reports"] == ([("l1", "applied"), ("l3", "applied")], [("l2", "applied")])
    assert checked["refused_param"] == "sae_memory_gib" and checked["after_refusal"] == ["l1", "l2", "l3"]
