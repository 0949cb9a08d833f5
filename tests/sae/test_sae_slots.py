"""The serving path's steering math (`slot_delta` on a `SlotTable`) against the reference `steering_delta`, and
its graph safety: traced once with fake tensors (no data-dependent control flow or shape can survive that), the
traced graph replays any later contents of the same buffers exactly, as a captured CUDA graph must."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sae import load_sae
from sae.steering import (
    EMPTY_SLOT,
    LATENT_OPS,
    ConditionTable,
    FoldedSAE,
    SlotTable,
    SteeringTable,
    SteerOp,
    condition_results,
    slot_delta,
    steering_delta,
)
from tests.helpers import make_random_sae

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

FEATURE_OPS = [SteerOp.ADD, *LATENT_OPS]  # the ops the reference steering_delta defines

D, D_SAE, T_MAX, CAPACITY = 64, 512, 32, 48


def folded(tmp_path, architecture: str, seed: int = 3) -> FoldedSAE:
    make_random_sae(tmp_path / architecture, "blocks.3.resid_post", architecture, d_in=D, d_sae=D_SAE, k=16, seed=seed)
    return FoldedSAE.build(load_sae(tmp_path / architecture), torch.device("cpu"))


def random_step(sae: FoldedSAE, x: torch.Tensor, ops: list[SteerOp], seed: int, chooser: FoldedSAE | None = None):
    """Three requests owning rows [0, 9), [9, 20) and [20, n), entries with random features (some of them the most
    active ones by `chooser`, default `sae`), ops, values and positions; returns the filled table, the row table
    and the reference delta (steering_delta per request)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    owners = torch.full((T_MAX,), -1)
    bounds = [(0, 9), (9, 20), (20, n)]
    for owner, (a, b) in enumerate(bounds):
        owners[a:b] = owner
    generated = torch.zeros(T_MAX, dtype=torch.bool)
    generated[:n] = torch.rand(n, generator=g) < 0.5
    table = SlotTable.allocate(D, CAPACITY, torch.device("cpu"))
    expected = torch.zeros_like(x)
    start = 0
    for owner, (a, b) in enumerate(bounds):
        e = 7
        features = torch.randint(0, D_SAE, (e,), generator=g)
        features[:2] = (chooser or sae).pre_activations(x[a:b]).argmax(dim=1)[:2]  # active, so clamp/mul bite
        op = torch.tensor([int(ops[i % len(ops)]) for i in range(e)])
        features[op == SteerOp.H_BIAS] = torch.randperm(D_SAE, generator=g)[: int((op == SteerOp.H_BIAS).sum())]
        value = 6 * torch.randn(e, generator=g)
        mode = torch.randint(0, 3, (e,), generator=g)  # 0 all, 1 prompt, 2 generated
        prompt, gen = mode != 2, mode != 1
        table.fill(start, sae, features, op, value, [owner] * e, prompt, gen)
        start += e
        rows_gen = generated[a:b].unsqueeze(1)
        mask = (torch.where(rows_gen, gen, prompt)).float()  # [r, e]
        expected[a:b] = steering_delta(sae, SteeringTable(features, op, value, mask), x[a:b])
    return table, owners, generated, expected, start


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
@pytest.mark.parametrize("ops", [[SteerOp.ADD], [SteerOp.CLAMP], [SteerOp.MUL], [SteerOp.H_BIAS], FEATURE_OPS])
def test_slot_delta_equals_the_reference_per_request(tmp_path, architecture, ops):
    sae = folded(tmp_path, architecture)
    x = 3 * torch.randn(27, D, generator=torch.Generator().manual_seed(1))
    table, owners, generated, expected, used = random_step(sae, x, ops, seed=2)
    assert expected.abs().max() > 1.0  # the case really steers
    torch.testing.assert_close(slot_delta(x, table, owners, generated), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slot_delta(x, table, owners, generated, used), expected, atol=1e-4, rtol=1e-4)


def test_add_on_a_topk_sae_needs_no_encode(tmp_path):
    sae = folded(tmp_path, "topk")
    x = 3 * torch.randn(27, D, generator=torch.Generator().manual_seed(1))
    table, owners, generated, expected, used = random_step(sae, x, [SteerOp.ADD], seed=5)
    torch.testing.assert_close(slot_delta(x, table, owners, generated), expected, atol=1e-4, rtol=1e-4)
    skipped = slot_delta(x, table, owners, generated, used, reads=False)  # the per-step path's add-only sites
    torch.testing.assert_close(skipped, expected, atol=1e-4, rtol=1e-4)


