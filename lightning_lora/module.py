"""LoraFinetuneModule: a Hugging Face causal LM wrapped with PEFT LoRA, trained by Lightning."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_lora.dtypes import IGNORE_INDEX, canonical_dtype, parse_dtype
from lightning_lora.elastic import check_elastic_optimizer, install_elastic_resume
from lightning_lora.export.bias_slots import plan_bias_slots
from lightning_lora.export.checkpoint import CHECKPOINT_KEY, config_to_dict
from lightning_lora.export.inits import rewrites_base
from lightning_lora.export.quantized import (
    check_quantization_settings,
    keep_training_layout,
    quantization_record,
    quantized_entries,
    quantized_state,
)
from lightning_lora.export.tokens import add_tokens, embedding_names, resize_vocab, tokenizer_files
from lightning_lora.kernels import LossKind, TrainingKernels
from lightning_lora.model_classes import import_model_classes, restore_class_decorators
from lightning_lora.resume import count_resumed_epoch
from lightning_lora.rng import RNG_KEY, gather_rng_states, set_rng_state
from lightning_lora.tiny import resolve_model_path

__all__ = ["LoraFinetuneModule"]

_BIAS = ("none", "all", "lora_only")
# PEFT's named initialisations; "pissa_niter_N" (fast SVD with N iterations) is accepted too.
_INITS = ("gaussian", "olora", "pissa", "eva", "corda", "loftq", "orthogonal")


class LoraFinetuneModule(L.LightningModule):
    """Fine-tune a Hugging Face causal LM with LoRA.

    The base model is loaded and wrapped with PEFT in :meth:`configure_model`, so that under
    DeepSpeed ZeRO-3 the weights are partitioned as they are created. The PEFT model lives in
    ``self.model``; the checkpoint's hyperparameters hold everything needed to rebuild it.

    Args:
        model_name_or_path: a local Hugging Face model directory, a hub id, or
            ``builtin:tiny-llama`` (a tiny base built locally, for trying things out).
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator; the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names to adapt (a list of names, matched as suffixes of the
            full module name), a regular expression matched against the full name, or
            ``"all-linear"``. ``None`` uses PEFT's default for the architecture.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["lm_head"]``).
        use_rslora: rank-stabilised LoRA scaling.
        use_dora: weight-decomposed LoRA (DoRA).
        init_lora_weights: ``True`` (PEFT default), ``False``, ``"gaussian"``, ``"olora"``,
            ``"pissa"``, ``"pissa_niter_N"``, or another PEFT initialisation by name.
        bias: which biases to train: ``"none"``, ``"all"`` or ``"lora_only"``.
        lora_bias: give each ``lora_B`` a trained bias (PEFT's ``lora_bias``), merged into the layer's
            bias. A layer without one gets it in the merged model where its config has a switch for
            it (Llama's ``attention_bias``, ``mlp_bias``); where none exists (Qwen2's ``o_proj``,
            Phi-3) only the adapter can be exported, which fit start says in one line.
        dtype: dtype the base weights are loaded in: ``fp32``, ``bf16``, ``fp16`` (torch's names
            too), or ``auto`` (the checkpoint's).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        optimizer: a callable that takes the trainable parameters and returns an optimizer;
            defaults to ``AdamW(lr=2e-4, weight_decay=0.0)``.
        warmup_steps: optimizer steps of linear warmup from zero.
        lr_schedule: ``cosine`` decay to ``min_lr_ratio`` times the peak after warmup, or ``constant``.
        min_lr_ratio: the final learning rate of the cosine schedule as a fraction of the peak.
        quantization: train on a 4-bit quantized base (QLoRA): ``"nf4"`` or ``"fp4"``, loaded through
            transformers' bitsandbytes integration with ``double_quantization`` and ``dtype`` as the
            compute dtype, and prepared for k-bit training as PEFT documents (the layers left
            unquantized, embeddings and head included, are upcast to fp32). LoRA stays in fp32. The
            checkpoint keeps the quantized weights and records these settings, so the export can
            merge into exactly the weights training saw. Single device and DDP; DeepSpeed and
            FSDP cannot shard a quantized base and are refused at setup. 8-bit (LLM.int8) is refused:
            it quantizes activations too, so no merged model could reproduce it.
        double_quantization: quantize the 4-bit quantization constants too (QLoRA's default).
        added_tokens: tokens to add to the tokenizer (give ``data.added_tokens`` the same list;
            the CLI links them). The embeddings grow to the new vocabulary (new rows start at
            the mean of the old ones) and, unless ``modules_to_save`` trains the embeddings in
            full, PEFT's trainable tokens train exactly the new rows of the input embeddings and
            of an untied output head.
        attn_implementation: transformers' attention implementation for the base: ``sdpa``,
            ``flex_attention`` (packed examples kept apart by a document mask, no dense mask),
            ``eager``, ``flash_attention_2`` where installed; ``None`` is transformers' default.
        linear_cross_entropy: how the training loss goes through the output head: ``chunked``
            computes the logits only where there is a target, a chunk of rows at a time, never the
            full logits (:mod:`lightning_lora.losses`); ``liger`` is Liger's fused kernel (CUDA);
            ``auto`` takes Liger's on CUDA when ``liger-kernel`` is installed, else ``chunked``, and
            the model's own loss where neither applies (a model type not checked, a trained or
            adapted head, trainable tokens, DeepSpeed ZeRO-3 or FSDP), saying so in the log;
            ``off`` is the model's own loss. Validation always computes the full logits.
        liger_kernels: Liger's RMSNorm and SwiGLU kernels on the base's layers; ``auto`` uses them
            on CUDA when ``liger-kernel`` is installed (a line in the log otherwise).
        compile_blocks: ``torch.compile`` each decoder block (the first steps pay the compilation).
        autocast_lora_inputs: under mixed precision (``bf16-mixed``, ``16-mixed``), LoRA layers take
            their input in the autocast dtype instead of casting it to their fp32 weights' dtype,
            which autocast undoes for the matrix product: two activation copies less per adapted
            layer and step, the same values.
    """

    def __init__(
        self,
        model_name_or_path: str,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        bias: Literal["none", "all", "lora_only"] = "none",
        lora_bias: bool = False,
        dtype: str = "fp32",
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable | None = None,
        warmup_steps: int = 0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        quantization: Literal["nf4", "fp4"] | None = None,
        double_quantization: bool = True,
        added_tokens: list[str] | None = None,
        attn_implementation: str | None = None,
        linear_cross_entropy: LossKind = "auto",
        liger_kernels: bool | Literal["auto"] = "auto",
        compile_blocks: bool = False,
        autocast_lora_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"model.r={r!r} must be a positive integer")
        if lora_alpha <= 0:
            raise ValueError(f"model.lora_alpha={lora_alpha!r} must be positive")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout={lora_dropout!r} must be in [0, 1)")
        if bias not in _BIAS:
            raise ValueError(f"model.bias={bias!r} is not one of {list(_BIAS)}")
        _check_lora_bias(lora_bias, use_dora, init_lora_weights)
        dtype = canonical_dtype(dtype, "model.dtype")
        if isinstance(init_lora_weights, str) and not (
            init_lora_weights in _INITS or re.fullmatch(r"pissa_niter_\d+", init_lora_weights)
        ):
            raise ValueError(f"model.init_lora_weights={init_lora_weights!r} is not one of {[True, False, *_INITS]}")
        if isinstance(target_modules, list) and not target_modules:
            raise ValueError("model.target_modules=[] names no module; give names, a regex or 'all-linear'")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps={warmup_steps!r} must be >= 0")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r} is not one of ['cosine', 'constant']")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"model.min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
        check_quantization_settings(quantization, init_lora_weights, use_dora)
        if attn_implementation is not None and (not isinstance(attn_implementation, str) or not attn_implementation):
            raise ValueError(f"model.attn_implementation={attn_implementation!r} must be a name such as 'sdpa' or 'flex_attention'")
        self.training_kernels = TrainingKernels(linear_cross_entropy, liger_kernels, compile_blocks, autocast_lora_inputs)
        # The optimizer is a callable, not a setting the export needs; everything else is kept.
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_name_or_path = model_name_or_path
        self.lora_settings = dict(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
            bias=bias,
            lora_bias=lora_bias,
        )
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.quantization = quantization
        self.double_quantization = double_quantization
        self.added_tokens = list(added_tokens or [])
        self.attn_implementation = attn_implementation
        self.tokenizer: Any = None  # loaded only to add tokens; the data module has its own
        self._tokenizer_record: tuple[int, dict[str, str]] | None = None
        self.model: torch.nn.Module | None = None
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_accuracy = MeanMetric()

    def lora_config(self) -> Any:
        """The PEFT ``LoraConfig`` this module trains with."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            base_model_name_or_path=resolve_model_path(self.model_name_or_path),
            **self.lora_settings,
        )

    @override
    def setup(self, stage: str) -> None:
        # Before Lightning enters deepspeed.zero.Init around configure_model: a model class first
        # imported inside it loses its class decorators when it exits (see model_classes.py).
        try:
            import_model_classes(resolve_model_path(self.model_name_or_path))
        except OSError:
            pass  # configure_model reports a base that cannot be loaded, naming the setting
        if stage == "fit" and self._trainer is not None:
            install_elastic_resume(self)  # a checkpoint of another number of ranks or strategy resumes too

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning may call this more than once (e.g. fit then test)
        from peft import get_peft_model

        self._check_quantization_strategy()
        base = self._load_base_model()
        device = self._root_device()
        self.training_kernels.prepare_base(base, device)
        if self.quantization is not None:
            from peft import prepare_model_for_kbit_training

            # Freezes the base, upcasts its unquantized layers to fp32, and (with gradient
            # checkpointing) makes the inputs require grad so that checkpointed blocks get gradients.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=self.gradient_checkpointing,
                                                   gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_training_layout(base)
        _check_module_names(base, "target_modules", self.lora_settings["target_modules"])
        _check_module_names(base, "modules_to_save", self.lora_settings["modules_to_save"])
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        strategy = self._deepspeed_strategy()
        if strategy is not None:
            self._check_deepspeed_support(strategy)
        if self.added_tokens:
            self._add_tokens(base)
        # PEFT upcasts adapters of a half-precision base to fp32 for stable training. DeepSpeed keeps
        # fp32 master weights itself, and its ZeRO-3 defragmentation asserts on mixed dtypes.
        self.model = get_peft_model(base, self.lora_config(), autocast_adapter_dtype=strategy is None)
        if strategy is not None and strategy.zero_stage_3:
            _reinit_lora_partitioned(self.model)
        if strategy is not None and strategy.exclude_frozen_parameters:
            # Such checkpoints hold only the trainable tensors; on resume the frozen ones come
            # from the base model loaded above.
            self.strict_loading = False
        self.training_kernels.prepare_model(self.model, device, self._sharding_strategy())
        # from_pretrained returns the model in eval mode, and Lightning keeps the modes it finds,
        # which would silently switch off LoRA dropout during training.
        self.model.train()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What an export needs to rebuild the PEFT model, in any checkpoint (DeepSpeed included).
        # The live config, once there is a model: PEFT adjusts it (e.g. fan_in_fan_out for Conv1D).
        config = self.model.peft_config["default"] if self.model is not None else self.lora_config()
        checkpoint[CHECKPOINT_KEY] = {
            "peft_config": config_to_dict(config),
            # As configured ("builtin:tiny-llama", a hub id, a path), so that it resolves anywhere.
            "base_model": self.model_name_or_path,
            "prefix": "model.",
        }
        if self.model is not None:
            weight = self.model.get_input_embeddings().weight
            checkpoint[CHECKPOINT_KEY]["vocab_size"] = getattr(weight, "ds_shape", weight.shape)[0]
        files = self._tokenizer_files()
        if files is not None:
            checkpoint[CHECKPOINT_KEY]["tokenizer"] = files
        if self.model is not None:
            quantization = quantization_record(self.model)
            if quantization is not None:
                checkpoint[CHECKPOINT_KEY]["quantization"] = quantization
        if self._trainer is not None:
            checkpoint[RNG_KEY] = gather_rng_states()  # every rank saves: a collective
            # What an elastic resume needs to rebuild the optimizer and the global batch (elastic.py).
            checkpoint[CHECKPOINT_KEY].update(
                world_size=self.trainer.world_size,
                accumulate_grad_batches=self.trainer.accumulate_grad_batches,
                trainable=[name for name, param in self.named_parameters() if param.requires_grad],
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_KEY) or []
        rank = self.global_rank if self._trainer is not None else 0
        # Given back at the first training batch; a run resumed on another number of ranks draws anew.
        self._rng_to_restore = states[rank] if len(states) == (self.trainer.world_size if self._trainer else 1) else None
        self._restore_quantized(checkpoint)

    @override
    def on_train_start(self) -> None:
        check_elastic_optimizer(self)
        count_resumed_epoch(self.trainer)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def _restore_quantized(self, checkpoint: dict[str, Any]) -> None:
        # Resuming a 4-bit run: the base was just quantized again from the 16-bit directory, which
        # is deterministic, so its bytes must be the checkpoint's. Say so if not (another base);
        # then leave out the quantization state, which the loaded 4-bit layers already hold and
        # torch's strict loading does not know (bitsandbytes restores it only in from_pretrained).
        if self.quantization is None or self.model is None or "state_dict" not in checkpoint:
            return
        state, live = checkpoint["state_dict"], quantized_state(self)
        for key in sorted(quantized_entries(state)):
            if key in live and not torch.equal(state[key].cpu(), live[key]):
                raise ValueError(f"the checkpoint's 4-bit tensor {key!r} differs from the base quantized now from "
                                 f"model.model_name_or_path={self.model_name_or_path!r}: not the base this run trained on")
            if not key.endswith(".weight"):
                del state[key]

    def _tokenizer_files(self) -> dict[str, str] | None:
        """The tokenizer this run trains with (the data module's, else our own), as files."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None) or self.tokenizer
        if tokenizer is None:
            return None
        if self._tokenizer_record is None or self._tokenizer_record[0] != id(tokenizer):
            self._tokenizer_record = (id(tokenizer), tokenizer_files(tokenizer))
        return self._tokenizer_record[1]

    def _add_tokens(self, base: torch.nn.Module) -> None:
        """Add ``added_tokens`` to the vocabulary, grow the embeddings, and train the new rows."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.model_name_or_path))
        ids = add_tokens(self.tokenizer, self.added_tokens, "model.added_tokens")
        resize_vocab(base, max(len(self.tokenizer), base.get_input_embeddings().weight.shape[0]))
        names = [name for name in embedding_names(base) if name is not None]
        if any(name in (self.lora_settings["modules_to_save"] or []) for name in names):
            return  # the embeddings are trained in full: the new rows with them
        # Both matrices by name: PEFT leaves out the head when it is tied to the input embeddings.
        self.lora_settings["trainable_token_indices"] = {name: ids for name in names}

    def _load_base_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(self.model_name_or_path)
        dtype = parse_dtype(self.dtype_name, "model.dtype") or "auto"
        loading: dict[str, Any] = {"dtype": dtype}
        attention = self._attention()
        if attention is not None:
            loading["attn_implementation"] = attention
        strategy = self._deepspeed_strategy()
        try:
            if self.quantization is not None:
                return AutoModelForCausalLM.from_pretrained(path, **loading, **self._quantized_loading(path, dtype))
            if strategy is None or not strategy.zero_stage_3:
                return AutoModelForCausalLM.from_pretrained(path, **loading)
            # Lightning runs configure_model inside deepspeed.zero.Init, so every parameter is
            # created partitioned (shape [0] locally) and a plain from_pretrained fails on the
            # shapes. With an HfDeepSpeedConfig alive, transformers loads into the partitions
            # itself. It is a process-wide setting, so it is removed right after.
            from transformers.integrations import HfDeepSpeedConfig
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            ds_config = HfDeepSpeedConfig(strategy.config)  # noqa: F841 (transformers keeps a weak reference)
            try:
                return AutoModelForCausalLM.from_pretrained(path, **loading)
            finally:
                unset_hf_deepspeed_config()
        except OSError as err:
            raise OSError(f"model.model_name_or_path={self.model_name_or_path!r} could not be loaded: {err}") from err
        except (ValueError, ImportError) as err:
            if self.attn_implementation is None or self.attn_implementation not in str(err):
                raise
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r} cannot be used: {err}") from err

    def _attention(self) -> str | None:
        """``attn_implementation``, but sdpa where flex attention would run on a CPU: torch has no
        backward for it there, and its compiled CPU forward is wrong at some lengths (torch 2.13:
        ``tests/test_training_path.py``). The same attention, with a dense mask for packed rows."""
        on_cpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cpu"
        if self.attn_implementation == "flex_attention" and on_cpu:
            rank_zero_info("model.attn_implementation='flex_attention': torch has no flex attention backward on "
                           "CPU, and its CPU forward is wrong at some lengths; using sdpa (the same attention, "
                           "a dense mask for packed rows)")
            return "sdpa"
        return self.attn_implementation

    def _quantized_loading(self, path: str, dtype: Any) -> dict[str, Any]:
        """``from_pretrained`` arguments that load the base in 4 bits on this process's device."""
        from transformers import AutoConfig, BitsAndBytesConfig

        if dtype == "auto":
            dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quantization,
                                    bnb_4bit_use_double_quant=self.double_quantization, bnb_4bit_compute_dtype=dtype)
        device = self._root_device()
        return {"quantization_config": config, "device_map": {"": device}}

    def _check_quantization_strategy(self) -> None:
        """One line at setup where the strategy cannot hold a quantized base."""
        if self.quantization is None or self._trainer is None:
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError(
                f"model.quantization={self.quantization!r} cannot be trained with {type(strategy).__name__}: it shards "
                "and casts the base's parameters, which a 4-bit base stores packed; use a single device or DDP"
            )

    def _check_deepspeed_support(self, strategy: Any) -> None:
        """Refuse, before training, what DeepSpeed would train wrongly or checkpoint unexportably."""
        init = self.lora_settings["init_lora_weights"]
        if rewrites_base({"init_lora_weights": init}) and strategy.exclude_frozen_parameters and not strategy.zero_stage_3:
            raise ValueError(
                f"model.init_lora_weights={init!r} rewrites the base weights, and the strategy's "
                "exclude_frozen_parameters=True (set by the DeepSpeed presets) leaves them out of every checkpoint, "
                "so the trained model could not be exported: set exclude_frozen_parameters: false"
            )
        if not strategy.zero_stage_3:
            return
        # These initialisations read the base weights while PEFT builds the adapters, which under
        # ZeRO-3 are still empty partitions: they would silently start from garbage.
        if self.added_tokens:
            raise ValueError(
                "model.added_tokens is not supported with DeepSpeed ZeRO-3 (PEFT initialises trainable "
                "tokens of partitioned embeddings on CUDA only); use ZeRO-2 or DDP"
            )
        if self.lora_settings["use_dora"]:
            raise ValueError("model.use_dora=true is not supported with DeepSpeed ZeRO-3; use ZeRO-2 or DDP")
        if isinstance(init, str) and init != "gaussian":
            raise ValueError(f"model.init_lora_weights={init!r} is not supported with DeepSpeed ZeRO-3; use ZeRO-2 or DDP")

    def _root_device(self) -> torch.device:
        """The device this process trains on, as the trainer's strategy says (the CPU without a trainer)."""
        return self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def _sharding_strategy(self) -> str | None:
        """The name of the trainer's strategy if it shards the parameters (ZeRO-3, FSDP), else None."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = self._deepspeed_strategy()
        if strategy is not None:
            return "DeepSpeed ZeRO-3" if strategy.zero_stage_3 else None
        if self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return type(self.trainer.strategy).__name__
        return None

    @property
    def kernels(self) -> dict[str, Any]:
        """What the training step runs with (attention, loss, Liger, compiled blocks), once configured."""
        return dict(self.training_kernels.active)

    def _deepspeed_strategy(self) -> Any:
        """The trainer's DeepSpeedStrategy, or None (no trainer, or another strategy)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return self.trainer.strategy
        return None

    @override
    def on_fit_start(self) -> None:
        restore_class_decorators()  # classes created inside deepspeed.zero.Init after all
        self._check_vocabulary()
        self._plan_lora_bias()
        # Under ZeRO-3 a partitioned parameter reports numel() == 0; ds_numel is its full size.
        def count(p: torch.Tensor) -> int:
            return getattr(p, "ds_numel", p.numel())

        trainable = sum(count(p) for p in self.parameters() if p.requires_grad)
        total = sum(count(p) for p in self.parameters())
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
        if self.logger is not None:
            self.logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)

    def _plan_lora_bias(self) -> None:
        """With lora_bias, say at step 0 what the merged model will be (HFExport says it when it is there)."""
        from lightning_lora.callbacks.hf_export import HFExport

        if not self.lora_settings["lora_bias"] or any(isinstance(c, HFExport) for c in self.trainer.callbacks):
            return
        slots = plan_bias_slots(self.model)
        if slots.problem is not None:
            rank_zero_warn(f"LoraFinetuneModule: {slots.problem}; export this run with "
                           "`lightning-lora export --no-merge`")
        elif slots.switches:
            rank_zero_info(f"model.lora_bias=True: {slots.merged_config_line()}")

    def _check_vocabulary(self) -> None:
        """Fail before the first step if the data's tokenizer has ids the model has no embedding for
        (an index error deep inside the forward pass otherwise)."""
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        weight = self.model.get_input_embeddings().weight
        rows = getattr(weight, "ds_shape", weight.shape)[0]
        if tokenizer is not None and len(tokenizer) > rows:
            raise ValueError(
                f"the data's tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: "
                f"give model.added_tokens the tokens data.added_tokens adds (now {self.added_tokens})"
            )

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # A padding batch (loss_weight 0) keeps the ranks in step at the end of an epoch: it trains nothing.
        weight = batch.get("loss_weight")
        if weight is not None:
            batch = {key: value for key, value in batch.items() if key != "loss_weight"}
        loss = self.training_kernels.loss(self.model, batch)
        if weight is not None:
            loss = loss * weight
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        strategy = self._deepspeed_strategy()
        if strategy is not None and strategy.deepspeed_engine.gradient_accumulation_steps() > 1:
            # Lightning divides the returned loss by accumulate_grad_batches, and DeepSpeed's backward
            # divides it by its gradient_accumulation_steps (the same number) again (Lightning #6170):
            # undo DeepSpeed's, so that the gradient is the global batch's mean under DeepSpeed as
            # under DDP (which matters to Adam's moments when a run resumes with another
            # accumulation, and to gradient clipping).
            loss = loss * strategy.deepspeed_engine.gradient_accumulation_steps()
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], loss_metric: MeanMetric, accuracy_metric: MeanMetric) -> None:
        """Accumulate per-token loss and next-token accuracy over the response tokens."""
        # Every input but the labels: a packed batch has position_ids and no attention_mask.
        logits = self.model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if not mask.any():
            return
        logits = logits[:, :-1][mask].float()
        targets = labels[mask]
        loss_metric.update(F.cross_entropy(logits, targets, reduction="none"))
        accuracy_metric.update((logits.argmax(dim=-1) == targets).float())

    def _log_epoch(self, prefix: str, loss_metric: MeanMetric, accuracy_metric: MeanMetric) -> None:
        if loss_metric.update_count == 0:
            return
        loss = loss_metric.compute()
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}_ppl", torch.exp(loss), sync_dist=False)
        self.log(f"{prefix}_accuracy", accuracy_metric.compute(), sync_dist=False)
        loss_metric.reset()
        accuracy_metric.reset()

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_accuracy)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss, self.val_accuracy)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_accuracy)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss, self.test_accuracy)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        # The schedule's length is read when it is first needed, after warmup: asking Lightning for
        # it here builds the training loader before a resumed run's checkpoint is restored, and
        # Lightning then never gives that loader its saved position (Lightning issue #20550).
        trainer = self.trainer
        schedule = _warmup_cosine(self.warmup_steps, lambda: int(max(1, trainer.estimated_stepping_batches)),
                                  self.min_lr_ratio, self.lr_schedule == "cosine")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_lora_bias(lora_bias: Any, use_dora: bool, init_lora_weights: bool | str) -> None:
    """PEFT's own limits on lora_bias, named by this module's settings before anything is loaded."""
    if not isinstance(lora_bias, bool):
        raise ValueError(f"model.lora_bias={lora_bias!r} must be true or false")
    if lora_bias and use_dora:
        raise ValueError("model.lora_bias=True cannot be combined with model.use_dora=True "
                         "(PEFT has no lora bias for DoRA)")
    if lora_bias and not isinstance(init_lora_weights, bool):
        raise ValueError(f"model.lora_bias=True needs model.init_lora_weights true or false, not {init_lora_weights!r}")


