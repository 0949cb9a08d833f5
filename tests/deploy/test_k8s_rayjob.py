"""The training RayJob runs the local training command (`python -m trainer --config ...`) with its paths on the
PVC the RayService loads SAEs from, and the model inside the image."""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

import yaml

from serve.config import service_args
from serve.engine.model_files import EMBEDDED_MODEL_NAME
from tests.deploy.dockerfiles import DOCKERFILES, env_of
from tests.deploy.k8s_manifests import IMAGE_APP_DIR, REPO, claim_of, one, ray_pod_templates, rendered
from trainer.config import load_config


def rayjob() -> dict:
    return one(rendered("cpu"), "RayJob", "sae-serve-train")


def entrypoint() -> tuple[list[str], str, list[str]]:
    """(command, config path, --set overrides) of the RayJob's entrypoint."""
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    command, rest = argv[:3], argv[3:]
    config, overrides = None, []
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        assert flag in ("--config", "--set"), f"unexpected entrypoint argument {flag}"
        if flag == "--config":
            config = value
        else:
            overrides.append(value)
    return command, config, overrides


def trainer_config():
    """The TrainerConfig the entrypoint runs (its config file is the repository's, copied into the image)."""
    _, config, overrides = entrypoint()
    return load_config(REPO / PurePosixPath(config).relative_to(IMAGE_APP_DIR), overrides)


def test_entrypoint_is_the_local_training_command():
    command, config, _ = entrypoint()
    assert command == ["python", "-m", "trainer"]
    repo_config = PurePosixPath(config).relative_to(IMAGE_APP_DIR)
    assert f"python -m trainer --config {repo_config}" in (REPO / "README.md").read_text()


def test_trainer_accepts_the_config_with_the_overrides():
    cfg = trainer_config()
    served = service_args(yaml.safe_load(one(rendered("cpu"), "RayService")["spec"]["serveConfigV2"]))
    assert cfg.publish.registry == served["sae_registry"]
    home = PurePosixPath(env_of(DOCKERFILES["cpu"])["SAE_SERVE_HOME"])
    assert PurePosixPath(cfg.model) == home / "models" / EMBEDDED_MODEL_NAME  # where `sae-serve model prepare` put it


def test_everything_the_job_writes_lands_on_the_registry_pvc_on_every_pod():
    cfg = trainer_config()
    written = [cfg.publish.registry, cfg.run.storage_path, cfg.data.cache_dir]
    for name, template in ray_pod_templates(rayjob()):
        for path in map(PurePosixPath, written):
            assert path.is_absolute() and claim_of(path, template) == "sae-serve-data", f"{name}: {path}"
    for name, template in ray_pod_templates(one(rendered("cpu"), "RayService")):
        assert claim_of(PurePosixPath(cfg.publish.registry), template) == "sae-serve-data", name


def test_job_cluster_has_the_cpus_the_train_workers_ask_for():
    cfg = trainer_config()
    spec = rayjob()["spec"]
    worker_cpus = sum(
        float(g["rayStartParams"]["num-cpus"]) * g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.run.num_workers * cfg.run.cpus_per_worker < worker_cpus
    # Capture actors run before training, on the same workers; the head (num-cpus 0) runs neither.
    assert cfg.data.capture_workers >= 1 and cfg.data.cache_dir
    assert cfg.data.capture_workers * cfg.data.capture_cpus <= worker_cpus
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
