"""Engines never outlive their owner: a careless owner (`SAEEngine.start`, no shutdown) that dies of an uncaught
ImportError or of SIGKILL leaves none of vLLM's processes running (the plugin's parent-death handling, lifetime.py).

Both owners are subprocesses starting a tiny dummy-weights engine at once (≈1 min together); every child process an
owner printed must be gone (exited or a zombie) soon after it died. Whatever is left is killed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serve.engine.model_files import embedded_model_dir
from tests.serve.test_engine_large_config import TINY_LLAMA31

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300  # two tiny engines starting at once on a busy 2-core box
GONE_TIMEOUT_S = 20
MARKER = "CHILD_PIDS "

OWNER = """
import asyncio, sys
import psutil
from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine

async def main(model, variant):
    engine = await SAEEngine.start(EngineConfig(model=model, dtype="float32", enforce_eager=True,
                                                load_dummy_weights=True, max_model_len=256, kv_cache_gib=0.25))
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    print("CHILD_PIDS " + " ".join(map(str, pids)), flush=True)
    if variant == "import_error":
        import sae_serve_no_such_module  # noqa: F401  (uncaught: the owner dies with a traceback)
    await asyncio.sleep(3600)  # the test SIGKILLs us

if __name__ == "__main__":  # vLLM spawns its engine core, which imports this file again
    asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

VARIANTS = ("import_error", "sigkill")


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    """Both owners, started at once: variant -> (Popen, log file)."""
    tmp = tmp_path_factory.mktemp("lifetime")
    model = tmp / "tiny-llama31"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA31))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, model / f)
    script = tmp / "owner.py"
    script.write_text(OWNER)
    started: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for variant in VARIANTS:
            log = tmp / f"{variant}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(script), str(model), variant], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
                )
            started[variant] = (proc, log)
        yield started
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[:120]}"
    return str(proc.pid)


def _children(proc: subprocess.Popen, log: Path) -> list[psutil.Process]:
    """The child processes the owner printed, as psutil handles taken while it is alive (safe from PID reuse)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(MARKER):
                handles = []
                for pid in map(int, line[len(MARKER) :].split()):
                    try:
                        handles.append(psutil.Process(pid))
                    except psutil.NoSuchProcess:
                        pass
                return handles
        if proc.poll() is not None:
            pytest.fail(f"the owner exited ({proc.returncode}) before starting its engine:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no engine within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_processes_die_with_their_owner(owners, variant):
    proc, log = owners[variant]
    children = _children(proc, log)
    try:
        assert children, "the engine started no child process?"
        if variant == "sigkill":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if variant == "import_error":
            assert proc.returncode != 0 and "ModuleNotFoundError" in log.read_text(), log.read_text()[-4000:]
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while time.monotonic() < deadline and not all(map(_gone, children)):
            time.sleep(0.25)
        left = [_describe(c) for c in children if not _gone(c)]
        assert not left, f"still running {GONE_TIMEOUT_S} s after the owner died: {left}"
    finally:
        for c in children:
            with contextlib.suppress(psutil.Error):
                c.kill()
