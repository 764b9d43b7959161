"""Which checkpoint a run resumes from: never one that a killed save left half-written.

A checkpoint is *complete* when:

- a directory (DeepSpeed ZeRO, sharded FSDP) carries a completion record (:data:`RECORD`, written by
  :func:`lightning_lora.callbacks.checkpoint.save_complete` after every rank confirmed its own
  files) and every file the record lists is there with its recorded size;
- a directory without one (Lightning's own ``ModelCheckpoint`` or ``trainer.save_checkpoint``):
  DeepSpeed's ``latest``, the model states and every rank's files they call for are there, each a
  whole torch archive (FSDP: ``.metadata`` and ``meta.pt``, which are written last). A directory
  overwritten in place (``save_last=True``) can still mix whole files of two saves: only the
  record rules that out, which is why ``CompleteCheckpoint`` writes ``last`` beside and renames it;
- a ``.ckpt`` file is a whole torch archive (torch writes the zip directory last: a file cut
  short has none).

Candidates are the ``*.ckpt`` entries of the ``ModelCheckpoint`` directories and of the trainer's
``default_root_dir`` (Lightning's SLURM ``hpc_ckpt_N.ckpt``), plus saves that were complete but not
yet renamed into place when the process died (in :data:`STAGING`). Every ``.pt`` file is read
through the project's restricted loader (:func:`lightning_lora.export.unpickle.load_torch_file`).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_lora.errors import ExportError

__all__ = ["RECORD", "STAGING", "TornCheckpointError", "check_complete", "checkpoint_dirs", "count_resumed_epoch",
           "find_checkpoints", "resolve_ckpt_path", "resume_checkpoint"]

# Inside a checkpoint directory: which files the save wrote, with their sizes, once all ranks confirmed them.
RECORD = "checkpoint_complete.json"
RECORD_FORMAT = "lightning_lora.checkpoint/1"
# Beside the checkpoints: saves being written, checkpoints being replaced or deleted. Its name holds
# no "ckpt_", which Lightning's hpc_ckpt numbering would count.
STAGING = ".lightning_lora_staging"
_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's CHECKPOINT_NAME_LAST, versioned or not
_RANK_FILE = re.compile(r"(?:^|/)(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


class TornCheckpointError(ExportError):
    """A checkpoint that a save did not finish writing; the message names the missing or short file."""


def check_complete(path: str | Path, staged: bool = False) -> None:
    """Raise :class:`TornCheckpointError`, naming the file, unless ``path`` is a complete checkpoint.

    Args:
        path: a checkpoint directory or ``.ckpt`` file.
        staged: ``path`` lies in :data:`STAGING` (also found from its name), where only a recorded
            directory is complete.
    """
    path = Path(path)
    staged = staged or path.parent.name == STAGING
    if not path.exists():
        raise TornCheckpointError(f"{str(path)!r} is missing")
    if path.is_file():
        _check_archive(path)
    elif (path / RECORD).is_file():
        _check_record(path)
    elif staged:
        raise TornCheckpointError(f"{str(path / RECORD)!r} is missing: the save was not confirmed by every rank")
    elif (path / "latest").is_file() or any(path.glob("*/*_model_states.pt")):
        _check_zero(path)
    elif (path / ".metadata").is_file() or (path / "meta.pt").exists():  # Lightning writes meta.pt last
        _check_present(path / ".metadata")
        _check_archive(path / "meta.pt")
    else:
        raise TornCheckpointError(f"{str(path)!r} holds no {RECORD}, no DeepSpeed 'latest' and no FSDP '.metadata': "
                                  "a save that did not get far, or not a checkpoint")


def _check_present(path: Path) -> None:
    if not path.is_file():
        raise TornCheckpointError(f"{str(path)!r} is missing")


def _check_archive(path: Path) -> None:
    _check_present(path)
    if not zipfile.is_zipfile(path):
        raise TornCheckpointError(f"{str(path)!r} is cut short ({path.stat().st_size} bytes, not a whole torch archive)")


def _check_record(path: Path) -> None:
    from lightning_lora.export.paths import inside

    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError) as err:
        raise TornCheckpointError(f"{str(path / RECORD)!r} is not readable: {err}") from err
    if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT and isinstance(record.get("files"), dict)):
        raise TornCheckpointError(f"{str(path / RECORD)!r} is not a {RECORD_FORMAT} completion record")
    for name, size in sorted(record["files"].items()):
        try:
            file = inside(path, name, repr(str(path / RECORD)))
        except ExportError as err:
            raise TornCheckpointError(str(err)) from err
        if not file.is_file():
            raise TornCheckpointError(f"{str(file)!r} is missing (its completion record lists it, {size} bytes)")
        if file.stat().st_size != size:
            raise TornCheckpointError(f"{str(file)!r} is {file.stat().st_size} bytes; its completion record says {size}")


def _check_zero(path: Path) -> None:
    """A ZeRO directory without a record: ``latest``, then every file the model states call for."""
    from lightning_lora.export.zero import read_model_states, resolve_zero_tag

    _check_present(path / "latest")  # DeepSpeed writes it after rank 0's files
    try:
        tag_dir = resolve_zero_tag(path)
    except ExportError as err:
        raise TornCheckpointError(str(err)) from err
    for file in sorted(tag_dir.glob("*_states.pt")):
        _check_archive(file)
    try:
        states = read_model_states(tag_dir, report=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise TornCheckpointError(f"the model states in {str(tag_dir)!r} are not readable: {err}") from err
    for name in _expected_zero_files(states, [p.name for p in tag_dir.iterdir()]):
        _check_present(tag_dir / name)


def _expected_zero_files(states: dict[str, Any], present: list[str]) -> Iterator[str]:
    """The rank files a ZeRO save writes, by name, from the world size and stage its model states
    record (one at a time: a damaged file may record any world size)."""
    world_size = states.get("dp_world_size") or 1
    stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    if not isinstance(world_size, int) or not isinstance(stage, int) or world_size < 1:
        raise TornCheckpointError(f"the model states record dp_world_size={world_size!r}, stage={stage!r}")
    prefixes = {m.group(1) or "" for name in present if (m := _RANK_FILE.search(name)) and m.group(3) == "optim"}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    if stage == 3:
        yield from (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size))
    else:
        yield "mp_rank_00_model_states.pt"
    if stage > 0:
        yield from (f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size))


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found in a directory: its global step if complete, else why it is torn."""

    path: Path
    step: int | None
    problem: str | None
    staged: bool

    @property
    def is_last(self) -> bool:
        return bool(_LAST.match(self.path.name))


