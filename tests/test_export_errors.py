"""``lightning-lora export`` on bad input: real checkpoints (trained once per session, copied before
they are damaged), real base models. Every case fails with exit code 1, one error line that names
the argument and the value to change, and nothing under the output name: no export, no half-written
directory, no temporary sibling left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.callbacks import HFExport
from lightning_lora.cli import export_main

PREFIX = "lightning-lora export: error: "


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command in-process; it must fail with exit code 1 and exactly one error line."""
    capsys.readouterr()
    code = export_main(argv)
    err = capsys.readouterr().err
    assert code == 1, f"exit code {code} for {argv}; stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, err
    return lines[0][len(PREFIX):]


def _args(checkpoint: Path, output: Path, base: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base), *extra]


def _assert_nothing_written(output: Path) -> None:
    assert not output.exists(), f"{output} was created"
    leftovers = sorted(p.name for p in output.parent.glob(f".{output.name}.*"))
    assert not leftovers, f"left beside {output}: {leftovers}"


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def single(trained_runs) -> tuple[Path, Path]:
    """A Lightning ``.ckpt`` (single device, fp32) and its base; read-only: copy before damaging."""
    run, base = trained_runs("single-fp32")
    return run / "ckpt", base


@pytest.fixture()
def zero_copy(trained_runs, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of a 2-rank ZeRO-2 checkpoint directory, and its base."""
    run, base = trained_runs("zero2-fp32")
    copy = tmp_path / "zero.ckpt"
    shutil.copytree(run / "ckpt", copy)
    return copy, base


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama base like the one the runs trained on, but with hidden size 32 instead of 64."""
    from lightning_lora.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("narrow") / "llama", arch="llama", hidden_size=32)


# --- the checkpoint argument ---------------------------------------------------------------------


def test_missing_checkpoint_path(capsys, single, tmp_path: Path) -> None:
    _, base = single
    missing = tmp_path / "no-such.ckpt"
    message = _error(capsys, _args(missing, tmp_path / "out", base))
    _assert_nothing_written(tmp_path / "out")
    assert f"--checkpoint={str(missing)!r}" in message and "does not exist" in message


def _random_bytes(path: Path, source: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _truncated(path: Path, source: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy interrupted half-way


def _no_state_dict(path: Path, source: Path) -> None:
    torch.save({"epoch": 3, "optimizer_states": []}, path)  # a torch file, not a Lightning checkpoint


def _empty_dir(path: Path, source: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("damage", [_random_bytes, _truncated, _no_state_dict, _empty_dir],
                         ids=["random-bytes", "truncated", "no-state-dict", "empty-dir"])
def test_something_that_is_not_a_checkpoint(damage, capsys, single, tmp_path: Path) -> None:
    source, base = single
    bad = tmp_path / "bad.ckpt"
    damage(bad, source)
    message = _error(capsys, _args(bad, tmp_path / "out", base))
    _assert_nothing_written(tmp_path / "out")
    assert f"--checkpoint={str(bad)!r}" in message
    assert re.search(r"not a readable Lightning checkpoint|not a Lightning checkpoint|is neither", message), message


def test_zero_directory_without_latest_lists_the_tags(capsys, zero_copy, tmp_path: Path) -> None:
    checkpoint, base = zero_copy
    tag = (checkpoint / "latest").read_text().strip()
    (checkpoint / "latest").unlink()
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base))
    _assert_nothing_written(tmp_path / "out")
    assert f"--checkpoint={str(checkpoint)!r}" in message
    assert "'latest'" in message and repr(tag) in message and "--tag" in message, message


def test_tag_that_does_not_exist(capsys, zero_copy, tmp_path: Path) -> None:
    checkpoint, base = zero_copy
    tag = (checkpoint / "latest").read_text().strip()
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--tag", "global_step999"))
    _assert_nothing_written(tmp_path / "out")
    assert "--tag='global_step999'" in message and f"tags present: [{tag!r}]" in message


def test_missing_rank_file_says_the_filesystem_must_be_shared(capsys, zero_copy, tmp_path: Path) -> None:
    checkpoint, base = zero_copy
    tag_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    (rank1,) = tag_dir.glob("*zero_pp_rank_1_*optim_states.pt")
    rank1.unlink()
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base))
    _assert_nothing_written(tmp_path / "out")
    assert str(tag_dir) in message and "2 ranks" in message and "rank(s) [1]" in message
    assert "filesystem shared by all nodes" in message


