"""Preemption: on SIGTERM or SIGUSR1, every rank saves a complete checkpoint at the next optimizer
step, then the run stops (and, under SLURM, requeues itself).

Why not Lightning's own handling: its SIGTERM handler runs a collective inside the handler and
stops only the ranks that received the signal, without saving; its SLURM SIGUSR1 handler saves
inside the handler, at whatever line the signal interrupted (mid-step, mid-collective), on the
ranks the signal reached. Here a handler only notes the signal; at each optimizer-step boundary
the ranks agree on it with one all-reduce (the signal may reach one rank only), save together
through :func:`lightning_lora.callbacks.checkpoint.save_complete`, and raise :class:`Preempted`.

The checkpoint is ``<default_root_dir>/hpc_ckpt_<N+1>.ckpt``: Lightning's own name for it, which a
requeued SLURM job resumes from by itself, and ``--ckpt_path auto`` finds anywhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.callbacks.checkpoint import save_complete

__all__ = ["Preempted", "Preemption"]

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Preempted(SIGTERMException):
    """Raised on every rank once the preemption checkpoint is complete: ``trainer.fit`` stops
    without ``on_train_end`` (no export of a half-trained run). A ``SystemExit``: the process exits
    with ``code``, 0 when the job was requeued, else 128 + the signal number (as the shell reports
    a process the signal stopped; ``torchrun --max-restarts`` then restarts the workers)."""


class Preemption(L.Callback):
    """Save a complete checkpoint on every rank at the next optimizer step after SIGTERM or SIGUSR1
    (on any rank), then stop; under SLURM with Lightning's auto-requeue, requeue the job first.

    Resume with ``--ckpt_path auto`` (or, under SLURM, nothing: Lightning resumes ``hpc_ckpt_N``).
    Signals that arrive before training starts (while the model loads) get Lightning's handling.

    Args:
        signals: the signal names to handle. SLURM's ``--signal=USR1@90`` sends SIGUSR1 ahead of
            the time limit; a preemption or ``scancel`` sends SIGTERM, and SIGKILL after
            ``KillWait`` (30 s by default): a save must fit in that time.
        requeue: run ``scontrol requeue`` after the save; ``None`` (default) does when Lightning's
            SLURM environment has ``auto_requeue`` (its default).
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool | None = None) -> None:
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        known = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}
        for name in names:
            if name not in known:
                raise ValueError(f"Preemption(signals={names!r}): {name!r} is not a signal that can be handled; "
                                 "use names such as 'SIGTERM' or 'SIGUSR1'")
        self.signals = [signal.Signals[name] for name in names]
        self.requeue = requeue
        self.saved: str | None = None  # the preemption checkpoint, once written
        self._received = 0
        self._checked_step = -1
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes: note the signal and nothing more.
        self._received = self._received or signum

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its handlers just before; these replace them while training runs.
        self._received, self._checked_step = 0, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: fit runs outside the main thread, where signals cannot be handled")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:  # within a gradient accumulation
            return
        self._checked_step = trainer.global_step
        strategy = trainer.strategy
        received = strategy.reduce(torch.tensor(self._received, device=strategy.root_device), reduce_op="max")
        signum = int(received.item())
        if not signum:
            return
        path = strategy.broadcast(str(_next_hpc_path(Path(trainer.default_root_dir))) if trainer.is_global_zero else None)
        save_complete(trainer, path)
        self.saved = path
        rank_zero_info(f"Preemption: {signal.Signals(signum).name} received; every rank saved {path!r} at global_step "
                       f"{trainer.global_step}; stopping")
        requeue = self.requeue if self.requeue is not None else _slurm_auto_requeue(trainer)
        requeued = strategy.broadcast(_requeue_slurm_job() if requeue and trainer.is_global_zero else False)
        raise Preempted(0 if requeued else 128 + signum)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        # Lightning's handlers back, for it to restore the process's own at its teardown.
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _next_hpc_path(directory: Path) -> Path:
    """``hpc_ckpt_<N+1>.ckpt``, N the highest taken: Lightning resumes the highest one."""
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _HPC.match(p.name))] if directory.is_dir() else []
    return directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def _slurm_auto_requeue(trainer: L.Trainer) -> bool:
    # The Trainer's private _accelerator_connector, read as Lightning's own signal connector reads it:
    # a single-device strategy has no public cluster_environment.
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def _requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (an array task as ``JOB_TASK``), as Lightning does; whether it did."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        rank_zero_warn(f"Preemption: cannot requeue: SLURM_JOB_ID={job_id!r} is not a job id")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"Preemption: 'scontrol requeue {job_id}' failed: {err}")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"Preemption: 'scontrol requeue {job_id}' exited {result.returncode}: {result.stderr.strip()}")
        return False
    rank_zero_info(f"Preemption: requeued SLURM job {job_id}")
    return True
