"""Where a merged model can hold the lora_B biases of a run, decided before anything is merged.

PEFT's ``lora_bias=True`` gives every ``lora_B`` a bias, which a merge adds to the base layer's
own bias. A layer whose architecture has none (Llama's projections, Qwen2's ``o_proj``, every
Phi-3 projection) has no slot for it, and PEFT's ``merge_and_unload`` stops there with a
``RuntimeError``. Some configs have a switch that gives such layers a bias (Llama's
``attention_bias`` and ``mlp_bias``); the merged model then turns it on, merges the lora bias
into a zero bias and carries zero biases wherever the switch adds one that no lora bias reaches:
the same function. Where no switch adds a bias there, no merged model can hold the run; that is
known from the configs alone, so the run is told at fit start and the export command refuses
before it opens a base weight file.

Switches are found generically, never from a list: the model is built on the meta device with
each boolean ``*bias*`` field of its config turned on, and a field counts when the only change
is new bias tensors (its layers gaining one).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.keys import PEFT_ROOT
from lightning_lora.export.plan import hf_name

__all__ = ["BiasSlots", "add_zero_biases", "bias_switches", "plan_bias_slots", "refuse_unmergeable", "unmergeable"]

# config class and JSON -> its switches: each probe builds the model on the meta device once.
_SWITCHES: dict[tuple[str, str], dict[str, dict[str, list[int]]]] = {}


@dataclass(frozen=True)
class BiasSlots:
    """What the merged model needs to hold every lora_B bias of a run.

    Attributes:
        needed: bias keys (the merged model's names) of the LoRA layers with ``lora_bias`` whose
            base layer has no bias.
        switches: the config fields the merged model turns on to give them one.
        added: bias key -> shape of every bias these switches add (zero unless in ``needed``).
        problem: why no merged model can hold the run; ``None`` when one can.
    """

    needed: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()
    added: dict[str, list[int]] = field(default_factory=dict)
    problem: str | None = None

    def merged_config_line(self) -> str:
        """What the merged model's config turns on, in the words the fit-start line uses."""
        switched = ", ".join(f"{name}=true" for name in self.switches)
        return f"the merged model will set {switched}, with zero biases where no lora bias lands"

    def record(self) -> dict[str, Any] | None:
        """What ``export.json`` says about it: ``None`` when the merged config is the base's."""
        if not self.switches:
            return None
        return {"switches": {name: True for name in self.switches}, "lora_biases": list(self.needed),
                "zero_biases": sorted(set(self.added) - set(self.needed))}


def bias_switches(config: Any) -> dict[str, dict[str, list[int]]]:
    """Each boolean ``*bias*`` field of ``config`` that is off and, turned on, only adds biases:
    field -> {bias key: shape} of the biases it adds (keys as the model's ``state_dict`` names them)."""
    text = config.get_text_config()
    key = (type(config).__name__, config.to_json_string(use_diff=False))
    if key not in _SWITCHES:
        fields = sorted(name for name, value in text.to_dict().items() if "bias" in name.lower() and value is False)
        switches: dict[str, dict[str, list[int]]] = {}
        if fields:
            before = _shapes(config)
            for name in fields:
                changed = copy.deepcopy(config)
                setattr(changed.get_text_config(), name, True)
                added = _only_biases_added(before, _shapes(changed))
                if added:
                    switches[name] = added
        _SWITCHES[key] = switches
    return _SWITCHES[key]


def _shapes(config: Any) -> dict[str, list[int]]:
    """The model of ``config``, built on the meta device: every tensor's key and shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lightning_lora.export.trust import remote_code
    from lightning_lora.model_classes import restore_class_decorators

    restore_class_decorators()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **remote_code())
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def _only_biases_added(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    """The biases ``after`` adds to ``before``; empty when it changes anything else."""
    added = {key: shape for key, shape in after.items() if key not in before}
    kept = all(after.get(key) == shape for key, shape in before.items())
    biases = all(key.endswith(".bias") and f"{key.removesuffix('.bias')}.weight" in before for key in added)
    return added if kept and biases else {}


def plan_bias_slots(peft_model: Any, adapter: str | None = None) -> BiasSlots:
    """Decide which switches give every lora bias of ``peft_model`` (live or on the meta device) a
    slot: the fewest that cover them, the one adding fewest biases first on a tie."""
    from peft.tuners.lora import LoraLayer

    adapter = adapter or getattr(peft_model, "active_adapter", "default")
    needed = tuple(hf_name(f"{name}.bias") for name, module in peft_model.named_modules()
                   if isinstance(module, LoraLayer) and module.lora_bias.get(adapter)
                   and getattr(module.get_base_layer(), "bias", None) is None)
    if not needed:
        return BiasSlots()
    config = peft_model.base_model.model.config
    switches = bias_switches(config)
    uncovered, chosen = set(needed), []
    while uncovered:
        useful = [name for name in sorted(switches) if name not in chosen and uncovered & set(switches[name])]
        if not useful:
            break
        best = max(useful, key=lambda name: (len(uncovered & set(switches[name])), -len(switches[name])))
        chosen.append(best)
        uncovered -= set(switches[best])
    if uncovered:
        missing = [key.removesuffix(".bias") for key in needed if key in uncovered]
        offered = f"its bias switches {sorted(switches)} add none there" if switches else "it has no bias switch"
        problem = (f"lora_bias=True on {len(missing)} layer(s) without a bias (e.g. {missing[:2]}) and no setting of "
                   f"{type(config).__name__} gives them one ({offered}), "
                   "so no merged model can hold the trained lora_B biases")
        return BiasSlots(needed=needed, problem=problem)
    added = {key: shape for name in chosen for key, shape in switches[name].items()}
    return BiasSlots(needed=needed, switches=tuple(chosen), added=added)


def unmergeable(problem: str) -> str:
    """The one line an export asked for a merged model fails with."""
    return f"{problem}: pass --no-merge to export the adapter alone (or train with lora_bias=False)"


@torch.no_grad()
def add_zero_biases(peft_model: Any, keys: dict[str, list[int]]) -> None:
    """Give each layer of ``keys`` (merged-model bias keys) a zero bias, in its weight's dtype and
    device, so that PEFT's own merge has a bias to add a lora bias to."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, shape in keys.items():
        module = peft_model.get_submodule(PEFT_ROOT + key.removesuffix(".bias"))
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if getattr(layer, "bias", None) is None:
            weight = layer.weight
            zeros = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            layer.bias = torch.nn.Parameter(zeros, requires_grad=False)


def refuse_unmergeable(checkpoint: Any, options: Any) -> None:
    """Fail an export asked for a merged model that cannot exist, from the LoRA config the
    checkpoint records and the base's ``config.json`` alone: before any weight file is opened.
    Inputs that cannot be read this cheaply are left to the full read, which decides again."""
    if not options.merge:
        return
    inputs = _recorded_inputs(checkpoint, options)
    if inputs is None:
        return
    from lightning_lora.export.structure import build_meta_peft_model

    base_path, config = inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "merging LoRA weights won't be possible": said below, once
            model = build_meta_peft_model(base_path, config)
    except (ValueError, OSError):
        return  # a config PEFT refuses: the full read names it
    slots = plan_bias_slots(model, "default")
    if slots.problem is not None:
        raise ExportError(unmergeable(slots.problem))


def _recorded_inputs(checkpoint: Any, options: Any) -> tuple[str, dict[str, Any]] | None:
    """(base directory, LoRA config) as the export will use them; ``None`` when the config has no
    lora_bias (nothing to decide) or they are not cheaply known."""
    from lightning_lora.export.checkpoint import TrainedCheckpoint, read_adapter_config, recorded_run
    from lightning_lora.export.sources import resolve_base

    if isinstance(checkpoint, TrainedCheckpoint):
        recorded = {"peft_config": checkpoint.lora_config, "base_model": checkpoint.base_model}
    else:
        recorded = recorded_run(Path(checkpoint)) or {}
    config = options.lora_config if options.lora_config is not None else recorded.get("peft_config")
    base = options.base_model if options.base_model is not None else recorded.get("base_model")
    if config is None or base is None:
        return None
    try:
        config = config if isinstance(config, dict) else read_adapter_config(config, "--lora-config")
        if not config.get("lora_bias"):
            return None  # nothing to decide: no model is built
        return resolve_base(str(base))[1], config
    except ExportError:
        return None  # the full read reports it, in its place
