"""Worker-side SAE state: loaded SAEs, per-request plans, the per-step row plan, steering and capture.

Lives in the vLLM worker process. The model's uncompiled outer `forward` calls `begin_step` once per step to map
batch rows to requests; the compiled graph calls `apply` at every hook site through an opaque custom op
(`serve/engine/worker/op.py`), so Python conditions here run at step time instead of being frozen at trace time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sae import load_sae
from sae.hookpoints import SITES, HookPoint
from sae.steering import FoldedSAE, SteeringTable, steering_delta
from serve.engine.codec import EncodedEntry, PositionMode, decode

CAPTURE_TTL_S = 600.0
# Fault injection for tests: the hook op leaves decode-only steps unsteered, as a CUDA graph captured around a
# Python hook would. The engine's start-up probe must catch it.
FAULT_SKIP_DECODE_ENV = "SAE_SERVE_FAULT_SKIP_DECODE_STEERING"

logger = logging.getLogger("sae_serve")


def site_index(hp: HookPoint) -> int:
    return hp.layer * len(SITES) + SITES.index(hp.site)


@dataclass
class WorkerSAE:
    """A loaded SAE at its site."""

    sae_id: str
    site: int
    folded: FoldedSAE


@dataclass
class RequestPlan:
    """One request's steering entries grouped by site, and its capture order."""

    key: str
    prompt_len: int
    steer: dict[int, list[EncodedEntry]]  # site -> entries
    missing: list[int] = field(default_factory=list)  # entries whose SAE is not loaded here
    capture_id: str | None = None
    capture_saes: list[str] = field(default_factory=list)
    capture_top_k: int = 0
    capture_features: dict[str, list[int]] = field(default_factory=dict)
    capture_generated: bool = False

    @classmethod
    def from_extra_args(cls, extra: dict | None, prompt_len: int, saes: dict[str, WorkerSAE]) -> RequestPlan | None:
        request = decode(extra)
        if request is None:
            return None
        steer: dict[int, list[EncodedEntry]] = {}
        missing = []
        for entry in request.steer:
            sae = saes.get(entry.sae)
            if sae is None:  # unloaded after validation: reported to the caller as sae_not_loaded
                missing.append(entry.index)
                continue
            steer.setdefault(sae.site, []).append(entry)
        plan = cls(key=request.key, prompt_len=prompt_len, steer=steer, missing=missing)
        cap = request.capture
        if cap is not None:
            plan.capture_id = request.key
            plan.capture_saes = [s for s in cap.saes if s in saes]
            plan.capture_top_k = cap.top_k
            plan.capture_features = cap.features
            plan.capture_generated = cap.include_generated
        return plan


@dataclass
class _SteerGroup:
    """All steering entries of one SAE at one site in this step."""

    sae: WorkerSAE
    table: SteeringTable


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


