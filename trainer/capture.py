"""Activation capture: run the transformers model up to the hook point, collect activations per chunk, cache them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.hookpoints import HookPoint, hf_module_and_output

from .config import TrainerConfig
from .data import ChunkPlan, SpecialTokens, iter_documents, tokenize_contexts

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inlier_mask(norms: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Bool mask of activations to keep: norm at most factor times the median norm (all when factor is None).

    At the first position after BOS, and at BOS itself, SmolLM2's residual stream sometimes reaches ~100x the
    typical norm (attention sinks); one such token outweighs a whole batch in a squared-error loss.
    """
    if factor is None or norms.numel() == 0:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms <= factor * norms.median()


def compute_dtype(requested: str, device: str | torch.device = "cpu") -> str:
    """The dtype capture math runs in: bfloat16 only where the hardware multiplies in it.

    On CPUs without AVX-512 BF16 or AMX, a bfloat16 matmul ran 44x slower than float32 (1.0 vs 44 GFLOP/s, one
    thread, AVX2) and SmolLM2's capture 7x slower (86 vs 598 activations/s), so such CPUs compute in float32;
    the cache still stores `data.cache_dtype`.
    """
    if requested != "bfloat16" or torch.device(device).type != "cpu":
        return requested
    bf16_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return requested if bf16_units else "float32"


class _StopForward(Exception):
    """Raised from the hook so layers past the hook point are never computed."""


