"""A short headless locust run of the mixed scenario (`sae-serve loadtest`) against the live shared service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clients.load_config import LoadConfig
from clients.loadtest import LoadTestRun, read_stats
from serve.launch.cli import main


def _steered_total(service) -> float:
    with service.http(key=None) as http:
        text = http.get("/metrics").text
    m = re.search(r'^sae_serve:steered_requests_total\{sae="toy"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_short_mixed_run_has_no_failures(service, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_SERVE_API_KEY", service.user_key)
    steered_before = _steered_total(service)
    code = main(
        [
            "loadtest",
            "--url",
            service.base_url,
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--duration",
            "20s",
            "--scenario",
            "mixed",
            "--weights",
            "chat=1,steered=1,activations=1",
            "--max-tokens",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    stats = {s.name: s for s in read_stats(tmp_path)}
    assert code == 0, stats
    for name in ("chat", "chat steered", "activations", "Aggregated"):
        assert stats[name].requests > 0 and stats[name].failures == 0, stats[name]
    assert stats["Aggregated"].p50_ms > 0 and stats["Aggregated"].requests_per_s > 0
    # The steered requests really carried steering on `toy` (the service counts them).
    assert _steered_total(service) - steered_before >= stats["chat steered"].requests
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_load_config_round_trips_through_the_environment():
    config = LoadConfig(
        scenario="steered",
        weights={"chat": 3, "activations": 1},
        max_tokens=4,
        sae="toy",
        steer_value=2.5,
        top_k=3,
        wait_s=0.1,
        api_key="sk-x",
    )
    assert LoadConfig.from_env(config.to_env()) == config
    assert "sk-x" not in repr(config)
    assert LoadConfig().task_weights() == {"chat": 2, "steered": 2, "activations": 1}
    assert config.task_weights() == {"steered": 1}
    with pytest.raises(ValueError, match="WEIGHTS"):
        LoadConfig.from_env({"SAE_SERVE_LOAD_WEIGHTS": "chat=2,dance=1"})
    with pytest.raises(ValueError, match="scenario"):
        LoadConfig(scenario="everything")
    with pytest.raises(ValueError, match="duration"):
        LoadTestRun(host="http://127.0.0.1:1", out=Path("unused"), duration="3 minutes")
