"""HFExport: at the end of a successful fit, export the PEFT adapter and the merged model.

This callback decides *when* and *on which ranks*; :mod:`lightning_lora.export` decides *how*.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_lora.errors import ExportError
from lightning_lora.export.bias_slots import plan_bias_slots
from lightning_lora.export.checkpoint import CHECKPOINT_KEY, TrainedCheckpoint, config_to_dict, recorded_step
from lightning_lora.export.fsdp import check_fsdp_files, is_fsdp_checkpoint
from lightning_lora.export.inits import rewrites_base
from lightning_lora.export.keys import normalize_keys, select_adapter
from lightning_lora.export.options import ExportOptions
from lightning_lora.export.pipeline import export_checkpoint, export_shared
from lightning_lora.export.quantized import keep_training_layout, quantization_record, quantized_state
from lightning_lora.export.tokens import tokenizer_files
from lightning_lora.export.trust import check_remote_code
from lightning_lora.export.zero import check_rank_files, read_model_states, resolve_zero_tag
from lightning_lora.model_classes import import_model_classes, restore_class_decorators
from lightning_lora.versions import warn_outside_tested_range

__all__ = ["HFExport"]

# Probe sequences taken from the validation data to start the verification's probes with.
_PROBE_SEQUENCES = 4
_PROBE_TOKENS = 64


class HFExport(L.Callback):
    """Export a PEFT adapter and a merged Hugging Face model when ``fit`` ends successfully.

    Works with :class:`~lightning_lora.LoraFinetuneModule` and with any LightningModule that holds
    a ``peft.PeftModel`` under any attribute. Single device and DDP export from memory on global
    rank 0. DeepSpeed and FSDP, whose ranks each hold a shard, save the final checkpoint (or reuse
    the one ``ModelCheckpoint`` wrote at this very step); then every rank merges and verifies its
    share of the output shards and rank 0 publishes once all succeeded. Ranks meet through files,
    never in a collective that could outlive the process group's timeout.

    Args:
        dirpath: the export directory (``adapter/``, ``merged/``, ``export.json``).
        merge: write the merged model. A run whose merged model cannot exist (``lora_bias`` on
            layers that no config setting gives a bias) is told so at fit start, and its export
            writes the adapter alone, saying why in ``export.json`` and the summary line.
        save_adapter: write the PEFT adapter.
        dtype: dtype of the merged weights: ``auto`` (the base's), ``fp32``, ``bf16``, ``fp16``.
        max_shard_size: largest safetensors shard of the merged model.
        merge_impl: ``peft`` (PEFT's merge of the whole model in memory), ``streaming`` (one
            tensor at a time), or ``auto`` (streaming: the same files, faster and lighter).
        verify: check the merged model against the trained one; a failure publishes nothing.
        base_model: the base model directory; by default the one the PEFT config names.
        overwrite: replace an existing export in ``dirpath`` (never anything else).
        export_on_exception: when fit fails, export the last checkpoint ``ModelCheckpoint`` wrote
            (the last good state) instead of nothing.
        merge_base: for a 4-bit base (QLoRA): merge into the ``dequantized`` 4-bit weights (the
            model that was trained) or the ``original`` 16-bit base.
        max_drift: fail the export when more than this fraction of the probe tokens' argmax differs
            from the trained 4-bit model; by default drift is reported (with the held-out loss
            of both models on a few validation batches) and never fails.
        trust_remote_code: run the custom code (``auto_map``) of a base model or tokenizer that maps
            to one; without it the export refuses such a base.
    """

    def __init__(
        self,
        dirpath: str,
        merge: bool = True,
        save_adapter: bool = True,
        dtype: Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] = "auto",
        max_shard_size: str = "5GB",
        merge_impl: Literal["auto", "peft", "streaming"] = "auto",
        verify: bool = True,
        base_model: str | None = None,
        overwrite: bool = False,
        export_on_exception: bool = False,
        merge_base: Literal["dequantized", "original"] = "dequantized",
        max_drift: float | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        try:
            # Validated here, where the callback is built, not at the end of a long run.
            self.options = ExportOptions(base_model=base_model, dtype=dtype, max_shard_size=max_shard_size, merge=merge,
                                         merge_impl=merge_impl, save_adapter=save_adapter, verify=verify,
                                         overwrite=overwrite, merge_base=merge_base, max_drift=max_drift,
                                         trust_remote_code=trust_remote_code)
        except ExportError as err:  # name the argument of this class, not the command's option
            message = re.sub(r"^--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(err))
            raise ValueError(f"HFExport {message}") from err
        self.dirpath = Path(dirpath)
        self.export_on_exception = export_on_exception
        self.result: dict[str, Any] | None = None
        self._merge_skipped: str | None = None  # why this run can have no merged model (on_fit_start)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # also under ddp_spawn, whose ranks carry no RANK variable
            warn_outside_tested_range()
        # Before Lightning enters deepspeed.zero.Init around configure_model: a model class first
        # imported inside it loses its class decorators when it exits (see model_classes.py).
        if self.options.base_model is not None and Path(self.options.base_model).is_dir():
            # Refused before training, not after it: the export would refuse it then.
            check_remote_code(self.options.base_model, "HFExport base_model", self.options.trust_remote_code,
                              flag="HFExport(trust_remote_code=True)")
            import_model_classes(self.options.base_model, trust_remote_code=self.options.trust_remote_code)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A user's configure_model may have created model classes inside deepspeed.zero.Init.
        restore_class_decorators()
        # Refuse, before the first step, a run whose result could not be exported correctly.
        _name, peft_model = _find_peft_model(pl_module)
        config = config_to_dict(peft_model.peft_config[peft_model.active_adapter])
        strategy = trainer.strategy
        quantization = quantization_record(peft_model)  # refuses 8 bits
        keep_training_layout(peft_model)
        if quantization is not None and isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError(f"HFExport: a {quantization['quant_type']} base cannot be trained and exported with "
                             f"{type(strategy).__name__}, which shards and casts the packed 4-bit weights; use DDP")
        if rewrites_base(config) and isinstance(strategy, DeepSpeedStrategy):
            init = config.get("init_lora_weights")
            if strategy.zero_stage_3:
                raise ValueError(f"init_lora_weights={init!r} rewrites base weights, which DeepSpeed ZeRO-3 holds as "
                                 "empty partitions when PEFT initialises: train it with ZeRO-2 or DDP")
            if getattr(strategy, "exclude_frozen_parameters", False):
                raise ValueError(f"init_lora_weights={init!r} rewrites base weights, and DeepSpeedStrategy("
                                 "exclude_frozen_parameters=True) would leave them out of every checkpoint, so the "
                                 "trained model could not be exported: set exclude_frozen_parameters=False")
        self._plan_merge(peft_model)

    def _plan_merge(self, peft_model: Any) -> None:
        """Whether the merged model can hold this run (its lora biases need a bias to merge into),
        said in one line now rather than after days of training."""
        if not self.options.merge:
            return
        slots = plan_bias_slots(peft_model)
        self._merge_skipped = slots.problem
        if slots.problem is not None and not self.options.save_adapter:
            raise ValueError(f"HFExport: {slots.problem}, and save_adapter=False: this run could export nothing")
        if slots.problem is not None:
            rank_zero_warn(f"HFExport: {slots.problem}; the export at the end of this run writes the adapter alone "
                           "(HFExport(merge=False) says so up front)")
        elif slots.switches:
            rank_zero_info(f"HFExport: lora_bias on layers without a bias: {slots.merged_config_line()}")

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
        described = _describe_peft_model(pl_module, trainer)
        settings = self._settings(described, _validation_probes(trainer))
        if described.get("quantization") is not None:
            settings["heldout"] = _heldout_batches(trainer)
        if isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            checkpoint = self._final_checkpoint(trainer)  # a collective: every rank takes part
            self.result = export_shared(checkpoint, self.dirpath, trainer.global_rank, trainer.world_size,
                                        trainer.strategy.broadcast, **settings)
        elif trainer.is_global_zero:
            self.result = export_checkpoint(_from_memory(trainer, pl_module, described), self.dirpath, **settings)
        if self.result is not None:
            from lightning_lora.export.verify import summarize_verification

            rank_zero_info(f"HFExport: wrote {self.dirpath}; {summarize_verification(self.result['verification'])}")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A preempted run (SIGTERM, Preemption) did not fail: it resumes, and exports when it finishes.
        if not self.export_on_exception or not trainer.is_global_zero or isinstance(exception, SIGTERMException):
            return
        last = _last_written(trainer)
        if last is None:
            rank_zero_warn(f"HFExport: fit failed ({exception!r}) and no checkpoint was written yet: nothing to export")
            return
        described = _describe_peft_model(pl_module, trainer)
        try:
            self.result = export_checkpoint(last, self.dirpath, **self._settings(described, None))
        except Exception as err:  # the training failure is what the user must see first
            rank_zero_warn(f"HFExport: exporting the last checkpoint {str(last)!r} after the failure failed too: {err}")
            return
        rank_zero_info(f"HFExport: fit failed; exported the last checkpoint {last} (step {self.result['global_step']}) to {self.dirpath}")

    def _settings(self, described: dict[str, Any], probes: list[list[int]] | None) -> dict[str, Any]:
        from dataclasses import asdict

        options = asdict(self.options)
        if self._merge_skipped is not None:
            options.update(merge=False, merge_skipped=self._merge_skipped)
        return {**options, "base_model": options["base_model"] or described["base_model"],
                "lora_config": described["peft_config"], "prefix": described["prefix"], "probes": probes}

    def _final_checkpoint(self, trainer: L.Trainer) -> Path:
        """The DeepSpeed or FSDP checkpoint of this step: the one ModelCheckpoint wrote at it, or a
        new one (all ranks save); every rank fails together if rank 0 cannot see it whole."""
        decision = {"reuse": "", "problem": ""}
        if trainer.is_global_zero:
            try:
                reusable = _checkpoint_at_step(trainer, trainer.global_step)
                decision["reuse"] = str(reusable) if reusable is not None else ""
            except Exception as err:  # every failure here must reach all ranks
                decision["problem"] = f"{type(err).__name__}: {err}"
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision["problem"]:
            raise ExportError(f"HFExport: {decision['problem']}")
        checkpoint = Path(decision["reuse"]) if decision["reuse"] else None
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
                    # report=False: the export reads these states again and names what it leaves unread.
                    check_rank_files(tag_dir, read_model_states(tag_dir, report=False))
                # else: an FSDP full state dict, one file that rank 0 wrote itself
            except Exception as err:  # an OSError of a network filesystem as much as a missing shard
                problem = str(err) if isinstance(err, ExportError) else f"{type(err).__name__}: {err}"
        # One short collective so that every rank fails together instead of rank 0 alone.
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ExportError(problem)
        return checkpoint


def _written_checkpoints(trainer: L.Trainer) -> list[Path]:
    """Every checkpoint the ModelCheckpoint callbacks know of that is still on disk."""
    paths: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths += [getattr(callback, "_last_checkpoint_saved", ""), callback.last_model_path, callback.best_model_path,
                      *callback.best_k_models]
    return [Path(p) for p in dict.fromkeys(p for p in paths if p) if Path(p).exists()]


def _checkpoint_at_step(trainer: L.Trainer, step: int) -> Path | None:
    """The checkpoint written at ``step`` (its own record says so), if there is one."""
    for path in _written_checkpoints(trainer):
        if recorded_step(path) == step:
            return path
    return None


def _last_written(trainer: L.Trainer) -> Path | None:
    """The checkpoint of the latest step among those written, the newest file on a tie."""
    steps = [(recorded_step(path), path.stat().st_mtime_ns, path) for path in _written_checkpoints(trainer)]
    steps = [entry for entry in steps if entry[0] is not None]
    return max(steps, key=lambda entry: (entry[0], entry[1]))[2] if steps else None


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
    quantization = quantization_record(peft_model)
    if quantization is not None:
        described["quantization"] = quantization
    return described


def _from_memory(trainer: L.Trainer, pl_module: L.LightningModule, described: dict[str, Any]) -> TrainedCheckpoint:
    """The trained tensors of a module whose parameters rank 0 holds whole (single device, DDP),
    copied to the CPU, and its frozen weights as they are (an initialisation may have rewritten
    them); ``described`` is :func:`_describe_peft_model`'s account of it."""
    trained, frozen = {}, {}
    for name, param in pl_module.named_parameters():
        if param.requires_grad:
            trained[name] = param.detach().to("cpu", copy=True)
        else:
            frozen[name] = param.detach()
    frozen.update(quantized_state(pl_module))  # a 4-bit base's quantization state, beside its packed weights
    adapter = _find_peft_model(pl_module)[1].active_adapter
    return TrainedCheckpoint(
        tensors=select_adapter(normalize_keys(trained, described["prefix"]), adapter)[1],
        source=f"{type(pl_module).__name__} in memory",
        kind="memory",
        lora_config=described["peft_config"],
        base_model=described["base_model"],
        global_step=trainer.global_step,
        vocab_size=described["vocab_size"],
        tokenizer_files=described.get("tokenizer"),
        frozen=select_adapter(normalize_keys(frozen, described["prefix"]), adapter, strict=False)[1],
        adapter_name=adapter,
        quantization=described.get("quantization"),
    )


def _validation_batches(trainer: L.Trainer, count: int) -> list[Any]:
    """Up to ``count`` batches of the first validation loader, or none without validation data."""
    try:
        loaders = trainer.val_dataloaders
        if loaders is None:
            datamodule = trainer.datamodule
            loaders = datamodule.val_dataloader() if datamodule is not None else None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return [] if loader is None else list(itertools.islice(loader, count))
    except (AttributeError, TypeError, NotImplementedError):
        return []


def _heldout_batches(trainer: L.Trainer) -> list[dict[str, list[list[int]]]] | None:
    """A few validation batches as lists, for the drift report's held-out loss of a 4-bit run."""
    from lightning_lora.data import HELDOUT_BATCHES, heldout_batches

    return heldout_batches(_validation_batches(trainer, HELDOUT_BATCHES))


def _validation_probes(trainer: L.Trainer) -> list[list[int]] | None:
    """Up to a few unpadded validation sequences, or ``None`` (fixed prompts) without validation data."""
    batches = _validation_batches(trainer, 1)
    batch = batches[0] if batches else None
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    if "position_ids" in batch and "attention_mask" not in batch:
        return None  # packed rows: examples run together
    probes = [row[m.bool()][:_PROBE_TOKENS].tolist() for row, m in zip(ids[:_PROBE_SEQUENCES], mask)]
    return [p for p in probes if p] or None
