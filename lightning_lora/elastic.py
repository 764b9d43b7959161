"""Elastic resume: continue a run on another number of ranks, or under another strategy, than the
one that wrote its checkpoint, with no conversion step.

Lightning and DeepSpeed resume only the layout that was saved: a ZeRO checkpoint is partitioned by
rank, and a ``.ckpt`` file of DDP holds a torch optimizer's state by parameter index. A LoRA run's
trained state is small, so each rank reads all of it, whole (:func:`read_resume_state`: the fp32
master weights, Adam's ``exp_avg``/``exp_avg_sq`` and step, Lightning's loops, LR scheduler and
callbacks), and puts it into the optimizer it now has (:func:`install_elastic_resume`).

What carries over and what is adjusted:
- the trained weights, both Adam moments and the step, the parameter group's ``lr``: exactly;
- the data position: the training loader's state is a position in the epoch's list of batches,
  which does not depend on the number of ranks (:class:`~lightning_lora.batching.TrainingBatchSampler`);
  Lightning's count of this epoch's batches is rescaled to the new number of ranks;
- the global batch (micro-batches per optimizer step, all ranks): kept, by setting the gradient
  accumulation to ``global / ranks`` (refused when it does not divide, or when the Trainer was
  given another accumulation than 1 or that);
- the RNG states: per rank, so given back only on the same number of ranks.
Only Adam and AdamW (one parameter group, no amsgrad) are carried over; other optimizers are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.export.recorded import CHECKPOINT_KEY
from lightning_lora.export.unpickle import load_torch_file
from lightning_lora.export.zero import ENGINE_KEYS, is_zero_checkpoint, read_model_states, resolve_zero_tag
from lightning_lora.export.zero_optimizer import ADAM_MOMENTS, read_zero_optimizer

__all__ = ["Layout", "ResumeState", "check_elastic_optimizer", "install_elastic_resume", "read_resume_state"]


@dataclass(frozen=True)
class Layout:
    """How a run's training state is laid out: ``deepspeed`` (with its ZeRO stage) or ``file``
    (one ``.ckpt``: single device, DDP), on how many ranks."""

    kind: str
    world_size: int
    stage: int = 0

    def __str__(self) -> str:
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.stage} on {self.world_size} rank{'s' if self.world_size > 1 else ''}"
        return "one device" if self.world_size == 1 else f"DDP on {self.world_size} ranks"


@dataclass
class ResumeState:
    """A checkpoint's training state, whole (see the module docstring)."""

    layout: Layout
    accumulate: int
    names: list[str]  # the trained tensors, in the optimizer's order
    master: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    step: int
    hyper: dict[str, Any]
    client: dict[str, Any] = field(default_factory=dict)  # Lightning's: loops, lr_schedulers, callbacks, ...

    @property
    def global_batch(self) -> int:
        return self.layout.world_size * self.accumulate


def source_layout(path: Path) -> Layout | None:
    """The layout a checkpoint was written in; ``None`` where it does not say (an older ``.ckpt``)."""
    if is_zero_checkpoint(path):
        states = read_model_states(resolve_zero_tag(path), report=False)
        stage = int(states["ds_config"]["zero_optimization"]["stage"])
        return Layout("deepspeed", int(states.get("dp_world_size") or 1), stage)
    record = load_torch_file(path, needed=[(CHECKPOINT_KEY,)], report=False).get(CHECKPOINT_KEY) or {}
    ranks = record.get("world_size") if isinstance(record, dict) else None
    return Layout("file", ranks) if isinstance(ranks, int) else None


def target_layout(trainer: L.Trainer) -> Layout:
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return Layout("deepspeed", trainer.world_size, int(strategy.config["zero_optimization"]["stage"]))
    return Layout("file", trainer.world_size)


def read_resume_state(path: Path) -> ResumeState:
    """Read a checkpoint's training state, whole, through the restricted loader."""
    if is_zero_checkpoint(path):
        tag_dir = resolve_zero_tag(path)
        optimizer = read_zero_optimizer(tag_dir)
        states = optimizer.model_states
        accumulate = int(states["ds_config"].get("gradient_accumulation_steps") or 1)
        client = {key: value for key, value in states.items() if key not in ENGINE_KEYS}
        layout = Layout("deepspeed", optimizer.world_size, optimizer.stage)
        return ResumeState(layout, accumulate, optimizer.names, optimizer.master, optimizer.moments, optimizer.step,
                           optimizer.hyper, client)
    return _read_ckpt_file(path)


