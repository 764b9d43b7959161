"""Read Lightning FSDP checkpoints saved with ``state_dict_type="sharded"``.

Such a checkpoint is a directory written by ``torch.distributed.checkpoint`` (``.metadata`` plus one
``__RANK_N.distcp`` file per rank) holding ``{"model": state_dict, "optimizer_0": ...}``, and a
``meta.pt`` with the rest of the Lightning checkpoint (global step, hyperparameters, what
``LoraFinetuneModule`` records). A ``state_dict_type="full"`` checkpoint is a plain ``.ckpt`` file,
read like any Lightning checkpoint.

Only the tensors an export needs are read, in one process, without a process group: the adapter's
(LoRA, ``modules_to_save``, trainable tokens, biases) at once, frozen weights one at a time when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.paths import inside
from lightning_lora.export.recorded import CLIENT_NEEDED
from lightning_lora.export.unpickle import ForeignObjectError, load_pickle, load_torch_file

__all__ = ["FSDPCheckpointError", "FSDPFrozenTensors", "check_fsdp_files", "is_fsdp_checkpoint", "read_fsdp_checkpoint"]

_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # lightning.fabric.strategies.fsdp._METADATA_FILENAME
# Parameters that LoRA training updates, by name: everything else of a LoRA run is frozen.
_TRAINED_MARKS = (".lora_", ".modules_to_save.", ".trainable_tokens_")


class FSDPCheckpointError(ExportError):
    """A sharded FSDP checkpoint directory that cannot be read as it is."""


def is_fsdp_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``torch.distributed.checkpoint``."""
    return path.is_dir() and (path / _METADATA).is_file()


def _reader(path: Path) -> Any:
    """torch's ``FileSystemReader`` whose ``.metadata`` is read by the restricted loader (torch's own
    reads it with a plain ``pickle.load``, which runs whatever the file names)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(path / _METADATA, "rb") as file:
                metadata = load_pickle(file, path / _METADATA, needed=[("state_dict_metadata",), ("planner_data",),
                                                                       ("storage_data",)])
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return RestrictedReader(path)


def _metadata(path: Path) -> Any:
    try:
        return _reader(path).read_metadata()
    except ExportError:
        raise
    except Exception as err:  # a truncated or foreign .metadata raises pickle/EOF errors
        raise FSDPCheckpointError(f"--checkpoint={str(path)!r}: its .metadata is not readable: {err}") from err


def check_fsdp_files(path: Path) -> int:
    """Fail, naming them, if shard files the metadata refers to are missing; returns their number.

    Every rank writes its own file: on several nodes they are only all in one place on a
    filesystem that all nodes share.
    """
    files = {info.relative_path for info in _metadata(path).storage_data.values()}
    # torch reads each shard as path / relative_path: a name from the metadata must stay inside.
    where = f"--checkpoint={str(path)!r}: {_METADATA}"
    missing = sorted(name for name in files if not inside(path, name, where).is_file())
    if missing:
        raise FSDPCheckpointError(
            f"--checkpoint={str(path)!r} lacks {len(missing)} of its {len(files)} shard files, e.g. {missing[:3]}: "
            "each rank writes its own, so the checkpoint directory must be on a filesystem shared by all nodes"
        )
    return len(files)


def _model_keys(path: Path, metadata: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Flattened checkpoint key -> parameter name of the module's tensors: (trained, frozen).

    An entry of the module stored as bytes is refused here: torch unpickles bytes entries with
    ``weights_only=False`` (the planner in :func:`_read` refuses them too).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    trained, frozen = {}, {}
    for flat, key in metadata.planner_data.items():
        if len(key) != 2 or key[0] != "model":
            continue  # optimizer state, or not a tensor of the module
        if not isinstance(metadata.state_dict_metadata.get(flat), TensorStorageMetadata):
            raise ForeignObjectError(f"--checkpoint={str(path)!r}: {flat!r} is stored as pickled bytes, not a tensor: "
                                     "not read (nothing of it was imported or run)")
        name = str(key[1])
        if any(mark in name for mark in _TRAINED_MARKS) or name.endswith(".bias"):
            trained[flat] = name
        else:
            frozen[flat] = name
    return trained, frozen


def _read(path: Path, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of ``keys`` (flattened key -> name), each whole, read without a process group.

    Tensor entries are read by torch with ``weights_only=True``; an entry the metadata declares as
    bytes would be unpickled by torch with ``weights_only=False``: refused, a module holds tensors.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class TensorsOnly(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise ForeignObjectError(f"--checkpoint={str(path)!r}: {read_item.dest_index.fqn!r} is stored as pickled "
                                     "bytes, not a tensor: not read (nothing of it was imported or run)")

    if not keys:
        return {}
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=_reader(path), planner=TensorsOnly(keys=set(keys)), no_dist=True)
    return dict(state.get("model", {}))


class FSDPFrozenTensors(Mapping[str, torch.Tensor]):
    """The frozen weights of a sharded FSDP checkpoint by parameter name, each read (whole) on access."""

    def __init__(self, path: Path, keys: dict[str, str]) -> None:
        self.path = path
        self._flat = {name: flat for flat, name in keys.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._flat:
            raise KeyError(name)
        return _read(self.path, {self._flat[name]: name})[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._flat


def read_fsdp_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], FSDPFrozenTensors, dict[str, Any]]:
    """The trained module tensors of a sharded FSDP checkpoint, each whole; its frozen weights,
    read one at a time on access; and the rest of the Lightning checkpoint from ``meta.pt``."""
    check_fsdp_files(path)
    trained_keys, frozen_keys = _model_keys(path, _metadata(path))
    tensors = _read(path, trained_keys)
    meta = path / _LIGHTNING_META
    try:
        client_state = load_torch_file(meta, needed=CLIENT_NEEDED) if meta.is_file() else {}
    except ForeignObjectError:
        raise
    except Exception as err:  # torch raises several types for a damaged file
        raise FSDPCheckpointError(f"--checkpoint={str(path)!r}: its {_LIGHTNING_META} is not readable: {err}") from err
    return tensors, FSDPFrozenTensors(path, frozen_keys), client_state
