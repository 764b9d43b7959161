"""The one export path: pure functions that take paths and tensors, usable without a Trainer.

Nothing here imports Lightning or the training side of the package.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ExportError",
    "TrainedCheckpoint",
    "VerificationError",
    "ZeroCheckpointError",
    "detect_prefix",
    "export_checkpoint",
    "load_checkpoint",
    "normalize_keys",
    "verify_directory",
    "verify_export",
]

_WHERE = {
    "ExportError": "lightning_lora.errors",
    "VerificationError": "lightning_lora.errors",
    "TrainedCheckpoint": "lightning_lora.export.checkpoint",
    "load_checkpoint": "lightning_lora.export.checkpoint",
    "ZeroCheckpointError": "lightning_lora.export.zero",
    "detect_prefix": "lightning_lora.export.keys",
    "normalize_keys": "lightning_lora.export.keys",
    "export_checkpoint": "lightning_lora.export.pipeline",
    "verify_directory": "lightning_lora.export.verify",
    "verify_export": "lightning_lora.export.verify",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: reading a checkpoint should not import the whole pipeline.
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