# --- checkpoint and base model / LoRA config that do not fit together ----------------------------

# Both merge implementations check their inputs before writing anything.
IMPLS = pytest.mark.parametrize("impl", ["peft", "streaming"])
_SHAPE = re.compile(r"tensor '([^']+)' has shape (\([\d, ]+\)) but the base model's is (\([\d, ]+\))")


@IMPLS
@pytest.mark.parametrize("run", ["single-fp32", "zero2-fp32"])
def test_base_model_with_other_shapes(
    run: str, impl: str, capsys, trained_runs, narrow_llama: Path, tmp_path: Path
) -> None:
    checkpoint = trained_runs(run)[0] / "ckpt"
    message = _error(capsys, _args(checkpoint, tmp_path / "out", narrow_llama, "--merge-impl", impl))
    _assert_nothing_written(tmp_path / "out")
    match = _SHAPE.search(message)
    assert match, message
    key, theirs, ours = match.groups()
    assert key.startswith("base_model.model.model.")
    assert "64" in theirs and "32" in ours and "64" not in ours, message  # the trained and the narrow hidden size
    assert "--base-model" in message


@IMPLS
def test_rank_override_that_differs_from_training(impl: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--r", "8", "--merge-impl", impl))
    _assert_nothing_written(tmp_path / "out")
    match = _SHAPE.search(message)
    assert match, message
    key, theirs, ours = match.groups()
    assert ".lora_A." in key or ".lora_B." in key
    assert "4" in theirs and "8" in ours and "--r" in message


def test_rank_override_that_is_not_positive(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--r", "0"))
    _assert_nothing_written(tmp_path / "out")
    assert "--r=0" in message, message


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj", "k_proj"], r"not in .*k_proj\.lora_A"),  # the config wants adapters the run never trained
        (["q_proj"], r"match no module.*v_proj\.lora_A"),  # the run trained adapters the config has no module for
    ],
    ids=["missing-adapters", "unexpected-adapters"],
)
@IMPLS
def test_lora_config_with_other_target_modules(targets, expected, impl: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                                  "target_modules": targets}))
    argv = _args(checkpoint, tmp_path / "out", base, "--lora-config", str(config), "--merge-impl", impl)
    message = _error(capsys, argv)
    _assert_nothing_written(tmp_path / "out")
    assert re.search(expected, message), message
    assert "--lora-config" in message, message