def load_language_model(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local transformers folder, in eval mode without gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype])
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer alone: enough to build the corpus when every chunk is already cached."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class HookedCapture:
    """Callable: input_ids [B, T] -> activations at one or several hook points, skipping layers past the last.

    With one hook point the result is [B, T, d_model]; with a sequence of them, [B, T, n_hooks, d_model] in the
    given order, all from one forward pass.
    """

    def __init__(self, model: torch.nn.Module, hook_point: str | HookPoint | Sequence[str | HookPoint]):
        self.model = model
        self.single = isinstance(hook_point, (str, HookPoint))
        points = [hook_point] if isinstance(hook_point, (str, HookPoint)) else list(hook_point)
        self.taps = [hf_module_and_output(model, hp) for hp in points]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        captured: dict[int, torch.Tensor] = {}

        def tap(index: int, extract):
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                captured[index] = extract(output)
                if len(captured) == len(self.taps):
                    raise _StopForward

            return hook

        handles = [module.register_forward_hook(tap(i, ex)) for i, (module, ex) in enumerate(self.taps)]
        try:
            self.model(input_ids=input_ids.long(), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if self.single:
            return captured[0].float()  # [B, T, d_model]
        return torch.stack([captured[i].float() for i in range(len(self.taps))], dim=2)  # [B, T, H, d_model]


@dataclass
class Corpus:
    """The tokenised corpus and how it is chunked."""

    contexts: torch.Tensor
    """Token ids [n_contexts, context_size] int32."""
    plan: ChunkPlan
    """Chunk ids for training and evaluation."""
    special: SpecialTokens
    """BOS/separator ids and the ids whose activations are dropped."""

    def chunk_tokens(self, chunk: int) -> torch.Tensor:
        """Token ids [n, context_size] of one chunk."""
        start, stop = self.plan.context_range(chunk)
        return self.contexts[start:stop]

    def keep_mask(self, tokens: torch.Tensor, exclude_special: bool) -> torch.Tensor:
        """Bool mask of positions whose activations are used (same shape as tokens)."""
        if not exclude_special:
            return torch.ones_like(tokens, dtype=torch.bool)
        excluded = torch.tensor(sorted(self.special.excluded), dtype=tokens.dtype)
        return ~torch.isin(tokens, excluded)


def cache_key(cfg: TrainerConfig, device: str | torch.device = "cpu") -> str:
    """Hash of everything that determines the captured activations (not the SAE or optimiser settings)."""
    d = cfg.data
    ident = {
        "model": str(cfg.model_path.resolve()),
        "hook_point": cfg.sae.hook_point,
        "data": [
            d.format,
            d.paths,
            d.hf_builder,
            d.hf_split,
            d.text_field,
            d.fortune_exclude,
            d.max_documents,
            d.context_size,
            d.prepend_bos,
            d.exclude_special_tokens,
            d.contexts_per_chunk,
            d.cache_dtype,
            compute_dtype(d.capture_dtype, device),
        ],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # Several workers may write the same file; write-then-rename means readers never see a partial one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_corpus(cfg: TrainerConfig, tokenizer) -> Corpus:
    """Tokenise the corpus (or read the cached token ids) and plan its chunks."""
    cache = Path(cfg.data.cache_dir).expanduser() / cache_key(cfg) if cfg.data.cache_dir else None
    tokens_file = cache / "contexts.safetensors" if cache else None
    if tokens_file is not None and tokens_file.exists():
        contexts = load_file(str(tokens_file))["contexts"]
    else:
        contexts = tokenize_contexts(iter_documents(cfg.data), tokenizer, cfg.data)
        if tokens_file is not None:
            _atomic_save({"contexts": contexts}, tokens_file)
    plan = ChunkPlan.build(contexts.shape[0], cfg.data.contexts_per_chunk, cfg.data.eval_fraction)
    return Corpus(contexts, plan, SpecialTokens.from_tokenizer(tokenizer))


class ChunkSource:
    """Activations per chunk (special tokens and norm outliers dropped), cached on disk per hook point.

    `hook_points` defaults to the config's SAE hook point; with several, one forward pass fills all of them and
    a position is dropped when it is a norm outlier at any of them, so every SAE sees the same tokens.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        corpus: Corpus,
        device: str | torch.device = "cpu",
        hook_points: Sequence[str] | None = None,
    ):
        self.cfg = cfg
        self.corpus = corpus
        self.device = device
        self.hook_points = list(hook_points or [cfg.sae.hook_point])
        self.caches = [
            Path(cfg.data.cache_dir).expanduser() / cache_key(_at(cfg, hp), device) if cfg.data.cache_dir else None
            for hp in self.hook_points
        ]
        self.cache = self.caches[0]
        self._capture: HookedCapture | None = None
        self.captured = 0  # chunks this source ran the model for (the rest came from the cache)

    def chunk_file(self, chunk: int, hook: int = 0) -> Path | None:
        """Cache file of a chunk at the hook_points[hook] (None without a cache)."""
        cache = self.caches[hook]
        return cache / f"chunk_{chunk:06d}.safetensors" if cache else None

    def __call__(self, chunk: int) -> torch.Tensor:
        """Activations [n_kept, d_model] at the first hook point (float32)."""
        return self.read(chunk)[:, 0]

    def read(self, chunk: int) -> torch.Tensor:
        """Activations [n_kept, n_hooks, d_model] float32, from the cache where every hook point has the chunk."""
        paths = [self.chunk_file(chunk, h) for h in range(len(self.hook_points))]
        if all(p is not None and p.exists() for p in paths):
            acts = torch.stack([load_file(str(p))["acts"].float() for p in paths if p is not None], dim=1)
        else:
            acts = self.capture(chunk)
            for h, path in enumerate(paths):
                if path is not None:
                    _atomic_save({"acts": acts[:, h].to(_DTYPES[self.cfg.data.cache_dtype])}, path)
        # Filtering after the cache keeps cached chunks valid for any outlier setting.
        factor = self.cfg.data.outlier_norm_factor
        keep = torch.stack([inlier_mask(acts[:, h].norm(dim=-1), factor) for h in range(acts.shape[1])]).all(0)
        return acts[keep]

    def capture(self, chunk: int) -> torch.Tensor:
        """Run the model over one chunk's contexts: [kept, n_hooks, d_model], special-token positions dropped."""
        if self._capture is None:
            dtype = compute_dtype(self.cfg.data.capture_dtype, self.device)
            model, _ = load_language_model(self.cfg.model_path, self.device, dtype)
            self._capture = HookedCapture(model, self.hook_points)
        tokens = self.corpus.chunk_tokens(chunk)  # [n, T]
        keep = self.corpus.keep_mask(tokens, self.cfg.data.exclude_special_tokens)  # [n, T]
        out = []
        bs = self.cfg.data.capture_batch_size
        for i in range(0, tokens.shape[0], bs):
            acts = self._capture(tokens[i : i + bs].to(self.device))  # [b, T, H, d]
            out.append(acts[keep[i : i + bs].to(acts.device)].cpu())  # [kept, H, d]
        self.captured += 1
        return torch.cat(out)


def _at(cfg: TrainerConfig, hook_point: str) -> TrainerConfig:
    """The config with its SAE at another hook point (what a cache key at that hook point is computed from)."""
    return dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, hook_point=hook_point))
