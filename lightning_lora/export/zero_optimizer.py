"""A ZeRO checkpoint's optimizer, whole: the fp32 master weights and Adam's moments of every trained
tensor, reassembled from each rank's flat partitions, so that a run can resume on another number
of ranks (:mod:`lightning_lora.elastic`).

DeepSpeed keeps, per rank and parameter group, one flat fp32 partition of the master weights, and
the inner optimizer's ``exp_avg`` and ``exp_avg_sq`` laid out exactly like it (the inner optimizer
steps the flat partitions as its parameters). ``zero_to_fp32`` knows how partitions join into whole
tensors for each stage (stage 1/2: concatenated per group with ``2 * world_size`` alignment; stage 3:
each parameter split evenly across the ranks); it is run once per quantity over the same files, with
the moment's partitions put where it reads the master weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.unpickle import load_torch_file
from lightning_lora.export.zero import (
    OPTIM_STATES,
    ZeroCheckpointError,
    check_rank_files,
    check_readable,
    read_model_states,
    zero_to_fp32_reading,
)

__all__ = ["ADAM_MOMENTS", "ZeroOptimizerState", "read_zero_optimizer"]

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Where each stage keeps the master weights' flat partitions, and its inner optimizer's state_dict.
_MASTER_KEY = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}
_INNER_KEY = {1: "base_optimizer_state", 2: "base_optimizer_state", 3: "optimizer_state_dict"}
_NEEDED = [("optimizer_state_dict", key) for key in (
    "zero_stage", "partition_count", "single_partition_of_fp32_groups", "fp32_flat_groups",
    "param_alignment_paddings", "base_optimizer_state", "optimizer_state_dict")]


@dataclass
class ZeroOptimizerState:
    """What an Adam-family optimizer held for the trained tensors, whole, by checkpoint key.

    Attributes:
        world_size: the ranks that wrote the checkpoint.
        stage: the ZeRO stage.
        names: the trained tensors' keys in the optimizer's order.
        master: the fp32 master weights.
        moments: ``{"exp_avg": {key: tensor}, "exp_avg_sq": {...}}``.
        step: the optimizer's step count.
        hyper: the parameter group's settings (``lr``, ``betas``, ...; without ``params``).
        model_states: rank 0's model states file, as read (engine settings, Lightning's client state).
    """

    world_size: int
    stage: int
    names: list[str]
    master: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: int = 0
    hyper: dict[str, Any] = field(default_factory=dict)
    model_states: dict[str, Any] = field(default_factory=dict, repr=False)


def read_zero_optimizer(tag_dir: Path) -> ZeroOptimizerState:
    """Reassemble a ZeRO tag directory's master weights and Adam moments (every file read through
    the restricted loader, memory-mapped).

    Raises:
        ZeroCheckpointError: a rank's files are missing or damaged, or the optimizer is not Adam
            or AdamW without amsgrad (its state is not ``step``, ``exp_avg``, ``exp_avg_sq``).
    """
    check_readable(tag_dir)
    states = read_model_states(tag_dir, report=False)
    world_size = check_rank_files(tag_dir, states)
    stage = int(states["ds_config"]["zero_optimization"]["stage"])
    names = [name for group in states.get("param_shapes") or [] for name in group]
    files: dict[Path, dict[str, Any]] = {}

    def rank_file(path: Path) -> dict[str, Any]:
        if path not in files:
            needed = _NEEDED if OPTIM_STATES.search(path.name) else None
            files[path] = load_torch_file(path, needed=needed, report=False)
        return files[path]

    master = _reassemble(tag_dir, stage, rank_file, lambda optim: optim[_MASTER_KEY[stage]])
    inner = [_inner_state(rank_file(path), stage, path) for path in _optim_files(tag_dir)]
    step, hyper = _adam_step_and_settings(inner, tag_dir)
    moments = {
        moment: _reassemble(tag_dir, stage, rank_file,
                            lambda optim, m=moment: [slot[m] for _, slot in sorted(optim[_INNER_KEY[stage]]["state"].items())])
        for moment in ADAM_MOMENTS
    }
    names = [name for name in names if name in master]
    return ZeroOptimizerState(world_size, stage, names, master, moments, step, hyper, states)


def _optim_files(tag_dir: Path) -> list[Path]:
    return sorted((p for p in tag_dir.iterdir() if OPTIM_STATES.search(p.name)),
                  key=lambda p: int(OPTIM_STATES.search(p.name).group(1)))


def _reassemble(tag_dir: Path, stage: int, rank_file: Callable[[Path], dict[str, Any]],
                partitions: Callable[[dict[str, Any]], list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """zero_to_fp32's reassembly of the trained tensors, reading ``partitions(optimizer state)``
    of each rank where it reads the master weights' partitions."""
    from deepspeed.utils import zero_to_fp32

    def load(file: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = Path(file)
        states = rank_file(path)
        if not OPTIM_STATES.search(path.name):
            return states
        optim = dict(states["optimizer_state_dict"])  # a copy: zero_to_fp32 pops from it
        optim[_MASTER_KEY[stage]] = partitions(optim)
        return {**states, "optimizer_state_dict": optim}

    kwargs: dict[str, Any] = {"tag": tag_dir.name}
    if "exclude_frozen_parameters" in inspect.signature(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint).parameters:
        kwargs["exclude_frozen_parameters"] = True
    try:
        tensors = zero_to_fp32_reading(load)(str(tag_dir.parent), **kwargs)
    except ExportError:
        raise
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError, IndexError) as err:
        raise ZeroCheckpointError(f"DeepSpeed could not reassemble the optimizer of {str(tag_dir)!r}: {err}") from err
    return {key: value.contiguous().float().clone() for key, value in tensors.items()}


def _inner_state(states: dict[str, Any], stage: int, path: Path) -> dict[str, Any]:
    """The inner optimizer's ``state_dict`` in a rank's optimizer file (``state`` by flat group)."""
    inner = states["optimizer_state_dict"].get(_INNER_KEY[stage])
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict):
        raise ZeroCheckpointError(f"{str(path)!r} holds no optimizer state in the layout of this DeepSpeed "
                                  f"(optimizer_state_dict[{_INNER_KEY[stage]!r}]): it cannot be resumed elsewhere")
    return inner


def _adam_step_and_settings(inner: list[dict[str, Any]], tag_dir: Path) -> tuple[int, dict[str, Any]]:
    """The shared step count and parameter-group settings; refuse what is not Adam's state."""
    steps = set()
    for state in inner:
        for slot in state["state"].values():
            if set(slot) != {"step", *ADAM_MOMENTS}:
                raise ZeroCheckpointError(
                    f"{str(tag_dir)!r}: the optimizer state holds {sorted(slot)}, not Adam's {['step', *ADAM_MOMENTS]}: "
                    "only Adam and AdamW (without amsgrad) can be resumed on another number of ranks or strategy")
            steps.add(int(slot["step"]))
    groups = inner[0].get("param_groups") or [{}]
    if len(steps) != 1 or len(groups) != 1 or groups[0].get("amsgrad"):
        raise ZeroCheckpointError(f"{str(tag_dir)!r}: {len(groups)} parameter groups, steps {sorted(steps)}: only one "
                                  "Adam/AdamW group (without amsgrad) can be resumed on another number of ranks")
    return steps.pop(), {key: value for key, value in groups[0].items() if key != "params"}
