"""Steering math on one SAE at one hook site: the change each op makes to the activations, as torch-only functions.

Ops (`SteerOp`), per token row r and entry e with feature i, value v and decoder row d_i:
    add     x += v · d_i
    clamp   x += (v - f_i(x)) · d_i              the feature's activation becomes v
    mul     x += (v - 1) · f_i(x) · d_i          the activation is multiplied by v
    h_bias  pre_i += v, and x += decode(f(pre + bias)) - decode(f(pre))   (the SAE error term is kept)
Residual-space ops on a direction u (a steering vector, or a feature's decoder row), with p = x · û:
    add     x += v · u                           (u unit-normalised on request)
    ablate  x -= p · û                           x loses its component along u
    cap     x += min(v - p, 0) · û               the projection is at most v
    set     x += (v - p) · û                     the projection becomes v
With nothing steered the delta is exactly zero, so the output equals the unsteered output.

Two forms of the same math:
- `slot_delta` is the serving path: fixed-shape tensor work on a `SlotTable` (one slot per steering entry in the
  step) that the host fills between steps, with no host synchronisation and no data-dependent shape, so a CUDA graph
  captured around it replays whatever the slots hold. It covers every op on ReLU and JumpReLU SAEs and `add` on all.
- `steering_delta` encodes only the rows and columns it needs, with data-dependent shapes: the path for latent ops
  (clamp, mul, h_bias) on TopK SAEs, whose activation of one latent depends on the row's k-th largest
  pre-activation (a full encode), and the reference `slot_delta` is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from . import architectures
from .config import SAEConfig
from .model import SparseAutoencoder

# Architectures whose activation of one latent depends on all the others (the k-th largest pre-activation).
FULL_ENCODE_ARCHITECTURES = ("topk",)


class SteerOp(IntEnum):
    """The ops; their values travel in the engine's per-request tables."""

    ADD = 0
    CLAMP = 1
    MUL = 2
    H_BIAS = 3
    ABLATE = 4
    CAP = 5
    SET = 6


LATENT_OPS = (SteerOp.CLAMP, SteerOp.MUL, SteerOp.H_BIAS)  # read an SAE latent's activation
RESIDUAL_OPS = (SteerOp.ABLATE, SteerOp.CAP, SteerOp.SET)  # read the projection on a unit direction


