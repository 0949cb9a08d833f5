"""SAE and feature cards: config, logit lens of a decoder row through the model's unembedding, trainer statistics.

The engine keeps SAE weights inside its worker, so this reads the SAE folder and the model's safetensors itself,
lazily and once (the unembedding of the embedded model is 113 MB in fp32).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from serve.registry import FEATURE_STATS_FILE, read_json

UNEMBEDDING_KEYS = ("lm_head.weight", "model.embed_tokens.weight")  # the second serves tied embeddings


def _unembedding_file(model_dir: Path) -> tuple[Path, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for key in UNEMBEDDING_KEYS:
            if key in weight_map:
                return model_dir / weight_map[key], key
    else:
        from safetensors import safe_open

        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                names = set(fh.keys())
            for key in UNEMBEDDING_KEYS:
                if key in names:
                    return file, key
    raise FileNotFoundError(f"no unembedding ({' or '.join(UNEMBEDDING_KEYS)}) in {model_dir}")


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class FeatureLens:
    """Computes feature cards; blocking (call it in a thread). Caches the unembedding and a few SAEs."""

    def __init__(self, model_dir: Path, cached_saes: int = 2):
        self.model_dir = model_dir
        self._W_U = None
        self._saes = _LRU(cached_saes)  # (sae_id, version) -> (SAEConfig, W_dec in model space [d_sae, d_in])
        self._stats = _LRU(2)  # (sae_id, version) -> feature records
        self._lock = threading.Lock()

    def _unembedding(self):
        if self._W_U is None:
            from safetensors import safe_open

            file, key = _unembedding_file(self.model_dir)
            with safe_open(str(file), framework="pt") as fh:
                self._W_U = fh.get_tensor(key).float()  # [vocab, d_model]
        return self._W_U

    def _sae(self, sae_id: str, version: str, folder: Path):
        key = (sae_id, version)
        if key not in self._saes:
            from sae import load_sae

            sae = load_sae(folder, dtype="float32")
            self._saes.put(key, (sae.cfg, sae.W_dec.detach() / sae.cfg.input_scale))
        return self._saes[key]

    def config(self, sae_id: str, version: str, folder: Path):
        """The SAEConfig of a served SAE (formats keep it beside the weights, so this reads the folder once)."""
        with self._lock:
            return self._sae(sae_id, version, folder)[0]

    def _feature_stats(self, sae_id: str, version: str, folder: Path) -> list[dict] | None:
        key = (sae_id, version)
        if key not in self._stats:
            data = read_json(folder / FEATURE_STATS_FILE)
            self._stats.put(key, data.get("features") if data else None)
        return self._stats[key]

    def stats(self, sae_id: str, version: str, folder: Path) -> list[dict] | None:
        """The `features` records of the SAE's feature_stats.json, or None without one."""
        with self._lock:
            return self._feature_stats(sae_id, version, folder)

    def card(self, sae_id: str, version: str, folder: Path, index: int, top_n: int, token_text) -> dict[str, Any]:
        """The fields of `protocol.FeatureCard` for feature `index` (already checked to be in range)."""
        with self._lock:
            W_U = self._unembedding()
            row = self._sae(sae_id, version, folder)[1][index]
            stats = self._feature_stats(sae_id, version, folder)
        logits = W_U @ row  # [vocab]
        top, bottom = logits.topk(top_n), logits.topk(top_n, largest=False)

        def tokens(result) -> list[dict]:
            return [
                {"token": token_text(int(i)), "id": int(i), "logit": float(v)}
                for v, i in zip(result.values, result.indices)
            ]

        out: dict[str, Any] = {
            "sae": sae_id,
            "feature": index,
            "decoder_norm": float(row.norm()),
            "top_tokens": tokens(top),
            "bottom_tokens": tokens(bottom),
        }
        record = stats[index] if stats is not None and index < len(stats) else None
        if record is not None and record.get("id", index) == index:
            for name in ("density", "mean_activation", "max_activation", "top_contexts", "explanation"):
                out[name] = record.get(name)
        return out
