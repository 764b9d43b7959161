"""TokenThroughput on a real Trainer fit: what it logs, and that it counts the real tokens trained."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.callbacks import TokenThroughput
from lightning_lora.tiny import quickstart_rows

COLUMNS = ("throughput/tokens_per_s", "throughput/nonpad_tokens_per_s")


def make_dm(tmp_path: Path, base: Path, **kwargs: Any) -> InstructionDataModule:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:40]), encoding="utf-8")
    dm = InstructionDataModule(str(path), tokenizer=str(base), batch_size=4, val_split=0.2, max_length=48,
                               template="human_assistant", **kwargs)
    dm.setup("fit")
    return dm


def fit(tmp_path: Path, base: Path, dm: InstructionDataModule, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    module = LoraFinetuneModule(str(base), target_modules=["q_proj", "v_proj"],
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    kwargs = {"logger": False, "num_sanity_val_steps": 0, "limit_val_batches": 1, **kwargs}
    trainer = L.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path, **kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("packing", [False, True])
def test_logs_rates_and_counts_exactly_the_real_tokens_trained(tmp_path: Path, llama_base: Path, packing: bool) -> None:
    dm = make_dm(tmp_path, llama_base, packing=packing)
    throughput = TokenThroughput()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = fit(tmp_path, llama_base, dm, [throughput], max_epochs=2, logger=logger, log_every_n_steps=2)

    steps = trainer.global_step
    assert steps == 2 * 8  # 32 training examples in batches of 4, two epochs
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(COLUMNS[0])]
    assert len(rows) == steps // 2
    for row in rows:
        tokens, nonpad = (float(row[c]) for c in COLUMNS)
        assert 0 < nonpad <= tokens
        assert not row.get("throughput/peak_memory_gib")  # CPU: no accelerator memory to report
    # Every training example twice, counted from the examples themselves rather than from batches.
    assert throughput.total_nonpad_tokens == 2 * sum(len(e["input_ids"]) for e in dm.train_examples)
    loader = dm.train_dataloader()
    padded = 0
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)
        padded += sum(batch["input_ids"].numel() for batch in loader)
    assert throughput.total_tokens == padded > throughput.total_nonpad_tokens
    assert throughput.total_seconds > 0


class SlowValidation(L.Callback):
    def on_validation_batch_end(self, *args: Any) -> None:
        time.sleep(1.0)


def test_validation_time_is_not_counted(tmp_path: Path, llama_base: Path) -> None:
    throughput = TokenThroughput()
    fit(tmp_path, llama_base, make_dm(tmp_path, llama_base), [throughput, SlowValidation()],
        max_steps=6, val_check_interval=2)  # the validations after steps 2 and 4 fall between training batches
    assert throughput.total_seconds < 1.0


def test_bad_interval_fails_naming_it() -> None:
    with pytest.raises(ValueError, match=r"log_every_n_steps=0"):
        TokenThroughput(log_every_n_steps=0)
