"""The PEFT model of a run, rebuilt on its base, and the checkpoint's tensors matched to it.

The structure (which modules LoRA wraps, their ranks and scales, Conv1D or Linear, tied
embeddings, trainable tokens) is always PEFT's own: ``get_peft_model`` on the base architecture,
on the meta device when only names and shapes are needed (no memory), or on the loaded base
for the whole-model merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.checkpoint import TrainedCheckpoint, lora_config_from_dict
from lightning_lora.export.quantized import quantized_entries
from lightning_lora.export.tokens import resize_vocab
from lightning_lora.export.trust import remote_code
from lightning_lora.export.weights import read_config
from lightning_lora.model_classes import restore_class_decorators

__all__ = ["build_meta_peft_model", "build_peft_model", "count_tensors", "merged_meta_model", "trained_by_model_key"]


# Settings of data-driven initialisations, which the rebuilt model (initialised plainly) does not use.
_INIT_SETTINGS = ("corda_config", "eva_config", "loftq_config", "lora_ga_config")


def _peft_config(base_model: str | Path, lora_config: dict[str, Any]) -> Any:
    # Initialisation does not matter (every adapter tensor is overwritten), and PiSSA-like inits
    # would run an SVD of every base weight (the checkpoint's rewritten base replaces it instead).
    plain = {key: value for key, value in lora_config.items() if key not in _INIT_SETTINGS}
    config = lora_config_from_dict({**plain, "init_lora_weights": True, "base_model_name_or_path": str(base_model)})
    config.inference_mode = False  # adapter_config.json says true; the trained tensors are found by requires_grad
    return config


def build_meta_peft_model(base_dir: str | Path, lora_config: dict[str, Any], vocab_size: int | None = None,
                          config: Any = None) -> Any:
    """The PEFT model of ``lora_config`` on the base's architecture, on the meta device (no memory),
    its embeddings grown to ``vocab_size`` rows when the run added tokens.

    Buffers computed from the config at construction (rotary frequencies) are real; parameters
    are on the meta device, tied ones tied. ``config`` replaces the base's ``config.json``.
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = config if config is not None else read_config(base_dir, "--base-model")
    restore_class_decorators()  # a training in this process may have created its classes in deepspeed.zero.Init
    # Parameters on the meta device, buffers (derived from the config, not stored) real.
    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **remote_code())
    base.tie_weights()  # the context's own parameter registration undoes the tie the model made
    if vocab_size is not None:
        resize_vocab(base, vocab_size)
    return get_peft_model(base, _peft_config(base_dir, lora_config), autocast_adapter_dtype=False)


def build_peft_model(base_model: str | Path, lora_config: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The base in its own dtype wrapped with LoRA as in training, every trained tensor in fp32.

    ``vocab_size``: the trained model's vocabulary, when the run added tokens; the base's
    embeddings grow to it as they did in training (see :func:`~lightning_lora.export.tokens.resize_vocab`).
    The frozen weights keep their stored precision; the adapters and ``modules_to_save`` copies
    are fp32.
    """
    from peft import get_peft_model
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    restore_class_decorators()
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto", **remote_code())
    if vocab_size is not None:
        resize_vocab(base, vocab_size)
    model = get_peft_model(base, _peft_config(base_model, lora_config), autocast_adapter_dtype=True)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.modules_to_save.float()
    return model


def merged_meta_model(merged_dir: Path) -> tuple[Any, Any]:
    """The merged model on the meta device (buffers real), built from its own config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_config(merged_dir, "merged")
    restore_class_decorators()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **remote_code())
    model.tie_weights()
    return model, config


def trained_by_model_key(model: Any, checkpoint: TrainedCheckpoint,
                         base: str = "--base-model") -> dict[str, torch.Tensor]:
    """The checkpoint's trained tensors keyed like ``model.state_dict()``, checked against ``model``.

    Every trainable parameter of the rebuilt PEFT model must come from the checkpoint, every
    tensor of the checkpoint must name a tensor of the model, and shapes must agree; any gap fails
    with names, and ``base`` (the base as the user named it, ``--base-model='dir'``). ``model`` may
    live on the meta device: only names and shapes are used. Frozen tensors a Lightning checkpoint
    holds beside them are left to :meth:`TrainedCheckpoint.frozen_tensors`.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # A 4-bit base's packed weights and their quantization state (QLoRA) are frozen: read apart.
    quantized = quantized_entries(checkpoint.tensors)
    tensors = {key: value for key, value in checkpoint.tensors.items() if key not in quantized}
    if checkpoint.adapter_format:
        # Let PEFT name the adapter-file keys (``...lora_A.weight``, ``lm_head.weight`` for
        # modules_to_save, ...) by feeding it each trainable parameter's index instead of its value.
        from peft.utils import get_peft_model_state_dict

        index = {name: torch.tensor(i) for i, name in enumerate(trainable)}
        file_keys = {key: trainable[int(i)] for key, i in get_peft_model_state_dict(model, state_dict=index).items()}
        _raise_on_gaps(sorted(set(file_keys) - set(tensors)), sorted(set(tensors) - set(file_keys)), checkpoint.source)
        tensors = {file_keys[key]: value for key, value in tensors.items()}
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _raise_on_gaps(sorted(set(trainable) - set(tensors)), sorted(set(tensors) - set(shapes)), checkpoint.source)
    for key, value in tensors.items():
        if shapes[key] != tuple(value.shape):
            raise ExportError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)} but the base model's is "
                f"{shapes[key]}: {base} is not the model this checkpoint was trained from, or --r / "
                "the LoRA config differs from training"
            )
    return {key: tensors[key] for key in trainable}


def count_tensors(model: Any, rewritten: set[str]) -> dict[str, int]:
    """How many trained tensors an export uses, how many modules LoRA wraps, and how many frozen
    tensors it takes from the checkpoint."""
    from peft.tuners.lora import LoraLayer

    trainable = sum(1 for _, p in model.named_parameters() if p.requires_grad)
    lora_modules = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    return {"trained_tensors": trainable, "lora_modules": lora_modules, "frozen_tensors_from_checkpoint": len(rewritten)}


def _raise_on_gaps(missing: list[str], unexpected: list[str], source: str) -> None:
    if missing:
        raise ExportError(
            f"{len(missing)} trained tensor(s) the LoRA config expects are not in {source!r}, e.g. "
            f"{missing[:3]}: the checkpoint was trained with another LoRA config (check --r, "
            "--lora-config, target modules) or another --prefix"
        )
    if unexpected:
        raise ExportError(
            f"{len(unexpected)} tensor(s) of {source!r} match no module of the rebuilt model, e.g. "
            f"{unexpected[:3]}: --base-model or the LoRA config (--lora-config, target modules) does not match the checkpoint"
        )