def _read_ckpt_file(path: Path) -> ResumeState:
    needed = [("state_dict",), ("optimizer_states",), ("loops",), (CHECKPOINT_KEY, "trainable"),
              (CHECKPOINT_KEY, "world_size"), (CHECKPOINT_KEY, "accumulate_grad_batches")]
    checkpoint = load_torch_file(path, argument="--ckpt_path", needed=needed)
    record = checkpoint[CHECKPOINT_KEY]
    names = list(record["trainable"])
    optimizers = checkpoint["optimizer_states"]
    if len(optimizers) != 1 or len(optimizers[0]["param_groups"]) != 1:
        raise ValueError(f"--ckpt_path={str(path)!r}: {len(optimizers)} optimizers; only one Adam/AdamW with one "
                         "parameter group can be resumed on another number of ranks or strategy")
    state, group = optimizers[0]["state"], optimizers[0]["param_groups"][0]
    slots = [state.get(index, {}) for index in range(len(names))]
    if any(set(slot) != {"step", *ADAM_MOMENTS} for slot in slots) or group.get("amsgrad"):
        raise ValueError(f"--ckpt_path={str(path)!r}: the optimizer state is not Adam's ({['step', *ADAM_MOMENTS]}): only "
                         "Adam and AdamW (without amsgrad) can be resumed on another number of ranks or strategy")
    moments = {m: {name: slot[m].float() for name, slot in zip(names, slots)} for m in ADAM_MOMENTS}
    master = {name: checkpoint["state_dict"][name].float() for name in names}
    steps = {int(slot["step"]) for slot in slots}
    client = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}
    layout = Layout("file", int(record["world_size"]))
    hyper = {key: value for key, value in group.items() if key != "params"}
    return ResumeState(layout, int(record.get("accumulate_grad_batches") or 1), names, master, moments, max(steps),
                       hyper, client)


def install_elastic_resume(module: L.LightningModule) -> None:
    """Make the module's Trainer resume a checkpoint of another layout elastically (a checkpoint of
    the same layout goes to the strategy's own loading, unchanged). Called in ``setup("fit")``."""
    strategy = module.trainer.strategy
    if getattr(strategy, "_lightning_lora_elastic", False):
        return
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        source, target = source_layout(Path(checkpoint_path)), target_layout(module.trainer)
        if source is None or source == target:
            return original(checkpoint_path, *args, **kwargs)
        return _load_elastic(module, Path(checkpoint_path), target)

    strategy.load_checkpoint = load_checkpoint
    strategy._lightning_lora_elastic = True


def _load_elastic(module: L.LightningModule, path: Path, target: Layout) -> dict[str, Any]:
    trainer = module.trainer
    state = read_resume_state(path)
    accumulate = _accumulation(trainer, state, target, path)
    trainer.accumulate_grad_batches = accumulate
    checkpoint = dict(state.client)  # its RNG states are given back only on as many ranks (LoraFinetuneModule)
    _rescale_epoch_progress(checkpoint, state.layout.world_size, target.world_size, path)
    trainable = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    here, there = {name for name, _ in trainable}, set(state.names)
    if here != there:
        name, whose = (min(here - there), "this module's") if here - there else (min(there - here), "the checkpoint's")
        raise ValueError(f"--ckpt_path={str(path)!r}: the trained tensor {name!r} is only {whose} (and "
                         f"{len(here ^ there) - 1} more differ): not a checkpoint of this run's LoRA settings")
    if target.kind == "deepspeed":
        _into_deepspeed(trainer, trainable, state, accumulate)
    else:
        checkpoint["state_dict"] = {name: state.master[name].to(param.dtype) for name, param in trainable}
        checkpoint["optimizer_states"] = [_torch_adam_state(state, [name for name, _ in trainable])]
        module.strict_loading = False  # the frozen weights are the base's, loaded already
        module._check_elastic_optimizer = True  # the optimizer exists only at on_train_start
    rank_zero_info(
        f"Resuming {str(path)!r} ({state.layout}) on {target}: weights, Adam moments (step {state.step}), LR schedule "
        f"and data position carried over; global batch {state.global_batch} micro-batches "
        f"= {target.world_size} x accumulate_grad_batches={accumulate}"
        + ("" if state.layout.world_size == target.world_size else "; RNG states not restored (another number of ranks)")
    )
    return checkpoint


def _accumulation(trainer: L.Trainer, state: ResumeState, target: Layout, path: Path) -> int:
    """The accumulation that keeps the global batch; refuse one that cannot, naming the numbers."""
    wanted, given = state.global_batch, trainer.accumulate_grad_batches
    if wanted % target.world_size:
        raise ValueError(f"--ckpt_path={str(path)!r} trained with a global batch of {wanted} micro-batches "
                         f"({state.layout.world_size} ranks x accumulate_grad_batches={state.accumulate}), which "
                         f"{target.world_size} ranks cannot share evenly: resume on a number of ranks dividing {wanted}")
    accumulate = wanted // target.world_size
    if given not in (1, accumulate):
        raise ValueError(f"trainer.accumulate_grad_batches={given} would change the global batch of {str(path)!r} "
                         f"from {wanted} to {given * target.world_size} micro-batches: leave it unset (it becomes "
                         f"{accumulate}) or set it to {accumulate}")
    return accumulate


