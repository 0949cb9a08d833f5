"""Every document of each rendered overlay validates: ray.io kinds against the KubeRay CRD copies (unknown fields
rejected), core kinds and the Ray pods' templates against kubernetes-validate's Kubernetes schemas (strict)."""

from __future__ import annotations

import copy
import os

import kubernetes_validate
import pytest
import yaml

from tests.deploy.k8s_manifests import (
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    crd_errors,
    kustomize,
    one,
    ray_pod_templates,
    rendered,
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_kinds(overlay):
    kinds = sorted(d["kind"] for d in rendered(overlay))
    expected = {"ConfigMap", "PersistentVolumeClaim", "RayService", "Secret", "Service", "ServiceMonitor"}
    assert expected <= set(kinds)
    assert ("RayJob" in kinds) == (overlay == "cpu")
    assert all(d["metadata"].get("namespace") == "sae-serve" for d in rendered(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_documents_validate_against_kuberay_crds(overlay):
    ray_docs = [d for d in rendered(overlay) if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs
    for doc in ray_docs:
        assert crd_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"
        # The cluster inside a RayService / RayJob is a RayCluster spec: check it against that CRD as well.
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        as_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": doc["metadata"], "spec": cluster}
        assert crd_errors(as_cluster) == [], f"{doc['kind']} {doc['metadata']['name']} as a RayCluster"


def test_crd_validation_catches_a_misspelt_field_and_a_wrong_type():
    service = copy.deepcopy(one(rendered("cpu"), "RayService"))
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = "\n".join(crd_errors(service))
    assert "rayStartParam" in errors and "maxReplicas" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_documents_validate_against_kubernetes_schemas(overlay):
    core = [d for d in rendered(overlay) if "/" not in d["apiVersion"] or d["apiVersion"].startswith("apps/")]
    assert {d["kind"] for d in core} == {"ConfigMap", "PersistentVolumeClaim", "Secret", "Service"}
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pod_templates_validate_as_kubernetes_pod_templates(overlay):
    ray_docs = [d for d in rendered(overlay) if d["apiVersion"].startswith("ray.io/")]
    templates = [(doc["kind"], name, t) for doc in ray_docs for name, t in ray_pod_templates(doc)]
    assert len(templates) >= 2  # a head and at least one worker group
    for kind, name, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        try:
            kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {kind} group {name}: {e}")


def test_kubernetes_validation_catches_a_misspelt_pod_field():
    _, template = ray_pod_templates(one(rendered("cpu"), "RayService"))[0]
    bad = copy.deepcopy(template)
    bad["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad},
            KUBERNETES_VERSION,
            strict=True,
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_ports_the_service_has(overlay):
    # The Prometheus Operator CRD is not shipped here, so check what it would act on: its selector picks our
    # Service, each endpoint names one of that Service's ports, and that port reaches a port of the head container.
    docs = rendered(overlay)
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "sae-serve")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(ports)
    head = ray_pod_templates(one(docs, "RayService"))[0][1]
    assert service["spec"]["selector"].items() - {"ray.io/serve": "true"}.items() <= head["metadata"]["labels"].items()
    container_ports = {p["name"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in ports.values()} <= container_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_mount_the_volumes_they_name_and_claims_exist(overlay):
    docs = rendered(overlay)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in (d for d in docs if d["apiVersion"].startswith("ray.io/")):
        for name, template in ray_pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{doc['kind']} {name}: no volume {mount['name']}"
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_secret_holds_placeholders_only_and_a_user_overlay_replaces_it(tmp_path):
    secret = one(rendered("cpu"), "Secret", "sae-serve-api-keys")
    assert secret["stringData"] == {"SAE_SERVE_API_KEYS": "", "SAE_SERVE_ADMIN_KEYS": ""}
    # The documented way to supply real keys (docs/deploy.md): an overlay of one's own with a secretGenerator.
    (tmp_path / "keys.env").write_text("SAE_SERVE_API_KEYS=sk-user-a,sk-user-b\nSAE_SERVE_ADMIN_KEYS=sk-admin\n")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", tmp_path)],  # kustomize wants relative
                "secretGenerator": [
                    {
                        "name": "sae-serve-api-keys",
                        "behavior": "replace",
                        "envs": ["keys.env"],
                        "options": {"disableNameSuffixHash": True},
                    }
                ],
            }
        )
    )
    docs = kustomize(tmp_path)
    replaced = one(docs, "Secret", "sae-serve-api-keys")
    assert "stringData" not in replaced and set(replaced["data"]) == {"SAE_SERVE_API_KEYS", "SAE_SERVE_ADMIN_KEYS"}
    refs = {
        ref["secretRef"]["name"]
        for _, t in ray_pod_templates(one(docs, "RayService"))
        for c in t["spec"]["containers"]
        for ref in c.get("envFrom", [])
    }
    assert refs == {"sae-serve-api-keys"}
