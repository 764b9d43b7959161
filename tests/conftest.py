"""Shared fixtures: tiny base models built from config (never downloaded), one per architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep the 2-core CI machine responsive when several processes run; DeepSpeed must never look for a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny Llama, Qwen2 (tied embeddings), GPT-2 (Conv1D) and Bloom bases with a tokenizer."""
    from lightning_lora.tiny import ARCHITECTURES, build_tiny_base

    root = tmp_path_factory.mktemp("bases")
    return {arch: build_tiny_base(root / arch, arch=arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_base(tiny_bases: dict[str, Path]) -> Path:
    return tiny_bases["llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``builtin:`` models are built into a per-session cache, not the user's home."""
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "builtin-cache"))