def find_checkpoints(dirpaths: list[str | Path]) -> list[Candidate]:
    """Every ``*.ckpt`` entry of ``dirpaths`` and of their staging folders, judged."""
    from lightning_lora.export.checkpoint import recorded_step

    found: list[Candidate] = []
    seen: set[Path] = set()
    for directory in map(Path, dirpaths):
        for staged, folder in ((False, directory), (True, directory / STAGING)):
            entries = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
            for entry in entries:
                if entry.resolve() in seen:
                    continue
                seen.add(entry.resolve())
                try:
                    check_complete(entry, staged)
                except TornCheckpointError as err:
                    found.append(Candidate(entry, None, str(err), staged))
                    continue
                step = recorded_step(entry)  # the restricted loader, metadata only
                problem = None if step is not None else "no global_step that the restricted loader reads"
                found.append(Candidate(entry, step, problem, staged))
    return found


def _newest(candidates: list[Candidate]) -> Candidate | None:
    complete = [c for c in candidates if c.problem is None]
    # The same step saved twice (a top-k and "last"): the one written later.
    return max(complete, key=lambda c: (c.step, os.stat(c.path).st_mtime_ns), default=None)


def _torn_text(candidates: list[Candidate]) -> str:
    torn = [f"{c.path.name}{' (staged)' if c.staged else ''}: {c.problem}" for c in candidates if c.problem]
    return "; ".join(torn[:3]) + (f"; and {len(torn) - 3} more" if len(torn) > 3 else "")