def test_free_slots_and_unowned_rows_give_exactly_zero(tmp_path):
    sae = folded(tmp_path, "jumprelu")
    x = 3 * torch.randn(27, D)
    table, owners, generated, _, _ = random_step(sae, x, FEATURE_OPS, seed=2)
    assert torch.equal(slot_delta(x, table, torch.full((T_MAX,), -1), generated), torch.zeros_like(x))
    table.clear(0)
    assert bool((table.owner == EMPTY_SLOT).all())
    assert torch.equal(slot_delta(x, table, owners, generated), torch.zeros_like(x))


def test_a_graph_traced_once_replays_new_buffer_contents(tmp_path):
    """make_fx with fake tensors records only tensor ops (a host sync or data-dependent shape would raise); the
    recorded graph then runs on the real buffers, refilled between calls, as a CUDA graph replay would."""
    sae = folded(tmp_path, "jumprelu")
    x = 3 * torch.randn(27, D, generator=torch.Generator().manual_seed(1))
    table = SlotTable.allocate(D, CAPACITY, torch.device("cpu"))
    owners, generated = torch.full((T_MAX,), -1), torch.zeros(T_MAX, dtype=torch.bool)
    fields = list(vars(table))

    def step(x, owners, generated, *buffers):
        return slot_delta(x, SlotTable(**dict(zip(fields, buffers, strict=True))), owners, generated)

    buffers = [getattr(table, f) for f in fields]
    graph = make_fx(step, tracing_mode="fake")(x, owners, generated, *buffers)  # contents: all slots free
    assert not any(n.target in (torch.ops.aten.nonzero.default, torch.ops.aten.item.default) for n in graph.graph.nodes)
    for seed, ops in ((2, FEATURE_OPS), (7, [SteerOp.CLAMP, SteerOp.ADD]), (9, [SteerOp.H_BIAS])):
        filled, new_owners, new_generated, expected, _ = random_step(sae, x, ops, seed)
        for f in fields:  # refill the captured buffers in place, as begin_step does between steps
            getattr(table, f).copy_(getattr(filled, f))
        owners.copy_(new_owners)
        generated.copy_(new_generated)
        torch.testing.assert_close(graph(x, owners, generated, *buffers), expected, atol=1e-4, rtol=1e-4)


BF16_TOLERANCE = 0.02  # relative (Frobenius) error of a step's delta, bf16 weights vs float32


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
@pytest.mark.parametrize("seed", range(6))
def test_bfloat16_weights_steer_within_the_stated_tolerance_of_float32(tmp_path, architecture, seed):
    """The serving dtype on CUDA: matrices in bf16, biases, thresholds and every product in float32. Measured over
    30 random SAEs: at most 1.1% (JumpReLU, all ops), 0.2% for add; a single row can differ more where a latent sits
    within bf16 rounding of its threshold."""
    make_random_sae(tmp_path, "blocks.3.resid_post", architecture, d_in=D, d_sae=D_SAE, seed=seed)
    f32 = FoldedSAE.build(load_sae(tmp_path), torch.device("cpu"))
    bf16 = FoldedSAE.build(load_sae(tmp_path), torch.device("cpu"), torch.bfloat16)
    assert bf16.W_enc.dtype == bf16.W_dec.dtype == torch.bfloat16
    assert bf16.resident_bytes() < 0.51 * f32.resident_bytes() + 4 * 2 * D_SAE  # matrices halved, vectors kept
    x = 3 * torch.randn(27, D, generator=torch.Generator().manual_seed(seed))
    want, owners, generated, _, _ = random_step(f32, x, FEATURE_OPS, seed)
    have, *_ = random_step(bf16, x, FEATURE_OPS, seed, chooser=f32)  # the same features
    reference = slot_delta(x, want, owners, generated)
    error = (slot_delta(x, have, owners, generated) - reference).norm() / reference.norm()
    assert reference.norm() > 1.0 and 0 < error <= BF16_TOLERANCE
    acts = f32.encode(x)  # capture reads the same weights: its activations keep the same bound
    assert (bf16.encode(x) - acts).norm() / acts.norm() <= BF16_TOLERANCE


