"""The tensor check: every merged tensor against what PEFT's own layer code makes of the sources.

For each tensor of the merged files (of the shards one worker owns):

- a LoRA-wrapped weight (Linear, Conv1D, Embedding, DoRA, ``lora_bias``): the PEFT layer is
  rebuilt from the sources (see :mod:`~lightning_lora.export.reference`) in fp32 and merged by
  PEFT's ``merge``; the export must equal that, cast once, within one unit in the
  last place of the export dtype measured against ``max(|W|, |delta|)`` (so a near-cancellation
  ``W + delta ~ 0`` cannot fail a correct merge);
- trained token rows: PEFT's merge of the trainable-tokens layer, cast once, bit for bit;
- a ``modules_to_save`` tensor: the trained tensor cast once, bit for bit;
- a bias the merged config adds (:mod:`~lightning_lora.export.bias_slots`): where a lora bias
  lands, PEFT's merge of the layer given a zero bias (what the trained layer adds, since it has
  none), within one ulp; anywhere else zero, bit for bit;
- everything else: its source cast once, bit for bit.

A tensor that is missing, unexpected, of another shape, or off by more fails and is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_lora.export.keys import PEFT_ROOT
from lightning_lora.export.plan import hf_name, is_adapter_key
from lightning_lora.export.reference import Materializer, TrainedModel
from lightning_lora.export.weights import WeightFiles

__all__ = ["TensorReport", "check_tensors", "expected_keys", "ulp"]

_SIGNIFICAND_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of each of ``values`` (float64)."""
    bits = _SIGNIFICAND_BITS[dtype]
    _, exponent = torch.frexp(values.double().abs())
    smallest = torch.finfo(dtype).tiny * 2.0 ** (1 - bits)
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - bits).clamp_min(smallest)


@dataclass
class TensorReport:
    """What the tensor check compared and the worst it found, per kind of tensor."""

    checked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    worst: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {"tensor", "max_abs_diff", "max_ulps"}
    problems: list[str] = field(default_factory=list)
    differing: dict[str, list[str]] = field(default_factory=dict)  # kind -> keys that differ from their source

    def note(self, kind: str, key: str, diff: float, ulps: float) -> None:
        self.checked += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if kind not in self.worst or diff > self.worst[kind]["max_abs_diff"]:
            self.worst[kind] = {"tensor": key, "max_abs_diff": diff, "max_ulps": ulps}

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "by_kind": self.by_kind, "worst": self.worst, "problems": self.problems,
                "differing": self.differing}


def _wrappers(peft_model: Any) -> dict[str, str]:
    """HF key of every base tensor -> the PEFT key of the parameter that holds it."""
    found = {}
    for name, _ in peft_model.named_parameters(remove_duplicate=False):
        if not is_adapter_key(name):
            found.setdefault(hf_name(name), name)
    return found


def expected_keys(peft_model: Any, tied: bool) -> set[str]:
    """The tensors the merged files must hold: every base tensor, less the head if it is tied."""
    keys = set(_wrappers(peft_model))
    if tied:
        output = peft_model.base_model.model.get_output_embeddings()
        names = {id(m): n for n, m in peft_model.base_model.model.named_modules()}
        if output is not None:
            head = getattr(output, "get_base_layer", lambda: output)()
            keys.discard(hf_name(f"{names.get(id(head), '')}.weight"))
    return keys


def _owner(peft_model: Any, key: str) -> tuple[str, Any] | None:
    """The outermost PEFT wrapper (LoRA or trainable-tokens layer, modules_to_save) holding ``key``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    parts = key.split(".")
    for end in range(1, len(parts)):
        name = ".".join(parts[:end])
        module = peft_model.get_submodule(name)
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            return name, module
    return None


@contextmanager
def _zero_base_biases(wrapper: Any) -> Iterator[None]:
    """A zero bias, for the duration, on each loaded base layer inside ``wrapper`` that has none but
    whose LoRA layer has a lora bias: PEFT merges a lora bias only into a bias, and a zero one
    leaves the layer's function unchanged."""
    from peft.tuners.lora import LoraLayer

    added = []
    for layer in wrapper.modules():
        base = layer.get_base_layer() if isinstance(layer, LoraLayer) else None
        if base is not None and any(layer.lora_bias.values()) and getattr(base, "bias", None) is None:
            weight = base.weight
            base.bias = torch.nn.Parameter(torch.zeros(layer.out_features, dtype=weight.dtype, device=weight.device),
                                           requires_grad=False)
            added.append(base)
    try:
        yield
    finally:
        for base in added:
            base.bias = None


