"""Rebuild the trained PEFT model on its base, load the trained tensors strictly, and merge.

Everything is computed in fp32 (base weights upcast, LoRA deltas in fp32) and cast to the target
dtype once, after the merge: merging in bf16 is the usual cause of "merged model differs from
the adapter model".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_lora.export.checkpoint import TrainedCheckpoint, lora_config_from_dict
from lightning_lora.export.tokens import resize_vocab

__all__ = [
    "ExportError",
    "build_peft_model",
    "check_merged_files",
    "count_tensors",
    "load_trained",
    "merge",
    "resolve_dtype",
    "trained_by_model_key",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# LoRA initialisations that rewrite the base weights at the start of training: the trained model's
# frozen weights are then the checkpoint's, not the base directory's.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "orthogonal")


class ExportError(ValueError):
    """The inputs of an export do not fit together; the message says which and how."""


def resolve_dtype(name: str, base_config: Any) -> torch.dtype:
    """``auto`` is the base model's own dtype (fp32 if it records none)."""
    if name == "auto":
        recorded = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
        if isinstance(recorded, str):
            recorded = getattr(torch, recorded, None)
        return recorded if isinstance(recorded, torch.dtype) else torch.float32
    if name not in DTYPES:
        raise ExportError(f"--dtype={name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def rewrites_base(lora_config: dict[str, Any]) -> bool:
    """Whether the LoRA initialisation changed the frozen base weights (PiSSA, OLoRA, ...)."""
    init = lora_config.get("init_lora_weights", True)
    return isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS)


def build_peft_model(base_model: str | Path, lora_config: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The base in its own dtype wrapped with LoRA as in training, every trained tensor in fp32.

    ``vocab_size``: the trained model's vocabulary, when the run added tokens; the base's
    embeddings grow to it as they did in training (see :func:`~lightning_lora.export.tokens.resize_vocab`).

    The frozen weights keep their stored precision (a bf16 base stays bf16: half the memory of
    an fp32 copy); the adapters and ``modules_to_save`` copies are fp32, and :func:`merge` upcasts
    one layer at a time, so the arithmetic is fp32 throughout.
    """
    from peft import get_peft_model
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    if vocab_size is not None:
        resize_vocab(base, vocab_size)
    config = lora_config_from_dict({**lora_config, "base_model_name_or_path": str(base_model)})
    # Initialisation does not matter (every adapter tensor is overwritten), except that PiSSA-like
    # inits would rewrite the base: the checkpoint's frozen weights replace it then.
    config.init_lora_weights = True
    config.inference_mode = False
    model = get_peft_model(base, config, autocast_adapter_dtype=True)  # half-precision adapters -> fp32
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.modules_to_save.float()
    return model


def trained_by_model_key(model: Any, checkpoint: TrainedCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors keyed like ``model.state_dict()``, checked against ``model``.

    Every trainable parameter of the rebuilt PEFT model must come from the checkpoint, every
    tensor of the checkpoint must name a tensor of the model, and shapes must agree; any gap fails
    with names. ``model`` may live on the meta device: only names and shapes are used.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    tensors = dict(checkpoint.tensors)
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
                f"{shapes[key]}: --base-model is not the model this run trained, or --r / "
                "the LoRA config differs from training"
            )
    return tensors


def count_tensors(model: Any, trained: dict[str, torch.Tensor], frozen_from_checkpoint: bool) -> dict[str, int]:
    """How many trained tensors an export uses, how many modules LoRA wraps, and how many frozen
    tensors it takes from the checkpoint."""
    from peft.tuners.lora import LoraLayer

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = len(set(trained) - trainable) if frozen_from_checkpoint else 0
    lora_modules = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    return {"trained_tensors": len(trainable), "lora_modules": lora_modules, "frozen_tensors_from_checkpoint": frozen}


def check_merged_files(merged_dir: Path) -> int:
    """Fail if any adapter tensor survived into the merged files; returns the number of tensors."""
    from safetensors import safe_open

    keys = []
    for file in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            keys += list(f.keys())
    leftovers = [k for k in keys if ".lora_" in k or ".base_layer." in k or ".modules_to_save." in k]
    if leftovers:
        raise ExportError(f"{len(leftovers)} adapter tensor(s) survived the merge, e.g. {leftovers[:3]}; nothing was published")
    return len(keys)


def load_trained(model: Any, trained: dict[str, torch.Tensor], frozen_from_checkpoint: bool) -> None:
    """Copy checked tensors (see :func:`trained_by_model_key`) into the PEFT model, in fp32.

    Args:
        model: the rebuilt PEFT model (see :func:`build_peft_model`).
        trained: the trained tensors keyed like ``model.state_dict()``.
        frozen_from_checkpoint: also copy the checkpoint's frozen weights over the base's (for
            PiSSA-like inits, which rewrote them, and exports without a base directory).
            Otherwise the base directory's weights, in their original precision, are kept.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    own = model.state_dict()
    with torch.no_grad():
        for key in set(trained) if frozen_from_checkpoint else trainable:
            own[key].copy_(trained[key])


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


@torch.no_grad()
def merge(model: Any, dtype: torch.dtype) -> Any:
    """PEFT's merge, one LoRA layer at a time in fp32, each cast once to ``dtype`` right after;
    trained token rows are written into their embeddings; then the adapters are unloaded.
    Unties a head that training changed.

    Upcasting layer by layer keeps the peak near the model in its own dtype plus one fp32 layer,
    where ``merge_and_unload`` on an fp32 copy of the whole model would need twice that or more.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    for module in model.modules():
        # Trainable tokens copy their rows into the embeddings (unload alone would drop them).
        if isinstance(module, (LoraLayer, TrainableTokensLayer)) and not module.merged:
            weight = module.get_base_layer().weight
            weight.data = weight.data.to(torch.float32)
            module.merge(safe_merge=True)
            weight.data = weight.data.to(dtype)
    merged = model.unload()
    _untie_changed_head(merged)
    return merged.to(dtype)


def _untie_changed_head(model: Any) -> None:
    """Keep a trained ``lm_head`` from being re-tied to the input embeddings on reload.

    When the config says the embeddings are tied but the merged head differs from the input
    embeddings (``modules_to_save=["lm_head"]``, LoRA on the head), ``from_pretrained`` would
    overwrite the trained head with the embeddings. Give the head its own tensor and untie.
    """
    output = model.get_output_embeddings()
    config = model.config
    if output is None or not getattr(config, "tie_word_embeddings", False):
        return
    embeddings = model.get_input_embeddings().weight
    if output.weight is embeddings or torch.equal(output.weight, embeddings):
        return
    output.weight = torch.nn.Parameter(output.weight.detach().clone())
    config.tie_word_embeddings = False
    # transformers >= 5 also consults this mapping when tying on load.
    if hasattr(model, "_tied_weights_keys") and isinstance(model._tied_weights_keys, dict):
        model._tied_weights_keys = {}
