"""Activation capture: run the transformers model up to the hook point, collect activations per chunk, cache them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
    """Callable: input_ids [B, T] -> activations at the hook point [B, T, d_model], skipping later layers."""

    def __init__(self, model: torch.nn.Module, hook_point: str | HookPoint):
        self.model = model
        self.module, self.extract = hf_module_and_output(model, hook_point)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            captured["x"] = self.extract(output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids.long(), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["x"].float()  # [B, T, d_model]


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


def cache_key(cfg: TrainerConfig) -> str:
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
            d.capture_dtype,
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
    """Activations [n_kept, d_model] float32 per chunk (special tokens and norm outliers dropped), cached on disk."""

    def __init__(self, cfg: TrainerConfig, corpus: Corpus, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.corpus = corpus
        self.device = device
        self.cache = Path(cfg.data.cache_dir).expanduser() / cache_key(cfg) if cfg.data.cache_dir else None
        self._capture: HookedCapture | None = None

    def chunk_file(self, chunk: int) -> Path | None:
        """Cache file of a chunk (None without a cache)."""
        return self.cache / f"chunk_{chunk:06d}.safetensors" if self.cache else None

    def __call__(self, chunk: int) -> torch.Tensor:
        path = self.chunk_file(chunk)
        if path is not None and path.exists():
            acts = load_file(str(path))["acts"].float()
        else:
            acts = self.capture(chunk)
            if path is not None:
                _atomic_save({"acts": acts.to(_DTYPES[self.cfg.data.cache_dtype])}, path)
        # Filtering after the cache keeps cached chunks valid for any outlier setting.
        return acts[inlier_mask(acts.norm(dim=-1), self.cfg.data.outlier_norm_factor)]

    def capture(self, chunk: int) -> torch.Tensor:
        """Run the model over one chunk's contexts; drops special-token positions."""
        if self._capture is None:
            model, _ = load_language_model(self.cfg.model_path, self.device, self.cfg.data.capture_dtype)
            self._capture = HookedCapture(model, self.cfg.sae.hook_point)
        tokens = self.corpus.chunk_tokens(chunk)  # [n, T]
        keep = self.corpus.keep_mask(tokens, self.cfg.data.exclude_special_tokens)  # [n, T]
        out = []
        bs = self.cfg.data.capture_batch_size
        for i in range(0, tokens.shape[0], bs):
            acts = self._capture(tokens[i : i + bs].to(self.device))  # [b, T, d]
            out.append(acts[keep[i : i + bs].to(acts.device)].cpu())  # [kept, d]
        return torch.cat(out)