def test_lora_config_path_without_a_config(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--lora-config", str(tmp_path)))
    _assert_nothing_written(tmp_path / "out")
    assert f"--lora-config={str(tmp_path)!r}" in message and "adapter_config.json" in message


def test_prefix_that_matches_nothing(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--prefix", "net."))
    _assert_nothing_written(tmp_path / "out")
    assert "--prefix='net.'" in message, message
    assert "'model.'" in message, message  # where the checkpoint does hold its PEFT model


# --- output options -------------------------------------------------------------------------------


def test_unknown_dtype(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base, "--dtype", "int8"))
    _assert_nothing_written(tmp_path / "out")
    assert "--dtype='int8'" in message
    assert all(repr(name) in message for name in ("auto", "fp32", "bf16", "fp16"))


@IMPLS
def test_unreadable_max_shard_size(impl: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    argv = _args(checkpoint, tmp_path / "out", base, "--max-shard-size", "lots", "--merge-impl", impl)
    message = _error(capsys, argv)
    _assert_nothing_written(tmp_path / "out")
    assert "--max-shard-size='lots'" in message, message


def test_output_inside_the_checkpoint_directory(capsys, zero_copy) -> None:
    checkpoint, base = zero_copy
    before = _snapshot(checkpoint)
    output = checkpoint / "export"
    message = _error(capsys, _args(checkpoint, output, base))
    _assert_nothing_written(output)
    assert _snapshot(checkpoint) == before
    assert f"--output={str(output.resolve())!r}" in message and "--checkpoint" in message


@pytest.mark.parametrize("inside", [False, True], ids=["equal", "inside"])
def test_output_at_the_base_model(inside: bool, capsys, single, tmp_path: Path) -> None:
    checkpoint, shared_base = single
    base = tmp_path / "base"
    shutil.copytree(shared_base, base)
    before = _snapshot(base)
    output = base / "export" if inside else base
    message = _error(capsys, _args(checkpoint, output, base))
    assert _snapshot(base) == before, "the base model directory was changed"
    assert not (base / "export").exists() and not list(tmp_path.glob(".base.*"))
    assert f"--output={str(output.resolve())!r}" in message and f"--base-model={str(base)!r}" in message


def test_existing_output_is_kept_byte_for_byte_without_overwrite(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base, "--no-merge")) == 0
    (output / "notes.txt").write_text("the user's own file")
    before = _snapshot(output)
    message = _error(capsys, _args(checkpoint, output, base))
    assert _snapshot(output) == before
    assert not [p.name for p in tmp_path.glob(".out.*")]
    assert f"--output={str(output)!r}" in message or f"--output={str(output.resolve())!r}" in message
    assert "--overwrite" in message


def test_existing_output_is_replaced_with_overwrite(single, tmp_path: Path) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base, "--no-merge")) == 0
    assert export_main(_args(checkpoint, output, base, "--overwrite")) == 0
    files = set(_snapshot(output))
    assert "merged/config.json" in files and "adapter/adapter_config.json" in files
    manifest = json.loads((output / "export.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert set(manifest["files"]) == files - {"export.json"}
    assert not [p.name for p in tmp_path.glob(".out.*")], "old export or temporary directory left behind"


def test_no_merge_writes_only_the_adapter_and_the_manifest(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("single-fp32")
    output = tmp_path / "out"
    assert export_main(_args(run / "ckpt", output, base, "--no-merge")) == 0
    assert set(_snapshot(output)) == {"export.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    manifest = json.loads((output / "export.json").read_text())
    assert manifest["verification"] == {"skipped": "no merged model"}
    assert set(manifest["files"]) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    # The adapter holds the trained tensors (PEFT's file names drop the adapter name).
    trained = torch.load(run / "trained.pt")
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    assert set(adapter) == {key.replace(".default", "") for key in trained}
    assert all(torch.equal(adapter[key.replace(".default", "")], value) for key, value in trained.items())


def test_no_verify_records_the_skip(single, tmp_path: Path) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base, "--no-verify")) == 0
    manifest = json.loads((output / "export.json").read_text())
    assert manifest["verification"] == {"skipped": "--no-verify"}
    files = set(_snapshot(output))
    assert {"adapter/adapter_model.safetensors", "merged/config.json", "merged/model.safetensors"} <= files
    assert not any(".verify-adapter" in f for f in files)


# --- the real command in a subprocess -------------------------------------------------------------

COMMAND = Path(sys.executable).parent / "lightning-lora"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    assert COMMAND.is_file(), f"the console script {COMMAND} is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(COMMAND), "export", *argv], capture_output=True, text=True, timeout=300, env=env)


def _missing_checkpoint(tmp_path: Path, runs) -> tuple[list[str], str]:
    base = runs("single-fp32")[1]
    return _args(tmp_path / "nope", tmp_path / "out", base), "does not exist"


def _missing_rank(tmp_path: Path, runs) -> tuple[list[str], str]:
    run, base = runs("zero2-fp32")
    copy = tmp_path / "zero.ckpt"
    shutil.copytree(run / "ckpt", copy)
    for rank1 in copy.glob("*/*zero_pp_rank_1_*optim_states.pt"):
        rank1.unlink()
    return _args(copy, tmp_path / "out", base), "filesystem shared by all nodes"


def _rank_mismatch(tmp_path: Path, runs) -> tuple[list[str], str]:
    run, base = runs("single-fp32")
    return _args(run / "ckpt", tmp_path / "out", base, "--r", "8"), "--r"  # fails after the models are loaded


@pytest.mark.parametrize("case", [_missing_checkpoint, _missing_rank, _rank_mismatch],
                         ids=["missing-checkpoint", "missing-rank", "rank-mismatch-after-loading"])
def test_command_prints_one_error_line_and_no_traceback(case, trained_runs, tmp_path: Path) -> None:
    argv, expected = case(tmp_path, trained_runs)
    result = _run(argv)
    assert result.returncode == 1
    _assert_nothing_written(tmp_path / "out")
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert expected in lines[0]


def test_debug_shows_the_traceback(trained_runs, tmp_path: Path) -> None:
    argv, _ = _missing_checkpoint(tmp_path, trained_runs)
    result = _run([*argv, "--debug"])
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ExportError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(PREFIX)
    _assert_nothing_written(tmp_path / "out")


# --- the callback validates where it is built -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dtype": "int8"}, ["dtype='int8'", "'bf16'"]),
        ({"merge": False, "save_adapter": False}, ["merge=False", "save_adapter=False"]),
        ({"merge_impl": "fastest"}, ["merge_impl='fastest'", "'streaming'"]),
        ({"max_shard_size": "lots"}, ["max_shard_size='lots'"]),
    ],
    ids=["dtype", "nothing-to-export", "merge-impl", "max-shard-size"],
)
def test_callback_rejects_bad_settings_at_construction(kwargs: dict, named: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError) as raised:
        HFExport(dirpath=str(tmp_path / "export"), **kwargs)
    assert all(text in str(raised.value) for text in named), str(raised.value)
    assert not (tmp_path / "export").exists()


