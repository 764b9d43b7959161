"""Our callbacks survive a resume: the shipped quickstart config, run through ``lightning-lora fit``
(two epochs), stopped mid-epoch or at the end of its first epoch and resumed with ``--ckpt_path``,
single device and DDP, leaves what the uninterrupted run leaves: ``TokenThroughput`` continues its
counts and logs at the same steps, and ``HFExport`` writes the same export (equal tensors, equal
manifest but for timings)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.cli import main
from lightning_lora.data import InstructionDataModule
from lightning_lora.tiny import resolve_model_path

REPO = Path(__file__).resolve().parent.parent
TRAIN, TEST = REPO / "data/quickstart/train.jsonl", REPO / "data/quickstart/test.jsonl"
RUN = Path("runs/quickstart")  # where the quickstart writes, relative to the working directory


def _fit_args(every_n_train_steps: int) -> list[str]:
    """The quickstart, two epochs, with the checkpoints a preempted run leaves behind: one every
    ``every_n_train_steps`` steps (``steps/step=N.ckpt``) and one at each epoch's end (``epochs/epoch=E.ckpt``)."""
    return [
        "fit", "--config", str(REPO / "configs/quickstart.yaml"), f"--data.data_path={TRAIN}",
        f"--data.val_data_path={TEST}", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={RUN}/steps",
        f"--trainer.callbacks.every_n_train_steps={every_n_train_steps}", "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={RUN}/epochs",
        "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={epoch}",
    ]


def _fit(runs: dict[Path, list[str]], devices: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run in its directory: in this process on one device, or ``lightning-lora fit`` under DDP
    (gloo, CPU), the runs side by side (a run's first rank waits for its second's imports: time the
    other run uses). A run's output goes to ``fit.log`` in its directory."""
    for run_dir in runs:
        run_dir.mkdir(parents=True)
    if devices == 1:
        for run_dir, args in runs.items():
            with monkeypatch.context() as patch:
                patch.chdir(run_dir)
                main(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = {}
    for run_dir, args in runs.items():
        with open(run_dir / "fit.log", "w") as log:
            command = [sys.executable, "-m", "lightning_lora", *args, "--trainer.strategy=ddp", f"--trainer.devices={devices}"]
            started[run_dir] = subprocess.Popen(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    for run_dir, process in started.items():
        code = process.wait(timeout=300)
        assert code == 0, f"{run_dir.name} failed:\n{(run_dir / 'fit.log').read_text()[-6000:]}"


def _throughput_counts(run_dir: Path) -> list[list[float]]:
    """TokenThroughput's counts at the end of fit, per rank (tokens, real tokens, and both since the
    last log), as the last epoch's checkpoint keeps them; the seconds are left out."""
    checkpoint = torch.load(run_dir / RUN / "epochs/epoch=1.ckpt", map_location="cpu", weights_only=True)
    return [[row[0], row[1], row[3], row[4]] for row in checkpoint["callbacks"]["TokenThroughput"]["ranks"]]


def _throughput_log_steps(run_dir: Path) -> list[int]:
    """The steps at which TokenThroughput logged (the logger's step: the optimizer step minus one)."""
    with open(run_dir / RUN / "logs/version_0/metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("throughput/tokens_per_s")]


def _without_timings(value: Any) -> Any:
    """export.json less what differs between two exports of the same tensors: seconds taken and the
    memory the machine had free."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("seconds", "merge_impl_reason")}
    return value


def _assert_same_export(whole: Path, resumed: Path, stop: str) -> None:
    whole, resumed = whole / RUN / "export", resumed / RUN / "export"
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file()), stop
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        expected, actual = load_file(whole / name), load_file(resumed / name)
        assert expected.keys() == actual.keys(), (stop, name)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), (stop, name)
    for name in ("adapter/adapter_config.json", "merged/config.json"):
        assert json.loads((whole / name).read_text()) == json.loads((resumed / name).read_text()), (stop, name)
    manifest = json.loads((resumed / "export.json").read_text())
    assert manifest["verification"]["passed"], stop
    assert _without_timings(manifest) == _without_timings(json.loads((whole / "export.json").read_text())), stop


def _example_tokens() -> int:
    """Every token of every training example: an epoch's real tokens, summed over the ranks."""
    data = InstructionDataModule(str(TRAIN), tokenizer=resolve_model_path("builtin:tiny-llama"), batch_size=16,
                                 max_length=128, template="human_assistant", val_data_path=str(TEST))
    data.setup("fit")
    return sum(len(example["input_ids"]) for example in data.train_examples)


@pytest.mark.parametrize(("devices", "every", "mid_epoch_step"), [(1, 14, 14), (2, 7, 7)], ids=["single", "ddp"])
def test_callbacks_after_a_resume_equal_the_uninterrupted_run(devices: int, every: int, mid_epoch_step: int,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """480 examples in batches of 16: 30 steps an epoch on one device, 15 under DDP. Stopped at a
    step inside the first epoch and at its end (its epoch checkpoint), each resumed to the end."""
    args = _fit_args(every)
    whole = tmp_path / "whole"
    _fit({whole: args}, devices, monkeypatch)
    whole_counts, whole_steps = _throughput_counts(whole), _throughput_log_steps(whole)
    # Independent of the callback: two epochs took every example's tokens twice, spread over the ranks.
    assert len(whole_counts) == devices and sum(rank[1] for rank in whole_counts) == 2 * _example_tokens()
    epoch_steps = 30 // devices
    assert whole_steps == list(range(9, 2 * epoch_steps, 10))  # log_every_n_steps: 10, at the step before

    stops = {"mid-epoch": (f"steps/step={mid_epoch_step}.ckpt", mid_epoch_step),
             "epoch-end": ("epochs/epoch=0.ckpt", epoch_steps)}
    _fit({tmp_path / stop: [*args, f"--ckpt_path={whole / RUN / checkpoint}"] for stop, (checkpoint, _) in stops.items()},
         devices, monkeypatch)
    for stop, (_, step) in stops.items():
        resumed = tmp_path / stop
        assert _throughput_counts(resumed) == whole_counts, stop
        assert _throughput_log_steps(resumed) == [s for s in whole_steps if s >= step], stop
        _assert_same_export(whole, resumed, stop)
