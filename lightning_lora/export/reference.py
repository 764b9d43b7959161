"""The verification's reference: the model that was trained, rebuilt from the sources on disk.

The reference never reads a file the exporter wrote and never reuses its arithmetic. Its
structure is PEFT's (``get_peft_model`` on the meta device, so nothing is allocated until a
module is needed); its tensors come from the sources:

- trained tensors (LoRA, DoRA magnitudes, ``modules_to_save``, trainable tokens) from the checkpoint;
- every frozen weight from the base directory, except where the checkpoint holds a frozen weight
  that differs from it: then the base was rewritten during training (PiSSA, OLoRA, LoftQ, ... or
  anything else) and the checkpoint's value is the trained model's. This is decided from the data,
  independently of the exporter's list of initialisations.

:class:`Materializer` loads the parameters of one module (a decoder block, the embeddings) onto
the compute device in fp32 and puts them back on the meta device afterwards, which is what keeps
verification memory near two decoder blocks whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.checkpoint import frozen_rows
from lightning_lora.export.plan import hf_name
from lightning_lora.export.tokens import mean_rows
from lightning_lora.export.weights import WeightFiles

__all__ = ["Materializer", "TrainedModel", "same_values"]

# Rows compared to tell a rewritten base weight from a copy of the base: an initialisation that
# rewrites a weight (a rank-r piece subtracted, a quantized residual) changes every row.
_SAMPLE_ROWS = 3


class TrainedModel:
    """The trained model's tensors, by PEFT-model key, each read from its source when asked for.

    Args:
        peft_model: the PEFT model of the run on the meta device.
        trained: the checkpoint's trained tensors, keyed like the PEFT model.
        frozen: frozen weights the checkpoint holds (may be empty), read lazily.
        base: the base model's weight files.
    """

    def __init__(self, peft_model: Any, trained: dict[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], base: WeightFiles) -> None:
        self.peft = peft_model
        self.trained = trained
        self.frozen = frozen
        self.base = base
        self.rewritten: set[str] = set()
        self.shapes = {name: tuple(p.shape) for name, p in peft_model.named_parameters(remove_duplicate=False)}
        names: dict[int, list[str]] = {}
        for name, param in peft_model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        # Every name of a tied parameter (a tied head is stored only as the input embeddings).
        self.aliases = {name: group for group in names.values() for name in group}

    def value(self, key: str) -> torch.Tensor:
        """The tensor ``key`` of the trained model, in the dtype its source stores it in."""
        if key in self.trained:
            return self.trained[key]
        shape = self.shapes.get(key)
        base_key = next((hf_name(k) for k in self.aliases.get(key, [key]) if hf_name(k) in self.base), hf_name(key))
        from_base = self._base(base_key, shape) if base_key in self.base else None
        if key in self.frozen:
            if from_base is None or not self._same_as_base(key, from_base):
                self.rewritten.add(key)
                return self.frozen[key]
        if from_base is None:
            raise ExportError(f"the trained model's tensor {base_key!r} is neither in --base-model={str(self.base.directory)!r} nor in the checkpoint")
        return from_base

    def _base(self, key: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        value = self.base.get(key)
        if shape is not None and value.dim() >= 1 and value.shape[0] < shape[0]:
            value = mean_rows(value, shape[0])  # the vocabulary grown for added tokens, as in training
        return value


    def _same_as_base(self, key: str, base: torch.Tensor) -> bool:
        """Whether the checkpoint's frozen weight is the base's, up to the precision either is
        stored or was loaded in (a bf16 run of an fp32 base, an fp32 run exported onto a bf16 copy,
        a bf16 base upcast to fp32 for QLoRA training), judged on a
        few rows read from the checkpoint (an initialisation that rewrites a weight changes every row)."""
        if base.dim() == 0 or base.shape[0] <= _SAMPLE_ROWS:
            stored = self.frozen[key]
            if stored.shape != base.shape:
                return False
        else:
            rows = torch.linspace(0, base.shape[0] - 1, _SAMPLE_ROWS).long().tolist()
            stored, base = frozen_rows(self.frozen, key, rows), base[rows]
            if stored.shape != base.shape:
                return False
        return same_values(stored, base)


def same_values(stored: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether a checkpoint's frozen ``stored`` values are ``base``'s, exactly, up to the precision
    either is stored or was loaded in: a cast is exact and deterministic, so no tolerance is needed."""
    if torch.equal(stored, base.to(stored.dtype)) or torch.equal(stored.to(base.dtype), base):
        return True
    # Loaded in 16 bits and upcast for training (QLoRA's k-bit preparation keeps such values in fp32).
    return any(torch.equal(stored, base.to(low).to(stored.dtype)) for low in (torch.bfloat16, torch.float16))


