"""The worker's step planning without vLLM: a stand-in model runner (batch rows, query_start_loc, request states)
drives `SteeringRuntime.begin_step`, then `apply` runs at a hook site as the model would. Checks that the static
path (every slot, every site, as CUDA graphs need) and the per-step path steer alike, that the report counts the
planned rows per positions mode, that entries beyond a site's slots are reported over_capacity, and that capture
reads the tap buffer after the step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae.hookpoints import SITES
from sae.steering import FoldedSAE, SteeringTable, SteerOp, steering_delta
from serve.engine import codec
from serve.engine.worker.runtime import SteeringRuntime
from serve.specs import CaptureSpec, SteeringEntry
from tests.helpers import make_random_sae

pytestmark = pytest.mark.fast  # no engine: the runner is a namespace

D, LAYERS, LAYER = 32, 4, 2
SITE = LAYER * len(SITES) + SITES.index("resid_post")


def runtime(tmp_path, static: bool, slots: int = 16) -> SteeringRuntime:
    make_random_sae(tmp_path / "s", f"blocks.{LAYER}.resid_post", "jumprelu", d_in=D, d_sae=64, seed=4)
    options = codec.WorkerOptions(static_steering=static, steering_slots=slots, capture_sites=2, sae_dtype=None)
    rt = SteeringRuntime(D, LAYERS, torch.device("cpu"), 64, options, static)
    rt.load("s", str(tmp_path / "s"))
    return rt


def attach(rt: SteeringRuntime, requests: list[tuple[str, int, int, int, dict]]) -> torch.Tensor:
    """Requests (id, prompt length, computed tokens, rows this step, extra_args) in batch order; returns the
    positions tensor of the step."""
    rows = [r[3] for r in requests]
    rt.runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=[r[0] for r in requests], num_reqs=len(requests)),
        query_start_loc=SimpleNamespace(np=np.concatenate([[0], np.cumsum(rows)])),
        requests={
            r[0]: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=r[4]), num_prompt_tokens=r[1])
            for r in requests
        },
    )
    return torch.cat([torch.arange(r[2], r[2] + r[3]) for r in requests])


def entries(*specs: tuple[int, float, str, str]) -> list[SteeringEntry]:
    return [SteeringEntry(sae="s", feature=f, value=v, op=op, positions=pos) for f, v, op, pos in specs]  # type: ignore[arg-type]


STEER_A = entries((3, 4.0, "add", "all"), (5, 2.0, "clamp", "prompt"), (7, 1.5, "mul", "generated"))
STEER_B = entries((3, -2.0, "h_bias", "all"), (9, 3.0, "add", "generated"))


def step(rt: SteeringRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: request a (prompt of 6, first chunk of 4 rows), b (prompt 3, decoding position 5), c (unsteered
    capture of its 5-token prompt). Returns the hidden states before and after the hook."""
    positions = attach(
        rt,
        [
            ("a", 6, 0, 4, codec.encode(STEER_A, None, "key-a")),
            ("b", 3, 5, 1, codec.encode(STEER_B, None, "key-b")),
            ("c", 5, 0, 5, codec.encode([], CaptureSpec(saes=["s"], top_k=3), "key-c")),
        ],
    )
    rt.begin_step(positions)
    hidden = torch.randn(len(positions), D, generator=torch.Generator().manual_seed(0))
    residual = torch.randn(len(positions), D, generator=torch.Generator().manual_seed(1))
    before = hidden.clone()
    for site in range(LAYERS * len(SITES)):  # every site runs the op, as the model does
        rt.apply(site, hidden, residual, site % len(SITES) == SITES.index("resid_post"))
    return before + residual, hidden + residual


def reference(sae: FoldedSAE, x: torch.Tensor) -> torch.Tensor:
    """The expected activations after the hook, per request with the reference steering_delta."""
    out = x.clone()
    for rows, steer, generated in ((slice(0, 4), STEER_A, [False] * 4), (slice(4, 5), STEER_B, [True])):
        g = torch.tensor(generated).unsqueeze(1)
        mode = {"all": (True, True), "prompt": (True, False), "generated": (False, True)}
        on_prompt = torch.tensor([mode[e.positions][0] for e in steer])
        on_gen = torch.tensor([mode[e.positions][1] for e in steer])
        table = SteeringTable(
            torch.tensor([e.feature for e in steer]),
            torch.tensor([int(SteerOp[e.op.upper()]) for e in steer]),
            torch.tensor([e.value for e in steer]),
            torch.where(g, on_gen, on_prompt).float(),
        )
        out[rows] += steering_delta(sae, table, x[rows])
    return out


