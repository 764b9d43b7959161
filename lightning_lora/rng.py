"""Every rank's random number generator states, kept in a checkpoint so that a resumed run draws
exactly what the uninterrupted run would have (LoRA dropout, above all).

The states are plain values (tensors, lists of ints), readable by ``torch.load(weights_only=True)``.
They are gathered from every rank when a checkpoint is saved (every rank takes part in saving) and
given back to each rank at the first training batch of the resumed run: anything the restore itself
draws in between (building models, a sanity check) cannot shift them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNG_KEY", "gather_rng_states", "set_rng_state"]

# Where LoraFinetuneModule keeps them in a checkpoint: one entry per global rank.
RNG_KEY = "lightning_lora_rng"


def _this_rank() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), python_gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
    }


def gather_rng_states() -> list[dict[str, Any]]:
    """Every global rank's states, in rank order (a collective when a process group is running)."""
    states = _this_rank()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    cpu = {**states, "cuda": [state.cpu() for state in states["cuda"]]}
    torch.distributed.all_gather_object(gathered, cpu)
    return gathered


def set_rng_state(state: dict[str, Any]) -> None:
    """Make this process's generators continue from ``state`` (one rank's entry)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
