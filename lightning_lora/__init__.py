"""Fine-tune Hugging Face causal LMs with LoRA in Lightning, and export deployable models."""

from __future__ import annotations

from typing import Any

__all__ = ["InstructionDataModule", "LoraFinetuneModule", "resolve_ckpt_path", "resume_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: ``lightning-lora export`` should not pay for importing Lightning.
    if name == "InstructionDataModule":
        from lightning_lora.data import InstructionDataModule

        return InstructionDataModule
    if name == "LoraFinetuneModule":
        from lightning_lora.module import LoraFinetuneModule

        return LoraFinetuneModule
    if name in ("resolve_ckpt_path", "resume_checkpoint"):
        from lightning_lora import resume

        return getattr(resume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
