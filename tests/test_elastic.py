"""Elastic resume: a run stopped on N ranks resumes on M ranks, or under another strategy, with no
conversion step (lightning_lora/elastic.py).

Each test is a chain of real runs (``tests/scripts/train_run.py``, ``lora_dropout=0``), each resuming
the previous one's checkpoint under another layout, two optimizer steps per link. It checks:

- what the resumed optimizer holds when training starts (weights, ``exp_avg``, ``exp_avg_sq``, step:
  DeepSpeed's own ``safe_get_full_*`` gathering under DeepSpeed, the torch optimizer's state
  otherwise) is ``torch.equal`` to what the previous link held when it stopped;
- the micro-batches of every optimizer step, all ranks together, are exactly the next ones of the
  epoch's list of batches, rebuilt here by a one-rank sampler from the same file: no example trained
  twice or skipped across a switch, epoch boundaries included;
- the chain's final weights equal a single-process run (in the test's own process) that takes the
  same global batches (one rank, accumulating all of them) from the first link's checkpoint, within
  ``_TOLERANCE`` (see there).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import run_train_script

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.elastic import Layout, _accumulation, _rescale_epoch_progress, read_resume_state

Z = ["--strategy", "deepspeed"]
# Chains of layouts, each with its accumulation: the global batch (ranks x accumulation) stays.
# (rows, global batch, validation batches, links)
CHAINS = {
    # ZeRO-1 2 -> 1, ZeRO-1 -> ZeRO-2, ZeRO-2 -> DDP, DDP -> one device; 14 batches an epoch, 2 a step:
    # every switch is mid-epoch; a validation batch each epoch.
    "zero1-zero2-ddp-single": (64, 2, 1, [
        [*Z, "--stage", "1", "--devices", "2"],
        [*Z, "--stage", "1", "--devices", "1"],
        [*Z, "--stage", "2", "--devices", "2"],
        ["--strategy", "ddp", "--devices", "2"],
        ["--strategy", "single"],
    ]),
    # ZeRO-3 2 -> 3 (from exclude_frozen_parameters) -> 2; 12 batches an epoch, 6 a step: every switch
    # is at an epoch's last batch (the second from a run that itself resumed at one); no validation.
    "zero3-2-3-2": (55, 6, 0, [
        [*Z, "--stage", "3", "--devices", "2", "--exclude-frozen"],
        [*Z, "--stage", "3", "--devices", "3"],
        [*Z, "--stage", "3", "--devices", "2"],
    ]),
}
STEPS_PER_LINK = 2
# The chain and the one-process reference add the same micro-batch gradients in another order
# (all-reduce across ranks vs accumulation) and scale them at another point (1/ranks after the sum
# vs 1/accumulation before it), so their gradients differ by rounding only: about G * 2^-24 of the
# gradient's size per step for G micro-batches. Adam divides by sqrt(v) >= sqrt(1 - beta2) |g|, so
# the update moves by up to 1 / sqrt(1 - beta2) = 31.6 times that, times lr, per step:
#   estimate = S * lr * G * 2^-24 / sqrt(1 - beta2) * max|w|   (S=6, G=6, lr=1e-2: 6.8e-7 * max|w|)
# Not a bound: where an element's gradient sums cancel to near zero, its relative rounding error has
# no limit, and Adam passes it on. Measured (seeded runs, so the numbers repeat): ZeRO-3 chain 3.3e-6,
# ZeRO-1 chain below 4e-7 of max|w|. The check uses the 1e-5 relative the issue allows (15x the
# estimate at S=6, G=6): 3x above the largest measured difference, 10^4 below what a wrong
# restore or a skipped batch gives (4e-2 measured with Adam's moments off by the accumulation).
_TOLERANCE = 1e-5


def _run_link(name: str, base: Path, out: Path, layout: list[str], rows: int, global_batch: int, val_batches: int,
              total: int, stop_at: int, resume: Path | None) -> None:
    """One run of the chain: planned for ``total`` steps, stopped (as if preempted) after ``stop_at``."""
    ranks = 1 if "single" in layout else int(layout[layout.index("--devices") + 1])
    args = [*layout, "--rows", str(rows), "--accumulate", str(global_batch // ranks), "--dump-state", "--seed", "0",
            "--val-batches", str(val_batches),
            "--steps", str(total), "--stop-at", str(stop_at), "--checkpoint-every", str(STEPS_PER_LINK)]
    if resume is not None:
        args += ["--resume-from", str(resume)]
    run_train_script(name, base, out, args)


def _checkpoint(out: Path, step: int) -> Path:
    """The checkpoint ModelCheckpoint wrote at ``step``, as a preempted run leaves it."""
    return out / "checkpoints" / f"step={step}.ckpt"


def _expected_batches(out: Path, base: Path, epochs: int) -> list[list[tuple[int, ...]]]:
    """Every micro-batch of the first ``epochs`` epochs in training order, as lists of token rows."""
    data = InstructionDataModule(str(out / "train.jsonl"), tokenizer=str(base), batch_size=4, val_split=0.125,
                                 template="human_assistant", max_length=64)
    data.setup("fit")
    sampler = data.train_dataloader().batch_sampler  # no trainer: one rank
    rows = [tuple(e["input_ids"]) for e in data.train_examples]
    return [[rows[i] for i in batch] for epoch in range(epochs) for batch in sampler.epoch_batches(epoch)]


@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_run_resumed_on_other_ranks_and_strategies_continues_exactly(
    tmp_path: Path, tiny_bases: dict[str, Path], chain: str
) -> None:
    rows, global_batch, val_batches, links = CHAINS[chain]
    base = tiny_bases["llama"]
    total = STEPS_PER_LINK * len(links)
    outs = []
    for i, layout in enumerate(links):
        resume = _checkpoint(outs[-1], STEPS_PER_LINK * i) if outs else None
        outs.append(tmp_path / f"link{i}")
        _run_link(f"link {i}", base, outs[-1], layout, rows, global_batch, val_batches, total,
                  STEPS_PER_LINK * (i + 1), resume)

    # 1. Every link starts with exactly what the previous one held when it stopped.
    for before, after in itertools.pairwise(outs):
        end, start = torch.load(before / "end_state.pt"), torch.load(after / "start_state.pt")
        assert start["global_step"] == end["global_step"] and start["steps"] == end["steps"] == [end["global_step"]]
        for kind in ("weights", "exp_avg", "exp_avg_sq"):
            assert end[kind].keys() == start[kind].keys()
            for key in end[kind]:
                assert torch.equal(end[kind][key], start[kind][key]), (after.name, kind, key)

    # 2. Each optimizer step trained exactly the next global batch of the epoch's list.
    total_steps = total
    trained: dict[int, list[tuple]] = {}
    for out in outs:
        for path in out.glob("steps-rank*.pt"):
            for record in torch.load(path):
                trained.setdefault(record["step"], []).extend(record["rows"])
    per_epoch = len(_expected_batches(outs[0], base, 1))
    expected = _expected_batches(outs[0], base, -(-total_steps * global_batch // per_epoch))
    assert sorted(trained) == list(range(total_steps))
    for step in range(total_steps):
        want = expected[step * global_batch:(step + 1) * global_batch]
        # The same examples as often (the data may hold a row twice): none trained twice or skipped.
        assert Counter(trained[step]) == Counter(row for batch in want for row in batch), step

    # 3. The chain ends where one process ends that takes the same global batches from the state
    #    the first link stopped with (restored exactly, as 1. shows for every switch).
    #    Run here, in this process, on one device, as train_run.py would.
    L.seed_everything(0)
    reference = _resume_on_one_device(outs[0], base, lambda p: torch.optim.AdamW(p, lr=1e-2), accumulate=global_batch,
                                      max_steps=total, checkpoint=_checkpoint(outs[0], STEPS_PER_LINK),
                                      val_batches=val_batches)
    want = {name: p.detach().float() for name, p in reference.named_parameters() if p.requires_grad}
    final = torch.load(outs[-1] / "end_state.pt")["weights"]
    assert final.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item()
        assert (final[key] - want[key]).abs().max().item() <= _TOLERANCE * scale, key


# ---------------------------------------------------------------------------------------------- refusals


def _resume_on_one_device(run: Path, base: Path, optimizer: Any, accumulate: int = 1, max_steps: int = 6,
                          checkpoint: Path | None = None, val_batches: int = 1) -> LoraFinetuneModule:
    """Resume a run of train_run.py (its final checkpoint by default) in this process, on one
    device, with train_run.py's settings; return the module when fit ends."""
    data = InstructionDataModule(str(run / "train.jsonl"), tokenizer=str(base), batch_size=4, val_split=0.125,
                                 template="human_assistant", max_length=64)
    module = LoraFinetuneModule(str(base), r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                optimizer=optimizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=val_batches, num_sanity_val_steps=0,
                        default_root_dir=str(run / "resumed"))
    trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint or run / "ckpt"))
    return module


