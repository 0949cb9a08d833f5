"""Settings of the feature-explanation job (trainer/explain.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExplainConfig:
    """Which features of which SAE folder to label, and the OpenAI-compatible endpoint that writes the labels."""

    sae_dir: Path
    """SAE folder holding feature_stats.json (the explanations are written back into it)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible API root, up to and including /v1 (our own service works)."""
    model: str = "SmolLM2-135M-Instruct"
    """Model name sent in each chat request."""
    api_key_env: str = "SAE_SERVE_EXPLAIN_API_KEY"
    """Environment variable holding the endpoint's API key (unset: no Authorization header)."""
    features: list[int] | None = None
    """Feature indices to label; None means every feature with top contexts, in index order."""
    limit: int | None = None
    """Label at most this many features this run (None: no bound)."""
    overwrite: bool = False
    """Label features that already have an explanation again."""
    max_contexts: int = 5
    """Top contexts shown to the model per feature."""
    max_tokens: int = 24
    """Most tokens of each answer."""
    temperature: float = 0.0
    """Sampling temperature of the answers."""
    timeout_s: float = 120.0
    """Seconds to wait for one answer."""
    max_label_chars: int = 120
    """Longer answers are cut to this many characters."""
    extra_body: dict = field(default_factory=dict)
    """Extra request fields some endpoints need (e.g. vendor options)."""
