"""Drift: how far the export is from the model that was *trained* on a 4-bit base (QLoRA).

Verification proves the merged model equals the merge of the chosen base. Drift compares it with
what training ran: the 4-bit base, each quantized layer rebuilt from the checkpoint's bytes and
run by bitsandbytes' own ``Linear4bit`` (:class:`~lightning_lora.export.quantized.QuantizedLinear`),
with the adapter on top through PEFT's layers. That reference shares nothing with the merge: not
the dequantization call, not the merge arithmetic, not the files written.

Both models run one decoder block at a time (as in :mod:`~lightning_lora.export.function_check`):

- *per block*: the export's block on the trained model's input to that block, against the trained
  block (what this block alone changes);
- *overall*: each model runs on its own hidden states from the embeddings to the logits (what a
  user of the export sees): the largest logit difference and the share of tokens whose argmax
  (the greedy next token) agrees;
- *held-out loss*: when the run had validation data, the loss of both models on it.

Drift is reported, and fails the export only past ``max_drift`` (a fraction of argmax tokens).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_lora.dtypes import IGNORE_INDEX
from lightning_lora.errors import ExportError
from lightning_lora.export.function_check import (
    Side,
    _blocks_loaded,
    _call_block,
    _capture,
    _first,
    _hidden,
    _logits,
    tolerance,
)
from lightning_lora.export.quantized import QuantizedBase, QuantizedLinear
from lightning_lora.export.reference import TrainedModel
from lightning_lora.export.structure import build_meta_peft_model, merged_meta_model
from lightning_lora.export.weights import WeightFiles, read_config

__all__ = ["measure_drift", "summarize_drift"]


def _trained_side(sources: Any, device: torch.device) -> Side:
    """The model that was trained: PEFT's structure, its 4-bit layers run by bitsandbytes."""
    quantized: QuantizedBase = sources.quantized
    model = build_meta_peft_model(sources.base_path, sources.lora_config, sources.checkpoint.vocab_size)
    replaced = 0
    for name, module in list(model.named_modules()):
        if f"{name}.weight" in quantized.weights:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, QuantizedLinear(module, quantized, f"{name}.weight"))
            replaced += 1
    if replaced != len(quantized.weights):
        raise ExportError(f"{len(quantized.weights) - replaced} of the checkpoint's 4-bit weights name no layer of the base model")
    # Everything but the 4-bit weights: the adapter from the checkpoint, the unquantized layers
    # (embeddings, norms, head) from the base directory.
    reference = TrainedModel(model, sources.trained, quantized.view("original"), sources.base)
    return Side("trained", model, lambda name: reference.value(name) if name in reference.shapes else None, device)


def _merged_side(merged_dir: Path, device: torch.device) -> Side:
    model, _ = merged_meta_model(merged_dir)
    files = WeightFiles(merged_dir, "merged", model.base_model_prefix)
    return Side("export", model, lambda name: files.get(name) if name in files else None, device)


