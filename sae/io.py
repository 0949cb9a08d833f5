"""Load an SAE folder of any supported format; save one in the native format, atomically."""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

import torch

from .formats import native, read_folder
from .hookpoints import HookPoint
from .model import SparseAutoencoder, dtype_name, torch_dtype
from .validation import check_state_dict


def load_sae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    hook_point: str | None = None,
    model: str | None = None,
) -> SparseAutoencoder:
    """Read an SAE folder (format auto-detected), check it, and return it in eval mode without gradients.

    `dtype` defaults to the file's; `hook_point` / `model` override what the folder records (or supply it).
    Raises ValueError for an unsupported, corrupt or inconsistent folder.
    """
    cfg, state_dict = read_folder(path)
    changes: dict = {}
    if hook_point is not None:
        HookPoint.parse(hook_point)
    if hook_point is not None and hook_point != cfg.hook_point:
        if cfg.hook_point:
            cfg.metadata.setdefault("source_hook_point", cfg.hook_point)
        changes["hook_point"] = hook_point
    if model is not None:
        changes["model"] = model
    target = torch_dtype(dtype) if dtype is not None else torch_dtype(cfg.dtype)
    changes["dtype"] = dtype_name(target)
    cfg = dataclasses.replace(cfg, **changes)
    check_state_dict(cfg, state_dict)
    state_dict = {k: v.to(target) for k, v in state_dict.items()}
    check_state_dict(cfg, state_dict)  # a narrower dtype can overflow to inf
    sae = SparseAutoencoder(cfg, device=device, dtype=target)
    sae.load_state_dict(state_dict, strict=True)
    sae.requires_grad_(False)
    return sae.eval()


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `sae` as a native folder; a reader never sees a partially written one. Returns the folder.

    The files go to a temporary sibling first, which is then renamed into place. An existing SAE folder (or an
    empty one) is renamed aside, replaced and deleted, so during an overwrite the path is briefly absent.
    """
    folder = Path(folder)
    state_dict = {k: v.detach() for k, v in sae.state_dict().items()}
    check_state_dict(sae.cfg, state_dict)
    cfg = dataclasses.replace(sae.cfg, dtype=dtype_name(state_dict["W_enc"].dtype))
    if folder.exists() and not _replaceable(folder):
        raise ValueError(f"refusing to overwrite {folder}: it is not an SAE folder (no {native.CONFIG_FILE})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        native.write(cfg, state_dict, tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{tag}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except OSError:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replaceable(folder: Path) -> bool:
    return folder.is_dir() and ((folder / native.CONFIG_FILE).is_file() or not any(folder.iterdir()))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
