"""LightningCLI for ``lightning-lora fit|validate|test|predict`` with our module and data module.

Kept apart from ``cli.py`` so that ``lightning-lora export`` and ``verify`` start without
importing Lightning.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lightning_lora.data import InstructionDataModule
from lightning_lora.module import LoraFinetuneModule
from lightning_lora.resume import resolve_ckpt_path
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

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI's private _parse_ckpt_path (2.x) reads a --ckpt_path file's hyperparameters
        # before before_fit: a torn checkpoint is refused first, by the name of its missing or short file.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in ("auto", "last"):  # those need the trainer: resolved in before_fit
            resolve_ckpt_path(None, ckpt_path, argument="--ckpt_path")
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """``--ckpt_path auto`` (the newest complete checkpoint, or none) and ``last`` resolved
        safely, and a torn ``--ckpt_path`` refused, before the Trainer loads anything."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(self.trainer, config.get("ckpt_path"), argument="--ckpt_path")


def run_lightning_cli(argv: list[str] | None) -> None:
    """Run a LightningCLI subcommand (``argv=None`` reads ``sys.argv``)."""
    warn_outside_tested_range()
    LightningLoraCLI(
        LoraFinetuneModule,
        InstructionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
