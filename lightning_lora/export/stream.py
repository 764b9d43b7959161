"""Writing the merged shards one tensor at a time, and the streaming merger that computes them.

For each output tensor of a shard (see :mod:`lightning_lora.export.plan`): read its starting
value (memory-mapped from the base's safetensors, or the checkpoint's rewritten frozen weight),
apply its update in fp32, cast once, write, and move on. Peak memory stays near the largest tensor
(in fp32) plus the trained tensors, whatever the model size, and each worker of a shared export
writes only its own shards. The arithmetic mirrors PEFT's ``merge`` (a property test compares them).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.plan import Entry, MergePlan, Update
from lightning_lora.export.tokens import mean_rows
from lightning_lora.export.trust import copy_code_files
from lightning_lora.export.weights import SAFETENSORS_DTYPES, WeightFiles

__all__ = ["merged_value", "streamed_values", "write_config", "write_index", "write_shards"]

_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class _Workspace:
    """Reusable buffers for the per-tensor arithmetic.

    Every fresh multi-megabyte tensor costs page faults (the allocator returns large blocks to the
    kernel when they are freed); on the 1.1B benchmark that was most of the merge time. One buffer
    per role, grown to the largest tensor, is filled again for each tensor instead.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, role: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


@torch.no_grad()
def merged_value(start: torch.Tensor | None, update: Update | None, dtype: torch.dtype, workspace: _Workspace | None = None) -> torch.Tensor:
    """One output tensor: PEFT's merge arithmetic in fp32 on its starting value, then one cast
    (floating tensors only). With a ``workspace`` the result may live in one of its buffers: use
    it before the next call."""
    workspace = workspace or _Workspace()
    grows = update is not None and update.rows is not None and start is not None and update.rows > start.shape[0]
    if update is None or (update.replacement is None and update.lora is None and update.bias is None
                          and not grows and update.tokens is None and update.magnitude is None):
        if not start.is_floating_point() or start.dtype == dtype:
            return start
        return workspace.take("out", start.shape, dtype).copy_(start)
    if update.replacement is not None:
        return update.replacement.to(dtype)
    if grows:
        start = mean_rows(start, update.rows)
    weight = workspace.take("weight", start.shape, torch.float32).copy_(start)
    if update.lora is not None:
        a, b, scale, fan_in_fan_out = update.lora
        delta = torch.matmul(b, a, out=workspace.take("delta", (b.shape[0], a.shape[1]), torch.float32)).mul_(scale)
        weight.add_(delta.T if fan_in_fan_out else delta)
        if update.magnitude is not None:
            # DoRA: rescale each output row of W + delta to the trained magnitude (PEFT's dora merge).
            norm = torch.linalg.norm(weight.T if fan_in_fan_out else weight, dim=1)
            factor = (update.magnitude / norm).view(-1, 1)
            return (factor.T * weight if fan_in_fan_out else factor * weight).to(dtype)
    if update.bias is not None:
        lora_bias, scale = update.bias
        weight.add_(lora_bias, alpha=scale)
    if update.tokens is not None:
        indices, values = update.tokens
        weight.index_copy_(0, torch.tensor(indices), values.float())
    return workspace.take("out", weight.shape, dtype).copy_(weight)


def _write_shard(path: Path, entries: list[Entry], values: Iterator[torch.Tensor]) -> dict[str, Any]:
    """Write a safetensors file tensor by tensor: the header (every offset is known in advance),
    then each value as it is computed. Nothing but the tensor being written is held in memory,
    where ``safetensors.torch.save_file`` would hold the whole shard, and a byte copy of it.
    Returns the file's sha256 and size, hashed as it is written (no second read for export.json)."""
    import hashlib

    digest = hashlib.sha256()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.key] = {"dtype": _ST_NAMES[entry.dtype], "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    size = 0
    with path.open("wb") as f:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        for entry, value in zip(entries, values, strict=True):
            if value.dtype != entry.dtype or list(value.shape) != entry.shape:
                raise ExportError(f"{entry.key!r} came out as {value.dtype} {list(value.shape)}, planned {entry.dtype} {entry.shape}")
            data = value.contiguous().reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            digest.update(data)
            size += data.nbytes
    return {"sha256": digest.hexdigest(), "size": size}


def streamed_values(plan: MergePlan, base: WeightFiles, frozen: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Callable[[Entry], torch.Tensor]:
    """The streaming merger's value of each planned tensor: its start read (memory-mapped from the
    base file, or the checkpoint's rewritten frozen weight), merged, cast. The base file is mapped
    per tensor, so its pages are unmapped again right after; the result may live in a reused
    buffer, valid until the next call."""
    workspace = _Workspace()

    def value(entry: Entry) -> torch.Tensor:
        update = plan.updates.get(entry.key)
        source = plan.sources[entry.key]
        if update is not None and update.frozen_key is not None:
            start = frozen[update.frozen_key]
        elif update is not None and update.zeros is not None:
            start = torch.zeros(update.zeros)  # a bias the merged config adds
        else:
            start = base.get(source) if source else None
        return merged_value(start, update, dtype, workspace)

    return value


def write_shards(plan: MergePlan, shard_numbers: list[int], value: Callable[[Entry], torch.Tensor],
                 output_dir: Path) -> dict[str, dict[str, Any]]:
    """Write the shards ``shard_numbers`` (indices into ``plan.shards``) into ``output_dir``, each
    tensor as ``value(entry)`` gives it, one at a time. Returns each file's name -> sha256 and size."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = plan.shard_names()
    written = {}
    for number in shard_numbers:
        shard = plan.shards[number]
        written[names[number]] = _write_shard(output_dir / names[number], shard, (value(entry) for entry in shard))
    return written


def write_index(plan: MergePlan, output_dir: Path) -> None:
    """``model.safetensors.index.json`` for a sharded export (``save_pretrained``'s layout)."""
    if len(plan.shards) == 1:
        return
    names = plan.shard_names()
    weight_map = {entry.key: names[i] for i, shard in enumerate(plan.shards) for entry in shard}
    index = {"metadata": {"total_size": sum(entry.nbytes for entry in plan.entries)}, "weight_map": weight_map}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(model: Any, base_dir: Path, output_dir: Path, dtype: torch.dtype, untie: bool,
                 switches: tuple[str, ...] = ()) -> None:
    """config.json (dtype, untied head, the bias ``switches`` turned on) and the base's
    generation_config.json, as save_pretrained writes them."""
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(model.base_model.model.config)
    config.dtype = dtype
    if untie:
        config.tie_word_embeddings = False
    for name in switches:  # the layers that hold a lora bias get a bias (bias_slots.py)
        setattr(config.get_text_config(), name, True)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output_dir)
    copy_code_files(base_dir, output_dir)  # a custom model trusted by name: its code, as save_pretrained ships it
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(output_dir)
