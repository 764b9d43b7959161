"""Train packed, token-budget batches under real two-process DDP and record what each rank trained.

Lightning re-runs this file for rank 1, so it is a plain script (see ``train_run.py``). Each rank
writes ``rank{R}.json`` under ``--out``: for every epoch, the token sequences of the examples in
each of its batches (read back from the packed rows), and its training losses.

Example::

    python tests/scripts/batching_ddp_run.py --base BASE --out OUT [--random]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_lora import InstructionDataModule, LoraFinetuneModule


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[list[list[list[int]]]] = []
        self.losses: list[float] = []
        self.padding_losses: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        examples = []
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            examples += [ids[a:b] for a, b in itertools.pairwise(starts) if b - a >= 2]  # padding: single zeros
        if "loss_weight" in batch:  # a padding batch: trains nothing (its loss is multiplied by 0)
            self.padding_losses.append(float(outputs["loss"]))
            examples = []
        self.epochs[-1].append(examples)
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--random", action="store_true", help="random batches (data.group_by_length=false)")
    args = parser.parse_args()
    out = Path(args.out)
    data_file = out / "train.jsonl"
    if "LOCAL_RANK" not in os.environ:  # the launching process writes; the rank it starts reads
        out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        rows = [{"text": f"row {i}: " + " ".join(["apple river"] * rng.randrange(1, 12))} for i in range(37)]
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = InstructionDataModule(str(data_file), tokenizer=args.base, val_split=0.0, max_length=64,
                                 max_tokens_per_batch=192, group_by_length=not args.random, packing=True)
    module = LoraFinetuneModule(args.base, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    record = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record], default_root_dir=str(out))
    trainer.fit(module, datamodule=data)
    result = {"epochs": record.epochs, "losses": record.losses, "num_examples": len(data.train_examples),
              "padding_losses": record.padding_losses}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # Leave the process group before exiting: exiting with gloo's threads alive can abort the process.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
