"""Trainer test fixtures: one torch thread (the box has 2 cores) and a tiny trained Llama built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import build_tiny_llama

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_config(tiny_llama, tmp_path):
    """The tiny-test config pointed at the tiny Llama, with every output under tmp_path."""
    from trainer.config import load_config

    def make(*overrides: str):
        return load_config(
            CONFIGS / "tiny-test.yaml",
            [
                f"model={tiny_llama}",
                f"run.storage_path={tmp_path / 'runs'}",
                f"publish.registry={tmp_path / 'registry'}",
                *overrides,
            ],
        )

    return make
