"""Folder formats: each module turns one on-disk layout into (SAEConfig, state_dict) in internal form.

`read_folder` is the one dispatcher; the first format whose `detect` matches reads the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import SAEConfig
from . import b_pre, llama_scope, native, saelens, sparsify

# Most specific first: sparsify and SAELens share cfg.json; b_pre is recognised by its tensor names.
FORMATS = (native, llama_scope, sparsify, saelens, b_pre)


def detect_format(folder: str | Path) -> str:
    """Name of the format of an SAE folder; ValueError if none matches."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder {folder} does not exist or is not a directory")
    for fmt in FORMATS:
        if fmt.detect(folder):
            return fmt.NAME
    raise ValueError(
        f"{folder} is not a recognised SAE folder: expected sae.json (native), hyperparams.json (Llama Scope), "
        "cfg.json + sae.safetensors (sparsify), cfg.json + sae_weights.safetensors (SAELens), "
        "or a JSON config + safetensors with b_pre (b_pre TopK)"
    )


def read_folder(folder: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(SAEConfig, state_dict) of an SAE folder in any supported format, in internal form."""
    name = detect_format(folder)
    fmt = next(f for f in FORMATS if f.NAME == name)
    try:
        return fmt.read(Path(folder))
    except (RuntimeError, IndexError, TypeError, KeyError) as e:
        # tensor ops and JSON lookups on a malformed file fail in many ways; report them as one kind
        raise ValueError(f"malformed {name} SAE folder {folder}: {type(e).__name__}: {e}") from e