class ReportStore:
    """Per request key: token rows each steering entry was planned onto, and the entries whose SAE was missing."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, int]] = {}
        self._missing: dict[str, list[int]] = {}
        self._touched: dict[str, float] = {}

    def open(self, key: str, missing: list[int]) -> None:
        self._rows.setdefault(key, {})
        self._missing[key] = missing
        self._touched[key] = time.monotonic()

    def add(self, key: str, index: int, rows: int) -> None:
        counts = self._rows.setdefault(key, {})
        counts[index] = counts.get(index, 0) + rows
        self._touched[key] = time.monotonic()

    def pop(self, key: str) -> dict[str, dict | list]:
        self._touched.pop(key, None)
        return {"rows": self._rows.pop(key, {}), "missing": self._missing.pop(key, [])}

    def expire(self) -> None:
        cutoff = time.monotonic() - CAPTURE_TTL_S
        for key in [k for k, t in self._touched.items() if t < cutoff]:
            self.pop(key)


class SteeringRuntime:
    """The worker's SAE state. One per worker process; reached by the custom op through `ACTIVE`."""

    def __init__(self, d_model: int, n_layers: int, device: torch.device):
        self.d_model = d_model
        self.n_layers = n_layers
        self.device = device
        self.runner: Any = None  # the vLLM model runner, attached by the worker extension after start-up
        self.saes: dict[str, WorkerSAE] = {}
        self.captures = CaptureStore()
        self.reports = ReportStore()
        self._plans: dict[str, RequestPlan | None] = {}
        self._step: dict[int, _SitePlan] | None = None
        self._decode_only = False  # this step has no prompt rows (read by the fault switch only)
        self._skip_decode = os.environ.get(FAULT_SKIP_DECODE_ENV) == "1"
        if self._skip_decode:
            logger.warning("%s=1: decode steps are left unsteered (fault injection for tests)", FAULT_SKIP_DECODE_ENV)

    # --- SAE registry -------------------------------------------------------------------------------
    def load(self, sae_id: str, path: str) -> dict:
        module = load_sae(path)
        hp = HookPoint.parse(module.cfg.hook_point)
        if module.cfg.d_in != self.d_model or not 0 <= hp.layer < self.n_layers:
            raise ValueError(
                f"SAE {sae_id!r} ({module.cfg.hook_point}, d_in={module.cfg.d_in}) does not fit a model with "
                f"{self.n_layers} layers and d_model={self.d_model}"
            )
        folded = FoldedSAE.build(module, self.device)
        del module  # its tensors live on in `folded` or are freed: the weights are held once
        self.saes[sae_id] = WorkerSAE(sae_id, site_index(hp), folded)
        self._plans.clear()  # plans resolved SAE ids to sites; rebuild against the new set
        return {
            "sae_id": sae_id,
            "hook_point": folded.cfg.hook_point,
            "d_sae": folded.cfg.d_sae,
            "bytes": folded.resident_bytes(),
        }

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
        owners: dict[tuple[int, str], list[tuple[str, int]]] = {}  # (request key, entry index) per column
        decode_only = True
        for i, plan in active:
            start, end = int(qsl[i]), int(qsl[i + 1])
            if start == end:
                continue
            if self._skip_decode:  # the fault switch only: not worth a per-step pass otherwise
                decode_only = decode_only and bool((pos[start:end] >= plan.prompt_len).all())
            for site, entries in plan.steer.items():
                for e in entries:
                    steer_rows.setdefault((site, e.sae), []).append(
                        (start, end, plan.prompt_len, e.feature, int(e.op), e.value, int(e.positions))
                    )
                    owners.setdefault((site, e.sae), []).append((plan.key, e.index))
            if plan.capture_id is not None:
                self._plan_capture(sites, plan, start, end, pos)
        for group_key, entries in steer_rows.items():
            group, rows = self._steer_group(self.saes[group_key[1]], entries, pos, n)
            sites.setdefault(group_key[0], _SitePlan()).steer.append(group)
            for (key, index), count in zip(owners[group_key], rows.tolist(), strict=True):
                self.reports.add(key, index, count)
        self._decode_only = decode_only
        self._step = sites or None

    def _new_plan(self, req_id: str) -> RequestPlan | None:
        state = self.runner.requests.get(req_id)
        if state is None or state.sampling_params is None:
            return None
        if len(self._plans) >= len(self.runner.requests):
            self._forget_finished()
        plan = RequestPlan.from_extra_args(state.sampling_params.extra_args, state.num_prompt_tokens, self.saes)
        if plan is not None and (plan.steer or plan.missing):
            self.reports.open(plan.key, plan.missing)
        return plan

    def _forget_finished(self) -> None:
        for req_id in [r for r in self._plans if r not in self.runner.requests]:
            del self._plans[req_id]
        self.captures.expire()
        self.reports.expire()

    def _steer_group(
        self, sae: WorkerSAE, entries: list, pos: torch.Tensor, n: int
    ) -> tuple[_SteerGroup, torch.Tensor]:
        """The group's table, and per entry the number of rows it applies to in this step (host tensor [E])."""
        start, end, prompt_len, feature, op, value, mode = (torch.tensor(c) for c in zip(*entries))
        rows = torch.arange(n).unsqueeze(1)  # [n, 1]
        in_request = (rows >= start) & (rows < end)  # [n, E]
        generated = pos.unsqueeze(1) >= prompt_len  # [n, E]
        pos_ok = (
            (mode == PositionMode.ALL)
            | ((mode == PositionMode.PROMPT) & ~generated)
            | ((mode == PositionMode.GENERATED) & generated)
        )
        applies = in_request & pos_ok  # [n, E] on the host
        mask = applies.to(device=self.device, dtype=torch.float32)
        table = SteeringTable(
            feature.to(self.device, torch.long),
            op.to(self.device, torch.long),
            value.to(self.device, torch.float32),
            mask,
        )
        return _SteerGroup(sae, table), applies.sum(dim=0)

    def _plan_capture(
        self, sites: dict[int, _SitePlan], plan: RequestPlan, start: int, end: int, pos: torch.Tensor
    ) -> None:
        assert plan.capture_id is not None
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
            if self._skip_decode and self._decode_only:
                break
            x = (hidden + residual) if adds_residual else hidden
            hidden.add_(steering_delta(group.sae.folded, group.table, x.float()).to(hidden.dtype))
        for item in plan.capture:
            x = (hidden[item.rows] + residual[item.rows]) if adds_residual else hidden[item.rows]
            acts = item.sae.folded.encode(x.float())  # [r, d_sae]
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


ACTIVE: SteeringRuntime | None = None
