"""Worker-side SAE state: loaded SAEs, per-request plans, the per-step row plan, steering and capture.

Lives in the vLLM worker process. The model runner's forward call (outside any captured graph; see
`extension.py`) calls `begin_step` once per step to fill the step's tables; the model calls `apply` at every hook
site through a custom op (`serve/engine/worker/op.py`) whose work on those tables has fixed shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sae import load_sae
from sae.hookpoints import SITES, HookPoint
from sae.steering import (
    LATENT_OPS,
    RESIDUAL_OPS,
    ConditionTable,
    FoldedSAE,
    SlotTable,
    SteeringTable,
    SteerOp,
    condition_results,
    slot_delta,
    steering_delta,
)
from serve.engine.codec import EncodedCondition, EncodedEntry, PositionMode, WorkerOptions, decode

CAPTURE_TTL_S = 600.0
NO_OWNER = -1  # row_owner of a token row outside any steering request
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
    local: bool = True  # its layer runs on this pipeline stage (otherwise it only counts steered rows)


@dataclass
class RequestPlan:
    """One request's steering entries grouped by site, and its capture order."""

    key: str
    prompt_len: int
    steer: dict[int, list[EncodedEntry]]  # site -> entries
    missing: list[int] = field(default_factory=list)  # entries whose SAE is not loaded here
    slotted: dict[int, list[EncodedEntry]] = field(default_factory=dict)  # site -> entries run from slot tables
    topk: dict[int, list[EncodedEntry]] = field(default_factory=dict)  # site -> latent ops on TopK SAEs
    owner: int = NO_OWNER  # this request's id in the row and slot tables
    left_out: set[int] = field(default_factory=set)  # entries without a slot in the current tables
    capture_id: str | None = None
    capture_saes: list[str] = field(default_factory=list)
    capture_top_k: int = 0
    capture_features: dict[str, list[int]] = field(default_factory=dict)
    capture_generated: bool = False
    capture_prompt: bool = True

    @classmethod
    def from_extra_args(
        cls, extra: dict | None, prompt_len: int, saes: dict[str, WorkerSAE], local_layers: range
    ) -> RequestPlan | None:
        request = decode(extra)
        if request is None:
            return None
        steer: dict[int, list[EncodedEntry]] = {}
        missing = []
        local: dict[int, bool] = {}  # site -> its layer runs on this pipeline stage
        for entry in request.steer:
            if entry.hook_point is not None:  # a vector
                hp = HookPoint.parse(entry.hook_point)
                site = site_index(hp)
                local[site] = hp.layer in local_layers
            elif (sae := saes.get(entry.sae or "")) is not None:
                site = sae.site
                local[site] = sae.local
            else:  # unloaded after validation: reported to the caller as sae_not_loaded
                missing.append(entry.index)
                continue
            steer.setdefault(site, []).append(entry)
        plan = cls(key=request.key, prompt_len=prompt_len, steer=steer, missing=missing)
        for site, entries in steer.items():
            if not local[site]:  # another pipeline stage steers there; this one counts the rows
                continue
            for entry in entries:
                full = entry.op in LATENT_OPS and saes[entry.sae or ""].folded.needs_full_encode
                (plan.topk if full else plan.slotted).setdefault(site, []).append(entry)
        cap = request.capture
        if cap is not None:
            plan.capture_id = request.key
            plan.capture_saes = [s for s in cap.saes if s in saes and saes[s].local]
            plan.capture_top_k = cap.top_k
            plan.capture_features = cap.features
            plan.capture_generated = cap.include_generated
            plan.capture_prompt = cap.include_prompt
        return plan


@dataclass
class _SteerGroup:
    """Latent-op entries of one TopK SAE at one site in this step (the full-encode path)."""

    sae: WorkerSAE
    table: SteeringTable


@dataclass
class _CaptureItem:
    capture_id: str
    sae: WorkerSAE
    tap: int  # row of the tap buffer holding the site's activations after this step
    rows: torch.Tensor  # [r] long
    positions: torch.Tensor  # [r] long
    top_k: int
    features: torch.Tensor | None  # [F] long


