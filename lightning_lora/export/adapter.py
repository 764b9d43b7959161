"""The PEFT adapter directory of an export: the trained adapter, or PEFT's conversion of it.

``PeftModel.from_pretrained(original base, adapter)`` must give the trained model. For most runs
the trained tensors are that adapter. A run whose initialisation rewrote the base (PiSSA, OLoRA,
CorDA, LoRA-GA) trained on ``W_res``; its adapter is converted as PEFT documents (see
:mod:`~lightning_lora.export.inits`). Where no conversion exists (LoftQ; rsLoRA with rank or alpha
patterns; DoRA), the merged model is still exported and the adapter is left out, with the reason.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from lightning_lora.export.inits import conversion_problem, converted_config, residual_factors
from lightning_lora.export.plan import hf_name
from lightning_lora.export.sources import Sources

__all__ = ["write_adapter"]

log = logging.getLogger("lightning_lora")


def write_adapter(sources: Sources, directory: Path) -> str | None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``; returns why no adapter was
    written (``None`` when one was)."""
    from peft.tuners.lora import LoraLayer

    tensors = {k: v.float() for k, v in sources.trained.items()}
    overrides: dict[str, Any] = {}
    # A dequantized 4-bit base (QLoRA) is the base the adapter trained on: it loads onto that
    # base quantized again, unchanged. Only an initialisation's rewrite calls for a conversion.
    rewritten = sources.rewritten - sources.dequantized
    rewritten_layers = [(name, module) for name, module in sources.peft_model.named_modules()
                        if isinstance(module, LoraLayer) and f"{name}.base_layer.weight" in rewritten]
    if rewritten_layers:
        problem = conversion_problem(sources.lora_config)
        if problem is None and len(rewritten_layers) != len(rewritten):
            problem = "--frozen-from-checkpoint took frozen weights no adapter can carry"
        if problem is not None:
            log.warning("no adapter written: %s; the merged model is the trained model", problem)
            return problem
        for name, module in rewritten_layers:
            _convert_layer(sources, name, module, tensors)
        converted = converted_config(sources.lora_config)
        overrides = {k: converted[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern") if converted.get(k)}
    _save(sources.peft_model, tensors, overrides, directory)
    return None


@torch.no_grad()
def _convert_layer(sources: Sources, name: str, module: Any, tensors: dict[str, torch.Tensor]) -> None:
    """``A' = [A; A0]``, ``B' = [B, -B0]`` with ``s * B0 @ A0 = W - W_res`` (PEFT's ``subtract_mutated_init``)."""
    key = f"{name}.base_layer.weight"
    original = sources.base.get(hf_name(key))
    residual = sources.frozen[key]
    rank, scale = module.r["default"], module.scaling["default"]
    b0, a0 = residual_factors(original, residual, rank, scale, module.fan_in_fan_out)
    a_key, b_key = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
    tensors[a_key] = torch.cat([tensors[a_key], a0], dim=0)
    tensors[b_key] = torch.cat([tensors[b_key], -b0], dim=1)


def _save(peft_model: Any, tensors: dict[str, torch.Tensor], overrides: dict[str, Any], directory: Path) -> None:
    """PEFT's own layout and key naming (the meta model names the keys; shapes are the tensors'), and
    the live config with ``overrides``; ``init_lora_weights`` is PEFT's default, so that loading the
    adapter never re-runs an initialisation that rewrites the base."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lightning_lora.export.checkpoint import lora_config_from_dict

    state = get_peft_model_state_dict(
        peft_model,
        state_dict=tensors,
        save_embedding_layers=False,  # trained rows travel as trainable tokens, a trained matrix as modules_to_save
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    live = copy.deepcopy(peft_model.peft_config["default"])
    saved = lora_config_from_dict({**live.to_dict(), **overrides}) if overrides else live
    saved.inference_mode = True  # as PeftModel.save_pretrained writes it
    for name, value in vars(saved).items():
        if isinstance(value, set):  # PEFT writes a set in its iteration order, which varies from process to process
            setattr(saved, name, sorted(value))
    saved.save_pretrained(directory)
