"""A model directory's weight files, read one tensor at a time: the base model, or a merged export.

Every safetensors header is read and checked when the directory is opened (a few kilobytes per
file, no tensor data): a truncated or damaged shard, a weight map naming a missing file, or a dtype
the export cannot handle fails there, naming the file and the argument, before anything large is
loaded. Tensors are then read memory-mapped, one at a time, so memory stays near one tensor
whatever the model size.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.paths import inside
from lightning_lora.export.trust import remote_code

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "WeightFiles", "read_config"]

# safetensors' names of the dtypes the export reads and writes. fp8 and other quantized storage is
# refused: such weights carry scales in other tensors, and merging into the raw values would be wrong.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies and what it is, from the file header alone."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class WeightFiles:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or its shards + index).

    Args:
        directory: the model directory.
        argument: the option that named it (``--base-model``), for errors.
        model_prefix: the architecture's ``base_model_prefix`` (``"model"``, ``"transformer"``):
            keys are found with or without it, as ``from_pretrained`` does.
        files: these safetensors files only (a worker's own shards) instead of the directory's.
    """

    def __init__(self, directory: str | Path, argument: str = "--base-model", model_prefix: str = "",
                 files: list[Path] | None = None) -> None:
        self.directory = Path(directory)
        self.argument = argument
        self.prefix = f"{model_prefix}." if model_prefix else ""
        self.tensors: dict[str, TensorInfo] = {}
        for file in files if files is not None else self._files():
            for key, info in _read_header(file, argument).items():
                self.tensors[key] = info

    def _files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ExportError(f"{self.argument}={str(self.directory)!r}: {index.name} is not a safetensors index: {err}") from err
            where = f"{self.argument}: {index.name}"
            files = sorted({inside(self.directory, name, where) for name in set(weight_map.values())})
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise ExportError(f"{self.argument}={str(self.directory)!r}: {index.name} names shard(s) that are not there: {missing[:3]}")
            return files
        single = self.directory / "model.safetensors"
        return [inside(self.directory, single.name, self.argument)] if single.is_file() else []

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.resolve(key) is not None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def resolve(self, key: str) -> str | None:
        """The stored key of ``key`` (with or without the architecture's prefix), or ``None``."""
        for candidate in (key, key.removeprefix(self.prefix), f"{self.prefix}{key}"):
            if candidate in self.tensors:
                return candidate
        return None

    def info(self, key: str) -> TensorInfo:
        return self.tensors[self._stored(key)]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its file (the file is mapped only while it is read)."""
        return self._read(key, lambda handle, stored: handle.get_tensor(stored))

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        """Rows ``indices`` of one tensor (elements of a vector), read without the rest of it."""

        def read(handle: Any, stored: str) -> torch.Tensor:
            part = handle.get_slice(stored)
            return torch.cat([part[index:index + 1] for index in indices])

        return self._read(key, read)

    def _stored(self, key: str) -> str:
        stored = self.resolve(key)
        if stored is None:
            raise ExportError(f"{self.argument}={str(self.directory)!r} holds no tensor {key!r}")
        return stored

    def _read(self, key: str, read: Callable[[Any, str], torch.Tensor]) -> torch.Tensor:
        """``read(handle, stored key)`` on the safetensors file holding ``key``, mapped only meanwhile;
        a failure is one line naming the file."""
        from safetensors import SafetensorError, safe_open

        stored = self._stored(key)
        file = self.tensors[stored].file
        try:
            with safe_open(file, "pt") as handle:
                return read(handle, stored)
        except (SafetensorError, OSError) as err:
            raise ExportError(f"{self.argument}={str(self.directory)!r}: reading {stored!r} from {file.name} failed: {err}") from err

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def _read_header(file: Path, argument: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, after checking that the file holds every byte the
    header promises and only dtypes the export handles."""
    where = f"{argument}: {str(file)!r}"
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportError(f"{where} is truncated or not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ExportError(f"{where} is truncated or not a safetensors file (its header claims {length} bytes of {size})")
            header = json.loads(f.read(length))
    except OSError as err:
        raise ExportError(f"{where} cannot be read: {err}") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{where} is damaged: its header is not valid JSON ({err})") from err
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for key, entry in header.items():
        name = entry.get("dtype") if isinstance(entry, dict) else None
        if name not in SAFETENSORS_DTYPES:
            raise ExportError(
                f"{where} stores {key!r} as {name}, which the export does not handle (supported: "
                f"{sorted(SAFETENSORS_DTYPES)}); quantized weights need their 16-bit original as --base-model"
            )
        shape = tuple(int(d) for d in entry["shape"])
        tensors[key] = TensorInfo(file, shape, SAFETENSORS_DTYPES[name])
        begin, stop = entry["data_offsets"]
        if stop - begin != tensors[key].nbytes:
            raise ExportError(f"{where} is damaged: {key!r} has {stop - begin} bytes for shape {list(shape)} {name}")
        end = max(end, stop)
    if 8 + length + end > size:
        raise ExportError(
            f"{where} is truncated: its tensors need {8 + length + end} bytes, the file has {size} "
            "(was it still being downloaded or copied?)"
        )
    return tensors


def read_config(directory: str | Path, argument: str) -> Any:
    """``AutoConfig.from_pretrained(directory)``, with a one-line error naming the argument."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, **remote_code())
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{argument}={str(directory)!r} has no readable config.json: {' '.join(str(err).split())}") from err
