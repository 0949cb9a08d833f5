"""Sparse autoencoders for serving: one module (`SparseAutoencoder`), one config (`SAEConfig`),
a native folder format, and readers for SAELens, sparsify, Llama Scope and b_pre TopK folders.

Depends only on torch, safetensors, numpy and the standard library; importing it has no side effects.
"""

from . import architectures
from .architectures import ARCHITECTURES, register_architecture
from .config import SAEConfig
from .formats import detect_format, read_folder
from .hookpoints import SITES, HookPoint, hf_module_and_output
from .io import load_sae, save_sae
from .model import SparseAutoencoder
from .validation import check_state_dict, validate_for_model

__all__ = [
    "ARCHITECTURES",
    "SITES",
    "HookPoint",
    "SAEConfig",
    "SparseAutoencoder",
    "architectures",
    "check_state_dict",
    "detect_format",
    "hf_module_and_output",
    "load_sae",
    "read_folder",
    "register_architecture",
    "save_sae",
    "validate_for_model",
]
