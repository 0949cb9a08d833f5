"""Rendering the kustomize overlays and validating documents against the KubeRay CRDs and Kubernetes' own schemas."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CRDS = K8S / "crds"
OVERLAYS = ("cpu", "gpu", "gpu-tp")
IMAGE_APP_DIR = PurePosixPath("/app")
"""WORKDIR of deploy/docker/Dockerfile.*: the repository files the images copy lie under it."""
KUBERNETES_VERSION = "1.35"
"""The Kubernetes version whose schemas (bundled in kubernetes-validate) the core kinds are checked against."""


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed to render the kustomize overlays (`kubectl kustomize`)")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize directory` renders."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def one(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    """The single document of that kind (and name)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever the CRD lists the fields: the API server (field validation
    Strict, kubectl's default) rejects them, while plain JSON Schema would let a misspelt field through."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """A validator of the KubeRay CRD copy's schema for that apiVersion and kind, or None if there is none."""
    group, _, version = api_version.partition("/")
    path = CRDS / f"{group}_{kind.lower()}s.yaml"
    if not path.is_file():
        return None
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB each
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if crd["spec"]["names"]["kind"] != kind or version not in served:
        return None
    schema = _strict(served[version]["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta, which the CRD leaves open.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations of a ray.io document (an unknown apiVersion/kind is one)."""
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    if validator is None:
        return [f"no KubeRay CRD for {doc['apiVersion']} {doc['kind']}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def ray_pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, pod template) of the head and each worker group of a RayService / RayJob / RayCluster."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]
    return [(name, group["template"]) for name, group in groups]


def mounts(template: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Mount path -> claim name of the PVC mounts of a pod template's containers."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        PurePosixPath(m["mountPath"]): claims[m["name"]]
        for c in template["spec"]["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in claims
    }


def claim_of(path: PurePosixPath, template: dict[str, Any]) -> str | None:
    """The claim of the PVC mounted at or above `path` in the pod template, or None."""
    return next((claim for mount, claim in mounts(template).items() if mount in (path, *path.parents)), None)
