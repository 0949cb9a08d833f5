"""Reference steering/capture on a plain transformers forward, written from the definitions in sae/steering.py.

Deliberately independent of `serve.engine.worker.runtime`: every latent op is expressed as an edit of the SAE code
f, delta = decode(f') - decode(f), with f' = f + v·e_i (add), f_i := v (clamp), f_i := m·f_i (mul), or
f' = act(pre + v·e_i) (h_bias); the residual-space ops on a direction u as edits of x's projection p = x·û:
add x + v·u, ablate x − p·û, cap x + min(v − p, 0)·û, set x + (v − p)·û.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from sae import HookPoint, SparseAutoencoder, hf_module_and_output
from serve.specs import SteeringEntry


def _edited_code(sae: SparseAutoencoder, x: torch.Tensor, entries: list[SteeringEntry]) -> torch.Tensor:
    pre = sae.pre_acts(x)
    f = sae.activate(pre)
    bias = torch.zeros_like(pre)
    for e in entries:
        if e.op == "h_bias":
            bias[..., e.feature] += e.value
    f_new = sae.activate(pre + bias)
    for e in entries:
        if e.op == "add":
            f_new[..., e.feature] += e.value
        elif e.op == "clamp":
            f_new[..., e.feature] += e.value - f[..., e.feature]
        elif e.op == "mul":
            f_new[..., e.feature] += (e.value - 1.0) * f[..., e.feature]
    return sae.decode(f_new) - sae.decode(f)


def _position_mask(entry: SteeringEntry, seq_len: int, prompt_len: int) -> torch.Tensor:  # [T, 1]
    pos = torch.arange(seq_len).unsqueeze(1)
    if entry.positions == "prompt":
        return (pos < prompt_len).float()
    if entry.positions == "generated":
        return (pos >= prompt_len).float()
    return torch.ones(seq_len, 1)


def direction_delta(x: torch.Tensor, u: torch.Tensor, e: SteeringEntry) -> torch.Tensor:  # [..., d] -> [..., d]
    unit = u / u.norm()
    p = (x @ unit).unsqueeze(-1)
    if e.op == "add":
        return e.value * (unit if e.normalize else u).expand_as(x)
    change = {"ablate": -p, "cap": (e.value - p).clamp(max=0.0), "set": e.value - p}[e.op]
    return change * unit


@contextmanager
def steered(model, saes: dict[str, SparseAutoencoder], entries: list[SteeringEntry], prompt_len: int, record=None):
    """Hook `model` so a forward over one sequence [1, T] is steered; `record[sae_id]` gets the steered activation.
    Vector entries, and residual-space ops on a feature's decoder row, edit x at their hook point. An entry's
    `when` conditions are read at their SAE's hook point before any steering there (hooks registered first), and
    gate the entry per token."""
    handles = []
    gates: dict[tuple[int, int], torch.Tensor] = {}  # (entry, condition) -> [1, T, 1] holds
    for n, e in enumerate(entries):
        for j, c in enumerate(e.when):
            cond_sae = saes[c.sae]
            module, get = hf_module_and_output(model, HookPoint.parse(cond_sae.cfg.hook_point))

            def condition_hook(_mod, _inp, output, key=(n, j), c=c, sae=cond_sae, get=get):
                act = sae.encode(get(output))[..., c.feature : c.feature + 1]
                gates[key] = (act > c.above) if c.above is not None else (act < c.below)

            handles.append(module.register_forward_hook(condition_hook))

    def gate(e: SteeringEntry) -> torch.Tensor | float:
        n = next(i for i, other in enumerate(entries) if other is e)
        out: torch.Tensor | float = 1.0
        for j in range(len(e.when)):
            out = out * gates[(n, j)].float()
        return out

    for hook_point in sorted({e.hook_point for e in entries if e.vector is not None}):
        mine_v = [e for e in entries if e.hook_point == hook_point]
        module, get = hf_module_and_output(model, HookPoint.parse(hook_point))

        def vector_hook(_mod, _inp, output, mine_v=mine_v, get=get):
            x = get(output)
            delta = sum(
                direction_delta(x, torch.tensor(e.vector), e) * _position_mask(e, x.shape[1], prompt_len) * gate(e)
                for e in mine_v
            )
            y = x + delta
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

        handles.append(module.register_forward_hook(vector_hook))
    hps = {sid: HookPoint.parse(s.cfg.hook_point) for sid, s in saes.items()}
    for sid, sae in saes.items():
        mine = [e for e in entries if e.sae == sid]
        module, get = hf_module_and_output(model, hps[sid])

        def hook(_mod, _inp, output, sae=sae, mine=mine, get=get, sid=sid):
            x = get(output)  # [1, T, d]
            delta = torch.zeros_like(x)
            # Edits are linear in f, so entries add up (tests use at most one h_bias entry per SAE).
            for e in mine:
                if e.op in ("ablate", "cap", "set"):
                    edit = direction_delta(x, sae.W_dec[e.feature].detach(), e)
                else:
                    edit = _edited_code(sae, x, [e])
                delta += edit * _position_mask(e, x.shape[1], prompt_len) * gate(e)
            y = x + delta
            if record is not None:
                record[sid] = y.detach()
            if isinstance(output, tuple):
                return (y,) + tuple(output[1:])
            return y

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prompt_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape [T-1]."""
    ids = torch.tensor([token_ids])
    logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)


@torch.no_grad()
def greedy(model, token_ids: list[int], max_tokens: int) -> list[int]:
    ids = list(token_ids)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(token_ids) :]