@pytest.mark.parametrize("static", [False, True])
def test_both_paths_steer_each_request_as_the_reference_and_report_its_rows(tmp_path, static):
    rt = runtime(tmp_path, static)
    x, after = step(rt)
    torch.testing.assert_close(after, reference(rt.saes["s"].folded, x), atol=1e-5, rtol=1e-5)
    assert (after[4] - x[4]).abs().max() > 0.1 and torch.equal(after[5:], x[5:])  # b steered, c untouched
    # a: 4 prompt rows (all: 4, prompt: 4, generated: 0); b: one generated row (h_bias all: 1, generated: 1).
    assert rt.reports.pop("key-a") == {"rows": {0: 4, 1: 4, 2: 0}, "missing": [], "over_capacity": []}
    assert rt.reports.pop("key-b") == {"rows": {0: 1, 1: 1}, "missing": [], "over_capacity": []}
    rt.flush()  # after the step: capture reads the tap buffer
    captured = rt.captures.pop("key-c")["s"]
    assert captured["positions"] == [0, 1, 2, 3, 4]
    want = rt.saes["s"].folded.encode(after[5:]).topk(3, dim=-1)
    torch.testing.assert_close(torch.tensor(captured["top_values"]), want.values, atol=1e-5, rtol=1e-5)


def test_entries_beyond_a_sites_slots_are_reported_over_capacity_and_left_alone(tmp_path):
    rt = runtime(tmp_path, static=True, slots=4)  # a's three entries fit, then one of b's two
    x, after = step(rt)
    assert rt.reports.pop("key-b") == {"rows": {0: 1}, "missing": [], "over_capacity": [1]}
    sae = rt.saes["s"].folded
    kept = SteeringTable(
        torch.tensor([3]), torch.tensor([int(codec.SteerOp.H_BIAS)]), torch.tensor([-2.0]), torch.ones(1, 1)
    )
    torch.testing.assert_close(after[4:5], x[4:5] + steering_delta(sae, kept, x[4:5]), atol=1e-5, rtol=1e-5)


def test_a_batch_without_steering_leaves_every_row_unowned(tmp_path):
    rt = runtime(tmp_path, static=True)
    step(rt)
    positions = attach(rt, [("d", 4, 0, 4, {})])
    rt.begin_step(positions)
    assert bool((rt.row_owner == -1).all())  # the static path then adds exactly zero everywhere
    hidden = torch.randn(4, D)
    before = hidden.clone()
    rt.apply(SITE, hidden, torch.zeros(4, D), True)
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("static", [False, True])
def test_a_vector_entry_ablates_its_direction_on_its_own_rows(tmp_path, static):
    rt = runtime(tmp_path, static)
    u = torch.randn(D, generator=torch.Generator().manual_seed(3))
    entry = SteeringEntry(vector=u.tolist(), hook_point=f"blocks.{LAYER}.resid_post", op="ablate")
    positions = attach(rt, [("v", 3, 0, 3, codec.encode([entry], None, "key-v")), ("w", 2, 0, 2, {})])
    rt.begin_step(positions)
    hidden, residual = torch.randn(5, D), torch.randn(5, D)
    x = hidden + residual
    rt.apply(SITE, hidden, residual, True)
    after = hidden + residual
    unit = u / u.norm()
    torch.testing.assert_close(after[:3] @ unit, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(after[:3], x[:3] - (x[:3] @ unit).unsqueeze(1) * unit, atol=1e-5, rtol=1e-5)
    assert torch.equal(after[3:], x[3:])
    assert rt.reports.pop("key-v")["rows"] == {0: 3}


@pytest.mark.parametrize("static", [False, True])
def test_a_gated_entry_steers_only_where_its_condition_holds_and_reports_those_rows(tmp_path, static):
    rt = runtime(tmp_path, static)
    sae = rt.saes["s"].folded
    hidden, residual = torch.randn(6, D, generator=torch.Generator().manual_seed(5)), torch.zeros(6, D)
    x = hidden.clone()
    act = sae.encode(x)
    feature = int((act > 0).sum(dim=0).argmax())
    middle = act[:, feature].sort().values[2:4]
    bound = float(middle.mean())  # halfway between two rows' values: no row sits at the bound
    holds = act[:, feature] > bound
    assert 0 < int(holds.sum()) < 6
    entry = SteeringEntry(sae="s", feature=9, value=3.0, when={"sae": "s", "feature": feature, "above": bound})
    positions = attach(rt, [("g", 6, 0, 6, codec.encode([entry], None, "key-g"))])
    rt.begin_step(positions)
    for site in range(LAYERS * len(SITES)):
        rt.apply(site, hidden, residual, site % len(SITES) == SITES.index("resid_post"))
    want = x + holds.float().unsqueeze(1) * 3.0 * sae.decoder_rows(torch.tensor([9]))
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
    rt.collect_hits()
    assert rt.reports.pop("key-g")["rows"] == {0: int(holds.sum())}
