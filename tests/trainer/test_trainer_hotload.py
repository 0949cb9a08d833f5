"""Trainer → registry → running service, end to end on the embedded model and the session's shared service:
a short Ray Train job (on the service's own Ray) publishes an SAE, the service loads it without a restart and
steers and reads activations with it; then a corrupt publish and a mismatched re-publish are rejected while
everything loaded keeps serving unchanged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import CONFIGS

from tests.helpers import make_random_sae

SAE_ID = "e2e"
SECOND_ID = "e2e-l5"  # trained by the same job from the same capture pass, at another hook point
PROMPT = "The old sailor looked at the sea and said"


def wait_for_state(service, sae_id: str, version: int, state: str, timeout: float = 60.0) -> dict:
    """The registry entry of `sae_id` once this publish has reached `state` (polled through GET /v1/registry)."""
    deadline = time.monotonic() + timeout
    with service.http() as http:
        while True:
            r = http.get("/v1/registry")
            assert r.status_code == 200, r.text
            entry = next((e for e in r.json()["entries"] if e["id"] == sae_id), None)
            if entry is not None and entry["version"] == version and entry["state"] == state:
                return entry
            assert time.monotonic() < deadline, f"{sae_id} v{version} never became {state}: {r.json()}"
            time.sleep(0.2)


def greedy(service, steering=None) -> str:
    extra = {"steering": steering} if steering else None
    r = service.openai().completions.create(
        model=service.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra
    )
    return r.choices[0].text


def write_manifest_entry(registry: Path, sae_id: str, version: int) -> None:
    """What a buggy or foreign publisher might leave: a manifest entry for whatever folder is there."""
    manifest = json.loads((registry / "manifest.json").read_text())
    manifest["saes"][sae_id] = {"version": version, "path": sae_id}
    tmp = registry / ".manifest.test.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, registry / "manifest.json")


@pytest.fixture(scope="module")
def published(service, tmp_path_factory):
    """Runs the job in this process: Ray Train joins the service's Ray (one worker, half a CPU)."""
    from serve.engine.model_files import resolve_model
    from trainer.config import load_config
    from trainer.job import run_job

    tmp = tmp_path_factory.mktemp("hotload-job")
    cfg = load_config(
        CONFIGS / "tiny-test.yaml",
        [
            f"model={resolve_model('embedded', prepare=False)}",
            f"run.storage_path={tmp / 'runs'}",
            f"publish.registry={service.registry}",
            f"publish.sae_id={SAE_ID}",
            f"data.cache_dir={tmp / 'cache'}",
            "sae.hook_point=blocks.10.resid_post",
            f"more_saes=[{{sae_id: {SECOND_ID}, hook_point: blocks.5.resid_post, k: 16}}]",
            "data.max_documents=300",
            "optim.steps=30",
            "run.num_workers=1",
            "run.cpus_per_worker=0.5",
            "run.checkpoint_every=30",
            "eval.max_contexts=8",
        ],
    )
    summary = run_job(cfg)
    yield summary
    with service.http(service.admin_key) as http:
        for sae_id in (SAE_ID, SECOND_ID):
            http.delete(f"/v1/saes/{sae_id}")  # leave the shared service as the other tests expect it


def test_published_sae_is_hot_loaded_and_steers(service, published):
    assert published["registry_entry"]["version"] == 1
    wait_for_state(service, SAE_ID, 1, "loaded")
    with service.http() as http:
        listed = {s["id"]: s for s in http.get("/v1/saes").json()["data"]}
        assert listed[SAE_ID]["hook_point"] == "blocks.10.resid_post" and listed[SAE_ID]["d_sae"] == 4 * 576
        assert "toy" in listed  # what was loaded before keeps serving
        r = http.post("/v1/activations", json={"input": PROMPT, "saes": [SAE_ID], "top_k": 3})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    tops = [t["saes"][SAE_ID]["top"] for t in tokens]
    assert all(len(top) == 3 for top in tops)
    assert any(value > 0 for top in tops for _, value in top)  # a trained TopK SAE fires on real text
    feature = tops[-1][0][0]

    plain = greedy(service)
    steered = greedy(service, [{"sae": SAE_ID, "feature": feature, "value": 150.0}])
    assert steered != plain
    assert greedy(service) == plain


def test_corrupt_and_mismatched_publishes_are_rejected_and_serving_continues(service, published, tmp_path):
    wait_for_state(service, SAE_ID, 1, "loaded")
    steering = [{"sae": SAE_ID, "feature": 7, "value": 150.0}]
    before = greedy(service, steering)

    broken = service.registry / "broken"
    broken.mkdir()
    (broken / "sae.json").write_text((service.registry / SAE_ID / "v1" / "sae.json").read_text())
    (broken / "sae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    write_manifest_entry(service.registry, "broken", 1)
    entry = wait_for_state(service, "broken", 1, "rejected")
    assert "cannot load an SAE" in entry["error"]

    # A re-publish of e2e whose width does not fit the model: the trainer's publish accepts any loadable SAE.
    from trainer.publish import publish

    make_random_sae(tmp_path / "narrow", "blocks.10.resid_post", "relu", d_in=64, d_sae=128)
    assert publish(tmp_path / "narrow", service.registry, SAE_ID)["version"] == 2
    entry = wait_for_state(service, SAE_ID, 2, "rejected")
    assert "576" in entry["error"] and "64" in entry["error"]

    with service.http() as http:
        listed = {s["id"]: s for s in http.get("/v1/saes").json()["data"]}
    assert "broken" not in listed and listed[SAE_ID]["d_in"] == 576 and "toy" in listed
    assert greedy(service, steering) == before


def test_one_job_publishes_two_saes_from_one_pass_and_both_hot_load(service, published):
    assert [s["sae_id"] for s in published["saes"]] == [SAE_ID, SECOND_ID]
    assert [s["hook_point"] for s in published["saes"]] == ["blocks.10.resid_post", "blocks.5.resid_post"]
    second = published["saes"][1]
    assert second["registry_entry"]["version"] == 1 and 0 < second["evaluation"]["fvu"] < 1
    wait_for_state(service, SECOND_ID, 1, "loaded")
    with service.http() as http:
        listed = {s["id"]: s for s in http.get("/v1/saes").json()["data"]}
        assert listed[SECOND_ID]["hook_point"] == "blocks.5.resid_post" and SAE_ID in listed
        r = http.post("/v1/activations", json={"input": PROMPT, "saes": [SAE_ID, SECOND_ID], "top_k": 2})
    assert r.status_code == 200, r.text
    for sae_id in (SAE_ID, SECOND_ID):
        assert any(v > 0 for t in r.json()["tokens"] for _, v in t["saes"][sae_id]["top"])
