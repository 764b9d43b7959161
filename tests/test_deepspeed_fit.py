"""Real DeepSpeed ZeRO-2/3 on two CPU processes: fit ``LoraFinetuneModule``, save, resume in a new Trainer.

The first fit of each run is the ``trained_runs`` one (shared with the export tests, 4 steps); a
second ``train_run.py`` process builds a new Trainer and resumes its checkpoint with ``ckpt_path=``
up to 7 steps. Both record (``--record``) what the engine holds when training starts, after the
checkpoint was restored: the fp32 master weights of the trainable tensors and every parameter as
the model computes with it (gathered under ZeRO-3). These guard the ZeRO-3 paths of
``LoraFinetuneModule.configure_model``: the base loaded into the partitions through
``HfDeepSpeedConfig`` (else the frozen weights are not the base on disk), ``_reinit_lora_partitioned``
(else ``lora_B`` starts random, not zero), and ``strict_loading=False`` for checkpoints written with
``exclude_frozen_parameters=True`` (else the resume fails on the missing frozen keys).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lightning_lora.rng import RNG_KEY

from conftest import RUNS, assert_frozen_weights_are_the_base, assert_module_holds_the_master_weights, run_train_script

FIRST_STEPS = 4  # train_run.py's default, used by every RUNS entry
TOTAL_STEPS = 7
STARTED = ["zero2-fp32", "zero3-fp32", "zero3-exclude-frozen"]  # the last is bf16-mixed
# Resumed here: exclude_frozen_parameters (the frozen weights come from the base on resume). ZeRO-2 and
# ZeRO-3 resumes with every weight in the checkpoint are checked step by step in test_resume.py.
RESUMED = ["zero3-exclude-frozen"]


@pytest.fixture(scope="session")
def resumed_runs(trained_runs, tmp_path_factory: pytest.TempPathFactory):
    """Resume each recorded run's checkpoint in a new process; return ``(first_dir, resumed_dir, base_dir)``."""
    done: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path, Path]:
        if name not in done:
            first, base = trained_runs(name)
            out = tmp_path_factory.mktemp(f"{name}-resumed")
            args = [*RUNS[name][1], "--resume-from", str(first / "ckpt"), "--steps", str(TOTAL_STEPS)]
            run_train_script(f"{name} (resumed)", base, out, args)
            done[name] = (first, out, base)
        return done[name]

    return get


def _start(run: Path) -> dict:
    return torch.load(run / "start.pt")


def _finished(run: Path) -> dict:
    return json.loads((run / "finished.json").read_text())


@pytest.mark.parametrize("name", STARTED)
def test_fit_starts_from_the_base_model(name: str, trained_runs) -> None:
    run, base = trained_runs(name)
    start = _start(run)
    assert start["global_step"] == 0
    assert_frozen_weights_are_the_base(start["params"], base)
    assert_module_holds_the_master_weights(start)
    lora_a = {k: v for k, v in start["trainable"].items() if ".lora_A." in k}
    lora_b = {k: v for k, v in start["trainable"].items() if ".lora_B." in k}
    assert len(lora_a) == len(lora_b) == 4  # q_proj and v_proj in 2 layers
    # PEFT's initialisation: lora_B zero (step 0 is the base model), lora_A random.
    assert all(torch.count_nonzero(v) == 0 for v in lora_b.values()), "lora_B does not start at zero"
    assert all(torch.count_nonzero(v) == v.numel() for v in lora_a.values())
    assert _finished(run)["global_step"] == FIRST_STEPS


