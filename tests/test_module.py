"""LoraFinetuneModule on real tiny models with a real Lightning Trainer on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import InstructionDataModule, LoraFinetuneModule

# Per architecture: LoRA targets, and the names PEFT gives the trainable tensors.
ARCH_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],  # a Conv1D: PEFT must use fan_in_fan_out
    "bloom": ["query_key_value"],
}


def _rows(n: int) -> list[dict[str, str]]:
    words = ["apple", "river", "stone", "cloud", "garden", "silver", "rocket", "window", "pencil", "forest"]
    return [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in (words * 4)[:n]]


def _datamodule(tmp_path: Path, base: Path, n: int = 16, **kwargs) -> InstructionDataModule:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n)))
    kwargs = {"batch_size": 4, "val_split": 0.0, "max_length": 96, **kwargs}
    return InstructionDataModule(data_path=str(path), tokenizer=str(base), **kwargs)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("arch", sorted(ARCH_TARGETS))
def test_trains_only_lora_parameters(arch: str, tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_bases[arch]
    modules_to_save = ["lm_head"] if arch == "qwen2" else None  # tied embeddings: the head is trained in full
    module = LoraFinetuneModule(str(base), r=4, lora_alpha=8, target_modules=ARCH_TARGETS[arch], modules_to_save=modules_to_save)
    trainer = _trainer(tmp_path, max_steps=3)
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=_datamodule(tmp_path, base))

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable, "nothing was trainable"
    for name in trainable:
        is_lora = ".lora_A." in name or ".lora_B." in name
        is_saved = modules_to_save is not None and ".modules_to_save." in name
        assert is_lora or is_saved, f"{name} requires grad but is neither LoRA nor in modules_to_save"
    # Every targeted module got a LoRA pair.
    lora_a = {n for n in trainable if ".lora_A." in n}
    assert len(lora_a) == module.model.config.num_hidden_layers * len(ARCH_TARGETS[arch])

    # The optimizer holds exactly the trainable parameters.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}

    # Training changed the trainable tensors (lora_B starts at zero) and nothing else.
    after = dict(module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable
    assert any(".lora_B." in n for n in changed)
    if arch == "gpt2":
        assert module.model.peft_config["default"].fan_in_fan_out


def test_loss_falls_when_overfitting_eight_examples(llama_base: Path, tmp_path: Path) -> None:
    module = LoraFinetuneModule(
        str(llama_base),
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="all-linear",
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        lr_schedule="constant",
    )
    data = _datamodule(tmp_path, llama_base, n=8, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.configure_model()
    module.eval()
    with torch.no_grad():
        initial = module(**batch).loss.item()
    _trainer(tmp_path, max_steps=40).fit(module, datamodule=data)
    module.eval()
    with torch.no_grad():
        final = module(**batch).loss.item()
    assert final < 0.5 * initial, (initial, final)


def test_validation_metrics_are_logged_per_epoch(llama_base: Path, tmp_path: Path) -> None:
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj", "v_proj"])
    data = _datamodule(tmp_path, llama_base, n=16, val_split=0.25)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert {"train_loss", "lr", "val_loss", "val_ppl", "val_accuracy"} <= set(metrics)
    # Perplexity is exp(token-mean loss); accuracy is a fraction.
    assert torch.isclose(metrics["val_ppl"], torch.exp(metrics["val_loss"]), rtol=1e-5)
    assert 0.0 <= metrics["val_accuracy"].item() <= 1.0

    # The loss metric is the mean over response tokens, computed here independently.
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            losses = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[mask], reduction="none")
            total, count = total + losses.sum().item(), count + mask.sum().item()
    assert metrics["val_loss"].item() == pytest.approx(total / count, rel=1e-5)


def test_configure_model_is_idempotent_and_hparams_rebuild_the_lora_config(llama_base: Path, tmp_path: Path) -> None:
    module = LoraFinetuneModule(str(llama_base), r=4, lora_alpha=12, target_modules=["q_proj"], use_rslora=True)
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=_datamodule(tmp_path, llama_base))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    hparams = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    rebuilt = LoraFinetuneModule(**hparams).lora_config()
    assert (rebuilt.r, rebuilt.lora_alpha, rebuilt.use_rslora) == (4, 12, True)
    assert set(rebuilt.target_modules) == {"q_proj"}
    assert rebuilt.base_model_name_or_path == str(llama_base)


def test_warmup_then_cosine_schedule(llama_base: Path, tmp_path: Path) -> None:
    module = LoraFinetuneModule(
        str(llama_base),
        target_modules=["q_proj"],
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        warmup_steps=4,
        min_lr_ratio=0.1,
    )
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_steps=12, callbacks=[Record()]).fit(module, datamodule=_datamodule(tmp_path, llama_base, n=48))
    # Linear warmup over 4 steps, then a monotone decay that ends near min_lr_ratio * peak.
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0.1 <= lrs[-1] < 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "model.r=0"),
        ({"r": -4}, "model.r=-4"),
        ({"lora_dropout": 1.5}, "model.lora_dropout=1.5"),
        ({"bias": "some"}, "model.bias='some'"),
        ({"dtype": "float8"}, "model.dtype='float8'"),
        ({"init_lora_weights": "magic"}, "model.init_lora_weights='magic'"),
        ({"target_modules": []}, "model.target_modules=[]"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, message: str, llama_base: Path) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LoraFinetuneModule(str(llama_base), **kwargs)


def test_unknown_target_module_fails_before_training(llama_base: Path, tmp_path: Path) -> None:
    # "q_projj" beside a valid name: PEFT alone would silently adapt only q_proj.
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj", "q_projj"])
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"model.target_modules names 'q_projj'.*v_proj"):
        trainer.fit(module, datamodule=_datamodule(tmp_path, llama_base))
    assert trainer.global_step == 0


def test_unknown_modules_to_save_and_missing_base_fail_clearly(llama_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.modules_to_save names 'head'"):
        LoraFinetuneModule(str(llama_base), target_modules=["q_proj"], modules_to_save=["head"]).configure_model()
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match=f"model.model_name_or_path='{missing}'"):
        LoraFinetuneModule(str(missing)).configure_model()
