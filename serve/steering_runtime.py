"""Worker-side SAE state: loaded SAEs, per-request plans, the per-step row plan, steering and capture.

Lives in the vLLM worker process. The model's uncompiled outer `forward` calls `begin_step` once per step to map
batch rows to requests; the compiled graph calls `apply` at every hook site through an opaque custom op
(`serve.steering_op`), so Python conditions here run at step time instead of being frozen at trace time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sae import SparseAutoencoder, load_sae
from sae.hookpoints import SITES, HookPoint

from .steering_spec import EXTRA_ARGS_KEY

OPS = ("add", "clamp", "mul", "h_bias")
POSITION_MODES = ("all", "prompt", "generated")
_FULL_ENCODE_ARCHS = ("topk",)  # activation of one latent depends on all others
CAPTURE_TTL_S = 600.0


def site_index(hp: HookPoint) -> int:
    return hp.layer * len(SITES) + SITES.index(hp.site)


@dataclass
class WorkerSAE:
    """An SAE ready for the hot path: encoder folded, decoder in model space."""

    sae_id: str
    site: int
    module: SparseAutoencoder
    W_enc: torch.Tensor  # [d_in, d_sae], input scale and b_dec subtraction folded in
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in], divided by input_scale

    @classmethod
    def build(cls, sae_id: str, module: SparseAutoencoder, device: torch.device) -> "WorkerSAE":
        module = module.to(device=device, dtype=torch.float32).eval()
        with torch.no_grad():
            w, b = module.folded_encoder()
            w_dec = module.W_dec / module.cfg.input_scale
        return cls(sae_id, site_index(HookPoint.parse(module.cfg.hook_point)), module, w.contiguous(), b, w_dec.contiguous())

    @property
    def needs_full_encode(self) -> bool:
        return self.module.cfg.architecture in _FULL_ENCODE_ARCHS

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [n, d_in] -> [n, d_sae]
        return self.module.activate(x @ self.W_enc + self.b_enc)

    def activate_columns(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Elementwise activation of chosen latents' pre-activations [n, E]; only valid without full encode."""
        arch = self.module.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        thr = self.module.threshold[features]
        return pre * (pre > thr)


@dataclass
class RequestPlan:
    """One request's steering entries grouped by site, and its capture order."""

    prompt_len: int
    steer: dict[int, list[tuple[str, int, int, float, int]]]  # site -> (sae, feature, op, value, positions)
    capture_id: str | None = None
    capture_saes: list[str] = field(default_factory=list)
    capture_top_k: int = 0
    capture_features: dict[str, list[int]] = field(default_factory=dict)
    capture_generated: bool = False

    @classmethod
    def from_extra_args(cls, extra: dict | None, prompt_len: int, saes: dict[str, WorkerSAE]) -> "RequestPlan | None":
        spec = (extra or {}).get(EXTRA_ARGS_KEY)
        if not spec:
            return None
        steer: dict[int, list] = {}
        for sae_id, feature, op, value, positions in spec.get("steer", ()):
            sae = saes.get(sae_id)
            if sae is None:  # unloaded after validation: the request runs unsteered for this entry
                continue
            steer.setdefault(sae.site, []).append(
                (sae_id, int(feature), OPS.index(op), float(value), POSITION_MODES.index(positions))
            )
        plan = cls(prompt_len=prompt_len, steer=steer)
        cap = spec.get("capture")
        if cap:
            plan.capture_id = cap["id"]
            plan.capture_saes = [s for s in cap["saes"] if s in saes]
            plan.capture_top_k = int(cap["top_k"])
            plan.capture_features = {k: list(v) for k, v in cap.get("features", {}).items()}
            plan.capture_generated = bool(cap.get("include_generated", False))
        return plan


@dataclass
class _SteerGroup:
    """All steering entries of one SAE at one site in this step, as tensors."""

    sae: WorkerSAE
    features: torch.Tensor  # [E] long
    ops: torch.Tensor  # [E] long
    values: torch.Tensor  # [E]
    mask: torch.Tensor  # [n, E] float, 1 where entry e applies to row r


@dataclass
class _CaptureItem:
    capture_id: str
    sae: WorkerSAE
    rows: torch.Tensor  # [r] long
    positions: torch.Tensor  # [r] long
    top_k: int
    features: torch.Tensor | None  # [F] long


@dataclass
class _SitePlan:
    steer: list[_SteerGroup] = field(default_factory=list)
    capture: list[_CaptureItem] = field(default_factory=list)