# --- coverage: every trained tensor accounted for ------------------------------------------------


@pytest.mark.parametrize("impl", ["peft", "streaming"])
def test_checkpoint_missing_one_adapter_tensor_fails_naming_it(impl: str, capsys, single, tmp_path: Path) -> None:
    checkpoint_path, base = single
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    removed = sorted(k for k in checkpoint["state_dict"] if ".lora_B." in k)[-1]
    del checkpoint["state_dict"][removed]
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    message = _error(capsys, _args(damaged, tmp_path / "out", base, "--merge-impl", impl))
    # Named as the PEFT model calls it: the checkpoint key less the LightningModule attribute.
    assert removed.removeprefix("model.") in message and "1 trained tensor(s)" in message
    _assert_nothing_written(tmp_path / "out")


def test_truncated_rank_file_is_named(capsys, zero_copy, tmp_path: Path) -> None:
    checkpoint, base = zero_copy
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    rank_file = next(p for p in sorted(tag.iterdir()) if p.name.startswith("zero_pp_rank_1"))
    rank_file.write_bytes(rank_file.read_bytes()[: rank_file.stat().st_size // 2])
    message = _error(capsys, _args(checkpoint, tmp_path / "out", base))
    assert rank_file.name in message and "truncated or corrupt" in message
    _assert_nothing_written(tmp_path / "out")


def test_sharded_fsdp_checkpoint_missing_a_shard_file_names_it(capsys, single, tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    checkpoint_path, base = single
    sharded = tmp_path / "fsdp.ckpt"
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(torch.load(checkpoint_path, weights_only=False), sharded)
    (sharded / "__0_0.distcp").unlink()
    message = _error(capsys, _args(sharded, tmp_path / "out", base))
    assert "__0_0.distcp" in message and "shared by all nodes" in message and str(sharded) in message
    _assert_nothing_written(tmp_path / "out")
