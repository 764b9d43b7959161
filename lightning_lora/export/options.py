"""The settings of an export, validated where they are built: a bad one fails before anything is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.dtypes import canonical_dtype
from lightning_lora.errors import ExportError
from lightning_lora.export.memory import MERGE_IMPLS
from lightning_lora.export.plan import parse_size
from lightning_lora.export.quantized import MERGE_BASES

__all__ = ["ExportOptions"]


@dataclass(frozen=True)
class ExportOptions:
    """How to export, as ``lightning-lora export`` and ``HFExport`` take it.

    Attributes:
        base_model: the base model directory (or ``builtin:...``); the checkpoint's record by default.
        lora_config: an ``adapter_config.json``, a directory holding one, or a dict; recorded by default.
        dtype: ``auto`` (the base's), ``fp32``, ``bf16``, ``fp16`` (torch's names too).
        max_shard_size: largest safetensors shard of the merged model, e.g. ``"2GB"``.
        prefix: the LightningModule attribute holding the PEFT model, e.g. ``"net."``; detected by default.
        tag: the ZeRO tag to read instead of the one ``latest`` names.
        adapter_name: the PEFT adapter to export when the module held several.
        r: override the LoRA rank of the recorded config.
        lora_alpha: override the LoRA alpha of the recorded config.
        merge: write ``merged/``.
        merge_skipped: why ``merge`` is off when the caller turned it off for the user (no merged
            model can hold the run: see :mod:`~lightning_lora.export.bias_slots`); ``export.json``
            and the summary say it.
        merge_impl: ``peft`` (the whole model in memory), ``streaming`` (one tensor at a time), or
            ``auto``: streaming (the same files, faster and lighter).
        save_adapter: write ``adapter/``.
        verify: check the merged model against the trained model; a failure publishes nothing.
        overwrite: replace an existing export (never anything else) in the output directory.
        probes: token id sequences for the function check, beside the fixed minimum set.
        tokenizer: the tokenizer to ship; by default the one the run trained with, else the base's.
        frozen_from_checkpoint: take every frozen weight from the checkpoint, not the base directory
            (automatic for the weights an initialisation rewrote).
        workers: local processes that share the merge and the verification.
        device: where verification computes (the process's GPU when it has one).
        progress: show progress bars (a terminal) or log lines.
        merge_base: for a run on a 4-bit base (QLoRA), what the adapter is merged into:
            ``dequantized`` (the 4-bit weights as training saw them: the model that was trained)
            or ``original`` (the 16-bit base directory). The same for a run without quantization.
        max_drift: fail when more than this fraction of the probe tokens' argmax differs between
            the export and the model that was trained (QLoRA); by default drift is only reported.
        heldout: validation batches (``input_ids``, ``labels``, optional ``attention_mask`` as
            lists) on which the drift report compares the loss of both models.
        trust_remote_code: run the custom code (``auto_map``) of a base model, adapter or tokenizer
            that maps to one; without it such an input is refused (``--trust-remote-code``).
    """

    base_model: str | None = None
    lora_config: str | dict[str, Any] | None = None
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    prefix: str | None = None
    tag: str | None = None
    adapter_name: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    merge: bool = True
    merge_skipped: str | None = None
    merge_impl: str = "auto"
    save_adapter: bool = True
    verify: bool = True
    overwrite: bool = False
    probes: list[list[int]] | None = field(default=None, compare=False)
    tokenizer: str | None = None
    frozen_from_checkpoint: bool = False
    workers: int = 1
    device: str | None = None
    progress: bool = False
    merge_base: str = "dequantized"
    max_drift: float | None = None
    heldout: list[dict[str, list[list[int]]]] | None = field(default=None, compare=False)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "--dtype"))
        except ValueError as err:
            raise ExportError(str(err)) from err
        parse_size(self.max_shard_size)
        if self.merge_impl not in MERGE_IMPLS:
            raise ExportError(f"--merge-impl={self.merge_impl!r} is not one of {list(MERGE_IMPLS)}")
        if self.r is not None and (not isinstance(self.r, int) or self.r <= 0):
            raise ExportError(f"--r={self.r!r} is not a positive integer")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ExportError(f"--lora-alpha={self.lora_alpha!r} is not a positive number")
        if self.merge_base not in MERGE_BASES:
            raise ExportError(f"--merge-base={self.merge_base!r} is not one of {list(MERGE_BASES)}")
        if self.max_drift is not None and not (isinstance(self.max_drift, (int, float)) and 0.0 <= self.max_drift <= 1.0):
            raise ExportError(f"--max-drift={self.max_drift!r} is not a fraction of tokens in [0, 1]")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ExportError(f"--workers={self.workers!r} is not a positive integer")
        if self.merge and self.merge_skipped is not None:
            raise ExportError(f"merge_skipped={self.merge_skipped!r} says why there is no merged model, but merge=True")
        if not self.merge and not self.save_adapter:
            raise ExportError("merge=False and save_adapter=False (--no-merge without an adapter) would export nothing")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ExportError(f"--device={self.device!r} is not a device: {err}") from err
        for name in ("base_model", "tokenizer", "lora_config"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))

    def fingerprinted(self) -> dict[str, Any]:
        """Every setting that changes a weight, a file's content or what is checked (not ``overwrite``,
        ``progress``, ``workers`` or ``device``, which change none of them)."""
        settings = asdict(self)
        for key in ("overwrite", "progress", "workers", "device"):
            settings.pop(key)
        return settings
