"""Read Lightning FSDP checkpoints saved with ``state_dict_type="sharded"``.

Such a checkpoint is a directory written by ``torch.distributed.checkpoint`` (``.metadata`` plus one
``__RANK_N.distcp`` file per rank) holding ``{"model": state_dict, "optimizer_0": ...}``, and a
``meta.pt`` with the rest of the Lightning checkpoint (global step, hyperparameters, what
``LoraFinetuneModule`` records). A ``state_dict_type="full"`` checkpoint is a plain ``.ckpt`` file,
read like any Lightning checkpoint.

Only the tensors an export needs are read, in one process, without a process group: the adapter's
(LoRA, ``modules_to_save``, trainable tokens, biases), and the frozen weights only on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["FSDPCheckpointError", "check_fsdp_files", "is_fsdp_checkpoint", "read_fsdp_checkpoint"]

_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # lightning.fabric.strategies.fsdp._METADATA_FILENAME
# Parameters that LoRA training updates, by name: everything else of a LoRA run is frozen.
_TRAINED_MARKS = (".lora_", ".modules_to_save.", ".trainable_tokens_")


class FSDPCheckpointError(ValueError):
    """A sharded FSDP checkpoint directory that cannot be read as it is."""


def is_fsdp_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``torch.distributed.checkpoint``."""
    return path.is_dir() and (path / _METADATA).is_file()


def _metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(path).read_metadata()
    except Exception as err:  # a truncated or foreign .metadata raises pickle/EOF errors
        raise FSDPCheckpointError(f"--checkpoint={str(path)!r}: its .metadata is not readable: {err}") from err


def check_fsdp_files(path: Path) -> int:
    """Fail, naming them, if shard files the metadata refers to are missing; returns their number.

    Every rank writes its own file: on several nodes they are only all in one place on a
    filesystem that all nodes share.
    """
    files = {info.relative_path for info in _metadata(path).storage_data.values()}
    missing = sorted(name for name in files if not (path / name).is_file())
    if missing:
        raise FSDPCheckpointError(
            f"--checkpoint={str(path)!r} lacks {len(missing)} of its {len(files)} shard files, e.g. {missing[:3]}: "
            "each rank writes its own, so the checkpoint directory must be on a filesystem shared by all nodes"
        )
    return len(files)


def _model_keys(metadata: Any, include_frozen: bool) -> dict[str, str]:
    """Flattened checkpoint key -> parameter name, for the tensors of ``"model"`` to read."""
    keys = {}
    for flat, path in metadata.planner_data.items():
        if len(path) != 2 or path[0] != "model":
            continue  # optimizer state, or not a tensor of the module
        name = str(path[1])
        if include_frozen or any(mark in name for mark in _TRAINED_MARKS) or name.endswith(".bias"):
            keys[flat] = name
    return keys


def read_fsdp_checkpoint(path: Path, include_frozen: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The module tensors of a sharded FSDP checkpoint (adapter tensors, plus frozen ones on
    request), each whole, and the rest of the Lightning checkpoint from ``meta.pt``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_fsdp_files(path)
    keys = _model_keys(_metadata(path), include_frozen)
    state: dict[str, Any] = {}
    if keys:
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=set(keys)), no_dist=True)
    tensors = dict(state.get("model", {}))
    meta = path / _LIGHTNING_META
    client_state = torch.load(meta, map_location="cpu", weights_only=False) if meta.is_file() else {}
    return tensors, client_state
