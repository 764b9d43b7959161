"""What the merged model's files will hold, decided before any value is computed.

For every tensor ``save_pretrained`` would write: where its starting value comes from (the base
model's files, or the checkpoint's frozen weights where training rewrote them), what changes it
(a LoRA delta, a trained replacement, trained token rows, grown vocabulary rows), its shape and
dtype (from the files' headers), which output shard holds it, and which worker writes that shard.
The layout depends only on the inputs and ``max_shard_size``, never on the number of workers, so
an export written by one process and by eight has the same bytes.

The structure (which modules LoRA wraps, Conv1D or Linear, tied embeddings, the live LoRA config)
comes from the PEFT model built on the meta device, which costs no memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.keys import PEFT_ROOT
from lightning_lora.export.weights import WeightFiles

__all__ = ["Entry", "MergePlan", "Update", "assign_shards", "hf_name", "is_adapter_key", "lora_scale", "parse_size",
           "plan_merge"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int, key: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5 * 10**9 bytes, as ``save_pretrained`` reads ``max_shard_size``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ExportError(f"{key}={size!r} is not a size like '5GB' or '500MB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def hf_name(peft_name: str) -> str:
    """The name the unwrapped Hugging Face model gives a tensor of the PEFT model."""
    name = peft_name.removeprefix(PEFT_ROOT).replace(".token_adapter.base_layer.", ".")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def is_adapter_key(key: str) -> bool:
    """A tensor of the adapter (LoRA, modules_to_save copy, trainable tokens), not of the base model."""
    return ".lora_" in key or ".modules_to_save." in key or ".trainable_tokens_" in key


def lora_scale(config: Any, module: str, rank: int) -> float:
    """The LoRA scale of ``module`` (its alpha_pattern entry, rsLoRA), as PEFT computes it."""
    alpha = config.lora_alpha
    for pattern, value in (config.alpha_pattern or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


@dataclass
class Update:
    """What happens to one output tensor besides a cast."""

    replacement: torch.Tensor | None = None  # a trained tensor that replaces the base's outright
    frozen_key: str | None = None  # start from the checkpoint's frozen weight of this key, not the base's
    lora: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None  # A, B, scale, fan_in_fan_out
    magnitude: torch.Tensor | None = None  # DoRA
    bias: tuple[torch.Tensor, float] | None = None  # lora_bias: lora_B's bias and the scale
    rows: int | None = None  # grow to this many rows (added tokens), as resize_vocab does
    tokens: tuple[list[int], torch.Tensor] | None = None  # trainable tokens: these rows replaced by these values
    zeros: list[int] | None = None  # a bias the merged config adds (bias_slots.py): starts as zeros of this shape


@dataclass
class Entry:
    """One tensor of the output: its key, shape and dtype, known before any value is computed."""

    key: str
    shape: list[int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class MergePlan:
    """Every output tensor, where its value comes from, and the shards that hold them."""

    sources: dict[str, str]  # output key -> base key holding its starting value ("" when replaced outright)
    updates: dict[str, Update]  # output key -> what changes it
    untie: bool  # write the output embeddings and set tie_word_embeddings=False
    entries: list[Entry] = field(default_factory=list)
    shards: list[list[Entry]] = field(default_factory=list)

    def shard_names(self) -> list[str]:
        count = len(self.shards)
        return ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

    @property
    def merged_modules(self) -> int:
        return sum(1 for update in self.updates.values() if update.lora is not None)


def plan_merge(model: Any, trained: dict[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], base: WeightFiles,
               rewritten: set[str], dtype: torch.dtype, max_shard_size: str | int,
               slots: Mapping[str, list[int]] | None = None) -> MergePlan:
    """Decide, for every tensor the merged model saves, its source, its update and its shard.

    Args:
        model: the PEFT model on the meta device.
        trained: the trained tensors, keyed like ``model.state_dict()`` (checked).
        frozen: the frozen weights the checkpoint holds, by the same keys (read lazily).
        base: the base model's weight files.
        rewritten: PEFT-model keys whose value is the checkpoint's frozen weight, not the base's.
        dtype: dtype of the merged floating-point weights.
        max_shard_size: largest output shard.
        slots: bias key -> shape of the biases the merged config adds (see
            :mod:`~lightning_lora.export.bias_slots`): zero, plus the lora bias merged there.
    """
    plan = MergePlan(sources={}, updates=_updates(model, trained, frozen, rewritten), untie=False)
    _plan_embeddings(model, plan)
    _plan_sources(model, plan, base)
    _plan_slots(plan, slots or {})
    plan.entries = _entries(plan, base, frozen, dtype)
    leftovers = [entry.key for entry in plan.entries if is_adapter_key(entry.key)]
    if leftovers:
        raise ExportError(f"{len(leftovers)} adapter tensor(s) would survive the merge, e.g. {leftovers[:3]}; nothing was published")
    plan.shards = _shards(plan.entries, parse_size(max_shard_size))
    return plan


def _updates(model: Any, trained: dict[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], rewritten: set[str]) -> dict[str, Update]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from peft.utils import ModulesToSaveWrapper

    config = model.peft_config["default"]
    updates: dict[str, Update] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
            if "default" in module.lora_A:
                a = trained[f"{name}.lora_A.default.weight"].float()
                b = trained[f"{name}.lora_B.default.weight"].float()
                transposed = module.fan_in_fan_out  # Conv1D stores (in, out)
            else:  # an embedding's pair is (r, vocab) and (dim, r): its delta is (B @ A)^T
                a = trained[f"{name}.lora_embedding_A.default"].float()
                b = trained[f"{name}.lora_embedding_B.default"].float()
                transposed = True
            scale = lora_scale(config, name.removeprefix(PEFT_ROOT), a.shape[0])
            update = Update(lora=(a, b, scale, transposed))
            magnitude = trained.get(f"{name}.lora_magnitude_vector.default.weight")
            if magnitude is not None:
                update.magnitude = magnitude.float()
            updates[f"{hf_name(name)}.weight"] = update
            bias = trained.get(f"{name}.lora_B.default.bias")
            if bias is not None:
                updates[f"{hf_name(name)}.bias"] = Update(bias=(bias.float(), scale))
        elif isinstance(module, ModulesToSaveWrapper):
            for param in dict(module.original_module.named_parameters()):
                updates[f"{hf_name(name)}.{param}"] = Update(replacement=trained[f"{name}.modules_to_save.default.{param}"])
        elif isinstance(module, TrainableTokensLayer) and module.tied_adapter is None and "default" in module.token_indices:
            values = trained[f"{name}.trainable_tokens_delta.default"]
            updates[hf_name(f"{name}.base_layer.weight")] = Update(tokens=(module.token_indices["default"], values))
    # Trained biases (bias="all"/"lora_only") replace the base's; rewritten frozen weights are the
    # starting value of whatever else happens to their tensor.
    for key, value in trained.items():
        if not is_adapter_key(key) and model.get_parameter(key).requires_grad:
            updates.setdefault(hf_name(key), Update()).replacement = value
    for key in sorted(rewritten):
        if key not in frozen:
            raise ExportError(f"the checkpoint holds no frozen weight {key!r}, which the export must take from it")
        updates.setdefault(hf_name(key), Update()).frozen_key = key
    return updates


def _plan_embeddings(model: Any, plan: MergePlan) -> None:
    """Untie a head that no longer equals the input embeddings; grow both to the trained vocabulary."""
    hf_model = model.base_model.model
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False)) and hf_model.get_output_embeddings() is not None
    input_key, output_key = _embedding_keys(hf_model)
    updates = plan.updates
    # A tied head follows what training did to the shared matrix (trained token rows, whose
    # adapters PEFT ties; a rewritten base), but not a LoRA delta or a replacement of either side.
    def changed(key: str | None) -> bool:
        update = updates.get(key) if key is not None else None
        return update is not None and (update.lora is not None or update.replacement is not None)

    plan.untie = tied and (changed(input_key) or changed(output_key))
    vocab = hf_model.get_input_embeddings().weight.shape[0]
    for key in (input_key, output_key):
        if key is not None and (key == input_key or plan.untie or not tied):
            updates.setdefault(key, Update()).rows = vocab


def _embedding_keys(hf_model: Any) -> tuple[str, str | None]:
    names = {id(m): n.replace(".token_adapter.base_layer", "").replace(".base_layer", "") for n, m in hf_model.named_modules()}
    output = hf_model.get_output_embeddings()
    input_key = f"{names[id(hf_model.get_input_embeddings())]}.weight"
    output_key = f"{names[id(output)]}.weight" if output is not None else None
    return input_key, output_key


def _plan_sources(model: Any, plan: MergePlan, base: WeightFiles) -> None:
    """The base tensor each output tensor starts from: the tensors save_pretrained would write,
    less the tied head's duplicate."""
    hf_model = model.base_model.model
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False)) and hf_model.get_output_embeddings() is not None
    input_key, output_key = _embedding_keys(hf_model)
    wanted = dict.fromkeys(hf_name(k) for k in model.state_dict() if not is_adapter_key(k))
    for key in wanted:
        if tied and key == output_key and not plan.untie:
            continue  # written once, as the input embeddings
        update = plan.updates.get(key)
        source = base.resolve(key)
        if source is None and tied and key == output_key:
            source = base.resolve(input_key)  # an untied head starts from the embeddings it was tied to
        if source is None:
            if update is not None and (update.replacement is not None or update.frozen_key is not None):
                plan.sources[key] = ""  # wholly replaced: needs no base value
                continue
            raise ExportError(f"--base-model={str(base.directory)!r}: its files hold no tensor for {key!r}")
        plan.sources[key] = source


