"""QLoRA: a run that trained on a 4-bit (bitsandbytes NF4 or FP4) base, as the export reads it.

A checkpoint keeps each quantized linear layer as bitsandbytes stores it: the packed 4-bit
``weight`` and beside it its quantization state (``weight.absmax``, ``weight.quant_map``, with
double quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
``weight.quant_state.bitsandbytes__nf4`` holding the rest). That *is* the base training saw, so
nothing is re-quantized: the ``dequantized`` merge base is bitsandbytes' own ``dequantize_4bit``
of those bytes, cast to the compute dtype, which is what ``Linear4bit`` multiplies with in every
forward and backward pass. The ``original`` merge base is the 16-bit base directory.

:class:`QuantizedBase` presents the checkpoint's frozen weights to the rest of the export with the
4-bit ones either dequantized or left out (then the base directory's weight is used), and the
state's components hidden. :class:`QuantizedLinear` runs a 4-bit layer as training ran it, for
the drift measurement (:mod:`~lightning_lora.export.drift`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lightning_lora.dtypes import DTYPES, canonical_dtype
from lightning_lora.errors import ExportError

__all__ = [
    "MERGE_BASES",
    "QUANT_TYPES",
    "QuantizedBase",
    "QuantizedLinear",
    "check_quantization_settings",
    "describe_quantization",
    "keep_training_layout",
    "quantization_record",
    "quantized_entries",
    "quantized_state",
]

QUANT_TYPES = ("nf4", "fp4")
MERGE_BASES = ("dequantized", "original")
# The entry of a 4-bit weight's state that names its quantization type; the weight's key is what precedes it.
_MARK = ".quant_state.bitsandbytes__"


def _needs_bitsandbytes(what: str) -> Any:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ExportError(f"{what} needs bitsandbytes: pip install 'lightning-lora[qlora]'") from err
    return bitsandbytes


def check_quantization_settings(quantization: str | None, init_lora_weights: Any, use_dora: bool) -> None:
    """Refuse, where the module is built, a quantization the export could not reproduce."""
    from lightning_lora.export.inits import rewrites_base

    if quantization is None:
        return
    if str(quantization).lower() in ("int8", "8bit", "llm.int8", "8-bit"):
        raise ValueError(f"model.quantization={quantization!r}: LLM.int8 quantizes the activations too, so no merged "
                         f"model can reproduce what was trained; use one of {list(QUANT_TYPES)}")
    if quantization not in QUANT_TYPES:
        raise ValueError(f"model.quantization={quantization!r} is not one of {list(QUANT_TYPES)} (or null)")
    if rewrites_base({"init_lora_weights": init_lora_weights}):
        raise ValueError(f"model.init_lora_weights={init_lora_weights!r} rewrites the base weights, which a "
                         f"model.quantization={quantization!r} base holds quantized; use the default initialisation")
    if use_dora:
        raise ValueError(f"model.use_dora=true is not supported with model.quantization={quantization!r}")
    _needs_bitsandbytes(f"model.quantization={quantization!r}")


def quantization_record(model: Any) -> dict[str, Any] | None:
    """How a (PEFT-wrapped) Hugging Face model's base was quantized, from its config; ``None`` if it was not.

    Raises:
        ValueError: 8-bit or another quantization whose trained model no merged model reproduces.
    """
    config = getattr(model, "config", None)
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    if settings.get("load_in_8bit"):
        raise ValueError("the base is loaded in 8 bits (LLM.int8), which quantizes the activations too: no merged model "
                         "can reproduce what was trained; load it in 4 bits (nf4 or fp4)")
    if settings.get("quant_method") != "bitsandbytes" or not settings.get("load_in_4bit"):
        raise ValueError(f"the base is quantized with {settings.get('quant_method')!r}; only bitsandbytes 4-bit "
                         "(nf4, fp4) can be exported")
    import bitsandbytes

    return {
        "method": "bitsandbytes",
        "quant_type": settings.get("bnb_4bit_quant_type", "fp4"),
        "double_quant": bool(settings.get("bnb_4bit_use_double_quant", False)),
        "compute_dtype": canonical_dtype(str(settings.get("bnb_4bit_compute_dtype") or "float32"), "bnb_4bit_compute_dtype"),
        "quant_storage": str(settings.get("bnb_4bit_quant_storage") or "uint8"),
        "bitsandbytes": bitsandbytes.__version__,
    }


def describe_quantization(record: dict[str, Any] | None) -> str:
    """A quantization record in words, e.g. ``nf4, double quantization, compute fp32``."""
    if not record:
        return "4-bit (not recorded: see the checkpoint's quantization state)"
    return (f"{record.get('quant_type')}{', double quantization' if record.get('double_quant') else ''}, "
            f"compute {record.get('compute_dtype')}")


def _linear4bit_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, Linear4bit)]


def keep_training_layout(module: torch.nn.Module) -> int:
    """Keep every 4-bit layer inside ``module`` in the layout it trains in; returns how many there are.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight in place for another
    kernel the first time it runs in eval mode (validation): it undoes double quantization, fails
    on a layer whose output size is not a multiple of 32, and saving a checkpoint packs it back by
    quantizing the scales again (an inverse bitsandbytes calls best-effort). Switched off, eval
    runs training's own arithmetic and the weights stay as training multiplies with them.
    """
    layers = _linear4bit_layers(module)
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def quantized_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's packed weight and quantization state inside ``module``, keyed as its state
    dict keys them (``<layer>.weight``, ``<layer>.weight.absmax``, ...), on the CPU: what a module in
    memory holds, in the layout a checkpoint stores (bitsandbytes' own ``_save_to_state_dict``)."""
    state = {}
    for name, layer in _linear4bit_layers(module):
        entries: dict[str, Any] = {}
        layer._save_to_state_dict(entries, f"{name}." if name else "", keep_vars=False)
        for key, value in entries.items():
            if key.startswith(f"{name}.weight" if name else "weight") and isinstance(value, torch.Tensor):
                state[key] = value.detach().cpu()
    return state


