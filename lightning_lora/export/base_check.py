"""Is ``--base-model`` the model the checkpoint was trained from? Asked before anything is merged.

A checkpoint that holds frozen weights (ZeRO-1/2 module state, ZeRO-3 fragments, a Lightning
``.ckpt``, sharded FSDP, a module in memory) holds the base it trained on. A few rows of a few of
those weights, compared with the same rows of ``--base-model``, tell a wrong base of the same
shapes at once, where the merge would first write the whole model and its verification then
fail on tensors the adapter never touched. Left out: the base weights of LoRA-wrapped layers
(PiSSA, OLoRA, LoftQ, ... rewrite those, and a LoRA config may not say so), the frozen weights
the export takes from the checkpoint anyway (``rewritten``, 4-bit QLoRA weights among them),
and the rows a vocabulary grew by.

Without frozen weights (``exclude_frozen_parameters``, an adapter directory) the export cannot
tell: it merges into the base it is given and verifies against that same base. What the
verification can tell is handled by :func:`untouched_verdict`: when the only tensors that differ
from their source are ones the adapter leaves untouched (a merge copies those, so only another
base makes them differ), the failure names the base. That is ``lightning-lora verify
--base-model`` with another base than the export's, or an export whose base differs only where
the sample did not look.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.checkpoint import frozen_rows
from lightning_lora.export.plan import hf_name
from lightning_lora.export.reference import same_values

if TYPE_CHECKING:
    from lightning_lora.export.sources import Sources

__all__ = ["check_base", "untouched_verdict", "wrong_base"]

log = logging.getLogger("lightning_lora")

# Enough to tell another model (whose every weight differs) at the cost of a few rows, whatever the model size.
SAMPLED_TENSORS = 8
SAMPLED_ROWS = 3


def wrong_base(base_name: str, differing: list[str], compared: int, what: str) -> str:
    """The one line that names a base other than the one the checkpoint was trained from."""
    return (f"--base-model={base_name!r} is not the model this checkpoint was trained from: "
            f"{len(differing)} of {compared} {what} differ (e.g. {', '.join(differing[:2])})")


def check_base(sources: Sources) -> None:
    """Compare a few rows of a few of the checkpoint's frozen weights with ``--base-model``'s, each
    read alone; raise :class:`ExportError` if any differ. Nothing to compare: nothing is checked."""
    started = time.perf_counter()
    # A sharded FSDP checkpoint reads a tensor whole (the others read the sampled rows only): its
    # sample is taken among the smallest weights, so that a 70B model's embeddings are not read.
    sample = _sample(_candidates(sources), smallest=sources.checkpoint.kind == "fsdp")
    differing = [base_key for key, base_key in sample if not _matches(sources, key, base_key)]
    if differing:
        raise ExportError(wrong_base(sources.base_name, differing, len(sample), "sampled frozen tensors"))
    if not sample:
        log.info("base check: nothing to compare (the checkpoint holds no frozen weight taken from --base-model)")
        return
    log.info("base check: %d sampled frozen tensors of the checkpoint equal --base-model's (%.3fs)",
             len(sample), time.perf_counter() - started)


def _candidates(sources: Sources) -> list[tuple[str, str, int, int]]:
    """(PEFT key, base key, dimensions, elements) of every frozen weight the comparison may use, in model order."""
    from peft.tuners.lora import LoraLayer

    model = sources.peft_model
    # By identity: a tied head wrapped by LoRA makes the embeddings a wrapped weight too.
    wrapped = {id(p) for module in model.modules() if isinstance(module, LoraLayer) for p in module.parameters()}
    found = []
    for key, param in model.named_parameters():
        if param.requires_grad or param.dim() == 0 or id(param) in wrapped or key in sources.rewritten:
            continue  # trained (a bias="all" bias), a scalar, possibly rewritten, or taken from the checkpoint
        if key not in sources.frozen:
            continue
        base_key = sources.base.resolve(hf_name(key))
        if base_key is not None and sources.base.tensors[base_key].dtype.is_floating_point:
            found.append((key, base_key, param.dim(), math.prod(sources.base.tensors[base_key].shape)))
    return found


def _sample(candidates: list[tuple[str, str, int, int]], smallest: bool = False) -> list[tuple[str, str]]:
    """Up to :data:`SAMPLED_TENSORS` candidates spread over the model, matrices first (a norm
    initialised to ones is the same in many models); with ``smallest``, spread over the smallest
    matrices only (a quarter of them, at least the sample's size)."""
    matrices = [c for c in candidates if c[2] >= 2]
    pool = matrices if len(matrices) >= SAMPLED_TENSORS else candidates
    if not pool:
        return []
    if smallest:
        limit = sorted(c[3] for c in pool)[min(len(pool) - 1, max(SAMPLED_TENSORS, len(pool) // 4) - 1)]
        pool = [c for c in pool if c[3] <= limit]
    count = min(SAMPLED_TENSORS, len(pool))
    picks = sorted({round(i * (len(pool) - 1) / max(1, count - 1)) for i in range(count)})
    return [pool[i][:2] for i in picks]


def _matches(sources: Sources, key: str, base_key: str) -> bool:
    """Whether a few rows of the checkpoint's ``key`` equal ``--base-model``'s, in either's precision.

    Rows are taken within the base's rows: those a run added for new tokens are the trained model's
    own. A checkpoint tensor of another shape (too few rows, other columns) differs.
    """
    count = sources.base.tensors[base_key].shape[0]
    rows = torch.linspace(0, count - 1, min(SAMPLED_ROWS, count)).long().unique().tolist()
    expected = sources.base.rows(base_key, rows)
    try:
        stored = frozen_rows(sources.frozen, key, rows)
    except (IndexError, RuntimeError):  # the checkpoint's tensor has fewer rows than the base's
        return False
    return stored.shape == expected.shape and same_values(stored, expected)


def untouched_verdict(tensors: dict[str, Any], base_name: str) -> str | None:
    """The wrong-base line for a tensor check whose only tensors that differ from their source are
    ones the adapter leaves untouched (copied from the base by the merge), else ``None``.

    ``tensors``: the tensor check's report (``by_kind``, ``differing``), one worker's or combined.
    """
    differing = tensors.get("differing") or {}
    untouched = sorted(differing.get("copied", []))
    if not untouched or set(differing) != {"copied"}:
        return None
    compared = tensors.get("by_kind", {}).get("copied", len(untouched))
    return wrong_base(base_name, untouched, compared, "tensors the adapter leaves untouched")
