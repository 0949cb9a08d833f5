"""The Grafana dashboard parses, ships in its ConfigMap, and queries only metrics (and labels) the service exports."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from serve.http.metrics import ServiceMetrics
from tests.deploy.k8s_manifests import K8S, OVERLAYS, one, rendered

DASHBOARD = K8S / "base" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, for every series ServiceMetrics can expose."""
    series: dict[str, set[str]] = {}
    for collector in vars(ServiceMetrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        (family,) = collector.describe()
        labels = set(collector._labelnames)  # prometheus_client exposes a metric's label names only here
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    return exprs


def test_every_queried_metric_is_exported():
    series = exported()
    for expr in expressions():
        names = set(re.findall(r"sae_serve:[a-zA-Z0-9_:]+", expr))
        assert names, f"queries none of our metrics: {expr}"
        assert names <= series.keys(), f"unknown metric in {expr}: {names - series.keys()}"


def test_every_grouping_label_exists_on_the_queried_metric():
    series = exported()
    for expr in expressions():
        labels = set().union(*(series[n] for n in re.findall(r"sae_serve:[a-zA-Z0-9_:]+", expr)))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= labels, expr
        for selector in re.findall(r"\{([^}]*)\}", expr):
            matchers = {m.split("=")[0].strip() for m in selector.split(",") if "=" in m}
            # `namespace` is attached by Prometheus from the scraped target, not by us.
            assert matchers - {"namespace"} <= labels, expr


def test_every_metric_is_on_the_dashboard():
    queried = set(re.findall(r"sae_serve:[a-zA-Z0-9_:]+", " ".join(expressions())))
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in queried}
    assert bases == {f.name for f in ServiceMetrics().registry.collect()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_ships_in_the_grafana_configmap(overlay):
    configmap = one(rendered(overlay), "ConfigMap", "sae-serve-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["sae-serve.json"]) == json.loads(DASHBOARD.read_text())