def quantized_entries(keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that belong to a 4-bit weight: the packed weight and its state."""
    keys = list(keys)
    weights = {key.split(_MARK)[0] for key in keys if _MARK in key}
    return {key for key in keys if key in weights or _MARK in key or key.rsplit(".", 1)[0] in weights}


def _quantized_weights(frozen: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """4-bit weight key -> its quantization type, found by the state entry beside each."""
    found = {}
    for key in frozen:
        if _MARK in key:
            weight, kind = key.split(_MARK)
            found[weight] = kind
    return found


class QuantizedBase(Mapping[str, torch.Tensor]):
    """The checkpoint's frozen weights with each 4-bit weight dequantized (``merge_base="dequantized"``)
    or left out (``"original"``: the base directory's then), and the quantization state hidden.

    Args:
        frozen: the checkpoint's frozen weights, as stored.
        merge_base: ``"dequantized"`` or ``"original"``.
        compute_dtype: the dtype training multiplied in (the quantization record's).
    """

    def __init__(self, frozen: Mapping[str, torch.Tensor], merge_base: str, compute_dtype: torch.dtype) -> None:
        self.frozen = frozen
        self.merge_base = merge_base
        self.compute_dtype = compute_dtype
        self.weights = _quantized_weights(frozen)
        self._parts: dict[str, list[str]] = {weight: [] for weight in self.weights}
        for key in frozen:  # <weight>.absmax, ..., <weight>.quant_state.bitsandbytes__nf4
            owner = key.split(_MARK)[0] if _MARK in key else key.rsplit(".", 1)[0]
            if owner in self._parts:
                self._parts[owner].append(key)
        self._state_keys = {part for parts in self._parts.values() for part in parts}
        self._hidden = self._state_keys | (set(self.weights) if merge_base == "original" else set())
        self.transposed: set[str] = set()

    def view(self, merge_base: str) -> QuantizedBase:
        """The same checkpoint for another merge base: its parsing and orientation are shared."""
        other = copy.copy(self)
        other.merge_base = merge_base
        other._hidden = self._state_keys | (set(self.weights) if merge_base == "original" else set())
        return other

    def orient(self, model: torch.nn.Module) -> None:
        """Match each 4-bit weight to the layout of the (meta) ``model``'s layer: transformers loads a
        GPT-2 ``Conv1D`` (weight stored (in, out)) as a 4-bit ``Linear4bit`` (out, in). Decided by
        the layer's type: a square layer's shape cannot tell."""
        import bitsandbytes.functional as F

        for name, module in model.named_modules():
            key = f"{name}.weight"
            if key not in self.weights:
                continue
            want = tuple(module.weight.shape)
            have = tuple(F.QuantState.from_dict(dict(self.state(key)[1]), device=torch.device("cpu")).shape)
            if type(module).__name__ == "Conv1D":
                self.transposed.add(key)
                have = tuple(reversed(have))
            if have != want:
                raise ExportError(f"the checkpoint's 4-bit weight {key!r} has shape {have}, the base model's is {tuple(want)}: "
                                  "--base-model is not the model this checkpoint was trained from")

    @staticmethod
    def read(frozen: Mapping[str, torch.Tensor], quantization: dict[str, Any] | None) -> QuantizedBase | None:
        """The checkpoint's frozen weights with their 4-bit ones dequantized, or ``None`` if it holds none."""
        if not _quantized_weights(frozen):
            return None
        _needs_bitsandbytes("a checkpoint of a 4-bit base")
        compute = DTYPES[(quantization or {}).get("compute_dtype", "fp32")]
        return QuantizedBase(frozen, "dequantized", compute)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._hidden:
            raise KeyError(key)
        if key in self.weights:
            return self.dequantize(key)
        return self.frozen[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key in self.frozen if key not in self._hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.frozen and key not in self._hidden

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        return self[key][indices]

    def state(self, key: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The packed 4-bit weight ``key`` and its quantization state, as the checkpoint holds them."""
        return self.frozen[key], {part[len(key) + 1:]: self.frozen[part] for part in self._parts[key]}

    @torch.no_grad()
    def dequantize(self, key: str) -> torch.Tensor:
        """The weight ``key`` as training multiplied with it: bitsandbytes' dequantization in the compute dtype."""
        import bitsandbytes.functional as F

        packed, parts = self.state(key)
        quant_state = F.QuantState.from_dict(dict(parts), device=torch.device("cpu"))
        weight = F.dequantize_4bit(packed.cpu(), quant_state).to(self.compute_dtype)
        return weight.T.contiguous() if key in self.transposed else weight


class QuantizedLinear(torch.nn.Module):
    """A 4-bit linear layer rebuilt from a checkpoint's bytes and run by bitsandbytes' own
    ``Linear4bit``, as training ran it; used in place of the meta ``nn.Linear`` of the trained
    model when drift is measured. Only the bias (if any) is a parameter, loaded like any other.
    """

    def __init__(self, layer: torch.nn.Module, base: QuantizedBase, key: str) -> None:
        super().__init__()
        if isinstance(layer, torch.nn.Linear):
            self.in_features, self.out_features = layer.in_features, layer.out_features
        elif type(layer).__name__ == "Conv1D":  # transformers' (in, out) linear layer (GPT-2)
            self.in_features, self.out_features = layer.weight.shape
        else:
            raise ExportError(f"the checkpoint holds {key!r} in 4 bits, but the base model's layer there is a "
                              f"{type(layer).__name__}, not a linear layer")
        self.weight_key, self.base = key, base
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        packed, parts = self.base.state(self.weight_key)
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None, device=x.device,
                                  compute_dtype=self.base.compute_dtype, quant_type=self.base.weights[self.weight_key])
        keep_training_layout(layer)
        layer.weight = bnb.nn.Params4bit.from_prequantized(data=packed.to(x.device), quantized_stats=dict(parts),
                                                           requires_grad=False, device=x.device)
        if self.bias is not None:
            layer.bias = torch.nn.Parameter(self.bias.detach(), requires_grad=False)
        return layer(x).to(x.dtype)