@dataclass
class _LiveSite:
    """What one hook site does in this step, for the per-step path (the static path computes every site). The
    fields down to `topk_conditions` describe the filled tables and are kept between refills; the rest is per step."""

    slots: int = 0  # slots in use in the site's table
    reads: bool = True  # some used slot reads its activation (not an add)
    gated: list[tuple[int, str, int]] = field(default_factory=list)  # (slot, request key, entry index) with conditions
    conditions: int = 0  # condition slots in use in the site's condition table
    topk_conditions: list[tuple[FoldedSAE, EncodedCondition, int]] = field(default_factory=list)  # full encode
    topk: list[_SteerGroup] = field(default_factory=list)
    tap: int | None = None


class CaptureStore:
    """Captured chunks per capture id, kept until the driver pops them (or they expire)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, list[tuple[torch.Tensor, ...]]]] = {}
        self._failed: dict[str, str] = {}
        self._touched: dict[str, float] = {}

    def fail(self, capture_id: str, why: str) -> None:
        """Rows of this capture were not recorded: its result must not be returned as complete."""
        self._failed[capture_id] = why
        self._touched[capture_id] = time.monotonic()

    def pop_failure(self, capture_id: str) -> str | None:
        return self._failed.pop(capture_id, None)

    def add(self, capture_id: str, sae_id: str, chunk: tuple[torch.Tensor, ...]) -> None:
        self._data.setdefault(capture_id, {}).setdefault(sae_id, []).append(chunk)
        self._touched[capture_id] = time.monotonic()

    def pop(self, capture_id: str) -> dict[str, dict[str, list]]:
        """Per SAE: positions, top-k indices/values and chosen features' values, one row per position."""
        self._touched.pop(capture_id, None)
        return self.drain(capture_id)

    def drain(self, capture_id: str) -> dict[str, dict[str, list]]:
        """The rows recorded since the last drain, as `pop` gives them; the capture stays open (live features)."""
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
            self._failed.pop(cid, None)
            self._touched.pop(cid, None)


