"""File reading shared by the format readers: JSON and safetensors only, never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..hookpoints import HookPoint
from ..model import dtype_name


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; a corrupt, truncated or non-safetensors file is a ValueError."""
    if not path.is_file():
        raise ValueError(f"SAE weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read {path} as safetensors (corrupt, truncated or another format): {e}") from e


def safetensors_keys(path: Path) -> set[str] | None:
    """Tensor names from the header only, or None if the file is not readable safetensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def common_dtype(state_dict: dict[str, torch.Tensor], reference: str) -> dict[str, torch.Tensor]:
    """Cast every tensor to the dtype of `reference` (foreign files mix, e.g. fp32 thresholds with bf16 weights)."""
    dtype = state_dict[reference].dtype
    return {k: v.to(dtype).contiguous() for k, v in state_dict.items()}


def state_dtype(state_dict: dict[str, torch.Tensor]) -> str:
    return dtype_name(state_dict["W_enc"].dtype)


def convert_hook_name(name: str | None, metadata: dict[str, Any]) -> str:
    """Our hook point for a foreign hook name; unconvertible names are kept verbatim for validation to reject."""
    if not name:
        return ""
    metadata["source_hook_name"] = name
    try:
        return str(HookPoint.from_transformer_lens(name))
    except ValueError:
        return name


def unsupported(fmt: str, what: str) -> ValueError:
    return ValueError(f"unsupported {fmt} SAE: {what}")


def require_keys(state_dict: dict[str, torch.Tensor], keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(
            f"{fmt} SAE weights are missing tensor(s) {', '.join(missing)}; "
            f"found {', '.join(sorted(state_dict)) or 'none'}"
        )