class CaptureStore:
    """Captured chunks per capture id, kept until the driver pops them (or they expire)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, list[tuple[torch.Tensor, ...]]]] = {}
        self._touched: dict[str, float] = {}

    def add(self, capture_id: str, sae_id: str, chunk: tuple[torch.Tensor, ...]) -> None:
        self._data.setdefault(capture_id, {}).setdefault(sae_id, []).append(chunk)
        self._touched[capture_id] = time.monotonic()

    def pop(self, capture_id: str) -> dict[str, dict[str, list]]:
        """Per SAE: positions, top-k indices/values and chosen features' values, one row per position."""
        self._touched.pop(capture_id, None)
        out: dict[str, dict[str, list]] = {}
        for sae_id, chunks in self._data.pop(capture_id, {}).items():
            pos = torch.cat([c[0] for c in chunks])
            # A recomputed position (preemption) overwrites the earlier value: keep each position's last row.
            last = {p: i for i, p in enumerate(pos.tolist())}
            keep = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long)
            cols = [torch.cat([c[j] for c in chunks])[keep] for j in range(1, 4)]
            out[sae_id] = {
                "positions": pos[keep].tolist(),
                "top_indices": cols[0].tolist(),
                "top_values": cols[1].tolist(),
                "feature_values": cols[2].tolist(),
            }
        return out

    def expire(self) -> None:
        cutoff = time.monotonic() - CAPTURE_TTL_S
        for cid in [c for c, t in self._touched.items() if t < cutoff]:
            self._data.pop(cid, None)
            self._touched.pop(cid, None)


class SteeringRuntime:
    """The worker's SAE state. One per worker process; reached by the custom op through `ACTIVE`."""

    def __init__(self, d_model: int, n_layers: int, device: torch.device):
        self.d_model = d_model
        self.n_layers = n_layers
        self.device = device
        self.runner = None  # the vLLM model runner, attached by the worker extension after start-up
        self.saes: dict[str, WorkerSAE] = {}
        self.captures = CaptureStore()
        self._plans: dict[str, RequestPlan | None] = {}
        self._step: dict[int, _SitePlan] | None = None

    # --- SAE registry -------------------------------------------------------------------------------
    def load(self, sae_id: str, path: str) -> dict:
        module = load_sae(path)
        hp = HookPoint.parse(module.cfg.hook_point)
        if module.cfg.d_in != self.d_model or not 0 <= hp.layer < self.n_layers:
            raise ValueError(
                f"SAE {sae_id!r} ({module.cfg.hook_point}, d_in={module.cfg.d_in}) does not fit a model with "
                f"{self.n_layers} layers and d_model={self.d_model}"
            )
        self.saes[sae_id] = WorkerSAE.build(sae_id, module, self.device)
        self._plans.clear()  # plans resolved SAE ids to sites; rebuild against the new set
        return {"sae_id": sae_id, "hook_point": module.cfg.hook_point, "d_sae": module.cfg.d_sae}

    def unload(self, sae_id: str) -> bool:
        self._plans.clear()
        return self.saes.pop(sae_id, None) is not None

    # --- per step -----------------------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor, has_attn_metadata: bool) -> None:
        """Map this step's rows to requests; called once per forward, before any hook site runs."""
        self._step = None
        if self.runner is None or not has_attn_metadata or not self.saes:
            return
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        active: list[tuple[int, RequestPlan]] = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            if req_id not in self._plans:
                self._plans[req_id] = self._new_plan(req_id)
            plan = self._plans[req_id]
            if plan is not None:
                active.append((i, plan))
        if not active:
            return
        qsl = self.runner.query_start_loc.np[: num_reqs + 1]
        n = positions.shape[0]
        pos = positions[:n].to("cpu", torch.long)  # row bookkeeping stays on the host
        sites: dict[int, _SitePlan] = {}
        steer_rows: dict[tuple[int, str], list] = {}
        for i, plan in active:
            start, end = int(qsl[i]), int(qsl[i + 1])
            if start == end:
                continue
            for site, entries in plan.steer.items():
                for sae_id, feature, op, value, mode in entries:
                    steer_rows.setdefault((site, sae_id), []).append((start, end, plan.prompt_len, feature, op, value, mode))
            if plan.capture_id is not None:
                self._plan_capture(sites, plan, start, end, pos)
        for (site, sae_id), entries in steer_rows.items():
            sites.setdefault(site, _SitePlan()).steer.append(self._steer_group(self.saes[sae_id], entries, pos, n))
        self._step = sites or None

    def _new_plan(self, req_id: str) -> RequestPlan | None:
        state = self.runner.requests.get(req_id)
        if state is None or state.sampling_params is None:
            return None
        if len(self._plans) >= len(self.runner.requests):
            self._forget_finished()
        return RequestPlan.from_extra_args(state.sampling_params.extra_args, state.num_prompt_tokens, self.saes)

    def _forget_finished(self) -> None:
        for req_id in [r for r in self._plans if r not in self.runner.requests]:
            del self._plans[req_id]
        self.captures.expire()

    def _steer_group(self, sae: WorkerSAE, entries: list, pos: torch.Tensor, n: int) -> _SteerGroup:
        start, end, prompt_len, feature, op, value, mode = (torch.tensor(c) for c in zip(*entries))
        rows = torch.arange(n).unsqueeze(1)  # [n, 1]
        in_request = (rows >= start) & (rows < end)  # [n, E]
        generated = pos.unsqueeze(1) >= prompt_len  # [n, E]
        pos_ok = (mode == 0) | ((mode == 1) & ~generated) | ((mode == 2) & generated)
        mask = (in_request & pos_ok).to(device=self.device, dtype=torch.float32)
        return _SteerGroup(
            sae,
            feature.to(self.device, torch.long),
            op.to(self.device, torch.long),
            value.to(self.device, torch.float32),
            mask,
        )

    def _plan_capture(self, sites: dict[int, _SitePlan], plan: RequestPlan, start: int, end: int, pos: torch.Tensor) -> None:
        rows = torch.arange(start, end)
        if not plan.capture_generated:
            rows = rows[pos[start:end] < plan.prompt_len]
        if rows.numel() == 0:
            return
        for sae_id in plan.capture_saes:
            sae = self.saes[sae_id]
            feats = plan.capture_features.get(sae_id)
            sites.setdefault(sae.site, _SitePlan()).capture.append(
                _CaptureItem(
                    plan.capture_id,
                    sae,
                    rows.to(self.device),
                    pos[rows].cpu(),
                    plan.capture_top_k,
                    torch.tensor(feats, dtype=torch.long, device=self.device) if feats else None,
                )
            )

    # --- inside the graph ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, site: int, hidden: torch.Tensor, residual: torch.Tensor, adds_residual: bool) -> None:
        """Steer `hidden` in place at `site`, then capture; the activation there is hidden (+ residual)."""
        step = self._step
        if step is None:
            return
        plan = step.get(site)
        if plan is None:
            return
        for group in plan.steer:
            x = (hidden + residual) if adds_residual else hidden
            hidden.add_(_steering_delta(group, x.float()).to(hidden.dtype))
        for item in plan.capture:
            x = (hidden[item.rows] + residual[item.rows]) if adds_residual else hidden[item.rows]
            acts = item.sae.encode(x.float())  # [r, d_sae]
            k = min(item.top_k, acts.shape[1])
            top = acts.topk(k, dim=-1) if k else None
            empty = torch.empty(len(item.rows), 0)
            self.captures.add(
                item.capture_id,
                item.sae.sae_id,
                (
                    item.positions,
                    top.indices.cpu() if top is not None else empty.long(),
                    top.values.cpu() if top is not None else empty,
                    acts[:, item.features].cpu() if item.features is not None else empty,
                ),
            )


