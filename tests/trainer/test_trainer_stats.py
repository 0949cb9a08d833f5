import torch

from trainer.stats import RunningStats


def test_welford_matches_torch_over_uneven_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=gen) * torch.linspace(0.1, 5, 16) + torch.linspace(-3, 3, 16)
    stats = RunningStats(16)
    for part in torch.split(x, [1, 7, 300, 2, 690]):
        stats.update(part)
    assert stats.count == 1000
    torch.testing.assert_close(stats.mean, x.double().mean(0))
    torch.testing.assert_close(stats.var, x.double().var(0))
    norms = x.double().norm(dim=-1)
    assert abs(stats.norm_mean - float(norms.mean())) < 1e-9
    assert abs(stats.norm_std - float(norms.std())) < 1e-9
    assert abs(stats.total_variance - float(x.double().var(0, unbiased=False).sum())) < 1e-9


def test_merge_and_pack_roundtrip_equal_single_pass():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2
    a, b, whole = RunningStats(8), RunningStats(8), RunningStats(8)
    a.update(x[:123])
    b.update(x[123:])
    whole.update(x)
    merged = RunningStats.from_tensor(a.to_tensor())
    merged.merge(RunningStats.from_tensor(b.to_tensor()))
    torch.testing.assert_close(merged.mean, whole.mean)
    torch.testing.assert_close(merged.m2, whole.m2)
    assert merged.count == 500
    assert abs(merged.norm_mean - whole.norm_mean) < 1e-9


def test_input_scale_normalises_mean_norm():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(2)) * 7
    stats = RunningStats(64)
    stats.update(x)
    scaled = x * stats.input_scale()
    assert abs(float(scaled.norm(dim=-1).mean()) - 8.0) < 1e-3
