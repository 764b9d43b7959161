"""Add HFExport to a plain Lightning Trainer that trains your own LightningModule.

Your module keeps its PEFT model under any attribute (``self.backbone`` here); HFExport finds it.
When fit ends, OUT/export holds the PEFT adapter, the merged Hugging Face model and export.json.

    python examples/own_module_with_hfexport.py --output runs/example

Runs on a CPU in well under a minute, on the tiny base model the project builds locally.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_lora.callbacks import HFExport
from lightning_lora.tiny import quickstart_rows, resolve_model_path


class MyModule(L.LightningModule):
    """An ordinary LightningModule: nothing here knows about lightning_lora."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base
        self.backbone: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.backbone is None:
            model = AutoModelForCausalLM.from_pretrained(self.base)
            config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
            self.backbone = get_peft_model(model, config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.backbone(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def make_loader(tokenizer: AutoTokenizer) -> DataLoader:
    texts = [f"Human: {r['instruction']} {r['input']}\n\nAssistant: {r['output']}" for r in quickstart_rows("train")[:128]]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(encoded["input_ids"], encoded["attention_mask"], labels)]
    return DataLoader(rows, batch_size=16, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/example")
    parser.add_argument("--max-steps", type=int, default=40)
    args = parser.parse_args()

    base = resolve_model_path("builtin:tiny-llama")  # or any local Hugging Face model directory
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        default_root_dir=args.output,
        logger=False,
        enable_checkpointing=False,
        callbacks=[HFExport(dirpath=f"{args.output}/export", overwrite=True)],
    )
    trainer.fit(MyModule(base), train_dataloaders=make_loader(tokenizer))
    verification = json.loads(open(f"{args.output}/export/export.json").read())["verification"]
    logits = verification["function"]["logits"]
    print(f"merged vs trained model: max |logit diff| {logits['max_abs_diff']:.2e}, passed={verification['passed']}")


if __name__ == "__main__":
    main()