def _warmup_cosine(warmup: int, total: Callable[[], int], min_ratio: float, cosine: bool) -> Any:
    """The LR multiplier at each step: linear warmup, then cosine decay (or constant). ``total``
    (the number of steps) is called once, at the first step past the warmup."""
    steps: list[int] = []

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine or step == warmup:
            return 1.0
        if not steps:
            steps.append(total())
        progress = min(1.0, (step - warmup) / max(1, steps[0] - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check_module_names(model: torch.nn.Module, key: str, value: list[str] | str | None) -> None:
    """Fail with the key and the unknown name if a LoRA setting names a module the model lacks.

    PEFT itself only fails when *no* target matches; a typo beside a valid name would silently
    train fewer modules than asked for.
    """
    if value is None or value == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(value, str):
        if not any(re.fullmatch(value, name) for name in names):
            raise ValueError(f"model.{key}={value!r} matches no module of the base model")
        return
    for target in value:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if not list(m.children())})
            raise ValueError(
                f"model.{key} names {target!r}, which matches no module of the base model "
                f"(its leaf modules: {leaves})"
            )


def _reinit_lora_partitioned(peft_model: torch.nn.Module) -> None:
    """Redo PEFT's adapter initialisation on ZeRO-3 partitioned parameters.

    Under ``deepspeed.zero.Init`` each LoRA ``nn.Linear`` is partitioned as soon as it is built,
    so PEFT's ``zeros_(lora_B)`` writes into empty local shards and is lost: ``lora_B`` would stay
    random and the model at step 0 would not be the base model. Gather each LoRA layer (its base
    weight too, which PiSSA/OLoRA read and rewrite), initialise on rank 0, and let DeepSpeed
    broadcast the result.
    """
    import deepspeed
    import torch.distributed as dist
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, peft_model.peft_config[adapter].init_lora_weights)
