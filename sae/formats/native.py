"""Native folder format `sae-serve/1`: `sae.json` (SAEConfig fields + "format") and `sae.safetensors`.

The tensors are stored under their internal names (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], threshold [d_sae] for threshold architectures), so reading needs no conversion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import SAEConfig
from ._files import read_json, read_safetensors

NAME = "native"
FORMAT = "sae-serve/1"
CONFIG_FILE = "sae.json"
WEIGHTS_FILE = "sae.safetensors"


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    data = read_json(folder / CONFIG_FILE)
    fmt = data.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: format {fmt!r} is not {FORMAT!r}")
    return SAEConfig.from_dict(data), read_safetensors(folder / WEIGHTS_FILE)


def write(cfg: SAEConfig, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Write both files into an existing folder and fsync them (the caller makes it atomic)."""
    config = {"format": FORMAT, **cfg.to_dict()}
    try:
        text = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:  # checked before any file is written
        raise ValueError(f"SAE config is not JSON-serialisable (check metadata): {e}") from e
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
