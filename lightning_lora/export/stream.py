"""The streaming merger: merge LoRA into a base model larger than memory, one tensor at a time.

The base model's safetensors shards are memory-mapped and read one tensor at a time; the few
tensors LoRA touches get their delta (computed in fp32, cast once); output shards of at most
``max_shard_size`` are written one after another, with the index. Peak memory stays near one
output shard plus the largest tensor plus the trained tensors, whatever the model size.

The structure of the PEFT model (which modules are wrapped, Conv1D or Linear, tied embeddings,
the live LoRA config) comes from the model built on the meta device, which costs no memory.
The arithmetic mirrors PEFT's ``merge``, so both implementations give the same tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lightning_lora.export.merge import ExportError
from lightning_lora.export.tokens import resize_vocab

__all__ = ["MERGE_IMPLS", "MergePlan", "build_meta_peft_model", "choose_merge_impl", "parse_size", "stream_merge"]

_ROOT = "base_model.model."
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9 bytes, as ``save_pretrained`` reads ``max_shard_size``."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ExportError(f"--max-shard-size={size!r} is not a size like '5GB' or '500MB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def base_shards(base_dir: Path) -> dict[str, Path]:
    """The base model's tensors by checkpoint key -> the safetensors file holding them."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: base_dir / file for key, file in weight_map.items()}
    single = base_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {key: single for key in f.keys()}
    return {}


MERGE_IMPLS = ("auto", "peft", "streaming")


def _available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_merge_impl(requested: str, base_dir: str | Path) -> tuple[str, str]:
    """The merge implementation to use, and why.

    ``auto`` streams when the whole-model merge (the base in memory, plus its mapped files)
    would take more than half of the memory available now, and the base is in safetensors.
    """
    if requested not in MERGE_IMPLS:
        raise ExportError(f"--merge-impl={requested!r} is not one of {list(MERGE_IMPLS)}")
    files = base_shards(Path(base_dir))
    if requested == "streaming" and not files:
        raise ExportError(f"--merge-impl=streaming needs safetensors weights in --base-model={str(base_dir)!r}")
    if requested != "auto":
        return requested, "requested"
    if not files:
        return "peft", "the base model has no safetensors files to stream"
    # The whole-model merge holds the base in its own dtype (its size on disk) while the mapped
    # input files stay resident too: about twice the files' size.
    needed, available = 2 * sum(file.stat().st_size for file in set(files.values())), _available_memory()
    verdict = "streaming" if needed > available // 2 else "peft"
    return verdict, f"a whole-model merge needs about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"


