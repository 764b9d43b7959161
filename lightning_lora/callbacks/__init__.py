"""Callbacks, importable from YAML as ``lightning_lora.callbacks.NAME``."""

from lightning_lora.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
