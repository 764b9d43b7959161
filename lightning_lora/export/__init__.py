"""The one export path: pure functions that take paths and tensors, usable without a Trainer."""

from lightning_lora.export.checkpoint import TrainedCheckpoint, load_checkpoint
from lightning_lora.export.keys import detect_prefix, normalize_keys
from lightning_lora.export.merge import ExportError
from lightning_lora.export.pipeline import export_checkpoint
from lightning_lora.export.verify import verify_directory, verify_export
from lightning_lora.export.zero import ZeroCheckpointError

__all__ = [
    "ExportError",
    "TrainedCheckpoint",
    "ZeroCheckpointError",
    "detect_prefix",
    "export_checkpoint",
    "load_checkpoint",
    "normalize_keys",
    "verify_directory",
    "verify_export",
]
