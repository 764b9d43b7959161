"""HFExport on a plain Trainer: exports after a successful fit only, or, when asked, the last good
checkpoint after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.callbacks import HFExport
from lightning_lora.tiny import build_tiny_base, quickstart_rows

from conftest import SCRIPT


class FailsAtStep(LoraFinetuneModule):
    """Training that breaks after a few good steps, as a node failure or a NaN guard would."""

    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("simulated failure")
        return super().training_step(batch, batch_idx)


def _fit(tmp_path: Path, base: Path, export: HFExport, fail_at: int | None,
         extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:48]))
    data = InstructionDataModule(str(data_file), tokenizer=str(base), batch_size=4, val_split=0.0, max_length=48,
                                 template="human_assistant")
    kwargs = dict(target_modules=["q_proj", "v_proj"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module = FailsAtStep(str(base), fail_at=fail_at, **kwargs) if fail_at is not None else LoraFinetuneModule(str(base), **kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints, export, *extra_callbacks],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return trainer


def test_exports_after_successful_fit(llama_base: Path, tmp_path: Path) -> None:
    export = HFExport(dirpath=str(tmp_path / "export"))
    _fit(tmp_path, llama_base, export, fail_at=None)
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["global_step"] == 8 and manifest["verification"]["passed"]
    assert export.result["inputs_fingerprint"] == manifest["inputs_fingerprint"]


def test_no_export_after_a_failed_fit_by_default(llama_base: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated failure"):
        _fit(tmp_path, llama_base, HFExport(dirpath=str(tmp_path / "export")), fail_at=5)
    assert not (tmp_path / "export").exists()


def test_export_on_exception_uses_the_last_good_checkpoint(llama_base: Path, tmp_path: Path) -> None:
    export = HFExport(dirpath=str(tmp_path / "export"), export_on_exception=True)
    with pytest.raises(RuntimeError, match="simulated failure"):  # the failure still reaches the user
        _fit(tmp_path, llama_base, export, fail_at=5)
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["global_step"] == 4  # the last checkpoint written before step 5 failed
    assert manifest["source"]["checkpoint"].endswith("last.ckpt") and manifest["verification"]["passed"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dtype": "int8"}, "dtype='int8'"), ({"merge": False, "save_adapter": False}, "export nothing"),
     ({"merge_impl": "fast"}, "merge_impl='fast'")],
)
def test_bad_settings_fail_at_construction(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        HFExport(dirpath=str(tmp_path), **kwargs)


def test_failing_export_on_rank_zero_fails_the_deepspeed_job_without_hanging(
    tiny_bases: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 0 exports alone after the other rank is released; when the export fails (here: a base
    model of other shapes), the job must end with an error, not wait in a collective."""
    narrow = build_tiny_base(tmp_path / "narrow", arch="llama", hidden_size=32)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(tiny_bases["llama"]), "--out", str(tmp_path / "run"),
         "--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--export", "--export-base-model", str(narrow)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "has shape" in result.stderr and "--base-model" in result.stderr
    assert time.monotonic() - started < 240  # far from the 30-minute collective timeout
    assert not (tmp_path / "run" / "export").exists()
