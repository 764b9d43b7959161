"""HFExport: at the end of a successful fit, export the PEFT adapter and the merged model.

This callback decides *when* and *on which rank*; :mod:`lightning_lora.export` decides *how*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.export.checkpoint import CHECKPOINT_KEY, TrainedCheckpoint, config_to_dict
from lightning_lora.export.fsdp import FSDPCheckpointError, check_fsdp_files, is_fsdp_checkpoint
from lightning_lora.export.keys import normalize_keys
from lightning_lora.export.merge import DTYPES
from lightning_lora.export.pipeline import export_checkpoint
from lightning_lora.export.stream import MERGE_IMPLS, parse_size
from lightning_lora.export.tokens import tokenizer_files
from lightning_lora.export.zero import ZeroCheckpointError, check_rank_files, read_model_states, resolve_zero_tag

__all__ = ["HFExport"]

# Probe sequences taken from the validation data for the merged-vs-adapter comparison.
_PROBE_SEQUENCES = 4
_PROBE_TOKENS = 64


class HFExport(L.Callback):
    """Export a PEFT adapter and a merged Hugging Face model when ``fit`` ends successfully.

    Works with :class:`~lightning_lora.LoraFinetuneModule` and with any LightningModule that holds
    a ``peft.PeftModel`` under any attribute. Single device and DDP export from memory on global
    rank 0. DeepSpeed and FSDP, whose ranks each hold a shard, save the final checkpoint (or reuse
    the one ``ModelCheckpoint`` just wrote at the same step), check that every rank's shard is
    visible, and then rank 0 alone reads it back and exports, so that no rank waits in a collective
    for the length of the export.

    Args:
        dirpath: the export directory (``adapter/``, ``merged/``, ``export.json``).
        merge: write the merged model.
        save_adapter: write the PEFT adapter.
        dtype: dtype of the merged weights: ``auto`` (the base's), ``fp32``, ``bf16``, ``fp16``.
        max_shard_size: largest safetensors shard of the merged model.
        merge_impl: ``peft`` (``merge_and_unload`` in memory), ``streaming`` (one tensor at a time),
            or ``auto`` (streaming when the model would not fit comfortably in memory).
        verify: reload both and compare their logits and greedy generations; a failure publishes nothing.
        base_model: the base model directory; by default the one the PEFT config names.
        overwrite: replace an existing export in ``dirpath``.
        export_on_exception: when fit fails, export the last checkpoint ``ModelCheckpoint`` wrote
            (the last good state) instead of nothing.
    """

    def __init__(
        self,
        dirpath: str,
        merge: bool = True,
        save_adapter: bool = True,
        dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
        max_shard_size: str = "5GB",
        merge_impl: Literal["auto", "peft", "streaming"] = "auto",
        verify: bool = True,
        base_model: str | None = None,
        overwrite: bool = False,
        export_on_exception: bool = False,
    ) -> None:
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"HFExport dtype={dtype!r} is not one of {['auto', *DTYPES]}")
        if not merge and not save_adapter:
            raise ValueError("HFExport with merge=False and save_adapter=False would export nothing")
        self.dirpath = Path(dirpath)
        self.merge = merge
        self.save_adapter = save_adapter
        self.dtype = dtype
        try:
            parse_size(max_shard_size)
        except ValueError as err:
            raise ValueError(f"HFExport max_shard_size={max_shard_size!r} is not a size like '5GB' or '500MB'") from err
        self.max_shard_size = max_shard_size
        if merge_impl not in MERGE_IMPLS:
            raise ValueError(f"HFExport merge_impl={merge_impl!r} is not one of {list(MERGE_IMPLS)}")
        self.merge_impl = merge_impl
        self.verify = verify
        self.base_model = base_model
        self.overwrite = overwrite
        self.export_on_exception = export_on_exception
        self.result: dict[str, Any] | None = None

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A module of the user's own records nothing about its PEFT model; record it so that any
        # checkpoint of this run can be exported later by the command.
        if CHECKPOINT_KEY not in checkpoint:
            checkpoint[CHECKPOINT_KEY] = _describe_peft_model(pl_module, trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end runs only when the fit loop finished (not after an exception), before the
        # strategy tears down, so a DeepSpeed engine is still there to save a checkpoint.
        sharded = isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy))
        if sharded:
            checkpoint = self._save_sharded_checkpoint(trainer)  # a collective: every rank takes part
        if not trainer.is_global_zero:
            return
        described = _describe_peft_model(pl_module, trainer)
        source = checkpoint if sharded else _from_memory(trainer, pl_module, described)
        self.result = self._export(source, described, _validation_probes(trainer))
        verification = self.result["verification"]
        summary = f"HFExport: wrote {self.dirpath}"
        if "max_abs_logit_diff" in verification:
            summary += (
                f"; merged vs adapter max |logit diff| {verification['max_abs_logit_diff']:.2e} "
                f"(tolerance {verification['tolerance']:.2e}), generated tokens agree {100 * verification['token_agreement']:.1f}%"
            )
        rank_zero_info(summary)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.export_on_exception or not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not last or not Path(last).exists():
            rank_zero_warn(f"HFExport: fit failed ({exception!r}) and no checkpoint was written yet: nothing to export")
            return
        described = _describe_peft_model(pl_module, trainer)
        try:
            self.result = self._export(Path(last), described, probes=None)
        except Exception as err:  # the training failure is what the user must see first
            rank_zero_warn(f"HFExport: exporting the last checkpoint {last!r} after the failure failed too: {err}")
            return
        rank_zero_info(f"HFExport: fit failed; exported the last checkpoint {last} (step {self.result['global_step']}) to {self.dirpath}")

    def _export(self, source: Path | TrainedCheckpoint, described: dict[str, Any], probes: list[list[int]] | None) -> dict[str, Any]:
        return export_checkpoint(
            source,
            self.dirpath,
            base_model=self.base_model or described["base_model"],
            lora_config=described["peft_config"],
            dtype=self.dtype,
            max_shard_size=self.max_shard_size,
            prefix=described["prefix"],
            merge_model=self.merge,
            merge_impl=self.merge_impl,
            save_adapter_dir=self.save_adapter,
            verify=self.verify,
            overwrite=self.overwrite,
            probes=probes,
            progress=False,
        )

    def _save_sharded_checkpoint(self, trainer: L.Trainer) -> Path:
        """Save (or reuse) the final DeepSpeed or FSDP checkpoint on all ranks; fail on all ranks if
        rank 0 cannot see it whole."""
        checkpoint = _reusable_checkpoint(trainer)
        if checkpoint is None:
            kind = "zero" if isinstance(trainer.strategy, DeepSpeedStrategy) else "fsdp"
            checkpoint = self.dirpath.with_name(f"{self.dirpath.name}-{kind}.ckpt")
            trainer.save_checkpoint(checkpoint)  # a collective: every rank writes its shard
        problem = ""
        if trainer.is_global_zero:
            try:
                if is_fsdp_checkpoint(checkpoint):
                    check_fsdp_files(checkpoint)
                elif checkpoint.is_dir():
                    tag_dir = resolve_zero_tag(checkpoint)
                    check_rank_files(tag_dir, read_model_states(tag_dir))
                # else: an FSDP full state dict, one file that rank 0 wrote itself
            except (ZeroCheckpointError, FSDPCheckpointError) as err:
                problem = str(err)
        # One short collective so that every rank fails together instead of rank 0 alone.
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ZeroCheckpointError(problem)
        return checkpoint


def _reusable_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint ModelCheckpoint wrote at this very step, if there is one."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if path and getattr(callback, "_last_global_step_saved", -1) == trainer.global_step and Path(path).exists():
        return Path(path)
    return None


def _find_peft_model(pl_module: L.LightningModule) -> tuple[str, Any]:
    from peft import PeftModel

    for name, module in pl_module.named_modules():
        if isinstance(module, PeftModel):
            return name, module
    raise ValueError(f"HFExport found no peft.PeftModel inside {type(pl_module).__name__}")


def _describe_peft_model(pl_module: L.LightningModule, trainer: L.Trainer) -> dict[str, Any]:
    """The LoRA config, base model, attribute prefix and vocabulary size of the PEFT model inside
    ``pl_module``, and the data module's tokenizer if it has one."""
    name, peft_model = _find_peft_model(pl_module)
    config = peft_model.peft_config[peft_model.active_adapter]
    weight = peft_model.get_input_embeddings().weight
    described = {
        "peft_config": config_to_dict(config),
        "base_model": config.base_model_name_or_path,
        "prefix": f"{name}." if name else "",
        "vocab_size": getattr(weight, "ds_shape", weight.shape)[0],
    }
    tokenizer = getattr(trainer.datamodule, "tokenizer", None)
    if tokenizer is not None:
        described["tokenizer"] = tokenizer_files(tokenizer)
    return described


def _from_memory(trainer: L.Trainer, pl_module: L.LightningModule, described: dict[str, Any]) -> TrainedCheckpoint:
    """The trained tensors of a module whose parameters rank 0 holds whole (single device, DDP);
    ``described`` is :func:`_describe_peft_model`'s account of it."""
    trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
    state = {n: t.detach().to("cpu", copy=True) for n, t in pl_module.state_dict().items() if n in trainable}
    return TrainedCheckpoint(
        tensors=normalize_keys(state, described["prefix"]),
        source=f"{type(pl_module).__name__} in memory",
        kind="memory",
        lora_config=described["peft_config"],
        base_model=described["base_model"],
        global_step=trainer.global_step,
        vocab_size=described["vocab_size"],
        tokenizer_files=described.get("tokenizer"),
    )


def _validation_probes(trainer: L.Trainer) -> list[list[int]] | None:
    """Up to a few unpadded validation sequences, or ``None`` (fixed prompts) without validation data."""
    try:
        loaders = trainer.val_dataloaders
        if loaders is None:
            datamodule = trainer.datamodule
            loaders = datamodule.val_dataloader() if datamodule is not None else None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        batch = next(iter(loader)) if loader is not None else None
    except (StopIteration, AttributeError, TypeError, NotImplementedError):
        return None
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    probes = [row[m.bool()][:_PROBE_TOKENS].tolist() for row, m in zip(ids[:_PROBE_SEQUENCES], mask)]
    return [p for p in probes if p] or None