@torch.no_grad()
def _run(trained: Side, export: Side, inputs: dict[str, torch.Tensor], per_block: list[dict[str, Any]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models end to end on ``inputs``, block by block; each block's own drift into ``per_block``."""
    trained_calls, export_calls = _capture(trained, **inputs), _capture(export, **inputs)
    mine = _hidden(trained_calls.args[0], trained_calls.kwargs[0])
    theirs = _hidden(export_calls.args[0], export_calls.kwargs[0])
    structure: Any = None
    for index, (trained_block, export_block) in enumerate(zip(trained.blocks, export.blocks)):
        with _blocks_loaded((trained, trained_block), (export, export_block)):
            out = _call_block(trained_block, trained_calls, index, mine)
            own = _first(_call_block(export_block, export_calls, index, theirs))
            if per_block is not None:
                alone = _first(_call_block(export_block, export_calls, index, mine))
                change = (_first(out) - mine).abs().max().item()
                diff = (alone.float() - _first(out).float()).abs().max().item()
                per_block.append({"block": f"{export.block_path}.{index}", "max_abs_diff": diff, "scale": change,
                                  "relative": diff / max(change, 1e-30), "hidden_size": mine.shape[-1]})
        structure, mine, theirs = out, _first(out), own
    trained.loader.release()
    export.loader.release()
    return _logits(trained, mine, structure), _logits(export, theirs, structure)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the labelled positions, and their count."""
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return 0.0, 0
    return F.cross_entropy(logits[:, :-1][mask], labels[mask], reduction="sum").item(), int(mask.sum().item())


def _coarser(first: torch.dtype, second: torch.dtype) -> torch.dtype:
    """The dtype of fewer significand bits."""
    return max((first, second), key=lambda dtype: torch.finfo(dtype).eps)


def measure_drift(merged_dir: Path, sources: Any, probes: torch.Tensor, heldout: list[dict[str, Any]] | None,
                  device: torch.device, max_drift: float | None, merge_base: str, dtype: torch.dtype) -> dict[str, Any]:
    """The drift report for ``export.json``.

    ``problems`` is not empty past ``max_drift``, and, for the ``dequantized`` base, when a block
    differs from the trained 4-bit block by more than the function check's tolerance for the
    coarser of the export dtype and the compute dtype: that export claims to be the trained model.
    """
    started = time.perf_counter()
    quantized: QuantizedBase = sources.quantized
    kinds = sorted(set(quantized.weights.values()))
    sides = [_trained_side(sources, device), _merged_side(merged_dir, device)]
    try:
        blocks: list[dict[str, Any]] = []
        trained_logits, export_logits = _run(*sides, {"input_ids": probes}, blocks)
        agreement = (trained_logits.argmax(-1) == export_logits.argmax(-1)).float().mean().item()
        if merge_base == "dequantized":
            merged_into = f"the dequantized {'/'.join(kinds)} base"
        else:
            stored = getattr(read_config(sources.base_path, "--base-model"), "dtype", None)
            merged_into = f"the original {_dtype_words(stored)} base"
        report: dict[str, Any] = {
            "merge_base": merge_base,
            "merged_into": merged_into,
            "trained_model": f"the {'/'.join(kinds)} base run by bitsandbytes' Linear4bit "
                             f"(compute {str(quantized.compute_dtype).removeprefix('torch.')}) with the adapter",
            "quantized_weights": len(quantized.weights),
            "probes": probes.shape[0],
            "tokens": probes.numel(),
            "blocks": blocks,
            "logits": {"max_abs_diff": (trained_logits - export_logits).abs().max().item(),
                       "scale": trained_logits.abs().max().item(),
                       "argmax_agreement": agreement},
            "heldout": None,
        }
        if heldout:
            losses = {"trained": 0.0, "export": 0.0}
            tokens = 0
            for batch in heldout:
                tensors = {key: torch.tensor(value) for key, value in batch.items()}
                inputs = {key: tensors[key] for key in ("input_ids", "attention_mask") if key in tensors}
                trained_logits, export_logits = _run(*sides, inputs, None)
                loss, count = _loss(trained_logits, tensors["labels"])
                losses["trained"] += loss
                losses["export"] += _loss(export_logits, tensors["labels"])[0]
                tokens += count
            if tokens:
                report["heldout"] = {"batches": len(heldout), "tokens": tokens,
                                     "loss_trained": losses["trained"] / tokens, "loss_export": losses["export"] / tokens}
    finally:
        for side in sides:
            side.close()
    differ = 1.0 - report["logits"]["argmax_agreement"]
    report["max_drift"] = max_drift
    report["problems"] = [] if max_drift is None or differ <= max_drift else [
        f"drift: {100 * differ:.2f}% of the probe tokens' argmax differ from the trained 4-bit model, more than "
        f"--max-drift={max_drift} allows"]
    if merge_base == "dequantized":
        precision = _coarser(dtype, quantized.compute_dtype)
        for block in report["blocks"]:
            block["tolerance"] = tolerance(precision, block["hidden_size"], block["scale"])
            if not block["max_abs_diff"] <= block["tolerance"]:
                report["problems"].append(
                    f"drift: {block['block']} of the export differs from the trained 4-bit block by {block['max_abs_diff']:.3g} "
                    f"(tolerance {block['tolerance']:.3g}): the dequantized base is not what training multiplied with")
                break
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _dtype_words(dtype: Any) -> str:
    from lightning_lora.dtypes import canonical_dtype

    try:
        return canonical_dtype(str(dtype).removeprefix("torch."), "dtype")
    except ValueError:
        return "16-bit"


def summarize_drift(drift: dict[str, Any]) -> str:
    """The drift in words, e.g. ``merged into the original bf16 base: 3.1 % of argmax tokens differ
    from the trained 4-bit model``."""
    logits = drift["logits"]
    text = (f"merged into {drift['merged_into']}: {100 * (1 - logits['argmax_agreement']):.1f} % of argmax tokens differ from the "
            f"trained 4-bit model (max |logit diff| {logits['max_abs_diff']:.2e})")
    heldout = drift.get("heldout")
    if heldout:
        text += f"; held-out loss {heldout['loss_export']:.4f} vs {heldout['loss_trained']:.4f} trained"
    return text if math.isfinite(logits["max_abs_diff"]) else text + " (not finite)"
