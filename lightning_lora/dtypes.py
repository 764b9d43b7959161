"""One spelling of dtypes across training, export and generation, and the label that masks a token.

The canonical names are ``fp32``, ``bf16`` and ``fp16`` (Lightning's ``precision`` spelling); torch's
names (``float32``, ``bfloat16``, ``float16``) are accepted as aliases everywhere. ``auto`` means
"as the checkpoint on disk stores it". A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_CHOICES", "IGNORE_INDEX", "canonical_dtype", "dtype_name", "parse_dtype"]

# The label that excludes a token from the loss (PyTorch's cross_entropy default).
IGNORE_INDEX = -100

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float": "fp32", "half": "fp16"}
DTYPE_CHOICES = ("auto", *DTYPES)


def canonical_dtype(name: str, key: str) -> str:
    """``name`` in its canonical spelling (``"bfloat16"`` -> ``"bf16"``); ``key`` names the setting
    in the error, e.g. ``"--dtype"`` or ``"model.dtype"``."""
    if not isinstance(name, str):
        raise ValueError(f"{key}={name!r} is not one of {list(DTYPE_CHOICES)}")
    lowered = name.strip().lower()
    lowered = _ALIASES.get(lowered, lowered)
    if lowered != "auto" and lowered not in DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {list(DTYPE_CHOICES)} (or torch's names: {list(_ALIASES)})")
    return lowered


def parse_dtype(name: str, key: str) -> torch.dtype | None:
    """The torch dtype of ``name``, or ``None`` for ``auto``."""
    canonical = canonical_dtype(name, key)
    return None if canonical == "auto" else DTYPES[canonical]


def dtype_name(dtype: torch.dtype) -> str:
    """Torch's own name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``), as ``config.json`` writes it."""
    return str(dtype).removeprefix("torch.")
