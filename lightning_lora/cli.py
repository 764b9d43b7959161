"""The ``lightning-lora`` command: LightningCLI's ``fit|validate|test|predict`` on our module and data."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lightning_lora.data import InstructionDataModule
from lightning_lora.module import LoraFinetuneModule

__all__ = ["LightningLoraCLI", "main"]


class LightningLoraCLI(LightningCLI):
    """LightningCLI with ``LoraFinetuneModule`` and ``InstructionDataModule``.

    The data module's tokenizer is taken from the model, so a config names the base once.
    """

    @override
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-lora`` and ``python -m lightning_lora``."""
    LightningLoraCLI(
        LoraFinetuneModule,
        InstructionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