@torch.no_grad()
def _merged_by_peft(wrapper: Any, key: str, peft_model: Any) -> torch.Tensor:
    """PEFT's merge of the loaded ``wrapper``, in place: the merged value of ``key``. The wrapper's
    tensors are released right after, so merging in place (PEFT's ``safe_merge=False``: the same
    arithmetic without a copy and a NaN scan) costs nothing the check needs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in wrapper.modules() if isinstance(m, BaseTunerLayer)]
    try:
        for layer in reversed(layers):  # inner wrappers first, as merge_and_unload does
            layer.merge(safe_merge=False)
        return peft_model.get_parameter(key).data
    finally:
        for layer in layers:
            layer.merged_adapters.clear()


def check_tensors(merged: WeightFiles, keys: list[str], reference: TrainedModel, dtype: torch.dtype,
                  device: torch.device, tied: bool, slots: Mapping[str, list[int]] | None = None) -> TensorReport:
    """Compare the merged tensors ``keys`` with the reference; see the module docstring.

    Args:
        merged: the merged model's weight files.
        keys: the merged keys to check (one worker's shards).
        reference: the trained model, from the sources.
        dtype: the export dtype.
        device: where to compute.
        tied: the merged config ties the head to the input embeddings.
        slots: bias key -> shape of the biases the merged config adds to the trained model's layers.
    """
    from peft.utils import ModulesToSaveWrapper

    report = TensorReport()
    peft_model = reference.peft
    holders = _wrappers(peft_model)
    loader = Materializer(peft_model, lambda name: reference.value(name) if name in reference.shapes else None, device)
    head_key = _tied_head_key(peft_model) if tied else None
    input_key = _input_key(peft_model) if tied else None
    for key in keys:
        if key not in holders and key in (slots or {}):
            _check_slot(report, key, merged.get(key), list(slots[key]), peft_model, loader, dtype)
            continue
        if key not in holders:
            report.problems.append(f"merged tensor {key!r} is not a tensor of the trained model")
            continue
        stored = merged.get(key)
        targets = [(key, holders[key])]
        if head_key is not None and key == input_key:
            targets.append((head_key, holders[head_key]))  # the tied head is these same values
        for name, peft_key in targets:
            if tuple(stored.shape) != reference.shapes[peft_key]:
                report.problems.append(f"merged tensor {name!r} has shape {tuple(stored.shape)}, the trained model's is {reference.shapes[peft_key]}")
                continue
            owner = _owner(peft_model, peft_key)
            if owner is None:
                expected, kind = reference.value(peft_key), "copied"
                _exact(report, name, stored, expected, kind)
            elif isinstance(owner[1], ModulesToSaveWrapper):
                copy = peft_key.replace(".original_module.", ".modules_to_save.default.")
                _exact(report, name, stored, reference.value(copy), "modules_to_save")
            else:
                loader.load(owner[1])
                try:
                    with _zero_base_biases(owner[1]):
                        expected = _merged_by_peft(owner[1], peft_key, peft_model)
                    if hasattr(owner[1], "lora_A"):
                        _within_ulp(report, name, stored, expected, lambda: reference.value(peft_key), dtype)
                    else:
                        _exact(report, name, stored, expected, "trainable_tokens")
                finally:
                    loader.release(owner[1])
    return report


def _check_slot(report: TensorReport, key: str, stored: torch.Tensor, shape: list[int], peft_model: Any,
                loader: Materializer, dtype: torch.dtype) -> None:
    """A bias the merged config adds: the lora bias PEFT merges into a zero bias, or zero."""
    from peft.tuners.lora import LoraLayer

    if list(stored.shape) != shape:
        report.problems.append(f"merged tensor {key!r} has shape {tuple(stored.shape)}, the layer's bias {tuple(shape)}")
        return
    module = peft_model.get_submodule(PEFT_ROOT + key.removesuffix(".bias"))
    zeros = torch.zeros(shape, dtype=stored.dtype)
    if not (isinstance(module, LoraLayer) and any(module.lora_bias.values())):
        _exact(report, key, stored, zeros, "added zero bias")
        return
    loader.load(module)
    try:
        with _zero_base_biases(module):
            expected = _merged_by_peft(module, f"{PEFT_ROOT}{key.removesuffix('.bias')}.base_layer.bias", peft_model)
        _within_ulp(report, key, stored, expected, lambda: torch.zeros_like(expected), dtype)
    finally:
        loader.release(module)


def _input_key(peft_model: Any) -> str:
    hf_model = peft_model.base_model.model
    embeddings = hf_model.get_input_embeddings()
    embeddings = getattr(embeddings, "get_base_layer", lambda: embeddings)()
    return hf_name(f"{_name_of(peft_model, embeddings)}.weight")


def _tied_head_key(peft_model: Any) -> str | None:
    output = peft_model.base_model.model.get_output_embeddings()
    if output is None:
        return None
    head = getattr(output, "get_base_layer", lambda: output)()
    return hf_name(f"{_name_of(peft_model, head)}.weight")


def _name_of(model: Any, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise KeyError("module not in model")


def _exact(report: TensorReport, key: str, stored: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    """Bit for bit: the source cast once to the stored dtype."""
    expected = expected.to(stored.device, stored.dtype)
    if torch.equal(stored, expected):
        report.note(kind, key, 0.0, 0.0)
        return
    diff = (stored.double() - expected.double()).abs().max().item() if stored.is_floating_point() else float("nan")
    report.note(kind, key, diff, float("inf"))
    report.differing.setdefault(kind, []).append(key)
    report.problems.append(f"merged tensor {key!r} differs from its source cast once ({kind}: max |diff| {diff:.3g})")


def _within_ulp(report: TensorReport, key: str, stored: torch.Tensor, expected: torch.Tensor,
                before: Callable[[], torch.Tensor], dtype: torch.dtype) -> None:
    """PEFT's fp32 merge cast once, within one ulp of ``dtype`` at max(|W|, |delta|) per element.
    ``before`` reads the weight before the merge again, needed only where the two differ."""
    stored = stored.to(expected.device)
    cast = expected.to(stored.dtype)
    if torch.equal(stored, cast):
        report.note("lora", key, 0.0, 0.0)
        return
    differ = stored != cast
    got, want, base = stored[differ].double(), expected[differ].double(), before().to(expected.device)[differ].double()
    allowed = ulp(torch.maximum(base.abs(), (want - base).abs()), dtype)
    diff = (got - want).abs()
    ulps = (diff / allowed).max().item()
    report.note("lora", key, diff.max().item(), ulps)
    if ulps > 1.0:
        report.problems.append(
            f"merged tensor {key!r} differs from PEFT's merge of the trained adapter by up to {ulps:.3g} ulp of "
            f"{str(dtype).removeprefix('torch.')} (max |diff| {diff.max().item():.3g}; 1 ulp allowed)"
        )