@pytest.mark.parametrize("name", RESUMED)
def test_resume_continues_where_the_fit_stopped(name: str, resumed_runs) -> None:
    first, resumed, base = resumed_runs(name)
    start = _start(resumed)
    assert start["global_step"] == FIRST_STEPS
    # The restored LoRA tensors are exactly those at the end of the first fit.
    at_end_of_first = torch.load(first / "trained.pt")
    assert set(start["trainable"]) == set(at_end_of_first)
    for key, value in at_end_of_first.items():
        assert torch.equal(start["trainable"][key], value), key
    assert any(torch.count_nonzero(v) for k, v in at_end_of_first.items() if ".lora_B." in k)
    assert_module_holds_the_master_weights(start)
    assert_frozen_weights_are_the_base(start["params"], base)
    # Training went on to the total and moved every LoRA tensor.
    assert _finished(resumed)["global_step"] == TOTAL_STEPS
    at_end = torch.load(resumed / "trained.pt")
    unchanged = [k for k, v in at_end.items() if torch.equal(v, at_end_of_first[k])]
    assert not unchanged, f"not trained after the resume: {unchanged}"


def _model_states(checkpoint: Path) -> list[Path]:
    files = sorted((checkpoint / "checkpoint").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    assert len(files) == 2  # one per rank
    return files


def test_exclude_frozen_checkpoint_holds_only_the_adapter(trained_runs, resumed_runs) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    excluded, base = trained_runs("zero3-exclude-frozen")
    full, _ = trained_runs("zero3-fp32")
    trained = torch.load(excluded / "trained.pt")
    lora_keys = {f"model.{k}" for k in trained}

    # zero_to_fp32 finds only the LoRA tensors, with their trained values; a full checkpoint has the base too.
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(excluded / "ckpt"))
    assert set(consolidated) == lora_keys
    assert all(torch.equal(consolidated[f"model.{k}"], v) for k, v in trained.items())
    assert set(get_fp32_state_dict_from_zero_checkpoint(str(full / "ckpt"))) > lora_keys

    # Each rank's model states names only the LoRA tensors and is a fraction of the base's size
    # (beside the RNG states of every rank, a few kilobytes whatever the model);
    # with the frozen fragments (the full run) each is over half of it.
    base_bytes = (base / "model.safetensors").stat().st_size
    for file in _model_states(excluded / "ckpt"):
        states = torch.load(file, weights_only=False)
        assert set(states["module"]) == lora_keys
        assert states["frozen_param_fragments"] is None
        rng = io.BytesIO()
        torch.save(states.get(RNG_KEY), rng)
        assert file.stat().st_size < base_bytes / 10 + len(rng.getvalue()), file
    assert all(f.stat().st_size > base_bytes / 2 for f in _model_states(full / "ckpt"))

    # The module relaxed strict loading by itself (train_run.py never sets it), and only here.
    assert _finished(excluded)["strict_loading"] is False
    assert _finished(full)["strict_loading"] is True
    # The resume of such a checkpoint works: the frozen weights come from the base on disk.
    _, resumed, _ = resumed_runs("zero3-exclude-frozen")
    assert _finished(resumed) == {"global_step": TOTAL_STEPS, "strict_loading": False}
    assert_frozen_weights_are_the_base(_start(resumed)["params"], base)


@pytest.mark.parametrize("name", ["zero3-bf16", "zero3-user-module"])
def test_model_classes_first_imported_inside_zero_init_build_and_run_after_it(name: str, trained_runs) -> None:
    """A model class first imported inside ``deepspeed.zero.Init`` (Lightning enters it around
    ``configure_model``) builds working models after the context has exited: the run's own
    architecture in HFExport's verification (it builds and runs the trained blocks again), and
    another architecture imported there for the first time, built and run by the script after fit.
    With transformers' kernels-decorated attention classes, DeepSpeed's exit used to put back their
    undecorated ``__init__`` while ``forward`` kept the wrapper: ``... has no attribute '_kernel_funcs'``."""
    run, _ = trained_runs(name)
    late = json.loads((run / "late_arch.json").read_text())
    assert late["first_import"] and late["inside_zero_init"], late  # the premise, not the fix
    assert late["logits_shape"] == [1, 12, 128] and late["logits_finite"], late
    verification = json.loads((run / "export" / "export.json").read_text())["verification"]
    assert verification["passed"] and verification["function"]["blocks_checked"] == 2, verification