def _rescale_epoch_progress(checkpoint: dict[str, Any], source_ranks: int, ranks: int, path: Path) -> None:
    """Lightning counts an epoch's batches per rank: make the count the new ranks' (each takes
    position / ranks), so that the epoch ends with the data.

    Each of Lightning's counters (ready, started, processed, completed) moves by the same amount,
    because their differences say where in a batch the checkpoint was written (``completed`` is one
    behind in ``on_train_batch_end``), and Lightning decides from them what to finish on resume."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    loaders = fit_loop.get("state_dict", {}).get("combined_loader") or [{}]
    position = loaders[0].get("position")
    if position is None:
        raise ValueError(f"--ckpt_path={str(path)!r} records no data position shared by the ranks (written by an "
                         "older lightning_lora): resume it on the number of ranks and strategy that wrote it")
    progress = fit_loop["epoch_loop.batch_progress"]
    before, after = math.ceil(position / source_ranks), math.ceil(position / ranks)
    if progress["current"]["processed"] == 0:  # this epoch's count not started (Lightning reset it)
        return
    if progress["current"]["processed"] != before:
        raise ValueError(f"--ckpt_path={str(path)!r}: Lightning counted {progress['current']['processed']} batches of "
                         f"this epoch per rank, but the data position {position} on {source_ranks} ranks makes "
                         f"{before}: cannot carry the count over to {ranks} rank{'s' if ranks > 1 else ''}")
    for counter in ("ready", "started", "processed", "completed"):
        progress["total"][counter] += after - before
        progress["current"][counter] += after - before


def _torch_adam_state(state: ResumeState, names: list[str]) -> dict[str, Any]:
    """The state a torch Adam/AdamW over ``names`` (in this order) loads."""
    slots = {
        index: {"step": torch.tensor(float(state.step)), **{m: state.moments[m][name].clone() for m in ADAM_MOMENTS}}
        for index, name in enumerate(names)
    }
    return {"state": slots, "param_groups": [{**state.hyper, "params": list(range(len(names)))}]}


def _into_deepspeed(trainer: L.Trainer, trainable: list[tuple[str, torch.nn.Parameter]], state: ResumeState,
                    accumulate: int) -> None:
    """Put the state into the live DeepSpeed engine: each rank sets its own partitions from the whole tensors."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine = trainer.strategy.deepspeed_engine
    _check_adam(engine.optimizer.optimizer)
    _create_adam_state(engine.optimizer)
    for name, param in trainable:
        value = state.master[name]
        if hasattr(param, "ds_id"):  # ZeRO-3: the working copy is partitioned too
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value.to(param.dtype).view_as(param.data))
        else:
            param.data.copy_(value.to(param.dtype))
        if hasattr(param, "ds_id"):
            for key in (None, *ADAM_MOMENTS):
                _set_zero3_partition(engine.optimizer, param, value if key is None else state.moments[key][name], key)
        else:
            safe_set_full_fp32_param(param, value)
            for moment in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, state.moments[moment][name], moment)
    for slot in engine.optimizer.optimizer.state.values():
        slot["step"] = torch.tensor(float(state.step))
    for group in engine.optimizer.param_groups:
        group.update({key: state.hyper[key] for key in ("lr", "initial_lr") if key in state.hyper})
    engine.global_steps = state.step
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * trainer.world_size * accumulate)


def _create_adam_state(zero_optimizer: Any) -> None:
    """Give the inner optimizer's flat partitions an Adam state now (DeepSpeed creates it at the first
    step), and link each parameter's view of it (ZeRO-1/2), so that the moments can be set."""
    inner = zero_optimizer.optimizer
    # The flat fp32 partitions the inner optimizer steps (ZeRO-3 names them otherwise than ZeRO-1/2).
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or zero_optimizer.single_partition_of_fp32_groups
    for flat in flats:
        if "exp_avg" not in inner.state[flat]:
            inner.state[flat].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                     exp_avg_sq=torch.zeros_like(flat))
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for params, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)


def _set_zero3_partition(zero_optimizer: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's part of ``value`` into the fp32 master partition (``key=None``) or the Adam state
    ``key`` of a ZeRO-3 parameter. DeepSpeed's ``safe_set_full_*`` cannot: for a parameter whose
    size the ranks do not divide, the last rank's part reaches past the unpadded value."""
    import torch.distributed as dist

    group, offset, numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
    flat = zero_optimizer.fp32_partitioned_groups_flat[group]
    target = flat if key is None else zero_optimizer.optimizer.state[flat][key]
    rank, ranks = dist.get_rank(group=zero_optimizer.dp_process_group), dist.get_world_size(group=zero_optimizer.dp_process_group)
    padded = torch.zeros(numel * ranks, dtype=target.dtype)
    padded[: value.numel()] = value.flatten()
    target.data.narrow(0, offset, numel).copy_(padded.narrow(0, numel * rank, numel))


def _check_adam(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or len(optimizer.param_groups) != 1:
        raise ValueError(f"the optimizer is {type(optimizer).__name__} with {len(optimizer.param_groups)} parameter "
                         "groups: only Adam and AdamW with one group can resume on another number of ranks or strategy")


def check_elastic_optimizer(module: L.LightningModule) -> None:
    """After an elastic resume into a torch optimizer (DDP, single device), before the first step:
    refuse one that is not Adam's (Lightning loaded the Adam state into it without looking)."""
    if getattr(module, "_check_elastic_optimizer", False):
        for optimizer in module.trainer.optimizers:
            _check_adam(optimizer)
        module._check_elastic_optimizer = False
