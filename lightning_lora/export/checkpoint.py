"""Read any finished LoRA run into one shape: trained tensors keyed like the PEFT model, plus metadata.

Sources: a DeepSpeed ZeRO directory, a sharded FSDP checkpoint directory, a Lightning ``.ckpt``
file (FSDP's full state dict included), or a PEFT adapter directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_lora.export.fsdp import is_fsdp_checkpoint, read_fsdp_checkpoint
from lightning_lora.export.keys import normalize_keys
from lightning_lora.export.zero import is_zero_checkpoint, read_zero_checkpoint, resolve_zero_tag

__all__ = ["CHECKPOINT_KEY", "TrainedCheckpoint", "config_to_dict", "load_checkpoint", "lora_config_from_dict"]

# Where LoraFinetuneModule and HFExport record what the export needs, inside any Lightning checkpoint.
CHECKPOINT_KEY = "lightning_lora"


@dataclass
class TrainedCheckpoint:
    """What a finished run left: tensors named as in the PEFT model, and what is known about them.

    Attributes:
        tensors: by PEFT-model key (``base_model.model....lora_A.default.weight``); for an adapter
            directory, by PEFT's adapter-file key (``...lora_A.weight``), see ``adapter_format``.
        source: the path read.
        kind: ``"deepspeed"``, ``"fsdp"`` (sharded), ``"lightning"`` or ``"adapter"``.
        lora_config: the PEFT ``LoraConfig`` as a dict, if the checkpoint carries it.
        base_model: the base model the run trained on, if recorded.
        global_step: the optimizer step the checkpoint was taken at, if recorded.
        adapter_format: the keys are in PEFT's adapter-file layout.
        tag: the ZeRO tag read, if any.
        vocab_size: rows of the trained model's input embeddings, if recorded (larger than the
            base's when the run added tokens).
        tokenizer_files: the tokenizer the run trained with, as ``save_pretrained`` files, if recorded.
    """

    tensors: dict[str, torch.Tensor]
    source: str
    kind: str
    lora_config: dict[str, Any] | None = None
    base_model: str | None = None
    global_step: int | None = None
    adapter_format: bool = False
    tag: str | None = None
    vocab_size: int | None = None
    tokenizer_files: dict[str, str] | None = None


def lora_config_from_dict(config: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` from its dict form, ignoring keys this PEFT version does not know."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{key: value for key, value in config.items() if key in known})


def _metadata(client_state: dict[str, Any]) -> dict[str, Any]:
    """The LoRA config, base model and attribute prefix recorded in a Lightning checkpoint."""
    recorded = dict(client_state.get(CHECKPOINT_KEY) or {})
    if "peft_config" not in recorded:
        # A checkpoint of LoraFinetuneModule written before it recorded CHECKPOINT_KEY: rebuild
        # the config from its hyperparameters.
        hparams = client_state.get("hyper_parameters") or {}
        if "model_name_or_path" in hparams and "r" in hparams:
            from lightning_lora.module import LoraFinetuneModule

            config = LoraFinetuneModule(**hparams).lora_config()
            recorded.setdefault("peft_config", config_to_dict(config))
            recorded.setdefault("base_model", config.base_model_name_or_path)
            recorded.setdefault("prefix", "model.")
    return recorded


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a PEFT config (sets become sorted lists)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def load_checkpoint(
    path: str | Path, prefix: str | None = None, tag: str | None = None, include_frozen: bool = False
) -> TrainedCheckpoint:
    """Read a ZeRO directory, a Lightning ``.ckpt`` file or a PEFT adapter directory.

    Args:
        path: the checkpoint.
        prefix: the LightningModule attribute holding the PEFT model (e.g. ``"net."``); recorded
            or detected when ``None``.
        tag: the ZeRO tag to read instead of the one ``latest`` names.
        include_frozen: also read frozen weights (needed without a base model directory).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint={str(path)!r} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path)
    if tag is None and is_fsdp_checkpoint(path):
        tensors, client_state = read_fsdp_checkpoint(path, include_frozen=include_frozen)
        kind = "fsdp"
    elif tag is not None or (path.is_dir() and is_zero_checkpoint(path)):
        tag_dir = resolve_zero_tag(path, tag)
        tensors, client_state = read_zero_checkpoint(tag_dir, include_frozen=include_frozen)
        kind, tag = "deepspeed", tag_dir.name
    elif path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"--checkpoint={str(path)!r} is not a readable Lightning checkpoint: {err}") from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"--checkpoint={str(path)!r} holds no 'state_dict': not a Lightning checkpoint")
        tensors, client_state, kind = checkpoint["state_dict"], checkpoint, "lightning"
    else:
        raise ValueError(
            f"--checkpoint={str(path)!r} is neither a DeepSpeed ZeRO directory (with 'latest'), a sharded "
            "FSDP checkpoint (with .metadata), a Lightning .ckpt file, nor a PEFT adapter directory (with adapter_config.json)"
        )
    recorded = _metadata(client_state)
    prefix = prefix if prefix is not None else recorded.get("prefix")
    return TrainedCheckpoint(
        tensors=normalize_keys(tensors, prefix),
        source=str(path),
        kind=kind,
        lora_config=recorded.get("peft_config"),
        base_model=recorded.get("base_model"),
        global_step=client_state.get("global_step"),
        tag=tag,
        vocab_size=recorded.get("vocab_size"),
        tokenizer_files=recorded.get("tokenizer"),
    )


def _load_adapter_dir(path: Path) -> TrainedCheckpoint:
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"--checkpoint={str(path)!r} is a {config['peft_type']} adapter; only LoRA is supported")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        tensors = load_file(weights)
    elif (path / "adapter_model.bin").is_file():
        tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"--checkpoint={str(path)!r} has adapter_config.json but no adapter_model.safetensors")
    return TrainedCheckpoint(
        tensors=tensors,
        source=str(path),
        kind="adapter",
        lora_config=config,
        base_model=config.get("base_model_name_or_path"),
        adapter_format=True,
    )