class Materializer:
    """Loads the meta-device parameters of one module at a time, and puts them back.

    Released tensors are kept for the next load of the same shape (the next decoder block has
    the same ones) and filled in place: a fresh multi-megabyte tensor costs more in page faults
    than copying and upcasting the weight into it. ``release()`` of everything empties that pool.

    Args:
        model: a model whose parameters are on the meta device.
        value: the tensor of a parameter by its name (any of its names, for a tied one); may
            return ``None`` for a name it does not know, to try the parameter's other names.
        device: where to compute.
    """

    def __init__(self, model: torch.nn.Module, value: Callable[[str], torch.Tensor | None], device: torch.device) -> None:
        self.value = value
        self.device = device
        self.names: dict[int, list[str]] = {}
        self.owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        self.meta: dict[int, torch.nn.Parameter] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for leaf, param in module._parameters.items():
                if param is None:
                    continue
                key = id(param)
                self.meta.setdefault(key, param)
                self.owners.setdefault(key, [])
                if (module, leaf) not in self.owners[key]:
                    self.owners[key].append((module, leaf))
                name = f"{module_name}.{leaf}" if module_name else leaf
                if name not in self.names.setdefault(key, []):
                    self.names[key].append(name)
        self.loaded: dict[int, torch.nn.Parameter] = {}  # meta id -> the loaded parameter
        self.current = {key: key for key in self.meta}  # id of the registered parameter -> meta id
        self.pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def _ids(self, module: torch.nn.Module) -> list[int]:
        ids = []
        for _, sub in module.named_modules(remove_duplicate=False):
            for param in sub._parameters.values():
                if param is not None:
                    ids.append(self.current[id(param)])
        return list(dict.fromkeys(ids))

    @torch.no_grad()
    def load(self, module: torch.nn.Module) -> None:
        """Give every parameter inside ``module`` its value, in fp32 on the device."""
        for key in self._ids(module):
            if key in self.loaded:
                continue
            tensor = None
            for name in self.names[key]:
                tensor = self.value(name)
                if tensor is not None:
                    break
            if tensor is None:
                raise ExportError(f"no source holds the tensor {self.names[key][0]!r}")
            expected = tuple(self.meta[key].shape)
            if tuple(tensor.shape) != expected:
                raise ExportError(f"{self.names[key][0]!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
            target = torch.float32 if tensor.is_floating_point() else tensor.dtype
            free = self.pool.get((expected, target))
            data = free.pop() if free else torch.empty(expected, dtype=target, device=self.device)
            param = torch.nn.Parameter(data.copy_(tensor), requires_grad=False)
            for owner, leaf in self.owners[key]:
                owner._parameters[leaf] = param
            self.loaded[key] = param
            self.current[id(param)] = key

    def release(self, module: torch.nn.Module | None = None) -> None:
        """Put the parameters inside ``module`` back on the meta device (their storage is kept for
        the next load); without a module, all of them, and the kept storage is freed."""
        keys = list(self.loaded) if module is None else [key for key in self._ids(module) if key in self.loaded]
        for key in keys:
            for owner, leaf in self.owners[key]:
                owner._parameters[leaf] = self.meta[key]
            param = self.loaded.pop(key)
            del self.current[id(param)]
            if module is not None:
                self.pool.setdefault((tuple(param.shape), param.dtype), []).append(param.data)
        if module is None:
            self.pool.clear()
