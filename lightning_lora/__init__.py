"""Fine-tune Hugging Face causal LMs with LoRA in Lightning, and export deployable models."""

from lightning_lora.data import InstructionDataModule
from lightning_lora.module import LoraFinetuneModule

__all__ = ["InstructionDataModule", "LoraFinetuneModule"]
__version__ = "0.1.0"
