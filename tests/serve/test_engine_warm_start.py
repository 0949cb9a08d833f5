"""A second start of the same model and config loads vLLM's AOT compile cache instead of compiling again, and the
loaded model steers exactly as the freshly compiled one (here with a vector entry on an engine that holds no SAE).

Two owners in a row, each a subprocess starting a tiny compiled dummy-weights engine with one private compile cache
(`VLLM_CACHE_ROOT`, `TORCHINDUCTOR_CACHE_DIR`): the first compiles and saves, the second must load (≈1.5 min).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from serve.engine.model_files import embedded_model_dir
from tests.serve.test_engine_large_config import TINY_LLAMA31

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600
MARKER = "TOKENS "

OWNER = """
import asyncio, json, sys
from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.specs import SteeringEntry

async def main(model):
    config = EngineConfig(model=model, load_dummy_weights=True, max_model_len=256, kv_cache_gib=0.25)
    async with SAEEngine.started(config) as engine:
        vector = [1.0 if i % 3 == 0 else -1.0 for i in range(engine.d_model)]
        runs = {"plain": [], "steered": [SteeringEntry(vector=vector, hook_point="blocks.0.resid_post", value=8.0)]}
        out = {}
        for name, steering in runs.items():
            out[name] = []
            async for u in engine.generate("Hello there, how are", Sampling(max_tokens=8, temperature=0.0), steering):
                out[name] += [t for o in u.outputs for t in o.token_ids]
                if u.steering_report:
                    out["report"] = [(r.status, r.steered_tokens) for r in u.steering_report]
        print("TOKENS " + json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1]))
"""


def _start(model: Path, caches: Path) -> tuple[dict, str]:
    env = dict(
        os.environ,
        VLLM_CACHE_ROOT=str(caches / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
        PYTHONPATH=str(ROOT),
    )
    run = subprocess.run(
        [sys.executable, "-c", OWNER, str(model)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith(MARKER))
    return json.loads(line[len(MARKER) :]), log


def test_second_start_loads_the_aot_compile_cache_and_steers_the_same(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(TINY_LLAMA31, num_hidden_layers=2, torch_dtype="float32")))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, model / f)

    cold, cold_log = _start(model, tmp_path / "caches")
    warm, warm_log = _start(model, tmp_path / "caches")

    assert "saved AOT compiled function" in cold_log
    assert "Directly load AOT compilation" in warm_log, warm_log[-4000:]
    assert "Compiling model again" not in warm_log
    assert warm == cold
    # No SAE is loaded: a vector entry alone steers every row (5 prompt + 7 fed-back tokens), and the loaded graph
    # still calls the hook.
    assert warm["report"] == [["applied", 12]]
    assert warm["steered"] != warm["plain"]
