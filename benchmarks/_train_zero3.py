"""Train a few LoRA steps with real DeepSpeed ZeRO-3 on CPU (2 processes) and save the checkpoint.

Used by ``benchmarks/export_memory.py`` to produce the checkpoint it exports. It is a plain script
because Lightning starts rank 1 by re-running ``sys.argv``. Do not run it by hand unless you want
to: ``export_memory.py`` calls it once and caches the result.

Example::

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/_train_zero3.py --base BASE --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The CPU DeepSpeed strategy is a test-only harness; it lives in tests/ and is imported by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from deepspeed_cpu import CPUDeepSpeedStrategy, cpu_deepspeed_env  # noqa: E402  (sets DS_ACCELERATOR first)

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_lora import InstructionDataModule, LoraFinetuneModule  # noqa: E402
from lightning_lora.tiny import quickstart_rows  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--out", required=True, help="run directory; the checkpoint goes to OUT/ckpt")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument("--devices", type=int, default=2, help="CPU processes")
    parser.add_argument("--rows", type=int, default=8, help="training rows of the tiny quickstart data")
    parser.add_argument("--max-length", type=int, default=16, help="tokens per sequence")
    # Large enough that two steps move the adapters visibly in bf16 (at 2e-4 the merged deltas
    # would mostly round away and the correctness check would compare base weights).
    parser.add_argument("--lr", type=float, default=1e-2)
    return parser.parse_args()


def main() -> None:
    args = parse()
    cpu_deepspeed_env()
    out = Path(args.out)
    data_file = out / "train.jsonl"
    if "LOCAL_RANK" not in os.environ:  # the launching process writes; the rank it starts reads
        out.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[: args.rows]))
    module = LoraFinetuneModule(
        args.base, r=16, lora_alpha=32, target_modules="all-linear", dtype="bfloat16",
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr),
    )
    # 'plain' + train_on_prompt: every example keeps tokens to learn from at max_length=16.
    data = InstructionDataModule(str(data_file), tokenizer=args.base, max_length=args.max_length, batch_size=1,
                                 val_split=0, template="plain", train_on_prompt=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=CPUDeepSpeedStrategy(stage=3), precision="bf16-mixed",
        max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fitted = time.perf_counter()
    trainer.save_checkpoint(out / "ckpt")
    saved = time.perf_counter()
    if trainer.is_global_zero:
        timing = {"fit_s": round(fitted - started, 3), "save_checkpoint_s": round(saved - fitted, 3),
                  "global_step": trainer.global_step}
        (out / "train_timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(f"trained {trainer.global_step} steps in {timing['fit_s']:.1f}s, "
              f"saved in {timing['save_checkpoint_s']:.1f}s")


if __name__ == "__main__":
    main()
