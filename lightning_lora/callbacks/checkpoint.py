"""CompleteCheckpoint: a ``ModelCheckpoint`` whose checkpoints carry their name only once they are
complete on every rank, so that a process killed mid-save (SIGKILL, a node lost) never leaves
``last.ckpt`` or any other name pointing at half a checkpoint.

A save (:func:`save_complete`) goes through four steps:

1. every rank writes into ``<dir>/.lightning_lora_staging/<name>`` (Lightning's and DeepSpeed's own
   save, unchanged);
2. every rank confirms the files it wrote itself, on its own disk (node-local disks included): they
   are there, whole torch archives, and flushed (``fsync``); the reports are gathered on every rank;
3. rank 0 writes the completion record (``checkpoint_complete.json``: every file and its size)
   into a directory checkpoint;
4. the save is renamed into place. A directory cannot replace another in one rename, so the old one
   is first renamed aside (``<name>.replaced``) and deleted after.

Removing an older top-k checkpoint renames it into the staging folder before deleting it, and
happens only after the new save is complete. The next save finishes what a killed one left: a
recorded save is renamed into place, anything else there is deleted.
:func:`lightning_lora.resume.resume_checkpoint` reads the same layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_lora.resume import (
    RECORD,
    RECORD_FORMAT,
    STAGING,
    TornCheckpointError,
    check_complete,
    count_resumed_epoch,
)

__all__ = ["CheckpointNotCompleteError", "CompleteCheckpoint", "remove_checkpoint", "save_complete"]

# The files a rank writes itself: DeepSpeed's zero_pp_rank_R_..., torch.distributed.checkpoint's __R_0.distcp.
# Everything else (model states, 'latest', a .ckpt file, FSDP metadata) is global rank 0's.
_RANK_OWNED = re.compile(r"(?:zero_pp_rank_|^__)(\d+)_")
_RANK_FILE = re.compile(r"(?:^|/)(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


class CheckpointNotCompleteError(RuntimeError):
    """A save that some rank could not confirm: it keeps its staging name, and nothing older is deleted."""


class CompleteCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments, same names, same top-k and ``save_last``)
    whose checkpoints are written beside their name and renamed into it only when every rank has
    confirmed its files; older top-k checkpoints are deleted only after that.

    Resume with ``--ckpt_path auto`` (the newest complete checkpoint) or ``--ckpt_path last``;
    a Trainer user calls :func:`lightning_lora.resolve_ckpt_path`. Remote (``s3://``) dirpaths are
    not supported: renames there are not atomic.
    """

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        count_resumed_epoch(trainer)  # resuming a checkpoint of this run's epoch ends (see there), any module

    # Lightning's private hooks (2.x): _save_checkpoint is where every save of ModelCheckpoint (top-k,
    # last, on exception) goes, _remove_checkpoint every deletion; _last_global_step_saved and
    # _last_checkpoint_saved are the bookkeeping the parent's _save_checkpoint keeps.
    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint with trainer.save_checkpoint replaced by save_complete.
        save_complete(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @override
    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        remove_checkpoint(trainer, filepath)


def save_complete(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint(filepath)`` on every rank, published under ``filepath`` only once
    every rank has confirmed its own files (see the module's docstring). A collective.

    Raises:
        CheckpointNotCompleteError: on every rank, naming the file, when one rank's files are
            missing or cut short; ``filepath`` then still holds the previous checkpoint.
    """
    final = Path(filepath)
    if "://" in str(filepath):
        raise ValueError(f"CompleteCheckpoint: filepath={str(filepath)!r} is remote; only local paths are renamed "
                         "atomically")
    staged = final.parent / STAGING / final.name
    _on_each_disk(trainer, lambda: _tidy(final.parent / STAGING))
    trainer.save_checkpoint(staged, weights_only)
    reports = _gather(trainer, _confirm(staged, trainer.global_rank))
    problems = [problem for report in reports for problem in report["problems"]]
    files: dict[str, int] = {}
    for report in reports:
        files.update(report["files"])
    problems += _deepspeed_gaps(trainer, files)
    if problems:
        raise CheckpointNotCompleteError(f"checkpoint {str(final)!r} was not completed, so it was not published and "
                                         f"nothing older was deleted: {'; '.join(problems[:3])}")
    ranks = [report["rank"] for report in reports]

    def record_and_publish() -> None:
        if trainer.is_global_zero and staged.is_dir():
            _write_record(staged, files, trainer.global_step, ranks)
        if staged.exists():
            _publish(staged, final)

    _on_each_disk(trainer, record_and_publish)


def remove_checkpoint(trainer: L.Trainer, filepath: str | Path) -> None:
    """Delete a checkpoint on every disk that holds it: renamed into the staging folder first, so
    that a kill mid-deletion leaves no half-deleted checkpoint under its name."""
    path = Path(filepath)

    def remove() -> None:
        if not (path.exists() or path.is_symlink()):
            return
        doomed = path.parent / STAGING / f"{path.name}.deleting"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        _remove(doomed)
        os.rename(path, doomed)
        _remove(doomed)

    _on_each_disk(trainer, remove)


def _on_each_disk(trainer: L.Trainer, action: Callable[[], None]) -> None:
    """Run ``action`` once per disk: global rank 0 first, then the first rank of every other node,
    where it finds something left to do only if that node's disk is its own. A collective; a
    failure on any rank is raised on every rank (no rank is left waiting in a barrier)."""

    def attempt(runs: bool) -> str:
        if not runs:
            return ""
        try:
            action()
        except OSError as err:
            return f"rank {trainer.global_rank}: {err}"
        return ""

    failed = trainer.strategy.broadcast(attempt(trainer.is_global_zero), src=0)
    other_disk = trainer.local_rank == 0 and not trainer.is_global_zero
    failed = failed or next(filter(None, _gather(trainer, attempt(other_disk))), "")
    if failed:
        raise CheckpointNotCompleteError(f"CompleteCheckpoint: {failed}")


def _tidy(staging: Path) -> None:
    """Finish or undo what a killed save or deletion left: a recorded save is renamed into place
    (it is newer than what carries its name), anything unrecorded is deleted, and a checkpoint
    renamed aside for a publish that cannot finish is put back."""
    staging.mkdir(parents=True, exist_ok=True)
    complete: dict[str, bool] = {}
    for entry in staging.glob("*.ckpt"):
        try:
            check_complete(entry, staged=True)
            complete[entry.name] = True
        except TornCheckpointError:
            complete[entry.name] = False
    for entry in sorted(staging.iterdir()):
        if entry.name.endswith(".deleting"):
            _remove(entry)
        elif entry.name.endswith(".replaced"):
            final = staging.parent / entry.name.removesuffix(".replaced")
            if final.exists() or final.is_symlink() or complete.get(final.name):
                _remove(entry)
            else:
                os.rename(entry, final)
    for name, is_complete in sorted(complete.items()):
        if is_complete:
            _publish(staging / name, staging.parent / name)
        else:
            _remove(staging / name)


def _confirm(staged: Path, rank: int) -> dict[str, Any]:
    """The files this rank wrote itself (name, size, as this rank sees them on its own disk), each
    flushed there, and what is wrong with them. Never raises: every rank must reach the gather."""
    files: dict[str, int] = {}
    problems: list[str] = []
    if not staged.exists():
        return {"rank": rank, "files": files, "problems": [f"rank 0 finds nothing at {str(staged)!r}"] if rank == 0 else []}
    try:
        paths = [staged] if staged.is_file() else sorted(p for p in staged.rglob("*") if p.is_file())
        for path in paths:
            owner = _RANK_OWNED.search(path.name)
            if (int(owner.group(1)) if owner else 0) != rank:
                continue
            name = path.relative_to(staged).as_posix() if path != staged else ""
            files[name] = path.stat().st_size
            if (path.suffix in (".pt", ".ckpt") or path == staged) and not zipfile.is_zipfile(path):
                problems.append(f"rank {rank}: {str(path)!r} is cut short ({files[name]} bytes, not a whole torch archive)")
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for directory in {p.parent for p in paths}:
            _fsync_dir(directory)
    except OSError as err:
        problems.append(f"rank {rank}: {err}")
    files.pop("", None)  # a single-file checkpoint needs no record
    return {"rank": rank, "files": files, "problems": problems}


def _deepspeed_gaps(trainer: L.Trainer, files: dict[str, int]) -> list[str]:
    """The rank files a DeepSpeed save must have written that their rank did not confirm."""
    config = getattr(trainer.strategy, "config", None)
    if not isinstance(config, dict) or "zero_optimization" not in config:
        return []
    stage = config["zero_optimization"].get("stage", 0)
    gaps = [] if "latest" in files else ["rank 0 reports no 'latest'"]
    for kind in ("optim", "model") if stage == 3 else ("optim",) if stage > 0 else ():
        ranks = {int(m.group(1)) for name in files if (m := _RANK_FILE.search(name)) and m.group(2) == kind}
        gaps += [f"rank {rank} did not confirm its {kind} states" for rank in range(trainer.world_size)
                 if rank not in ranks][:4]
    if stage < 3 and not any(name.endswith("mp_rank_00_model_states.pt") for name in files):
        gaps.append("rank 0 reports no mp_rank_00_model_states.pt")
    return gaps


def _gather(trainer: L.Trainer, report: Any) -> list[Any]:
    """Every rank's ``report``, in rank order (a collective under several processes)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or trainer.world_size == 1:
        return [report]
    reports: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    return reports


def _write_record(staged: Path, files: dict[str, int], step: int, ranks: list[int]) -> None:
    record = {"format": RECORD_FORMAT, "global_step": step, "confirmed_by_ranks": ranks,
              "files": dict(sorted(files.items()))}
    temporary = staged / f".{RECORD}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, staged / RECORD)
    _fsync_dir(staged)


def _publish(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final``; a directory replaces another in two renames (old one aside first)."""
    final_is_dir = final.is_dir() and not final.is_symlink()
    if final_is_dir or (staged.is_dir() and (final.exists() or final.is_symlink())):
        replaced = staged.parent / f"{final.name}.replaced"
        _remove(replaced)
        os.rename(final, replaced)
        os.rename(staged, final)
        _remove(replaced)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync_dir(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems do not sync directories
        pass
    finally:
        os.close(handle)