class ReportStore:
    """Per request key: token rows each steering entry was planned onto, the entries whose SAE was missing and the
    entries left out of a step for want of a slot."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, int]] = {}
        self._missing: dict[str, list[int]] = {}
        self._left_out: dict[str, set[int]] = {}
        self._touched: dict[str, float] = {}

    def open(self, key: str, missing: list[int]) -> None:
        self._rows.setdefault(key, {})
        self._missing[key] = missing
        self._touched[key] = time.monotonic()

    def add(self, key: str, index: int, rows: int) -> None:
        counts = self._rows.setdefault(key, {})
        counts[index] = counts.get(index, 0) + rows
        self._touched[key] = time.monotonic()

    def leave_out(self, key: str, index: int) -> None:
        self._left_out.setdefault(key, set()).add(index)

    def pop(self, key: str) -> dict[str, dict | list]:
        self._touched.pop(key, None)
        return {
            "rows": self._rows.pop(key, {}),
            "missing": self._missing.pop(key, []),
            "over_capacity": sorted(self._left_out.pop(key, ())),
        }

    def expire(self) -> None:
        cutoff = time.monotonic() - CAPTURE_TTL_S
        for key in [k for k, t in self._touched.items() if t < cutoff]:
            self.pop(key)


class SteeringRuntime:
    """The worker's SAE state. One per worker process; reached by the custom op through `ACTIVE`.

    Between steps the host fills persistent buffers: per hook site a `SlotTable` (one slot per steering entry of
    the batch at that site), one row table for the step (`row_owner`: which steering request a token row belongs to;
    `row_generated`: whether it is a generated token) and `site_tap` (which row of the tap buffer a site copies its
    activations into, for capture). Inside the model, `apply` is tensor work on those buffers only. In static mode
    (CUDA graphs) it runs the same fixed-shape work at every site in every step, so a captured graph replays
    whatever the buffers hold; in per-step mode (no graphs, e.g. on CPU) it skips the sites and slots the step does
    not use. Captured rows are encoded from the tap buffer after the step, outside the model."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        device: torch.device,
        max_tokens: int,
        options: WorkerOptions,
        static: bool,
        sae_dtype: torch.dtype = torch.float32,
    ):
        self.d_model = d_model
        self.n_layers = n_layers
        self.device = device
        self.options = options
        self.static = static
        self.sae_dtype = sae_dtype
        self.runner: Any = None  # the vLLM model runner, attached by the worker extension after start-up
        self.local_layers = range(n_layers)  # the layers this pipeline stage runs (set by the model)
        self.masters: dict[str, WorkerSAE] = {}  # every loaded SAE, in host memory
        self.saes: dict[str, WorkerSAE] = {}  # the resident ones, on the device
        self.captures = CaptureStore()
        self.reports = ReportStore()
        self._plans: dict[str, RequestPlan | None] = {}
        n_sites = n_layers * len(SITES)
        self.row_owner = torch.full((max_tokens,), NO_OWNER, dtype=torch.long, device=device)  # [T_max]
        self.row_generated = torch.zeros(max_tokens, dtype=torch.bool, device=device)  # [T_max]
        self._rows_set = 0  # rows of row_owner written by the last step (the rest stay NO_OWNER)
        self.taps = torch.zeros(options.capture_sites + 1, max_tokens, d_model, device=device)  # last: scratch
        self.site_tap = torch.full((n_sites,), options.capture_sites, dtype=torch.long, device=device)  # [sites]
        self._tapped: list[int] = []  # sites whose site_tap entry is not the scratch row
        self._pending: list[_CaptureItem] = []  # captured in the last step, encoded before the next
        # Condition results of the step: a column per distinct condition, then one always true, then a scratch one.
        self.always = options.condition_slots
        self.scratch = options.condition_slots + 1
        self.condition_ok = torch.zeros(max_tokens, options.condition_slots + 2, dtype=torch.bool, device=device)
        self.condition_ok[:, self.always] = True
        self.tables: dict[int, SlotTable] = {}
        self.condition_tables: dict[int, ConditionTable] = {}
        if static:  # every site's buffers exist before vLLM captures its graphs
            self.tables = {s: self._new_table() for s in range(n_sites)}
            self.condition_tables = {s: self._new_condition_table() for s in range(n_sites)}
        self._slotted: frozenset[str] | None = frozenset()  # steering requests the tables were filled for; None: stale
        self._filled: dict[int, _LiveSite] = {}  # per site, what the filled tables hold (each step starts from it)
        self._live: dict[int, _LiveSite] = {}
        self._decode_only = False  # this step has no prompt rows (read by the fault switch only)
        self._skip_decode = os.environ.get(FAULT_SKIP_DECODE_ENV) == "1"
        if self._skip_decode:
            logger.warning("%s=1: decode steps are left unsteered (fault injection for tests)", FAULT_SKIP_DECODE_ENV)

    def _new_table(self) -> SlotTable:
        return SlotTable.allocate(
            self.d_model, self.options.steering_slots, self.device, self.always, self.options.conditions_per_entry
        )

    def _new_condition_table(self) -> ConditionTable:
        return ConditionTable.allocate(self.d_model, self.options.condition_slots, self.device, self.scratch)

    # --- SAE registry -------------------------------------------------------------------------------
    def load(self, sae_id: str, path: str) -> dict:
        """Read an SAE into host memory (its master copy) and make it resident on the device."""
        module = load_sae(path)
        hp = HookPoint.parse(module.cfg.hook_point)
        if module.cfg.d_in != self.d_model or not 0 <= hp.layer < self.n_layers:
            raise ValueError(
                f"SAE {sae_id!r} ({module.cfg.hook_point}, d_in={module.cfg.d_in}) does not fit a model with "
                f"{self.n_layers} layers and d_model={self.d_model}"
            )
        master = FoldedSAE.build(module, torch.device("cpu"), self.sae_dtype)
        del module  # its tensors live on in `master` or are freed
        if self.device.type == "cuda":
            master = master.to(torch.device("cpu"), pin=True)
        self.masters[sae_id] = WorkerSAE(sae_id, site_index(hp), master, hp.layer in self.local_layers)
        self.page([sae_id], [])
        return {
            "sae_id": sae_id,
            "hook_point": master.cfg.hook_point,
            "d_sae": master.cfg.d_sae,
            "bytes": master.resident_bytes(),
        }

    def unload(self, sae_id: str) -> bool:
        self._forget_plans()
        self.saes.pop(sae_id, None)
        return self.masters.pop(sae_id, None) is not None

    def page(self, page_in: list[str], page_out: list[str]) -> None:
        """Move SAEs between the device and their master copies (on CPU the very same tensors: held once)."""
        for sae_id in page_out:
            self.saes.pop(sae_id, None)
        for sae_id in page_in:
            master = self.masters[sae_id]
            self.saes[sae_id] = dataclasses.replace(master, folded=master.folded.to(self.device))
        self._forget_plans()

    def _forget_plans(self) -> None:
        """Plans resolved SAE ids to sites and slots hold SAE weights: rebuild both against the new set."""
        self._plans.clear()
        self._slotted = None

    # --- between steps ------------------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor) -> None:
        """Fill this step's tables; called by the model runner's forward wrapper before the (possibly captured)
        model runs, and never inside it."""
        self.flush()
        batch = self.runner.input_batch if self.runner is not None else None
        active: list[tuple[int, RequestPlan]] = []
        if batch is not None:
            num_reqs = batch.num_reqs
            for i, req_id in enumerate(batch.req_ids[:num_reqs]):
                if req_id not in self._plans:
                    self._plans[req_id] = self._new_plan(req_id)
                plan = self._plans[req_id]
                if plan is not None:
                    active.append((i, plan))
        if batch is None or not active:
            if self._rows_set or self._tapped or self._live:
                self._reset_rows()
            return
        qsl = self.runner.query_start_loc.np[: batch.num_reqs + 1]
        n = int(qsl[-1])
        steering = [(i, p) for i, p in active if p.steer]
        if frozenset(p.key for _, p in steering) != self._slotted:
            self._fill_slots([p for _, p in steering])
        pos = positions[:n].to("cpu", torch.long).numpy()  # row bookkeeping stays on the host
        owner = np.full(max(n, self._rows_set), NO_OWNER, dtype=np.int64)
        generated = np.zeros(n, dtype=bool)
        live = {site: dataclasses.replace(filled, topk=[]) for site, filled in self._filled.items()}
        topk_rows: dict[tuple[int, str | None], list] = {}  # (site, SAE id) -> its TopK latent-op entries' rows
        decode_only = True
        for i, plan in active:
            start, end = int(qsl[i]), int(qsl[i + 1])
            if start == end:
                continue
            gen = pos[start:end] >= plan.prompt_len
            if plan.steer:
                owner[start:end] = plan.owner
                generated[start:end] = gen
                self._count(plan, end - start, int(gen.sum()))
                for site, groups in plan.topk.items():
                    for e in groups:
                        live.setdefault(site, _LiveSite())
                        topk_rows.setdefault((site, e.sae), []).append((start, end, plan, e))
            if self._skip_decode:  # the fault switch only: not worth a per-step pass otherwise
                decode_only = decode_only and bool(gen.all())
            if plan.capture_id is not None:
                self._plan_capture(live, plan, start, end, pos)
        for (site, sae_id), entries in topk_rows.items():
            live[site].topk.append(self._topk_group(self.saes[sae_id or ""], entries, pos, n))
        self.row_owner[: owner.shape[0]].copy_(torch.from_numpy(owner), non_blocking=True)
        self.row_generated[:n].copy_(torch.from_numpy(generated), non_blocking=True)
        self._rows_set = n
        self._point_taps(live)
        self._decode_only = decode_only
        self._live = {
            site: s
            for site, s in live.items()
            if s.slots or s.topk or s.tap is not None or s.conditions or s.topk_conditions
        }

    def _reset_rows(self) -> None:
        self.row_owner[: self._rows_set].fill_(NO_OWNER)
        self._rows_set = 0
        self._point_taps({})
        self._live = {}

    def _new_plan(self, req_id: str) -> RequestPlan | None:
        state = self.runner.requests.get(req_id)
        if state is None or state.sampling_params is None:
            return None
        if len(self._plans) >= len(self.runner.requests):
            self._forget_finished()
        plan = RequestPlan.from_extra_args(
            state.sampling_params.extra_args, state.num_prompt_tokens, self.saes, self.local_layers
        )
        if plan is not None and (plan.steer or plan.missing):
            self.reports.open(plan.key, plan.missing)
            if self.static:  # the facade refuses these with CUDA graphs; never run them unreported
                for e in (e for entries in plan.topk.values() for e in entries):
                    self.reports.leave_out(plan.key, e.index)
                    plan.left_out.add(e.index)
                plan.topk = {}
        return plan

    def _forget_finished(self) -> None:
        for req_id in [r for r in self._plans if r not in self.runner.requests]:
            del self._plans[req_id]
        self.captures.expire()
        self.reports.expire()

    def _fill_slots(self, plans: list[RequestPlan]) -> None:
        """Give every slotted entry of these requests a slot at its site (a new batch composition; decode steps
        of an unchanged batch reuse the tables). Entries beyond a site's capacity wait for a later refill and are
        reported over_capacity."""
        per_site: dict[int, list[tuple[RequestPlan, EncodedEntry]]] = {}
        for owner, plan in enumerate(plans):
            plan.owner = owner
            for site, entries in plan.slotted.items():
                per_site.setdefault(site, []).extend((plan, e) for e in entries)
        self.collect_hits()
        capacity = self.options.steering_slots
        filled: dict[int, _LiveSite] = {}
        columns: dict[EncodedCondition, int] = {}  # each distinct condition's column in condition_ok
        for site, site_entries in per_site.items():
            table = self.tables.get(site)
            if table is None:
                table = self.tables[site] = self._new_table()
            for plan, e in site_entries[capacity:]:
                self.reports.leave_out(plan.key, e.index)
                plan.left_out.add(e.index)
            gated_ones = [(p, e) for p, e in site_entries[:capacity] if e.when]
            kept = self._assign_conditions(gated_ones, columns) + [
                (p, e) for p, e in site_entries[:capacity] if not e.when
            ]
            by_sae: dict[str | None, list[tuple[RequestPlan, EncodedEntry]]] = {}
            for p, e in kept:
                if e.op not in RESIDUAL_OPS and e.sae:
                    by_sae.setdefault(e.sae, []).append((p, e))
            latent = [pe for group in by_sae.values() for pe in group]  # the order _fill_latent_slots fills in
            direction = [(p, e) for p, e in kept if e.op in RESIDUAL_OPS or not e.sae]
            start = self._fill_latent_slots(table, latent)
            start = self._fill_direction_slots(table, start, direction)
            order = latent + direction  # as filled: slot u holds order[u]
            table.gate(0, [[columns[c] for c in e.when] for _, e in order], self.always)
            table.hits.zero_()
            for plan, e in kept:
                plan.left_out.discard(e.index)
            table.clear(start)
            filled[site] = _LiveSite(
                slots=start,
                reads=any(e.op != SteerOp.ADD for _, e in kept),
                gated=[(u, p.key, e.index) for u, (p, e) in enumerate(order) if e.when],
            )
        for site, old in self._filled.items():
            if old.slots and site not in filled:
                self.tables[site].clear(0)
        self._fill_conditions(columns, filled)
        self._filled = filled
        self._slotted = frozenset(p.key for p in plans)

    def _assign_conditions(
        self, entries: list[tuple[RequestPlan, EncodedEntry]], columns: dict[EncodedCondition, int]
    ) -> list[tuple[RequestPlan, EncodedEntry]]:
        """Give every condition of these gated entries a column of condition_ok (shared by equal conditions); an
        entry whose conditions do not all get one waits for a later refill, reported over_capacity."""
        kept = []
        for plan, e in entries:
            new = [c for c in dict.fromkeys(e.when) if c not in columns]
            if len(columns) + len(new) > self.options.condition_slots:
                self.reports.leave_out(plan.key, e.index)
                plan.left_out.add(e.index)
                continue
            for c in new:
                columns[c] = len(columns)
            kept.append((plan, e))
        return kept

    def _fill_conditions(self, columns: dict[EncodedCondition, int], filled: dict[int, _LiveSite]) -> None:
        """Each condition in the condition table of its SAE's site (TopK SAEs: the full-encode list instead),
        noted in that site's `filled`."""
        for c, column in columns.items():
            sae = self.saes[c.sae]
            site = filled.setdefault(sae.site, _LiveSite())
            if sae.folded.needs_full_encode:
                site.topk_conditions.append((sae.folded, c, column))
                continue
            table = self.condition_tables.get(sae.site)
            if table is None:
                table = self.condition_tables[sae.site] = self._new_condition_table()
            table.fill(site.conditions, sae.folded, c.feature, c.below, c.bound, column)
            site.conditions += 1
        for at, table in self.condition_tables.items():
            table.clear(filled[at].conditions if at in filled else 0, self.scratch)

    @torch.inference_mode()  # tables made during a step are inference tensors; sae_finish runs outside one
    def collect_hits(self) -> None:
        """Add the rows each gated slot steered to its entry's report count (a device read: at a refill of the
        tables and when a request finishes, never per step)."""
        for site, filled in self._filled.items():
            if not filled.gated:
                continue
            table = self.tables[site]
            hits = table.hits.tolist()
            for u, key, index in filled.gated:
                self.reports.add(key, index, int(hits[u]))
            table.hits.zero_()

    def _fill_latent_slots(self, table: SlotTable, entries: list[tuple[RequestPlan, EncodedEntry]]) -> int:
        """Slots from 0 on for entries that read an SAE latent (and add along its decoder row), one SAE's slots
        side by side; returns the next free slot."""
        start = 0
        for sae_id in dict.fromkeys(e.sae for _, e in entries):
            group = [(p, e) for p, e in entries if e.sae == sae_id]
            modes = [e.positions for _, e in group]
            table.fill(
                start,
                self.saes[sae_id or ""].folded,
                torch.tensor([e.feature for _, e in group], dtype=torch.long, device=self.device),
                [int(e.op) for _, e in group],
                [e.value for _, e in group],
                [p.owner for p, _ in group],
                [m != PositionMode.GENERATED for m in modes],
                [m != PositionMode.PROMPT for m in modes],
            )
            start += len(group)
        return start

    def _fill_direction_slots(
        self, table: SlotTable, start: int, entries: list[tuple[RequestPlan, EncodedEntry]]
    ) -> int:
        """Slots for residual-space entries: vectors, and residual ops along a feature's decoder row."""
        if not entries:
            return start
        raw = torch.stack(
            [
                torch.tensor(e.vector, dtype=torch.float32, device=self.device)
                if e.vector is not None
                else self.saes[e.sae or ""].folded.decoder_rows(torch.tensor([e.feature], device=self.device))[0]
                for _, e in entries
            ]
        )  # [k, d]
        unit = raw / raw.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        keep_raw = torch.tensor([e.op == SteerOp.ADD and not e.normalize for _, e in entries], device=self.device)
        modes = [e.positions for _, e in entries]
        table.fill_directions(
            start,
            unit,
            torch.where(keep_raw.unsqueeze(1), raw, unit),
            [int(e.op) for _, e in entries],
            [e.value for _, e in entries],
            [p.owner for p, _ in entries],
            [m != PositionMode.GENERATED for m in modes],
            [m != PositionMode.PROMPT for m in modes],
        )
        return start + len(entries)

    def _count(self, plan: RequestPlan, rows: int, generated: int) -> None:
        """Add this step's rows to each entry's report count (rows are counted when planned)."""
        by_mode = {PositionMode.ALL: rows, PositionMode.PROMPT: rows - generated, PositionMode.GENERATED: generated}
        for entries in plan.steer.values():
            for e in entries:
                if e.index not in plan.left_out and not e.when:  # gated entries count what the graph steered
                    self.reports.add(plan.key, e.index, by_mode[e.positions])

    def _topk_group(self, sae: WorkerSAE, entries: list, pos: np.ndarray, n: int) -> _SteerGroup:
        """Latent-op entries of one TopK SAE with their per-row mask (the per-step path only)."""
        rows = torch.arange(n).unsqueeze(1)  # [n, 1]
        start, end, prompt_len, mode = (
            torch.tensor(c) for c in zip(*[(s, e, p.prompt_len, int(x.positions)) for s, e, p, x in entries])
        )
        in_request = (rows >= start) & (rows < end)  # [n, E]
        generated = torch.from_numpy(pos).unsqueeze(1) >= prompt_len  # [n, E]
        pos_ok = (
            (mode == PositionMode.ALL)
            | ((mode == PositionMode.PROMPT) & ~generated)
            | ((mode == PositionMode.GENERATED) & generated)
        )
        table = SteeringTable(
            torch.tensor([x.feature for *_, x in entries], dtype=torch.long, device=self.device),
            torch.tensor([int(x.op) for *_, x in entries], dtype=torch.long, device=self.device),
            torch.tensor([x.value for *_, x in entries], dtype=torch.float32, device=self.device),
            (in_request & pos_ok).to(device=self.device, dtype=torch.float32),
        )
        return _SteerGroup(sae, table)

    def _plan_capture(
        self, live: dict[int, _LiveSite], plan: RequestPlan, start: int, end: int, pos: np.ndarray
    ) -> None:
        assert plan.capture_id is not None
        rows = torch.arange(start, end)
        if not plan.capture_generated:
            rows = rows[torch.from_numpy(pos[start:end] < plan.prompt_len)]
        if not plan.capture_prompt:
            rows = rows[torch.from_numpy(pos[rows.numpy()] >= plan.prompt_len)]
        if rows.numel() == 0:
            return
        for sae_id in plan.capture_saes:
            sae = self.saes[sae_id]
            feats = plan.capture_features.get(sae_id)
            site = live.setdefault(sae.site, _LiveSite())
            self._pending.append(
                _CaptureItem(
                    plan.capture_id,
                    sae,
                    sae.site,  # replaced by the site's tap row in _point_taps
                    rows.to(self.device),
                    torch.from_numpy(pos[rows.numpy()]),
                    plan.capture_top_k,
                    torch.tensor(feats, dtype=torch.long, device=self.device) if feats else None,
                )
            )
            site.tap = -1  # wanted

    def _point_taps(self, live: dict[int, _LiveSite]) -> None:
        """Give each capturing site a row of the tap buffer; a step wanting more sites than there are rows fails
        its captures (the facade answers 503) rather than dropping rows."""
        wanted = [site for site, s in live.items() if s.tap is not None]
        for site in self._tapped:
            self.site_tap[site] = self.options.capture_sites
        rows = {site: k for k, site in enumerate(wanted[: self.options.capture_sites])}
        for site, k in rows.items():
            live[site].tap = k
            self.site_tap[site] = k
        for site in wanted[self.options.capture_sites :]:
            live[site].tap = None
        kept = []
        for item in self._pending:
            if item.tap in rows:
                kept.append(dataclasses.replace(item, tap=rows[item.tap]))
            else:
                self.captures.fail(item.capture_id, f"more than {self.options.capture_sites} capture sites in one step")
        self._pending = kept
        self._tapped = list(rows)

    def flush(self) -> None:
        """Encode the rows the last step copied into the tap buffer (outside the model, before the next step)."""
        for item in self._pending:
            x = self.taps[item.tap, item.rows]  # [r, d_model]
            acts = item.sae.folded.encode(x)  # [r, d_sae]
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
        self._pending = []

    # --- inside the model ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, site: int, hidden: torch.Tensor, residual: torch.Tensor, adds_residual: bool) -> None:
        """Steer `hidden` in place at `site`, then copy the activation there (hidden (+ residual)) into the site's
        tap row. Static mode: the same fixed-shape work at every site, whatever the step holds."""
        if self.static:
            x = ((hidden + residual) if adds_residual else hidden).float()  # [T, d]
            n = x.shape[0]
            conditions = self.condition_tables[site]
            self.condition_ok[:n].index_copy_(1, conditions.column, condition_results(x, conditions))
            delta = slot_delta(x, self.tables[site], self.row_owner, self.row_generated, condition_ok=self.condition_ok)
            hidden.add_(delta.to(hidden.dtype))
            self.taps[:, :n].index_copy_(0, self.site_tap[site : site + 1], (x + delta).unsqueeze(0))
            return
        live = self._live.get(site)
        if live is None:
            return
        x = ((hidden + residual) if adds_residual else hidden).float()
        n = x.shape[0]
        if live.conditions:  # read before this site's steering
            conditions = self.condition_tables[site]
            ok = condition_results(x, conditions, live.conditions)
            self.condition_ok[:n].index_copy_(1, conditions.column[: live.conditions], ok)
        for folded, c, column in live.topk_conditions:
            act = folded.encode(x)[:, c.feature]
            self.condition_ok[:n, column] = act < c.bound if c.below else act > c.bound
        delta = torch.zeros_like(x)
        if not (self._skip_decode and self._decode_only):
            if live.slots:
                gate = self.condition_ok if live.gated else None
                delta = slot_delta(
                    x, self.tables[site], self.row_owner, self.row_generated, live.slots, live.reads, gate
                )
            for group in live.topk:
                delta += steering_delta(group.sae.folded, group.table, x)
            hidden.add_(delta.to(hidden.dtype))
        if live.tap is not None:
            self.taps[live.tap, : x.shape[0]].copy_(x + delta)


ACTIVE: SteeringRuntime | None = None