def _steering_delta(g: _SteerGroup, x: torch.Tensor) -> torch.Tensor:  # x [n, d_in] -> [n, d_in]
    """Sum over entries of coef[r, e] · d_e with the coefficient each op defines, plus h_bias's change of the
    activations. Only the entries' features are encoded, except for TopK, whose activations depend on the k-th
    largest pre-activation of the row (one full encode and one top-k, then everything stays k-sized)."""
    sae = g.sae
    add, clamp, mul, h_bias = (g.ops == i for i in range(4))
    coef = torch.where(add, g.values, torch.zeros_like(g.values)).expand(x.shape[0], -1)  # [n, E]
    needs_f = clamp | mul | h_bias
    rows = g.mask[:, needs_f].any(dim=1).nonzero().squeeze(1) if bool(needs_f.any()) else None
    if rows is None or rows.numel() == 0:
        return (coef * g.mask) @ sae.W_dec[g.features]
    features, inv = g.features.unique(return_inverse=True)  # [U], [E]
    mask = g.mask[rows]  # [r, E]
    bias = torch.zeros(len(rows), len(features), dtype=x.dtype)  # [r, U] summed h_bias per feature
    bias.index_add_(1, inv, mask * torch.where(h_bias, g.values, torch.zeros_like(g.values)))
    xr = x[rows]
    extra = torch.zeros_like(x)
    if sae.needs_full_encode:
        f_u, hb_delta = _topk_activations(sae, xr, features, bias)
        if hb_delta is not None:
            extra[rows] = hb_delta
    else:
        pre_u = xr @ sae.W_enc[:, features] + sae.b_enc[features]  # [r, U]
        f_u = sae.activate_columns(pre_u, features)
        if bool(h_bias.any()):
            extra[rows] = (sae.activate_columns(pre_u + bias, features) - f_u) @ sae.W_dec[features]
    f = f_u[:, inv]  # [r, E]
    c = coef[rows]
    c = torch.where(clamp, g.values - f, c)
    c = torch.where(mul, (g.values - 1.0) * f, c)
    coef = coef.clone()
    coef[rows] = torch.where(h_bias, torch.zeros_like(c), c)
    return (coef * g.mask) @ sae.W_dec[g.features] + extra


def _topk_activations(
    sae: WorkerSAE, x: torch.Tensor, features: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TopK activations of `features` [r, U] and, with h_bias, the change it makes to the decoded output [r, d_in].
    With at most m biased latents per row, unbiased latents outside the top k+m can never enter the new top k, so
    the new k-th largest is found among k+2m candidates instead of a second full top-k."""
    k = sae.module.cfg.k
    m = int(bias.ne(0).sum(dim=1).max())
    pre = x @ sae.W_enc + sae.b_enc  # [r, d_sae]
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
    return f_u, change[:, cols] @ sae.W_dec[cols]


ACTIVE: SteeringRuntime | None = None