def test_an_accumulation_that_changes_the_global_batch_is_refused_naming_the_numbers(trained_runs) -> None:
    run, base = trained_runs("ddp-fp32")  # 2 ranks x accumulation 1: a global batch of 2 micro-batches
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3 would change the global batch .* from 2 to 3 "
                                         r"micro-batches: leave it unset \(it becomes 2\) or set it to 2"):
        _resume_on_one_device(run, base, lambda p: torch.optim.AdamW(p, lr=1e-2), accumulate=3)


def test_a_global_batch_the_new_ranks_cannot_share_is_refused(trained_runs) -> None:
    run, _ = trained_runs("ddp-fp32")
    state = read_resume_state(run / "ckpt")
    assert state.layout == Layout("file", 2) and state.global_batch == 2
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"global batch of 2 micro-batches \(2 ranks x accumulate_grad_batches=1\), "
                                         r"which 3 ranks cannot share evenly"):
        _accumulation(trainer, state, Layout("deepspeed", 3, 3), run / "ckpt")


def test_lightning_batch_count_moves_to_the_new_ranks_and_a_count_that_disagrees_is_refused(trained_runs) -> None:
    run, _ = trained_runs("ddp-fp32")  # 2 ranks, stopped at position 8 of the epoch's list: 4 batches a rank
    loops = read_resume_state(run / "ckpt").client["loops"]
    progress = loops["fit_loop"]["epoch_loop.batch_progress"]
    assert loops["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 8
    assert progress["current"]["processed"] == 4
    in_batch = copy.deepcopy(loops)  # as written in on_train_batch_end: completed one behind
    in_batch["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] = 3
    in_batch["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] = 3
    _rescale_epoch_progress({"loops": in_batch}, 2, 1, run / "ckpt")
    moved = in_batch["fit_loop"]["epoch_loop.batch_progress"]
    assert moved["current"] == {"ready": 8, "started": 8, "processed": 8, "completed": 7}
    assert moved["total"] == {"ready": 8, "started": 8, "processed": 8, "completed": 7}
    progress["current"]["processed"] = 3
    with pytest.raises(ValueError, match=r"Lightning counted 3 batches of this epoch per rank, but the data position "
                                         r"8 on 2 ranks makes 4: cannot carry the count over to 1 rank$"):
        _rescale_epoch_progress({"loops": loops}, 2, 1, run / "ckpt")


def test_an_optimizer_other_than_adam_is_refused_before_the_first_step(trained_runs) -> None:
    run, base = trained_runs("ddp-fp32")
    with pytest.raises(ValueError, match=r"the optimizer is SGD .* only Adam and AdamW"):
        _resume_on_one_device(run, base, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))


def test_a_checkpoint_of_another_optimizer_is_refused_by_the_reader(tmp_path: Path, trained_runs) -> None:
    run, _ = trained_runs("ddp-fp32")
    checkpoint = torch.load(run / "ckpt", weights_only=False)
    for slot in checkpoint["optimizer_states"][0]["state"].values():
        slot["momentum_buffer"] = slot.pop("exp_avg")  # what SGD with momentum keeps
    torch.save(checkpoint, tmp_path / "sgd.ckpt")
    with pytest.raises(ValueError, match=r"not Adam's .* only Adam and AdamW \(without amsgrad\)"):
        read_resume_state(tmp_path / "sgd.ckpt")


def test_a_checkpoint_of_other_lora_targets_is_refused_naming_a_tensor(trained_runs) -> None:
    run, base = trained_runs("ddp-fp32")  # trained q_proj and v_proj
    data = InstructionDataModule(str(run / "train.jsonl"), tokenizer=str(base), batch_size=4, val_split=0.125,
                                 template="human_assistant", max_length=64)
    module = LoraFinetuneModule(str(base), r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(run / "resumed"))
    with pytest.raises(ValueError, match=r"the trained tensor '.*v_proj.lora_A.default.weight' is only the "
                                         r"checkpoint's .*not a checkpoint of this run's LoRA settings"):
        trainer.fit(module, datamodule=data, ckpt_path=str(run / "ckpt"))
