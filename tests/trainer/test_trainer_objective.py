import math

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.objective import TrainingObjective, normalize_decoder, project_decoder_grad
from trainer.resample import resample_dead_latents
from trainer.sae_init import init_sae
from trainer.state import TrainState
from trainer.stats import RunningStats
from trainer.thresholds import inference_threshold, update_thresholds

D, S, K = 16, 64, 4


def make(architecture: str, scale: bool = False, seed: int = 0):
    cfg = TrainerConfig.from_dict(
        {
            "sae": {"architecture": architecture, "d_sae": S, "k": K, "normalize_input": scale},
            "optim": {"aux_k": 8, "seed": seed},
        }
    )
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    stats = RunningStats(D)
    stats.update(x)
    sae = init_sae(cfg, stats)
    with torch.no_grad():  # break the W_enc = W_dec.T symmetry so the test sees distinct encoder gradients
        sae.W_enc.add_(0.1 * torch.randn(D, S, generator=torch.Generator().manual_seed(9)))
        sae.b_enc.add_(0.05)
    return cfg, sae, x


def dense_reference(sae, x, dead, architecture, aux_k, aux_coef):
    """The same objective written densely with plain autograd."""
    xs = x * sae.cfg.input_scale
    xc = xs - sae.b_dec
    pre = xc @ sae.W_enc + sae.b_enc
    acts = torch.relu(pre)
    if architecture == "topk":
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(K, dim=1).indices, True)
    else:
        flat = acts.detach().reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(K * x.shape[0]).indices] = True
        mask = mask.view_as(pre)
    f = acts * mask
    recon = f @ sae.W_dec + sae.b_dec
    err = xs - recon
    total = (xs - xs.mean(0)).pow(2).sum()
    fvu = err.pow(2).sum() / total
    n_dead = int(dead.sum())
    k_aux = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead, -math.inf)
    aux_mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, masked.topk(k_aux, dim=1).indices, True)
    e_hat = (torch.relu(pre) * aux_mask) @ sae.W_dec
    aux = min(n_dead / aux_k, 1.0) * (e_hat - err.detach()).pow(2).sum() / total
    return fvu + aux_coef * aux


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("scale", [False, True])
def test_sparse_objective_matches_dense_autograd(architecture, scale):
    cfg, sae, x = make(architecture, scale)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[::3] = True
    obj = TrainingObjective(sae, cfg.optim, architecture)
    out = obj(x, dead)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.requires_grad}
    sae.zero_grad()
    want_loss = dense_reference(sae, x, dead, architecture, 8, cfg.optim.aux_k_coef)
    want_loss.backward()
    assert abs(float(out.loss.detach()) - float(want_loss.detach())) < 1e-5
    for name, grad in got.items():
        torch.testing.assert_close(grad, getattr(sae, name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_topk_training_reconstruction_is_the_inference_forward():
    cfg, sae, x = make("topk", scale=True)
    out = TrainingObjective(sae, cfg.optim, "topk")(x, torch.zeros(S, dtype=torch.bool))
    with torch.no_grad():
        sq = (x - sae(x)).pow(2).sum()
    assert abs(float(out.sq_err) - float(sq)) / float(sq) < 1e-5
    assert float(out.l0) == K


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_decoder_stays_unit_norm_with_projected_gradient(architecture):
    cfg, sae, x = make(architecture)
    obj = TrainingObjective(sae, cfg.optim, architecture)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    dead = torch.zeros(S, dtype=torch.bool)
    before = sae.W_dec.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        obj(x, dead, 0.1).loss.backward()
        project_decoder_grad(sae)
        parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
        assert parallel.abs().max() < 1e-6 * max(1.0, float(sae.W_dec.grad.abs().max()))
        opt.step()
        normalize_decoder(sae)
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(S))
    assert not torch.allclose(sae.W_dec, before)


def test_batchtopk_threshold_gives_about_k_active_latents_at_inference():
    cfg, sae, x = make("batchtopk")
    obj = TrainingObjective(sae, cfg.optim, "batchtopk")
    state = TrainState(0, torch.zeros(S, dtype=torch.int64), [0], RunningStats(D), torch.full((S,), math.nan))
    for _ in range(50):
        out = obj(x, torch.zeros(S, dtype=torch.bool))
        update_thresholds(state, out.min_kept, decay=0.9)
    assert state.global_threshold > 0
    for mode in ("global", "per_latent"):
        with torch.no_grad():
            sae.threshold.copy_(inference_threshold(state, mode))
            l0 = float((sae.encode(x) > 0).sum(-1).double().mean())
        assert K / 2 <= l0 <= 2 * K, (mode, l0)


def test_resampling_reinitialises_only_dead_latents():
    cfg, sae, x = make("relu")
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-3)
    TrainingObjective(sae, cfg.optim, "relu")(x, torch.zeros(S, dtype=torch.bool), 0.1).loss.backward()
    opt.step()
    dead = torch.zeros(S, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    W_dec, W_enc = sae.W_dec.detach().clone(), sae.W_enc.detach().clone()
    assert resample_dead_latents(sae, opt, x, dead, seed=0) == 3
    torch.testing.assert_close(sae.W_dec[~dead], W_dec[~dead])
    torch.testing.assert_close(sae.W_enc[:, ~dead], W_enc[:, ~dead])
    assert not torch.allclose(sae.W_dec[dead], W_dec[dead])
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=-1), torch.ones(3))
    assert (sae.b_enc[dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (opt.state[sae.W_enc]["exp_avg_sq"][:, dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][~dead] != 0).any()
