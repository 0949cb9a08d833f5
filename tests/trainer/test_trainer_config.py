import pytest
from conftest import CONFIGS

from trainer.config import TrainerConfig, load_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_roundtrip(path):
    cfg = load_config(path)
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg


def test_demo_config_is_the_8x_layer_15_topk_sae():
    cfg = load_config(CONFIGS / "smollm2-l15-resid-8x.yaml")
    assert (cfg.sae.hook_point, cfg.sae.architecture, cfg.sae.k, cfg.sae.expansion_factor) == (
        "blocks.15.resid_post",
        "topk",
        32,
        8,
    )
    assert cfg.run.cpus_per_worker < 1


def test_overrides_are_parsed_as_yaml_and_checked():
    cfg = load_config(
        CONFIGS / "tiny-test.yaml",
        ["optim.steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "data.cache_dir=null", "run.name=x"],
    )
    assert (cfg.optim.steps, cfg.optim.lr, cfg.optim.betas, cfg.data.cache_dir, cfg.run.name) == (
        7,
        1e-3,
        (0.8, 0.9),
        None,
        "x",
    )
    with pytest.raises(KeyError, match="stepz"):
        load_config(None, ["optim.stepz=1"])
    with pytest.raises(TypeError):
        load_config(None, ["optim.steps=many"])
    with pytest.raises(ValueError):
        load_config(None, ["sae.architecture=gated"])
    with pytest.raises(ValueError):
        load_config(None, ["optim.steps"])


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    from trainer.config import OptimConfig
    from trainer.schedule import default_lr, lr_factor

    optim = OptimConfig(steps=100, warmup_steps=10, decay_start=0.8)
    factors = [lr_factor(s, optim) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and factors[90] == 0.5 and factors[99] == 0.05
    assert abs(default_lr(2**14) - 2e-4) < 1e-12


@pytest.mark.fast
def test_more_saes_become_one_job_each_capturing_every_hook_point():
    cfg = load_config(
        CONFIGS / "tiny-test.yaml",
        ["more_saes=[{sae_id: wide, expansion_factor: 8}, {sae_id: l2, hook_point: blocks.2.resid_post, k: 4}]"],
    )
    first, wide, l2 = cfg.sae_jobs()
    assert first.sae == cfg.sae and first.run.name == "tiny" and first.more_saes == []
    assert (wide.sae.hook_point, wide.sae.expansion_factor, wide.sae.k) == ("blocks.1.resid_post", 8, 8)
    assert (l2.sae.hook_point, l2.sae.k, l2.publish.sae_id, l2.run.name) == ("blocks.2.resid_post", 4, "l2", "tiny-l2")
    assert all(j.capture_hook_points == ["blocks.1.resid_post", "blocks.2.resid_post"] for j in (first, wide))
    assert l2.capture_hook_points == ["blocks.2.resid_post", "blocks.1.resid_post"]
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