@dataclass
class FoldedSAE:
    """An SAE ready for the hot path, its weights held once: input scale and b_dec subtraction folded into the
    encoder (instead of kept beside it), decoder in model space. The decoder bias is not needed: steering changes
    activations, and the delta of a decode is the decode of the delta."""

    cfg: SAEConfig
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in], divided by input_scale
    threshold: torch.Tensor | None  # [d_sae] for jumprelu

    @classmethod
    def build(cls, module: SparseAutoencoder, device: torch.device, dtype: torch.dtype = torch.float32) -> FoldedSAE:
        """From a loaded module, which the caller then drops. The two matrices are held in `dtype` (the serving
        dtype); biases and thresholds, d_sae values each, stay in float32, and every product accumulates in float32."""
        module = module.to(device=device, dtype=torch.float32).eval()
        cfg = module.cfg
        with torch.no_grad():
            if cfg.input_scale == 1.0 and not cfg.b_dec_in_encoder:
                w, b = module.W_enc.detach(), module.b_enc.detach()
            else:
                w, b = module.folded_encoder()
            w_dec = module.W_dec.detach() if cfg.input_scale == 1.0 else module.W_dec.detach() / cfg.input_scale
        threshold = module.threshold.detach() if module.threshold is not None else None
        return cls(cfg, w.to(dtype).contiguous(), b, w_dec.to(dtype).contiguous(), threshold)

    def to(self, device: torch.device, pin: bool = False) -> FoldedSAE:
        """The same SAE on `device` (the very tensors where they are there already); `pin`: in page-locked host
        memory, for fast copies to a GPU."""

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=True)
            return t.pin_memory() if pin else t

        threshold = move(self.threshold) if self.threshold is not None else None
        return FoldedSAE(self.cfg, move(self.W_enc), move(self.b_enc), move(self.W_dec), threshold)

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def needs_full_encode(self) -> bool:
        return self.architecture in FULL_ENCODE_ARCHITECTURES

    @staticmethod
    def bytes_for(module: SparseAutoencoder, dtype: torch.dtype) -> int:
        """What `build(module, ..., dtype).resident_bytes()` will be, without building it."""
        vectors = module.b_enc.numel() + (module.threshold.numel() if module.threshold is not None else 0)
        return (module.W_enc.numel() + module.W_dec.numel()) * dtype.itemsize + vectors * 4

    def resident_bytes(self) -> int:
        tensors = [self.W_enc, self.b_enc, self.W_dec] + ([self.threshold] if self.threshold is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:  # [n, d_sae] -> [n, d_sae]
        return architectures.get_architecture(self.architecture)(pre, self)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:  # [n, d_in] float32 -> [n, d_sae] float32
        return (x.to(self.W_enc.dtype) @ self.W_enc).float() + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [n, d_in] -> [n, d_sae]
        return self.activate(self.pre_activations(x))

    def decoder_rows(self, features: torch.Tensor) -> torch.Tensor:  # [F] -> [F, d_in] float32
        return self.W_dec[features].float()

    def activate_columns(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Elementwise activation of chosen latents' pre-activations [n, E]; only valid without full encode."""
        if self.architecture == "relu":
            return torch.relu(pre)
        assert self.threshold is not None
        thr = self.threshold[features]
        return pre * (pre > thr)


EMPTY_SLOT = -2  # owner of an unused slot; rows outside any steering request have owner -1, so neither matches


@dataclass
class SlotTable:
    """Persistent steering slots of one hook site: slot u holds one entry of one request in the step (its SAE
    feature's encoder column, threshold and decoder row, op and value, and which of the owner's rows it steers).
    Allocated once at full capacity; only contents change between steps."""

    read: torch.Tensor  # [d_in, U] folded encoder column of the slot's feature
    read_bias: torch.Tensor  # [U]
    threshold: torch.Tensor  # [U] activation threshold: 0 for ReLU, the latent's threshold for JumpReLU
    write: torch.Tensor  # [U, d_in] decoder row
    op: torch.Tensor  # [U] long, SteerOp values
    value: torch.Tensor  # [U]
    owner: torch.Tensor  # [U] long, the owning request's id in the step's row table; EMPTY_SLOT when unused
    on_prompt: torch.Tensor  # [U] bool, steers the owner's prompt rows
    on_generated: torch.Tensor  # [U] bool, steers the owner's generated rows
    conditions: torch.Tensor  # [U, K] long, columns of the step's condition results that must all hold
    hits: torch.Tensor  # [U] rows each slot steered since it was last read (for the steering report)

    @classmethod
    def allocate(cls, d_in: int, capacity: int, device: torch.device, always: int = 0, per_slot: int = 1) -> SlotTable:
        """`always`: the condition-results column that is always true (a slot without conditions points there);
        `per_slot`: the most conditions one slot has."""
        f32, zeros = torch.float32, torch.zeros
        return cls(
            read=zeros(d_in, capacity, dtype=f32, device=device),
            read_bias=zeros(capacity, dtype=f32, device=device),
            threshold=zeros(capacity, dtype=f32, device=device),
            write=zeros(capacity, d_in, dtype=f32, device=device),
            op=zeros(capacity, dtype=torch.long, device=device),
            value=zeros(capacity, dtype=f32, device=device),
            owner=torch.full((capacity,), EMPTY_SLOT, dtype=torch.long, device=device),
            on_prompt=zeros(capacity, dtype=torch.bool, device=device),
            on_generated=zeros(capacity, dtype=torch.bool, device=device),
            conditions=torch.full((capacity, per_slot), always, dtype=torch.long, device=device),
            hits=zeros(capacity, dtype=f32, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.op.shape[0]

    def fill(self, start: int, sae: FoldedSAE, features: torch.Tensor, ops, values, owners, prompt, generated) -> None:
        """Write slots [start, start + len(features)) for latent-op and add entries of one SAE (host lists or
        tensors per slot)."""
        end = start + len(features)
        self.read[:, start:end] = sae.W_enc[:, features]
        self.read_bias[start:end] = sae.b_enc[features]
        self.threshold[start:end] = sae.threshold[features] if sae.threshold is not None else 0.0
        self.write[start:end] = sae.W_dec[features]
        self._fill_entries(start, end, ops, values, owners, prompt, generated)

    def fill_directions(
        self, start: int, read: torch.Tensor, write: torch.Tensor, ops, values, owners, prompt, generated
    ) -> None:
        """Write slots for residual-space entries: `read` [k, d_in] the unit directions whose projection the ops
        read, `write` [k, d_in] the directions they add along (the same, or the raw vector for add)."""
        end = start + read.shape[0]
        self.read[:, start:end] = read.T
        self.read_bias[start:end] = 0.0
        self.threshold[start:end] = -torch.inf  # f = pre: the projection itself
        self.write[start:end] = write
        self._fill_entries(start, end, ops, values, owners, prompt, generated)

    def _fill_entries(self, start: int, end: int, ops, values, owners, prompt, generated) -> None:
        for buf, src in ((self.op, ops), (self.value, values), (self.owner, owners)):
            buf[start:end] = torch.as_tensor(src, dtype=buf.dtype)
        self.on_prompt[start:end] = torch.as_tensor(prompt, dtype=torch.bool)
        self.on_generated[start:end] = torch.as_tensor(generated, dtype=torch.bool)

    def clear(self, start: int) -> None:
        """Free slots from `start` on: they match no row, so they contribute exactly zero."""
        self.owner[start:] = EMPTY_SLOT
        self.value[start:] = 0.0

    def gate(self, start: int, columns: list[list[int]], always: int) -> None:
        """Point slots [start, start + len(columns)) at their condition columns (the rest at `always`)."""
        for u, cols in enumerate(columns, start=start):
            row = cols + [always] * (self.conditions.shape[1] - len(cols))
            self.conditions[u] = torch.as_tensor(row, dtype=torch.long)


@dataclass
class ConditionTable:
    """Persistent condition slots of one hook site: slot c tests one SAE latent's activation against a bound and
    writes the result into column `column[c]` of the step's condition results (free slots write a scratch column)."""

    read: torch.Tensor  # [d_in, C] folded encoder column
    read_bias: torch.Tensor  # [C]
    threshold: torch.Tensor  # [C] activation threshold (0 for ReLU)
    bound: torch.Tensor  # [C]
    below: torch.Tensor  # [C] bool: holds where the activation is below the bound (else above)
    column: torch.Tensor  # [C] long

    @classmethod
    def allocate(cls, d_in: int, capacity: int, device: torch.device, scratch: int) -> ConditionTable:
        zeros = torch.zeros
        return cls(
            read=zeros(d_in, capacity, device=device),
            read_bias=zeros(capacity, device=device),
            threshold=zeros(capacity, device=device),
            bound=zeros(capacity, device=device),
            below=zeros(capacity, dtype=torch.bool, device=device),
            column=torch.full((capacity,), scratch, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.bound.shape[0]

    def fill(self, start: int, sae: FoldedSAE, feature: int, below: bool, bound: float, column: int) -> None:
        self.read[:, start] = sae.W_enc[:, feature]
        self.read_bias[start] = sae.b_enc[feature]
        self.threshold[start] = sae.threshold[feature] if sae.threshold is not None else 0.0
        self.bound[start], self.below[start], self.column[start] = bound, below, column

    def clear(self, start: int, scratch: int) -> None:
        self.column[start:] = scratch


def condition_results(x: torch.Tensor, table: ConditionTable, used: int | None = None) -> torch.Tensor:  # [T, C]
    """Whether each condition slot holds at each row (fixed shapes; ReLU and JumpReLU latents)."""
    cols = slice(None) if used is None else slice(0, used)
    pre = x @ table.read[:, cols] + table.read_bias[cols]
    act = pre * (pre > table.threshold[cols])
    bound = table.bound[cols]
    return torch.where(table.below[cols], act < bound, act > bound)


def slot_delta(
    x: torch.Tensor,
    table: SlotTable,
    row_owner: torch.Tensor,
    row_generated: torch.Tensor,
    used: int | None = None,
    reads: bool = True,
    condition_ok: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, d_in] -> [T, d_in]
    """The change every slot makes to the rows it owns, with fixed shapes: `row_owner` [>= T] long (-1: no
    steering request) and `row_generated` [>= T] bool are the step's row table. `used` limits the work to the first
    slots where the caller knows the rest are free, and `reads=False` skips the encode where it knows every used
    slot is an add (neither inside a captured graph: there every slot is computed). With `condition_ok`
    [>= T, columns] bool (the step's condition results, one column always true), a slot applies only at rows where
    all its `conditions` columns hold; the rows each slot steered are added to `table.hits`.
    A slot's latent activation is f = pre · [pre > threshold] (ReLU, JumpReLU; a direction slot has threshold
    −inf, so f is its projection); h_bias adds act(pre + v) − f."""
    t = table
    cols = slice(None) if used is None else slice(0, used)
    n = x.shape[0]
    v, op = t.value[cols], t.op[cols]
    if reads:
        pre = x @ t.read[:, cols] + t.read_bias[cols]  # [T, U]
        coef = _coefficients(pre, t.threshold[cols], v, op)
    else:
        coef = v.expand(n, -1)
    gen = row_generated[:n].unsqueeze(1)  # [T, 1]
    applies = (row_owner[:n].unsqueeze(1) == t.owner[cols]) & torch.where(gen, t.on_generated[cols], t.on_prompt[cols])
    if condition_ok is not None:
        applies = applies & condition_ok[:n][:, t.conditions[cols]].all(dim=-1)  # [T, U, K] -> [T, U]
        t.hits[cols] += applies.sum(dim=0)
    return (coef * applies) @ t.write[cols]


def _coefficients(pre: torch.Tensor, thr: torch.Tensor, v: torch.Tensor, op: torch.Tensor) -> torch.Tensor:  # [T, U]
    f = pre * (pre > thr)
    biased = pre + v
    pinned = v - f  # clamp and set; cap keeps its negative part only
    return torch.where(
        op == SteerOp.ADD,
        v,
        torch.where(
            (op == SteerOp.CLAMP) | (op == SteerOp.SET),
            pinned,
            torch.where(
                op == SteerOp.MUL,
                (v - 1.0) * f,
                torch.where(
                    op == SteerOp.H_BIAS,
                    biased * (biased > thr) - f,
                    torch.where(op == SteerOp.ABLATE, -f, pinned.clamp(max=0.0)),
                ),
            ),
        ),
    )


@dataclass
class SteeringTable:
    """Steering entries of one SAE at one site in one step, for `steering_delta`."""

    features: torch.Tensor  # [E] long
    ops: torch.Tensor  # [E] long, SteerOp values
    values: torch.Tensor  # [E]
    mask: torch.Tensor  # [n, E] float, 1 where entry e applies to row r


def steering_delta(sae: FoldedSAE, table: SteeringTable, x: torch.Tensor) -> torch.Tensor:  # [n, d_in] -> [n, d_in]
    """Sum over entries (add and the latent ops) of coef[r, e] · d_e with the coefficient each op defines, plus
    h_bias's change of the activations. Only the entries' features are encoded, except for TopK, whose activations
    depend on the k-th largest pre-activation of the row (one full encode and one top-k, then everything stays
    k-sized)."""
    g = table
    add, clamp, mul, h_bias = (g.ops == op for op in (SteerOp.ADD, *LATENT_OPS))
    coef = torch.where(add, g.values, torch.zeros_like(g.values)).expand(x.shape[0], -1)  # [n, E]
    needs_f = clamp | mul | h_bias
    rows = g.mask[:, needs_f].any(dim=1).nonzero().squeeze(1) if bool(needs_f.any()) else None
    if rows is None or rows.numel() == 0:
        return (coef * g.mask) @ sae.decoder_rows(g.features)
    features, inv = g.features.unique(return_inverse=True)  # [U], [E]
    mask = g.mask[rows]  # [r, E]
    bias = torch.zeros(len(rows), len(features), dtype=x.dtype)  # [r, U] summed h_bias per feature
    bias.index_add_(1, inv, mask * torch.where(h_bias, g.values, torch.zeros_like(g.values)))
    xr = x[rows]
    extra = torch.zeros_like(x)
    if sae.needs_full_encode:
        f_u, hb_delta = topk_activations(sae, xr, features, bias)
        if hb_delta is not None:
            extra[rows] = hb_delta
    else:
        pre_u = xr @ sae.W_enc[:, features].float() + sae.b_enc[features]  # [r, U]
        f_u = sae.activate_columns(pre_u, features)
        if bool(h_bias.any()):
            extra[rows] = (sae.activate_columns(pre_u + bias, features) - f_u) @ sae.decoder_rows(features)
    f = f_u[:, inv]  # [r, E]
    c = coef[rows]
    c = torch.where(clamp, g.values - f, c)
    c = torch.where(mul, (g.values - 1.0) * f, c)
    coef = coef.clone()
    coef[rows] = torch.where(h_bias, torch.zeros_like(c), c)
    return (coef * g.mask) @ sae.decoder_rows(g.features) + extra


def topk_activations(
    sae: FoldedSAE, x: torch.Tensor, features: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TopK activations of `features` [r, U] and, with h_bias, the change it makes to the decoded output [r, d_in].
    With at most m biased latents per row, unbiased latents outside the top k+m can never enter the new top k, so
    the new k-th largest is found among k+2m candidates instead of a second full top-k."""
    assert sae.k is not None
    k = sae.k
    m = int(bias.ne(0).sum(dim=1).max())
    pre = sae.pre_activations(x)  # [r, d_sae]
    top_vals, top_idx = pre.relu().topk(min(k + m, pre.shape[1]), dim=-1)  # sorted, [r, k+m]
    t0 = top_vals[:, k - 1 : k]  # [r, 1] k-th largest activation
    pre_u = pre[:, features]  # [r, U]
    a_u = pre_u.relu()
    f_u = a_u * (a_u >= t0)
    if m == 0:
        return f_u, None
    in_top = top_idx.unsqueeze(2) == features.view(1, 1, -1)  # [r, k+m, U]
    cand_new = (pre.gather(1, top_idx) + (in_top * bias.unsqueeze(1)).sum(dim=2)).relu()  # [r, k+m]
    u_new = (pre_u + bias).relu()  # [r, U]
    outside = ~in_top.any(dim=1)  # [r, U] biased features not among the candidates
    pool = torch.cat([cand_new, u_new.masked_fill(~outside, -1.0)], dim=1)
    t1 = pool.topk(k, dim=-1).values[:, -1:]  # [r, 1] k-th largest after the bias
    change = torch.zeros_like(pre)  # [r, d_sae], non-zero only where an activation moved
    change.scatter_(1, top_idx, cand_new * (cand_new >= t1) - top_vals * (top_vals >= t0))
    change[:, features] += (u_new * (u_new >= t1) - f_u) * outside
    cols = change.ne(0).any(dim=0).nonzero().squeeze(1)
    return f_u, change[:, cols] @ sae.decoder_rows(cols)
