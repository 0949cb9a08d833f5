"""The start-up probe catches steering that leaves decode steps unsteered (the failure a CUDA graph captured around
a Python hook would cause), planted here with the worker's fault switch, on a tiny dummy-weights Llama."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import pytest_asyncio

from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.engine.model_files import embedded_model_dir
from serve.engine.worker.runtime import FAULT_SKIP_DECODE_ENV
from serve.errors import SteeringUnavailable
from serve.specs import SteeringEntry
from tests.helpers import make_random_sae
from tests.serve.test_engine_large_config import TINY_LLAMA31


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def faulty_engine(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama-probe")
    (model / "config.json").write_text(json.dumps({**TINY_LLAMA31, "torch_dtype": "float32"}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, model / f)
    sae_dir = tmp_path_factory.mktemp("saes") / "r1"
    make_random_sae(sae_dir, "blocks.1.resid_post", "relu", d_in=TINY_LLAMA31["hidden_size"], seed=2)
    os.environ[FAULT_SKIP_DECODE_ENV] = "1"  # inherited by the engine core process vLLM starts now
    try:
        eng = await SAEEngine.start(
            EngineConfig(
                model=str(model),
                enforce_eager=True,
                load_dummy_weights=True,
                max_model_len=256,
                kv_cache_gib=0.25,
                saes={"r1": str(sae_dir)},
            )
        )
    finally:
        del os.environ[FAULT_SKIP_DECODE_ENV]
    yield eng
    eng.shutdown()


async def test_probe_refuses_steering_when_decode_steps_are_unsteered(faulty_engine):
    assert faulty_engine.steering_refused is not None
    assert "blocks.1.resid_post" in faulty_engine.steering_refused
    assert "did not change any decode step" in faulty_engine.steering_refused
    with pytest.raises(SteeringUnavailable) as e:
        await anext(
            faulty_engine.generate("Hi", Sampling(max_tokens=2), [SteeringEntry(sae="r1", feature=0, value=1.0)])
        )
    assert (e.value.status, e.value.param, e.value.code) == (503, "steering", "steering_unavailable")
    tokens = []
    async for u in faulty_engine.generate("Hi", Sampling(max_tokens=3, temperature=0.0, ignore_eos=True)):
        tokens += [t for o in u.outputs for t in o.token_ids]
    assert len(tokens) == 3  # plain generation keeps serving
