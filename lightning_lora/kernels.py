"""The faster pieces of a training step, each chosen at setup and said in one log line.

:class:`TrainingKernels` holds what :class:`~lightning_lora.module.LoraFinetuneModule` trains with:
the loss through the head without full logits (:mod:`lightning_lora.losses`, or Liger's fused
kernel), Liger's RMSNorm and SwiGLU kernels, ``torch.compile`` per decoder block, and LoRA layers
that take their input in the autocast dtype. A piece that cannot run here (a package absent, no
CUDA device, a model or strategy it does not support) falls back to the plain path with a line in
the log; only a setting that can never work for this model is an error.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.dtypes import IGNORE_INDEX
from lightning_lora.losses import linear_cross_entropy

__all__ = ["FUSED_LOSS_MODEL_TYPES", "LossKind", "TrainingKernels"]

LossKind = Literal["auto", "chunked", "liger", "off"]
_LOSS_KINDS = get_args(LossKind)
# Model types whose causal-LM forward is ``lm_head(decoder(...).last_hidden_state)`` and whose loss is
# the plain shifted cross-entropy: no logit scaling or soft-capping (Gemma 2/3, Cohere), no auxiliary
# router loss (the MoE models). tests/test_training_path.py checks each against the model's own loss.
FUSED_LOSS_MODEL_TYPES = frozenset({"gemma", "gpt2", "llama", "mistral", "olmo2", "phi", "phi3", "qwen2", "qwen3",
                                    "smollm3", "starcoder2"})


@dataclass
class TrainingKernels:
    """What a module's training step runs: the module's settings, and what :meth:`prepare_base` and
    :meth:`prepare_model` made of them where it trains (``active``, also logged).

    Args:
        linear_cross_entropy: ``auto`` (Liger's fused kernel on CUDA when ``liger-kernel`` is
            installed, else ``chunked``), ``chunked`` (:func:`lightning_lora.losses.linear_cross_entropy`),
            ``liger``, or ``off`` (the model's own loss over the full logits).
        liger_kernels: Liger's RMSNorm and SwiGLU kernels on this model's layers (not its RoPE: see
            :func:`_apply_liger`); ``auto`` uses them on CUDA when ``liger-kernel`` is installed.
        compile_blocks: ``torch.compile`` each decoder block.
        autocast_lora_inputs: under mixed precision, LoRA layers take their input in the autocast dtype.
    """

    linear_cross_entropy: LossKind = "auto"
    liger_kernels: bool | Literal["auto"] = "auto"
    compile_blocks: bool = False
    autocast_lora_inputs: bool = True
    active: dict[str, Any] = field(default_factory=dict, init=False)
    _loss: str = field(default="off", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.linear_cross_entropy not in _LOSS_KINDS:
            raise ValueError(f"model.linear_cross_entropy={self.linear_cross_entropy!r} is not one of {list(_LOSS_KINDS)}")
        if self.liger_kernels not in (True, False, "auto"):
            raise ValueError(f"model.liger_kernels={self.liger_kernels!r} is not one of [true, false, 'auto']")

    def prepare_base(self, base: torch.nn.Module, device: torch.device) -> None:
        """Patch the base model before PEFT wraps it (Liger's kernels replace module forwards)."""
        self.active["attention"] = getattr(base.config, "_attn_implementation", None)
        self.active["liger_kernels"] = _apply_liger(base, self.liger_kernels, device)

    def prepare_model(self, model: torch.nn.Module, device: torch.device, sharded: str | None) -> None:
        """Decide the loss, compile the blocks and set the input casts of the PEFT ``model``'s LoRA layers.

        ``sharded`` names the strategy when it shards parameters (ZeRO-3, FSDP): they are gathered by
        the hooks of the modules that own them, which the chunked loss bypasses for the head.
        """
        from peft.tuners.lora import LoraLayer

        self._loss = self._resolve_loss(model, device, sharded)
        self.active["linear_cross_entropy"] = self._loss
        self.active["compiled_blocks"] = _compile_blocks(model) if self.compile_blocks else 0
        if self.autocast_lora_inputs:
            for layer in model.modules():
                if isinstance(layer, LoraLayer):
                    layer.cast_input_dtype_enabled = _CastUnlessAutocast()
        self.active["autocast_lora_inputs"] = self.autocast_lora_inputs
        rank_zero_info("training kernels: " + ", ".join(f"{key}={value}" for key, value in self.active.items()))

    def loss(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The training loss of ``batch`` (with ``labels``), as the model's own loss defines it."""
        if self._loss == "off":
            return model(**batch).loss
        return _head_loss(model, batch, self._loss)

    def _resolve_loss(self, model: torch.nn.Module, device: torch.device, sharded: str | None) -> str:
        setting = self.linear_cross_entropy
        if setting == "off":
            return "off"
        reason = _head_loss_unsupported(model, sharded)
        if reason is not None:
            if setting != "auto":
                raise ValueError(f"model.linear_cross_entropy={setting!r} cannot be used: {reason}; set it to 'auto' or 'off'")
            rank_zero_info(f"model.linear_cross_entropy=auto: the model's own loss ({reason})")
            return "off"
        if setting == "chunked":
            return "chunked"
        liger = _liger_missing(device)
        if liger is None:
            return "liger"
        if setting == "liger":
            rank_zero_info(f"model.linear_cross_entropy='liger': {liger}; the chunked loss instead")
        return "chunked"


class _CastUnlessAutocast:
    """A LoRA layer's ``cast_input_dtype_enabled``, which PEFT reads as a bool before each forward:
    true (cast the input to the adapter's dtype) unless autocast is on, which casts it straight
    back for the matrix product; skipping that saves two activation copies per layer and step and
    changes no value (the round trip through fp32 is exact). Read at call time, so a forward
    outside autocast still casts, and activation checkpointing recomputes as the forward ran."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))

    def __repr__(self) -> str:
        return "cast unless autocast is on"


def _head_loss_unsupported(model: torch.nn.Module, sharded: str | None) -> str | None:
    """Why the loss cannot bypass the model's forward for its head, or None."""
    base = model.get_base_model()
    model_type = base.config.model_type
    if model_type not in FUSED_LOSS_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose loss is known to be the plain head's"
    if sharded is not None:
        return f"{sharded} shards the head's weight, gathered only by its own forward"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__} (trained or adapted), not a plain Linear"
    if any(type(m).__name__ == "TrainableTokensWrapper" for m in base.modules()):
        return "trainable tokens change the head's rows"
    return None


def _head_loss(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """The model's loss computed from its final hidden states at the positions with a target."""
    base = model.get_base_model()
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "num_items_in_batch")}
    hidden = base.base_model(**inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    rows, targets = hidden[:, :-1][mask], targets[mask]
    head = base.get_output_embeddings()
    divisor = batch.get("num_items_in_batch")
    if kind == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        summed = liger_fused_linear_cross_entropy(rows, head.weight, targets, bias=head.bias, reduction="sum")
        return summed / (divisor if divisor is not None else max(1, targets.numel()))
    return linear_cross_entropy(rows, head.weight, targets, divisor, bias=head.bias)


def _liger_missing(device: torch.device) -> str | None:
    """Why Liger's kernels cannot run on ``device``, or None."""
    if device.type != "cuda":
        return f"Liger's kernels need a CUDA device (training on {device.type})"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not installed or does not import ({err})"
    return None


def _apply_liger(base: torch.nn.Module, setting: bool | str, device: torch.device) -> str:
    """Patch ``base``'s layers with Liger's RMSNorm and SwiGLU kernels where asked and possible; say what happened."""
    if setting is False:
        return "off"
    missing = _liger_missing(device)
    if missing is not None:
        if setting is True:
            rank_zero_info(f"model.liger_kernels=true: {missing}; the model's own layers instead")
        return f"off ({missing})"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = base.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        rank_zero_info(f"model.liger_kernels: Liger has no kernels for model type {model_type!r}")
        return f"off (no kernels for {model_type!r})"
    # Liger also replaces transformers' module-level classes and RoPE function, for every model built
    # later in this process (the export's CPU verification too, where Triton cannot run): put those
    # back, keeping only the patches of this model's own layers. RoPE is such a module-level function.
    modules = [module for name, module in list(sys.modules.items()) if name.startswith("transformers.models.")]
    saved = [(module, dict(vars(module))) for module in modules]
    _apply_liger_kernel_to_instance(model=base, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    for module, names in saved:
        for name, value in names.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return "rms_norm, swiglu"


def _compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every decoder block in place (the classes the model names as never split)."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    for block in blocks:
        block.compile()
    return len(blocks)
