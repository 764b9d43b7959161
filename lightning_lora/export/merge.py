"""The whole-model merge: PEFT's own ``merge`` on the rebuilt PEFT model, for models that fit in memory.

Everything is computed in fp32 (base weights upcast one layer at a time, LoRA deltas in fp32) and
cast to the target dtype once, after the merge: merging in bf16 is the usual cause of "merged
model differs from the adapter model".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_lora.errors import ExportError

__all__ = ["load_trained", "merge", "resolve_dtype"]


def resolve_dtype(name: str, base_config: Any) -> torch.dtype:
    """The merged weights' dtype: ``auto`` is the base model's own (fp32 if it records none)."""
    from lightning_lora.dtypes import parse_dtype

    try:
        dtype = parse_dtype(name, "--dtype")
    except ValueError as err:
        raise ExportError(str(err)) from err
    if dtype is not None:
        return dtype
    recorded = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def load_trained(model: Any, trained: dict[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], rewritten: set[str]) -> None:
    """Copy the trained tensors, and the checkpoint's frozen weights of ``rewritten``, into the PEFT
    model (see :func:`~lightning_lora.export.structure.build_peft_model`); every other frozen weight
    stays the base directory's, in its original precision."""
    own = model.state_dict()
    with torch.no_grad():
        for key, value in trained.items():
            own[key].copy_(value)
        for key in rewritten:
            own[key].copy_(frozen[key])


@torch.no_grad()
def merge(model: Any, dtype: torch.dtype) -> Any:
    """PEFT's merge, one LoRA layer at a time in fp32, each cast once to ``dtype`` right after;
    trained token rows are written into their embeddings; then the adapters are unloaded.

    A head tied to the input embeddings is given its own copy first, so that a delta merged into
    one of them (LoRA on ``lm_head`` or on the embeddings) cannot reach the other through the
    shared matrix. Whether the export ties them again, and its config, are the plan's to decide
    (:mod:`~lightning_lora.export.plan`); only the merged values are taken from here.

    Upcasting layer by layer keeps the peak near the model in its own dtype plus one fp32 layer,
    where ``merge_and_unload`` on an fp32 copy of the whole model would need twice that or more.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    _untie(model.base_model.model)
    for module in model.modules():
        # Trainable tokens copy their rows into the embeddings (unload alone would drop them).
        if isinstance(module, (LoraLayer, TrainableTokensLayer)) and not module.merged:
            weight = module.get_base_layer().weight
            weight.data = weight.data.to(torch.float32)
            module.merge(safe_merge=True)
            weight.data = weight.data.to(dtype)
    return model.unload().to(dtype)


def _untie(hf_model: Any) -> None:
    """Give a head that shares the input embeddings' matrix its own copy of it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def innermost(module: Any) -> Any:
        while isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        return module

    output = hf_model.get_output_embeddings()
    if output is None:
        return
    head, embeddings = innermost(output), innermost(hf_model.get_input_embeddings())
    if getattr(head, "weight", None) is not None and head.weight is getattr(embeddings, "weight", None):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
