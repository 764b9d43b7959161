"""Export a finished checkpoint offline with the Python API, long after (or far from) the training run.

A plain Lightning Trainer with ModelCheckpoint trains LoraFinetuneModule on the shipped quickstart data;
then ``export_checkpoint(ckpt, out)`` turns the ``.ckpt`` file alone into OUT/export/{adapter,merged,
export.json}: the base model and the LoRA config are read from the checkpoint, and the merged model is
checked against the adapter before it is published (the same as ``lightning-lora export --checkpoint``).

    python examples/export_a_checkpoint.py --output runs/export-example

Runs on a CPU in well under a minute, on the tiny base model the project builds locally.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.export import export_checkpoint

DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/export-example")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args()

    L.seed_everything(0)
    base = "builtin:tiny-llama"  # or any local Hugging Face model directory / hub id
    model = LoraFinetuneModule(base, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                               optimizer=partial(torch.optim.AdamW, lr=3e-3))
    data = InstructionDataModule(str(DATA / "train.jsonl"), tokenizer=base, template="human_assistant",
                                 max_length=128, batch_size=16, val_split=0.0)
    checkpoint = ModelCheckpoint(dirpath=f"{args.output}/checkpoints", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.max_steps, default_root_dir=args.output,
                        limit_val_batches=0, logger=False, callbacks=[checkpoint])
    trainer.fit(model, datamodule=data)

    # Any time later, in any process: only the checkpoint file is needed.
    ckpt = checkpoint.last_model_path
    manifest = export_checkpoint(ckpt, f"{args.output}/export", overwrite=True, progress=False)
    logits = manifest["verification"]["function"]["logits"]
    print(f"exported {ckpt} (step {manifest['global_step']}, base {manifest['base_model']}) to {args.output}/export")
    print(f"merged vs trained model: max |logit diff| {logits['max_abs_diff']:.2e} (tolerance {logits['tolerance']:.1e}), "
          f"argmax agreement {logits['argmax_agreement']:.0%}, passed={manifest['verification']['passed']}")


if __name__ == "__main__":
    main()