@pytest.mark.parametrize("normalize", [False, True])
def test_direction_slots_apply_the_residual_ops(normalize):
    """Slots filled from raw directions: add along u (or û), ablate, cap and set along û, each on its owner's rows."""
    g = torch.Generator().manual_seed(8)
    x = 3 * torch.randn(10, D, generator=g)
    u = torch.randn(4, D, generator=g)
    unit = u / u.norm(dim=1, keepdim=True)
    ops = [SteerOp.ADD, SteerOp.ABLATE, SteerOp.CAP, SteerOp.SET]
    values = [2.5, 0.0, -0.5, 1.5]
    table = SlotTable.allocate(D, 8, torch.device("cpu"))
    write = unit.clone() if normalize else torch.cat([u[:1], unit[1:]])
    table.fill_directions(0, unit, write, ops, values, [0, 1, 2, 3], [True] * 4, [True] * 4)
    owners = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1] + [-1] * (T_MAX - 10))
    generated = torch.zeros(T_MAX, dtype=torch.bool)
    expected = torch.zeros_like(x)
    for row in range(8):
        slot = int(owners[row])
        p = x[row] @ unit[slot]
        v = values[slot]
        change = {0: v, 1: -p, 2: min(v - p, 0.0), 3: v - p}[slot]
        expected[row] = change * (write[slot] if slot == 0 else unit[slot])
    delta = slot_delta(x, table, owners, generated)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    after = x + delta
    torch.testing.assert_close(after[2:4] @ unit[1], torch.zeros(2), atol=1e-4, rtol=0)  # ablated
    assert bool((after[4:6] @ unit[2] <= -0.5 + 1e-4).all())  # capped
    torch.testing.assert_close(after[6:8] @ unit[3], torch.full((2,), 1.5), atol=1e-4, rtol=0)  # set


def test_conditions_gate_their_slots_per_row_and_count_the_rows_steered(tmp_path):
    """Two conditions at a site write their columns of the step's results; a slot gated by one, a slot gated by
    both (AND) and an ungated slot; all three own every row. Traced once with fake tensors, like the rest."""
    sae = folded(tmp_path, "jumprelu")
    x = 3 * torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    act = sae.encode(x)
    fires = (act > 0).sum(dim=0)  # the most often active latents, so that the bounds split the rows
    a, b = int(fires[:256].argmax()), int(fires[256:].argmax()) + 256
    middle = act[:, a].sort().values[9:11]
    bound_a, bound_b = float(middle.mean()), float(act[:, b].max()) / 2  # no row sits at a bound
    always, scratch = 4, 5
    ok = torch.zeros(T_MAX, 6, dtype=torch.bool)
    ok[:, always] = True
    conditions = ConditionTable.allocate(D, 3, torch.device("cpu"), scratch)
    conditions.fill(0, sae, a, False, bound_a, 0)  # column 0: act_a > bound_a
    conditions.fill(1, sae, b, True, bound_b, 2)  # column 2: act_b < bound_b
    table = SlotTable.allocate(D, 4, torch.device("cpu"), always, per_slot=2)
    features = torch.tensor([7, 8, 9])
    table.fill(0, sae, features, [int(SteerOp.ADD)] * 3, [1.0, 2.0, 3.0], [0, 0, 0], [True] * 3, [True] * 3)
    table.gate(0, [[0], [0, 2], []], always)
    owners, generated = torch.zeros(T_MAX, dtype=torch.long), torch.zeros(T_MAX, dtype=torch.bool)

    def step(x, ok, owners, generated, *buffers):
        ct = ConditionTable(*buffers[:6])
        st = SlotTable(*buffers[6:])
        ok[: x.shape[0]].index_copy_(1, ct.column, condition_results(x, ct))
        return slot_delta(x, st, owners, generated, condition_ok=ok)

    buffers = [*vars(conditions).values(), *vars(table).values()]
    graph = make_fx(step, tracing_mode="fake")(x, ok.clone(), owners, generated, *[b.clone() for b in buffers])
    delta = graph(x, ok, owners, generated, *buffers)
    hold_a, hold_b = act[:, a] > bound_a, act[:, b] < bound_b
    assert 0 < int(hold_a.sum()) < 20 and 0 < int((hold_a & hold_b).sum()) < int(hold_a.sum())
    gate = torch.stack([hold_a, hold_a & hold_b, torch.ones(20, dtype=torch.bool)], dim=1).float()  # [T, 3]
    expected = (gate * torch.tensor([1.0, 2.0, 3.0])) @ sae.decoder_rows(features)
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)
    assert table.hits[:3].tolist() == gate.sum(dim=0).tolist()
