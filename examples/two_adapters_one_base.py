"""Train two LoRA adapters for different tasks, then serve both from one base model in memory.

Adapter ``reverse`` learns the quickstart rows that reverse a word, adapter ``add`` those that add two
numbers; HFExport writes each to OUT/<name>/export. ``load_for_generation`` then puts both adapters
onto one copy of the base, and the same prompts are answered by each adapter, by the base with the
adapters disabled, and by the base after ``unload`` took the adapters out. OUT/answers.json keeps it all.

    python examples/two_adapters_one_base.py --output runs/two-adapters

Runs on a CPU in well under a minute, on the tiny base model the project builds locally.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.callbacks import HFExport
from lightning_lora.inference import generate, load_for_generation, render_prompt, unload

DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart"
BASE = "builtin:tiny-llama"  # or any local Hugging Face model directory / hub id
TASKS = {"reverse": "Reverse the letters", "add": "Add the two numbers"}  # adapter name -> instruction


def rows(split: str, task: str) -> list[dict[str, str]]:
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["instruction"].startswith(TASKS[task])]


def train_adapter(task: str, output: Path, max_steps: int) -> Path:
    """Fine-tune one adapter on one task's rows; returns its exported PEFT adapter directory."""
    data_file = output / task / "train.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows("train", task)))
    L.seed_everything(0)
    model = LoraFinetuneModule(BASE, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                               optimizer=partial(torch.optim.AdamW, lr=3e-3))
    data = InstructionDataModule(str(data_file), tokenizer=BASE, template="human_assistant",
                                 max_length=64, batch_size=16, val_split=0.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=output / task, logger=False,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[HFExport(dirpath=str(output / task / "export"), overwrite=True)])
    trainer.fit(model, datamodule=data)
    return output / task / "export" / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/two-adapters")
    parser.add_argument("--max-steps", type=int, default=60, help="per adapter")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    output = Path(args.output)

    adapters = {task: train_adapter(task, output, args.max_steps) for task in TASKS}
    model, tokenizer = load_for_generation(BASE, adapters, dtype="fp32", device="cpu")  # one base, two adapters
    questions = [row for task in TASKS for row in rows("test", task)[:3]]
    prompts = [render_prompt(row, "human_assistant", tokenizer) for row in questions]

    answers = {name: generate(model, tokenizer, prompts, adapter=name, max_new_tokens=args.max_new_tokens)
               for name in adapters}
    answers["disabled"] = generate(model, tokenizer, prompts, disable_adapters=True, max_new_tokens=args.max_new_tokens)
    base = unload(model)  # the adapters are taken out: plain base model from here on
    answers["unloaded"] = generate(base, tokenizer, prompts, max_new_tokens=args.max_new_tokens)

    for i, row in enumerate(questions):
        print(f"{row['instruction']} {row['input']!r} (expected {row['output']!r})")
        for name, texts in answers.items():
            print(f"  {name:>9}: {texts[i]!r}")
    report = {"base": BASE, "adapters": {k: str(v) for k, v in adapters.items()}, "prompts": prompts,
              "max_new_tokens": args.max_new_tokens, "answers": answers}
    (output / "answers.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
