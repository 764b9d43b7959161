"""Torn checkpoints and preemption signals: a save killed at any point never leaves ``last`` or
``auto`` pointing at half a checkpoint, a torn path is refused naming its file, and SIGTERM or
SIGUSR1 on any rank makes every rank save at the next optimizer step and stop.

Real runs: two-process DeepSpeed ZeRO-3 on CPU, killed by a real SIGKILL in the middle of a real
save, then resumed with ``auto`` and stopped by a real SIGTERM that reaches rank 1 only; the
command line in-process on one device (SIGUSR1, SLURM requeue through a stand-in ``scontrol``).
The kill points in between are the files of those real checkpoints, removed or cut short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import SCRIPT

from lightning_lora import InstructionDataModule, LoraFinetuneModule, resolve_ckpt_path, resume_checkpoint
from lightning_lora.callbacks import CompleteCheckpoint, HFExport
from lightning_lora.callbacks.checkpoint import CheckpointNotCompleteError, _tidy
from lightning_lora.export.checkpoint import recorded_step
from lightning_lora.lightning_cli import LightningLoraCLI
from lightning_lora.resume import RECORD, STAGING, TornCheckpointError, check_complete, find_checkpoints
from lightning_lora.tiny import quickstart_rows

ZERO3 = ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--keep-checkpoints", "complete", "--preemption"]
RANK_FILES = [f"checkpoint/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
              for rank in (0, 1) for kind in ("model", "optim")]


def _run(base: Path, out: Path, args: list[str], log: str) -> int:
    """train_run.py in its own process group, logging to ``out/log``; returns rank 0's exit status
    once every rank has exited (the ranks still alive 20 s after rank 0 are killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    with open(out / log, "w") as output:
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--base", str(base), "--out", str(out), *args],
                                   stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status = process.wait(timeout=300)
    for tick in range(150):  # 0.2 s each: 20 s of grace, then SIGKILL
        try:
            os.killpg(process.pid, 0 if tick < 100 else signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    return status


@pytest.fixture(scope="module")
def preempted(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run A: SIGKILL on rank 0 right after its first file of the step-3 ``last.ckpt`` save (the
    top-k ``step=3.ckpt`` is complete); a copy of what it left. Run B, in the same directory:
    ``--resume-from auto``, SIGTERM to rank 1 alone at the batch after step 4."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    out.mkdir()
    killed = _run(llama_base, out, [*ZERO3, "--steps", "8", "--kill-in-save", "3:last.ckpt"], "killed.log")
    after_kill = out.parent / "after-kill"
    shutil.copytree(out, after_kill, symlinks=True)
    stopped = _run(llama_base, out, [*ZERO3, "--steps", "8", "--resume-from", "auto", "--record",
                                     "--signal-at", "4:1:SIGTERM"], "stopped.log")
    return {"out": out, "after_kill": after_kill, "killed": killed, "stopped": stopped}


def test_a_kill_mid_save_leaves_last_on_the_previous_whole_checkpoint(preempted: dict[str, Any], lightning_log) -> None:
    assert preempted["killed"] == -signal.SIGKILL, (preempted["out"] / "killed.log").read_text()[-3000:]
    checkpoints = preempted["after_kill"] / "checkpoints"
    staged = checkpoints / STAGING / "last.ckpt"
    assert (staged / RANK_FILES[0]).is_file()  # the killed save had begun writing last.ckpt
    last = resume_checkpoint(checkpoints, last=True)
    assert last == str(checkpoints / "last.ckpt") and recorded_step(last) == 2
    # Every file of it belongs to the step-2 save (its record lists each with its size).
    record = json.loads((checkpoints / "last.ckpt" / RECORD).read_text())
    assert record["global_step"] == 2 and set(RANK_FILES) <= set(record["files"])
    assert resume_checkpoint(checkpoints) == str(checkpoints / "step=3.ckpt")
    said = [r.getMessage() for r in lightning_log.records if r.getMessage().startswith("Resuming from")]
    assert f"skipped as torn: last.ckpt (staged): '{staged / RECORD}' is missing" in said[-1]
    with pytest.raises(TornCheckpointError, match=re.escape(f"ckpt_path='{staged}' is not a complete checkpoint: "
                                                                f"'{staged / RECORD}' is missing")):
        resolve_ckpt_path(None, staged)


def test_sigterm_on_one_rank_saves_on_every_rank_at_the_next_step_and_stops(preempted: dict[str, Any]) -> None:
    out = preempted["out"]
    assert preempted["stopped"] == 128 + signal.SIGTERM, (out / "stopped.log").read_text()[-3000:]
    # The resumed run started from the newest complete checkpoint, not the torn last.ckpt.
    assert (out / "resumed_from.txt").read_text() == str(out / "checkpoints" / "step=3.ckpt")
    assert torch.load(out / "start.pt", weights_only=True)["global_step"] == 3
    # The signal reached rank 1 during step 5's batch: both ranks saved at step 5 and stopped there.
    for rank in (0, 1):
        stop = json.loads((out / f"stopped-rank{rank}.json").read_text())
        assert stop == {"type": "Preempted", "code": 143, "global_step": 5}
    hpc = out / "hpc_ckpt_1.ckpt"
    check_complete(hpc)
    record = json.loads((hpc / RECORD).read_text())
    assert record["confirmed_by_ranks"] == [0, 1] and set(RANK_FILES) <= set(record["files"])
    assert recorded_step(hpc) == 5
    assert resume_checkpoint(out / "checkpoints", out) == str(hpc)
    # Top-k kept the newest two; the torn staged save of run A was cleared by run B's first save.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [STAGING, "last.ckpt", "step=3.ckpt", "step=4.ckpt"]
    assert not any((out / "checkpoints" / STAGING).iterdir())


# Each kill point: how many files of the new save (last.ckpt at step 5: rank files in the order
# DeepSpeed writes them, then 'latest' and the scripts, then the record) were on disk, and then what
# was renamed. A half number: the next file was half written.
KILL_POINTS = {
    "before-first-file": 0, "after-rank0-model": 1, "mid-rank0-optim": 1.5, "after-rank0-optim": 2,
    "after-rank1-model": 3, "after-rank1-optim-before-latest": 4, "after-latest": -1, "after-record-before-last": None,
    "mid-rename-into-last": None, "after-last": None, "while-deleting-older-top-k": None,
}


def _new_save_files(hpc: Path) -> list[str]:
    others = sorted(set(json.loads((hpc / RECORD).read_text())["files"]) - set(RANK_FILES) - {"latest"})
    return [*RANK_FILES, "latest", *others, RECORD]


def _kill_point(run: Path, scenario: Path, point: str) -> Path:
    """checkpoints/ holding step=3.ckpt, last.ckpt (step 4) and a save of last.ckpt at step 5 (the
    files of run B's hpc_ckpt_1.ckpt) killed at ``point``."""
    checkpoints, staging = scenario / "checkpoints", scenario / "checkpoints" / STAGING
    for name in ("step=3.ckpt", "last.ckpt"):
        shutil.copytree(run / "checkpoints" / name, checkpoints / name)
    new = _new_save_files(run / "hpc_ckpt_1.ckpt")
    written = len(new) if KILL_POINTS[point] is None else KILL_POINTS[point] % len(new)
    (staging / "last.ckpt" / "checkpoint").mkdir(parents=True)
    for name in new[: int(written)]:
        shutil.copy(run / "hpc_ckpt_1.ckpt" / name, staging / "last.ckpt" / name)
    if written % 1:
        data = (run / "hpc_ckpt_1.ckpt" / new[int(written)]).read_bytes()
        (staging / "last.ckpt" / new[int(written)]).write_bytes(data[: len(data) // 2])
    if point in ("mid-rename-into-last", "after-last", "while-deleting-older-top-k"):
        os.rename(checkpoints / "last.ckpt", staging / "last.ckpt.replaced")
    if point in ("after-last", "while-deleting-older-top-k"):
        os.rename(staging / "last.ckpt", checkpoints / "last.ckpt")
        (staging / "last.ckpt.replaced" / RANK_FILES[0]).unlink()  # its deletion had begun
    if point == "while-deleting-older-top-k":
        os.rename(checkpoints / "step=3.ckpt", staging / "step=3.ckpt.deleting")
        (staging / "step=3.ckpt.deleting" / RANK_FILES[1]).unlink()
    return checkpoints


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_every_kill_point_resumes_from_the_newest_whole_checkpoint(point: str, preempted: dict[str, Any],
                                                                    tmp_path: Path, lightning_log) -> None:
    checkpoints = _kill_point(preempted["out"], tmp_path, point)
    new_is_whole = KILL_POINTS[point] is None
    published = point in ("after-last", "while-deleting-older-top-k")
    expected = checkpoints / "last.ckpt" if published or not new_is_whole else checkpoints / STAGING / "last.ckpt"
    step = 5 if new_is_whole else 4
    for last in (True, False):
        chosen = resume_checkpoint(checkpoints, last=last)
        assert chosen == str(expected) and recorded_step(chosen) == step
        assert f"Resuming from '{expected}' (global_step {step})" in lightning_log.records[-1].getMessage()
    # Nothing under a checkpoint's own name is ever torn: only staged saves are.
    assert all(c.problem is None for c in find_checkpoints([checkpoints]) if not c.staged)
    # The next save first finishes what the kill left: a whole save is renamed into place, the rest deleted.
    _tidy(checkpoints / STAGING)
    assert not any((checkpoints / STAGING).iterdir())
    check_complete(checkpoints / "last.ckpt")
    assert recorded_step(checkpoints / "last.ckpt") == step


def _without(source: Path, target: Path, remove: tuple[str, ...] = (), cut: str | None = None) -> Path:
    shutil.copytree(source, target)
    for name in remove:
        (target / name).unlink()
    if cut:
        data = (target / cut).read_bytes()
        (target / cut).write_bytes(data[:-100])
    return target


@pytest.mark.parametrize(("damage", "message"), [
    ({"remove": (RANK_FILES[3],)}, f"'{{ckpt}}/{RANK_FILES[3]}' is missing (its completion record lists it, <N> bytes)"),
    ({"cut": RANK_FILES[0]}, f"'{{ckpt}}/{RANK_FILES[0]}' is <N> bytes; its completion record says <N>"),
    ({"remove": (RECORD, "latest")}, "'{ckpt}/latest' is missing"),
    ({"remove": (RECORD, RANK_FILES[3])}, f"'{{ckpt}}/{RANK_FILES[3]}' is missing"),
    ({"remove": (RECORD,), "cut": RANK_FILES[2]}, f"'{{ckpt}}/{RANK_FILES[2]}' is cut short (<N> bytes, not a whole"),
], ids=["recorded-missing", "recorded-short", "plain-no-latest", "plain-missing-rank-file", "plain-cut-short"])
def test_an_explicit_torn_path_is_refused_naming_the_file(damage: dict, message: str, preempted: dict[str, Any],
                                                          tmp_path: Path) -> None:
    whole = preempted["out"] / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, whole) == whole
    ckpt = _without(whole, tmp_path / "last.ckpt", **damage)
    expected = re.escape(f"ckpt_path='{ckpt}' is not a complete checkpoint: " + message.format(ckpt=ckpt))
    with pytest.raises(TornCheckpointError, match="^" + expected.replace("<N>", r"\d+")):
        resolve_ckpt_path(None, ckpt)


class _Marker:
    """Unpickling it would create a file: a checkpoint naming code to run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_choosing_a_checkpoint_reads_it_through_the_restricted_loader(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"global_step": 7}, tmp_path / "a.ckpt")
    torch.save({"global_step": 9, "hyper_parameters": {"x": _Marker(marker)}}, tmp_path / "b.ckpt")
    assert resume_checkpoint(tmp_path) == str(tmp_path / "a.ckpt")
    assert not marker.exists()


def _cli(tmp_path: Path, base: Path, *args: str, **defaults: Any) -> LightningLoraCLI:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:40]))
    return LightningLoraCLI(LoraFinetuneModule, InstructionDataModule, trainer_defaults=defaults,
                            save_config_kwargs={"overwrite": True}, args=[
        "fit", f"--model.model_name_or_path={base}", "--model.target_modules=[q_proj,v_proj]", f"--data.data_path={data}",
        "--data.batch_size=4", "--data.max_length=48", "--data.val_split=0.2", "--data.template=human_assistant",
        "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.accumulate_grad_batches=2", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_lora.callbacks.CompleteCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'ck'}",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
        "--trainer.callbacks+=lightning_lora.callbacks.Preemption", *args,
    ])


class _SignalAndCount(L.Callback):
    """SIGUSR1 to this process in the first micro-batch after global step ``step``; counts the
    micro-batches started."""

    def __init__(self, step: int) -> None:
        self.step, self.batches = step, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if trainer.global_step == self.step and batch_idx % 2 == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_cli_sigusr1_under_slurm_saves_requeues_and_auto_resumes(llama_base: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, lightning_log) -> None:
    scontrol = tmp_path / "bin" / "scontrol"  # SLURM's command, standing in: records how it was called
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lora",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    handler = signal.getsignal(signal.SIGUSR1)
    counter = _SignalAndCount(step=2)
    fresh = re.escape(f"Starting fresh: no complete checkpoint in '{tmp_path / 'ck'}'")
    export = HFExport(dirpath=str(tmp_path / "export"), export_on_exception=True)
    with pytest.warns(UserWarning, match=fresh), pytest.raises(SystemExit) as stop:
        _cli(tmp_path, llama_base, "--trainer.max_steps=8", "--ckpt_path=auto", callbacks=[counter, export])
    assert stop.value.code == 0  # requeued
    assert not (tmp_path / "export").exists()  # a preempted run did not fail: it exports when it finishes
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    # Saved at the optimizer step after the signal (step 3, both its micro-batches trained), not mid-accumulation.
    assert counter.batches == 6 and recorded_step(tmp_path / "hpc_ckpt_1.ckpt") == 3
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.ckpt")) == ["step=1.ckpt", "step=2.ckpt"]
    assert signal.getsignal(signal.SIGUSR1) == handler
    # Requeued: resumes from the preemption checkpoint; a torn newer one is skipped, and refused by name.
    torn = tmp_path / "hpc_ckpt_2.ckpt"
    torn.write_bytes((tmp_path / "hpc_ckpt_1.ckpt").read_bytes()[:-10])
    refused = re.escape(f"--ckpt_path='{torn}' is not a complete checkpoint: '{torn}' is cut short")
    with pytest.raises(TornCheckpointError, match=refused):
        _cli(tmp_path, llama_base, "--trainer.max_steps=4", f"--ckpt_path={torn}")
    cli = _cli(tmp_path, llama_base, "--trainer.max_steps=4", "--ckpt_path=auto")
    assert cli.trainer.global_step == 4
    said = [r.getMessage() for r in lightning_log.records if r.getMessage().startswith("Resuming from")]
    assert said[-1].startswith(f"Resuming from '{tmp_path / 'hpc_ckpt_1.ckpt'}' (global_step 3): the newest complete")
    assert f"skipped as torn: hpc_ckpt_2.ckpt: '{torn}' is cut short" in said[-1]


class _CutShort(L.Callback):
    """The disk keeps only part of the step-2 checkpoint file (a full or failing disk)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_cut_short(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            save(checkpoint, path, storage_options)
            if trainer.global_step == 2:
                Path(path).write_bytes(Path(path).read_bytes()[:1000])

        io.save_checkpoint = save_cut_short


def test_a_save_not_confirmed_is_not_published_and_deletes_nothing(llama_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:24]))
    datamodule = InstructionDataModule(str(data), tokenizer=str(llama_base), batch_size=4, val_split=0.2, max_length=48,
                                       template="human_assistant")
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj"])
    checkpoints = CompleteCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, callbacks=[_CutShort(), checkpoints], default_root_dir=tmp_path)
    staged = tmp_path / "ck" / STAGING / "step=2.ckpt"
    with pytest.raises(CheckpointNotCompleteError, match=re.escape(f"rank 0: '{staged}' is cut short (1000 bytes")):
        trainer.fit(module, datamodule=datamodule)
    assert [p.name for p in (tmp_path / "ck").glob("*.ckpt")] == ["step=1.ckpt"]  # the older one was kept
    check_complete(tmp_path / "ck" / "step=1.ckpt")
