"""A run stopped mid-epoch and resumed with ``ckpt_path`` trains on exactly the batches, and draws
exactly the dropout, of the run that was never stopped: every step's loss and the final adapter are
``torch.equal``. Real Trainer, real LoraFinetuneModule (default LoRA dropout), real data module."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.callbacks import CompleteCheckpoint, TokenThroughput
from lightning_lora.tiny import quickstart_rows


class Recorder(L.Callback):
    """Every training step's loss, by global step, and every micro-batch's in order (and, after fit,
    the warnings it raised); with ``stop_at``, fit ends after that global step (after its checkpoint)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.micro_batch_losses: list[torch.Tensor] = []
        self.warnings: list[str] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().clone()
        self.losses[trainer.global_step] = loss
        self.micro_batch_losses.append(loss)
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True  # ModelCheckpoint still saves this batch's step (Lightning runs it last)


def _fit(tmp_path: Path, base: Path, steps: int, ckpt_path: Path | None = None, num_workers: int = 0,
         limit_train_batches: int | None = None, accumulate: int = 1, checkpoint_every: int = 5,
         stop_at: int | None = None, module_class: type = LoraFinetuneModule, checkpoint_class: type = ModelCheckpoint,
         **data: Any) -> tuple[Recorder, LoraFinetuneModule]:
    data_file = tmp_path.parent / "train.jsonl"
    if not data_file.exists():
        data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:40]))
    L.seed_everything(0)
    datamodule = InstructionDataModule(str(data_file), tokenizer=str(base), batch_size=4, val_split=0.2,
                                       max_length=48, template="human_assistant", num_workers=num_workers,
                                       **data)
    module = module_class(str(base), target_modules=["q_proj", "v_proj"],
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    recorder = Recorder(stop_at)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=4, num_sanity_val_steps=2,
                        limit_train_batches=limit_train_batches, accumulate_grad_batches=accumulate,
                        callbacks=[recorder, TokenThroughput(log_every_n_steps=1),
                                   checkpoint_class(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_every,
                                                    save_top_k=-1)],
                        default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    recorder.warnings = [str(w.message) for w in caught]
    recorder.epochs = trainer.fit_loop.epoch_progress.state_dict()
    return recorder, module


def _adapter(module: LoraFinetuneModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("data", [{}, {"packing": True, "max_tokens_per_batch": 160}, {"num_workers": 2},
                                  {"limit_train_batches": 5}],
                         ids=["padded", "packed-token-budget", "two-workers", "epochs-ended-early"])
def test_a_run_resumed_mid_epoch_equals_the_run_never_stopped(data: dict, llama_base: Path, tmp_path: Path) -> None:
    # 32 training examples in batches of 4 (or a token budget): step 5 is mid-epoch, 14 is in the next.
    # With limit_train_batches=5 Lightning ends each epoch at its 5th batch, and step 5 is the end
    # of the first: the loader was left mid-list, and the resumed run must start the next epoch.
    trainer_args = {key: data.pop(key) for key in ("num_workers", "limit_train_batches") if key in data}
    whole, whole_module = _fit(tmp_path / "whole", llama_base, steps=14, **trainer_args, **data)
    checkpoint = next((tmp_path / "whole" / "ckpt").glob("*step=5.ckpt"))
    resumed, resumed_module = _fit(tmp_path / "resumed", llama_base, steps=14, ckpt_path=checkpoint,
                                   **trainer_args, **data)
    assert sorted(resumed.losses) == list(range(6, 15))
    for step in resumed.losses:
        assert torch.equal(resumed.losses[step], whole.losses[step]), step
    whole_adapter, resumed_adapter = _adapter(whole_module), _adapter(resumed_module)
    assert whole_adapter.keys() == resumed_adapter.keys()
    assert all(torch.equal(whole_adapter[k], resumed_adapter[k]) for k in whole_adapter)
    assert not [w for w in resumed.warnings if "not resumable" in w]


class UserTrainStart(LoraFinetuneModule):
    """A module with an ``on_train_start`` of its own that does not call ours."""

    def on_train_start(self) -> None:
        pass


@pytest.mark.parametrize("kinds", [(LoraFinetuneModule, ModelCheckpoint), (UserTrainStart, CompleteCheckpoint)],
                         ids=["our-module", "complete-checkpoint"])
def test_a_run_resumed_at_an_epoch_end_and_again_at_the_next_equals_the_run_never_stopped(
    kinds: tuple[type, type], llama_base: Path, tmp_path: Path
) -> None:
    # 8 batches an epoch, 2 a step: steps 4 and 8 end epochs 0 and 1, and both checkpoints are
    # written in on_train_batch_end at the epoch's last batch. Lightning (2.5, 2.6) resumes the
    # first into epoch 1 without counting it started, so step 8's checkpoint read as written
    # between epochs, and its resume trained epoch 1 again. Our module counts it, and so does
    # CompleteCheckpoint, for any module (lightning_lora.resume.count_resumed_epoch).
    common = {"steps": 10, "accumulate": 2, "checkpoint_every": 4, "module_class": kinds[0],
              "checkpoint_class": kinds[1]}
    whole, whole_module = _fit(tmp_path / "whole", llama_base, **common)
    first, _ = _fit(tmp_path / "first", llama_base, stop_at=8, **common,
                    ckpt_path=next((tmp_path / "whole" / "ckpt").glob("*step=4.ckpt")))
    second, second_module = _fit(tmp_path / "second", llama_base, **common,
                                 ckpt_path=next((tmp_path / "first" / "ckpt").glob("*step=8.ckpt")))
    assert len(first.micro_batch_losses) == 8 and len(second.micro_batch_losses) == 4
    for resumed, start in ((first, 8), (second, 16)):  # the micro-batches each resumed run trained
        wanted = whole.micro_batch_losses[start:start + len(resumed.micro_batch_losses)]
        assert all(torch.equal(a, b) for a, b in zip(resumed.micro_batch_losses, wanted, strict=True)), start
    assert second.epochs == whole.epochs  # ends in epoch 2, as the run never stopped
    whole_adapter, second_adapter = _adapter(whole_module), _adapter(second_module)
    assert all(torch.equal(whole_adapter[k], second_adapter[k]) for k in whole_adapter)


# DDP: tests/test_callback_resume.py resumes the quickstart under two-process DDP mid-epoch and at an
# epoch boundary, and checks the final adapter and merged weights torch.equal to the run never stopped.
# ZeRO-3 only (its working weights are partitioned too): a ZeRO-2 run resumes through the same code of
# ours (loader position, RNG states per rank); what differs is DeepSpeed's own loading of its
# partitions, left out here for suite time (37 s); ZeRO-2 checkpoints are read by our elastic reader
# in tests/test_elastic.py's chain.
@pytest.mark.parametrize("strategy", [["--strategy", "deepspeed", "--stage", "3", "--devices", "2"]], ids=["zero3"])
def test_a_two_process_run_resumed_mid_epoch_equals_the_run_never_stopped(strategy: list[str], llama_base: Path,
                                                                   tmp_path: Path) -> None:
    """Two processes (DeepSpeed ZeRO-3), LoRA dropout 0.05: each rank's loss at every
    step after the resume, and the final adapter, equal the uninterrupted run's (7 batches a rank an
    epoch; stopped at step 3, run to step 10 in the next epoch)."""
    from conftest import assert_frozen_weights_are_the_base, assert_module_holds_the_master_weights, run_train_script

    common = [*strategy, "--dropout", "0.05", "--steps", "10", "--log-losses"]
    run_train_script("whole", llama_base, tmp_path / "whole", [*common, "--checkpoint-every", "3"])
    checkpoint = tmp_path / "whole" / "checkpoints" / "step=3.ckpt"
    run_train_script("resumed", llama_base, tmp_path / "resumed", [*common, "--resume-from", str(checkpoint),
                                                                   "--record"])
    # What the engine holds when the resumed fit starts: the base's frozen weights, and LoRA tensors
    # the model computes with equal to the fp32 masters restored at step 3.
    start = torch.load(tmp_path / "resumed" / "start.pt")
    assert start["global_step"] == 3
    assert_frozen_weights_are_the_base(start["params"], llama_base)
    assert_module_holds_the_master_weights(start)
    for rank in (0, 1):
        whole = torch.load(tmp_path / "whole" / f"losses-rank{rank}.pt")
        resumed = torch.load(tmp_path / "resumed" / f"losses-rank{rank}.pt")
        assert sorted(resumed) == list(range(4, 11))
        for step in resumed:
            assert torch.equal(resumed[step], whole[step]), (rank, step)
    whole, resumed = torch.load(tmp_path / "whole" / "trained.pt"), torch.load(tmp_path / "resumed" / "trained.pt")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