def _plan_slots(plan: MergePlan, slots: Mapping[str, list[int]]) -> None:
    """Each added bias right after its weight, as the merged model's ``state_dict`` orders them;
    a lora bias with nowhere to go fails here rather than vanish from the export."""
    for key, shape in slots.items():
        plan.updates.setdefault(key, Update()).zeros = list(shape)
    ordered: dict[str, str] = {}
    for key, source in plan.sources.items():
        ordered[key] = source
        bias = f"{key.removesuffix('.weight')}.bias"
        if key.endswith(".weight") and bias in slots and bias not in plan.sources:
            ordered[bias] = ""
    lost = sorted(key for key, update in plan.updates.items()
                  if (update.bias is not None or update.zeros is not None) and key not in ordered)
    if lost:
        raise ExportError(f"the merged model has no place for the bias(es) {lost[:3]}; nothing was published")
    plan.sources = ordered


def _entries(plan: MergePlan, base: WeightFiles, frozen: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[Entry]:
    """Shape and output dtype of every output tensor, from the base files' headers."""
    entries = []
    for key, source in plan.sources.items():
        update = plan.updates.get(key)
        if not source and update.zeros is not None:
            entries.append(Entry(key, list(update.zeros), dtype))
            continue
        if not source:
            value = update.replacement if update.replacement is not None else frozen[update.frozen_key]
            entries.append(Entry(key, list(value.shape), dtype if value.is_floating_point() else value.dtype))
            continue
        info = base.info(source)
        shape = list(info.shape)
        if update is not None and update.rows is not None and update.rows > shape[0]:
            shape[0] = update.rows
        entries.append(Entry(key, shape, dtype if info.dtype.is_floating_point else info.dtype))
    return entries


def _shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Group output tensors into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def assign_shards(shards: list[list[Entry]], workers: int) -> list[int]:
    """The worker that writes each shard: the largest shards first, each to the least loaded worker."""
    load = [0] * workers
    owner = [0] * len(shards)
    for index in sorted(range(len(shards)), key=lambda i: (-sum(e.nbytes for e in shards[i]), i)):
        worker = min(range(workers), key=lambda w: (load[w], w))
        owner[index] = worker
        load[worker] += sum(e.nbytes for e in shards[index])
    return owner