def build_meta_peft_model(base_dir: str | Path, lora_config: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The PEFT model of ``lora_config`` on the base's architecture, on the meta device (no memory),
    its embeddings grown to ``vocab_size`` rows when the run added tokens."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_lora.export.checkpoint import lora_config_from_dict

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if vocab_size is not None:
        resize_vocab(base, vocab_size)
    peft_config = lora_config_from_dict({**lora_config, "base_model_name_or_path": str(base_dir)})
    peft_config.init_lora_weights = True  # PiSSA-like inits would run an SVD; the values are overwritten anyway
    peft_config.inference_mode = False  # adapter_config.json says true; the trained tensors are found by requires_grad
    return get_peft_model(base, peft_config, autocast_adapter_dtype=False)


@dataclass
class _Update:
    """What happens to one base tensor: replaced outright, or merged with a LoRA delta."""

    replacement: torch.Tensor | None = None
    lora: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None  # A, B, scale, fan_in_fan_out
    magnitude: torch.Tensor | None = None  # DoRA
    base_override: torch.Tensor | None = None  # the checkpoint's frozen weight, merged instead of the base's
    rows: int | None = None  # grow the base tensor to this many rows (added tokens), as resize_vocab does
    tokens: tuple[list[int], torch.Tensor] | None = None  # trainable tokens: these rows replaced by these values


@dataclass
class MergePlan:
    """Every output tensor and where its value comes from."""

    sources: dict[str, str]  # output key -> base checkpoint key holding its starting value
    updates: dict[str, _Update]  # output key -> what changes it
    untie: bool  # write the output embeddings and set tie_word_embeddings=False


def _lora_scale(config: Any, module: str, rank: int) -> float:
    alpha = config.lora_alpha
    for pattern, value in (config.alpha_pattern or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def plan_merge(model: Any, trained: dict[str, torch.Tensor], base_keys: set[str], frozen_from_checkpoint: bool) -> MergePlan:
    """Decide, for every tensor the merged model saves, its source and its update."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from peft.utils import ModulesToSaveWrapper

    config = model.peft_config["default"]
    hf_model = model.base_model.model
    prefix = f"{hf_model.base_model_prefix}."
    updates: dict[str, _Update] = {}
    sources: dict[str, str] = {}

    def hf_name(peft_name: str) -> str:
        """The name the unwrapped model gives a tensor of the PEFT model."""
        name = peft_name.removeprefix(_ROOT).replace(".token_adapter.base_layer.", ".")
        return name.replace(".base_layer.", ".").replace(".original_module.", ".")

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = trained[f"{name}.lora_A.default.weight"].float()
            b = trained[f"{name}.lora_B.default.weight"].float()
            update = _Update(lora=(a, b, _lora_scale(config, name.removeprefix(_ROOT), a.shape[0]), module.fan_in_fan_out))
            magnitude = trained.get(f"{name}.lora_magnitude_vector.default.weight")
            if magnitude is not None:
                update.magnitude = magnitude.float()
            updates[f"{hf_name(name)}.weight"] = update
        elif isinstance(module, ModulesToSaveWrapper):
            for param in dict(module.original_module.named_parameters()):
                updates[f"{hf_name(name)}.{param}"] = _Update(replacement=trained[f"{name}.modules_to_save.default.{param}"])
        elif isinstance(module, TrainableTokensLayer) and module.tied_adapter is None and "default" in module.token_indices:
            values = trained[f"{name}.trainable_tokens_delta.default"]
            updates[hf_name(f"{name}.base_layer.weight")] = _Update(tokens=(module.token_indices["default"], values))
    for key, value in trained.items():  # trained biases (bias="all"/"lora_only"), frozen weights from the checkpoint
        if _is_adapter_key(key):
            continue
        out = hf_name(key)
        trainable = model.get_parameter(key).requires_grad
        if out in updates and not trainable and frozen_from_checkpoint:
            updates[out].base_override = value  # e.g. the PiSSA-rewritten base of a LoRA module
        elif trainable or frozen_from_checkpoint:
            updates[out] = _Update(replacement=value)

    # The tensors save_pretrained would write: the unwrapped model's state dict less tied duplicates.
    wanted = [hf_name(k) for k in model.state_dict() if not _is_adapter_key(k)]
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False)) and hf_model.get_output_embeddings() is not None
    names = {id(m): n.replace(".token_adapter.base_layer", "") for n, m in hf_model.named_modules()}
    input_key = f"{names[id(hf_model.get_input_embeddings())]}.weight"
    output_key = f"{names[id(hf_model.get_output_embeddings())]}.weight" if hf_model.get_output_embeddings() is not None else None
    # A tied head follows trained token rows of the input embeddings (PEFT ties their adapters),
    # but not a replaced input embedding (modules_to_save) nor an update of its own.
    follows = input_key not in updates or updates[input_key].tokens is not None
    untie = tied and (output_key in updates or not follows)
    # Embeddings grown for added tokens: new rows as resize_vocab makes them (a no-op otherwise).
    vocab = hf_model.get_input_embeddings().weight.shape[0]
    for key in (input_key, output_key):
        if key is not None and (key == input_key or untie or not tied):
            updates.setdefault(key, _Update()).rows = vocab
    for key in wanted:
        if tied and key == output_key and not untie:
            continue  # written once, as the input embeddings
        source = key if key in base_keys else key.removeprefix(prefix) if key.removeprefix(prefix) in base_keys else None
        if source is None and tied and key == output_key:
            source = input_key if input_key in base_keys else input_key.removeprefix(prefix)
        if source is None or source not in base_keys:
            if key in updates and updates[key].replacement is not None:
                sources[key] = ""  # wholly replaced: needs no base value
                continue
            raise ExportError(f"the base model's files hold no tensor for {key!r}; use --merge-impl peft")
        sources[key] = source
    return MergePlan(sources=sources, updates=updates, untie=untie)


def _is_adapter_key(key: str) -> bool:
    """A tensor of the adapter (LoRA, modules_to_save copy, trainable tokens), not of the base model."""
    return ".lora_" in key or ".modules_to_save." in key or ".trainable_tokens_" in key


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
def _merged_value(
    base: torch.Tensor | None, update: _Update | None, dtype: torch.dtype, workspace: _Workspace | None = None
) -> torch.Tensor:
    """One output tensor: PEFT's merge arithmetic in fp32, then one cast (floating tensors only).

    With a ``workspace`` the result may live in one of its buffers: use it before the next call.
    """
    workspace = workspace or _Workspace()
    if update is None:
        if not base.is_floating_point() or base.dtype == dtype:
            return base
        return workspace.take("out", base.shape, dtype).copy_(base)
    if update.replacement is not None:
        return update.replacement.to(dtype)
    source = update.base_override if update.base_override is not None else base
    if update.rows is not None and update.rows > source.shape[0]:
        # resize_vocab's new rows: the mean of the old ones, in the base's dtype.
        mean = source.float().mean(dim=0, keepdim=True).to(source.dtype)
        source = torch.cat([source, mean.expand(update.rows - source.shape[0], -1)])
    weight = workspace.take("weight", source.shape, torch.float32).copy_(source)
    if update.lora is not None:
        a, b, scale, fan_in_fan_out = update.lora
        delta = torch.matmul(b, a, out=workspace.take("delta", (b.shape[0], a.shape[1]), torch.float32)).mul_(scale)
        weight.add_(delta.T if fan_in_fan_out else delta)
        if update.magnitude is not None:
            # DoRA: rescale each output row of W + delta to the trained magnitude (PEFT's dora merge).
            norm = torch.linalg.norm(weight.T if fan_in_fan_out else weight, dim=1)
            factor = (update.magnitude / norm).view(-1, 1)
            return (factor.T * weight if fan_in_fan_out else factor * weight).to(dtype)
    if update.tokens is not None:
        indices, values = update.tokens
        weight.index_copy_(0, torch.tensor(indices), values.float())
    return workspace.take("out", weight.shape, dtype).copy_(weight)


# safetensors' names of the dtypes a checkpoint holds.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}


@dataclass
class _Entry:
    """One tensor of the output: its key, shape and dtype, known before any value is computed."""

    key: str
    shape: list[int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _entries(plan: MergePlan, base_files: dict[str, Path], dtype: torch.dtype) -> list[_Entry]:
    """Shape and output dtype of every output tensor, read from the base files' JSON headers
    (nothing is memory-mapped for this)."""
    headers: dict[Path, dict[str, Any]] = {}
    entries = []
    for key, source in plan.sources.items():
        if not source:
            replacement = plan.updates[key].replacement
            entries.append(_Entry(key, list(replacement.shape), dtype))
            continue
        file = base_files[source]
        if file not in headers:
            with file.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                headers[file] = json.loads(f.read(length))
        info = headers[file][source]
        base_dtype = _TORCH_DTYPES[info["dtype"]]
        shape = list(info["shape"])
        rows = plan.updates[key].rows if key in plan.updates else None
        if rows is not None and rows > shape[0]:
            shape[0] = rows
        entries.append(_Entry(key, shape, dtype if base_dtype.is_floating_point else base_dtype))
    return entries


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Group output tensors into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _write_shard(path: Path, entries: list[_Entry], values: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file tensor by tensor: the header (every offset is known in advance),
    then each value as it is computed. Nothing but the tensor being written is held in memory,
    where ``safetensors.torch.save_file`` would hold the whole shard, and a byte copy of it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.key] = {"dtype": _ST_DTYPES[entry.dtype], "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry, value in zip(entries, values, strict=True):
            if value.dtype != entry.dtype or list(value.shape) != entry.shape:
                raise ExportError(f"{entry.key!r} came out as {value.dtype} {list(value.shape)}, planned {entry.dtype} {entry.shape}")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def stream_merge(
    model: Any,
    trained: dict[str, torch.Tensor],
    base_dir: Path,
    output_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str | int,
    frozen_from_checkpoint: bool = False,
) -> dict[str, int]:
    """Write the merged model's weights, config and index into ``output_dir``.

    Args:
        model: the PEFT model on the meta device (see :func:`build_meta_peft_model`).
        trained: trained tensors keyed like ``model.state_dict()`` (already checked).
        base_dir: the base model directory (safetensors).
        output_dir: the merged model directory to fill.
        dtype: dtype of the merged weights.
        max_shard_size: largest output shard.
        frozen_from_checkpoint: frozen tensors in ``trained`` replace the base's.

    Returns:
        Counts: merged modules, replaced tensors, output shards.
    """
    base_files = base_shards(base_dir)
    if not base_files:
        raise ExportError(f"--base-model={str(base_dir)!r} has no safetensors weights; use --merge-impl peft")
    plan = plan_merge(model, trained, set(base_files), frozen_from_checkpoint)
    entries = _entries(plan, base_files, dtype)
    shards = _shards(entries, parse_size(max_shard_size))
    output_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}

    workspace = _Workspace()

    def values(shard: list[_Entry]) -> Iterator[torch.Tensor]:
        """Each output tensor in turn: its base tensor read, merged, yielded (and written before
        the next one reuses the workspace). The base file is opened (memory-mapped) per tensor,
        so its pages are unmapped again right after."""
        for entry in shard:
            source = plan.sources[entry.key]
            if not source:
                yield _merged_value(None, plan.updates[entry.key], dtype, workspace)
                continue
            with safe_open(base_files[source], "pt") as f:
                yield _merged_value(f.get_tensor(source), plan.updates.get(entry.key), dtype, workspace)

    for number, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(output_dir / name, shard, values(shard))
        weight_map.update({entry.key: name for entry in shard})
    total = sum(entry.nbytes for entry in entries)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_config(model, base_dir, output_dir, dtype, plan.untie)
    merged_modules = sum(1 for u in plan.updates.values() if u.lora is not None)
    replaced = sum(1 for u in plan.updates.values() if u.replacement is not None)
    return {"merged_modules": merged_modules, "replaced_tensors": replaced, "shards": len(shards)}


def _write_config(model: Any, base_dir: Path, output_dir: Path, dtype: torch.dtype, untie: bool) -> None:
    """config.json (dtype, untied head) and the base's generation_config.json, as save_pretrained writes them."""
    from transformers import GenerationConfig

    config = model.base_model.model.config
    config.dtype = dtype
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(output_dir)
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(output_dir)
