"""LightningCLI for ``lightning-lora fit|validate|test|predict`` with our module and data module.

Kept apart from ``cli.py`` so that ``lightning-lora export`` and ``verify`` start without
importing Lightning.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lightning_lora.data import InstructionDataModule
from lightning_lora.module import LoraFinetuneModule
from lightning_lora.versions import warn_outside_tested_range

__all__ = ["LightningLoraCLI", "run_lightning_cli"]


class LightningLoraCLI(LightningCLI):
    """LightningCLI with ``LoraFinetuneModule`` and ``InstructionDataModule``.

    The data module's tokenizer and added tokens are taken from the model, so a config names
    the base and the new tokens once.
    """

    @override
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.added_tokens", "data.added_tokens")


def run_lightning_cli(argv: list[str] | None) -> None:
    """Run a LightningCLI subcommand (``argv=None`` reads ``sys.argv``)."""
    warn_outside_tested_range()
    LightningLoraCLI(
        LoraFinetuneModule,
        InstructionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