def resume_checkpoint(*dirpaths: str | Path, last: bool = False) -> str | None:
    """The newest complete checkpoint in ``dirpaths`` by ``global_step``, or ``None`` (start fresh).

    Says in one line which one it chose and which it skipped as torn, or why there is none.

    Args:
        dirpaths: the directories checkpoints are saved in (``ModelCheckpoint(dirpath=...)``, the
            trainer's ``default_root_dir`` for ``hpc_ckpt_N.ckpt``).
        last: Lightning's ``ckpt_path="last"``: the newest complete ``last*.ckpt``; if every one
            is torn or there is none, the newest complete checkpoint of any name.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    candidates = find_checkpoints(list(dirpaths))
    where = ", ".join(repr(str(d)) for d in dirpaths)
    torn = _torn_text(candidates)
    chosen = _newest([c for c in candidates if c.is_last]) if last else None
    note = ""
    if last and chosen is None:
        lasts = [c for c in candidates if c.is_last]
        note = f"no complete last checkpoint ({_torn_text(lasts) or 'none saved'}), so "
    chosen = chosen or _newest(candidates)
    if chosen is None:
        rank_zero_warn(f"Starting fresh: no complete checkpoint in {where} ({torn or 'none saved yet'})")
        return None
    kind = "last" if last and not note else "newest complete"
    skipped = f"; skipped as torn: {torn}" if torn else ""
    rank_zero_info(f"Resuming from {str(chosen.path)!r} (global_step {chosen.step}): {note}the {kind} checkpoint "
                   f"in {where}{skipped}")
    return str(chosen.path)


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """Where ``trainer`` saves checkpoints: each ``ModelCheckpoint``'s and ``OnExceptionCheckpoint``'s
    directory and ``default_root_dir`` (preemption saves, Lightning's ``hpc_ckpt_N.ckpt``). Local paths only."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    dirs: list[Path] = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            # Without a dirpath, Lightning derives it from the logger (a new version directory per run),
            # in ModelCheckpoint's private __resolve_ckpt_dir, as its own ckpt_path="last" does.
            dirs.append(callback.dirpath or callback._ModelCheckpoint__resolve_ckpt_dir(trainer))
        elif isinstance(callback, OnExceptionCheckpoint):
            dirs.append(callback.dirpath)
    dirs.append(trainer.default_root_dir)
    unique: dict[Path, Path] = {}
    for directory in dirs:
        if "://" not in str(directory):
            unique.setdefault(Path(directory).resolve(), Path(directory))
    return list(unique.values())


def resolve_ckpt_path(trainer: Any, ckpt_path: str | Path | None, argument: str = "ckpt_path") -> str | Path | None:
    """``trainer.fit``'s ``ckpt_path`` made safe: ``"auto"`` and ``"last"`` become the checkpoint
    :func:`resume_checkpoint` chooses in :func:`checkpoint_dirs` (or ``None``); a path is refused,
    naming the missing or short file, unless it is complete. Lightning's other values pass through.
    ``argument`` is how errors name the option (the command line passes ``"--ckpt_path"``).

    Example::

        trainer.fit(model, datamodule=data, ckpt_path=resolve_ckpt_path(trainer, "auto"))
    """
    if ckpt_path in ("auto", "last"):
        return resume_checkpoint(*checkpoint_dirs(trainer), last=ckpt_path == "last")
    if ckpt_path is None or ckpt_path in ("best", "hpc") or re.match(r"^(registry|[a-z0-9]+://)", str(ckpt_path)):
        return ckpt_path
    try:
        check_complete(ckpt_path)
    except TornCheckpointError as err:
        raise TornCheckpointError(f"{argument}={str(ckpt_path)!r} is not a complete checkpoint: {err}") from None
    return ckpt_path


def count_resumed_epoch(trainer: Any) -> None:
    """Count the epoch a resume at an epoch's end starts, which Lightning (2.5, 2.6) leaves uncounted.

    Resuming a checkpoint written in ``on_train_batch_end`` at an epoch's last batch (a step-based
    ``ModelCheckpoint``, our ``Preemption``), Lightning marks that epoch complete and goes on to the
    next one, but still as the restarted one: it skips the next epoch's ``ready``/``started`` counts
    (and its ``on_train_epoch_start`` hooks). A checkpoint written during that epoch then reads as
    written between epochs, and resuming it trains the epoch again from its start. Call in
    ``on_train_start`` (``LoraFinetuneModule`` and ``CompleteCheckpoint`` do); calling it twice
    changes nothing."""
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress
    if (
        fit_loop.restarted_mid_epoch
        and fit_loop.epoch_loop.restarted_on_train_batch_end
        and fit_loop.epoch_loop.batch_progress.is_last_batch
        and epochs.current.ready == epochs.current.processed  # Lightning just counted the epoch complete
    ):
        epochs.increment_ready()
        epochs.increment_started()
