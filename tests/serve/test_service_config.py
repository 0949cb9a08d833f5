"""Resources the model deployment asks Ray for, with tensor / pipeline parallel engine workers."""

from __future__ import annotations

import pytest

from serve.config import ServiceConfig

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier


def options(engine: dict, model: dict) -> dict:
    return ServiceConfig.model_validate({"engine": engine, "model": model}).model_serve_options()


def test_one_worker_needs_no_placement_group():
    opts = options({}, {"num_cpus": 2, "num_gpus": 1})
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert "placement_group_bundles" not in opts


def test_mp_workers_are_processes_of_the_replica_so_it_reserves_their_gpus():
    opts = options(
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp"},
        {"num_cpus": 4, "num_gpus": 1},
    )
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 4}
    assert "placement_group_bundles" not in opts


def test_ray_workers_get_one_bundle_each_with_the_replica_in_the_first():
    opts = options(
        {"tensor_parallel_size": 4, "distributed_executor_backend": "ray"},
        {"num_cpus": 2, "num_gpus": 1, "placement_strategy": "PACK"},
    )
    assert opts["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 1}] + [{"CPU": 1.0, "GPU": 1}] * 3
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 2}  # fits in the first bundle
