"""An export never destroys what is not an export, never answers "nothing to do" with a stale
model, and checks what it can before it loads anything large."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_lora.callbacks import HFExport
from lightning_lora.cli import export_main

from test_export_errors import _snapshot, single  # noqa: F401  (single is a fixture)

PREFIX = "lightning-lora export: error: "


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = export_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _args(checkpoint: Path, output: Path, base: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base), *extra]


# --- --overwrite replaces exports, and nothing else --------------------------------------------------


def test_overwrite_never_deletes_the_run_directory_holding_the_checkpoint(single, tmp_path: Path, capsys) -> None:
    checkpoint, base = single
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run)
    before = _snapshot(run)
    code, _, err = _run(capsys, *_args(run / "ckpt", run, base, "--overwrite"))
    assert code == 1 and f"contains --checkpoint={str(run / 'ckpt')!r}" in err, err
    assert _snapshot(run) == before


@pytest.mark.parametrize("contents", ["own-files", "export-plus-own-file", "a-file"])
def test_overwrite_refuses_anything_that_is_not_purely_an_export(contents: str, single, tmp_path: Path, capsys) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    if contents == "own-files":
        (output / "notes").mkdir(parents=True)
        (output / "notes" / "todo.md").write_text("mine")
        (output / "export.json").write_text('{"not": "ours"}')
    elif contents == "export-plus-own-file":
        assert export_main(_args(checkpoint, output, base, "--no-merge")) == 0
        (output / "adapter" / "README.md").write_text("my notes on this adapter")
    else:
        output.write_text("a file of the user's")
    before = _snapshot(output) if output.is_dir() else output.read_bytes()
    code, _, err = _run(capsys, *_args(checkpoint, output, base, "--overwrite"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith(PREFIX), err
    assert (_snapshot(output) if output.is_dir() else output.read_bytes()) == before
    assert not [p.name for p in tmp_path.glob(".out.*")]


def test_overwrite_replaces_an_export_of_ours_and_an_empty_directory_is_used(single, tmp_path: Path) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    output.mkdir()
    assert export_main(_args(checkpoint, output, base, "--no-merge")) == 0  # an empty directory is no loss
    assert export_main(_args(checkpoint, output, base, "--overwrite")) == 0
    assert (output / "merged" / "config.json").is_file()


def test_callback_with_overwrite_refuses_a_directory_of_user_files(llama_base: Path, tmp_path: Path) -> None:
    import lightning as L
    import torch

    from lightning_lora import InstructionDataModule, LoraFinetuneModule
    from lightning_lora.tiny import quickstart_rows

    target = tmp_path / "results"
    target.mkdir()
    (target / "paper.tex").write_text("months of work")
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:16]))
    data = InstructionDataModule(str(data_file), tokenizer=str(llama_base), batch_size=4, val_split=0.0, max_length=64,
                                 template="human_assistant")
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[HFExport(dirpath=str(target), overwrite=True)])
    with pytest.raises(Exception, match="not part of an export"):
        trainer.fit(module, datamodule=data)
    assert (target / "paper.tex").read_text() == "months of work" and sorted(p.name for p in target.iterdir()) == ["paper.tex"]


def test_a_failed_export_never_replaces_a_users_directory_named_like_its_report(single, tmp_path: Path, monkeypatch) -> None:
    from lightning_lora.export import function_check

    checkpoint, base = single
    (tmp_path / "out.failed").mkdir()
    (tmp_path / "out.failed" / "data.csv").write_text("1,2,3")
    monkeypatch.setattr(function_check, "SAFETY", -1.0)  # forces the verification to fail
    assert export_main(_args(checkpoint, tmp_path / "out", base)) == 1
    assert (tmp_path / "out.failed" / "data.csv").read_text() == "1,2,3"
    assert (tmp_path / "out.failed-2" / "export.json").is_file()


# --- the rerun fingerprint covers every setting that changes the result -------------------------------


@pytest.mark.parametrize(
    "changed",
    [["--dtype", "bf16"], ["--max-shard-size", "100KB"], ["--merge-impl", "streaming"], ["--prefix", "model."],
     ["--no-verify"], ["--r", "4"], ["--frozen-from-checkpoint"]],
    ids=["dtype", "shard-size", "merge-impl", "prefix", "verify", "r", "frozen"],
)
def test_any_setting_that_changes_the_result_is_not_a_rerun(changed: list[str], single, tmp_path: Path, capsys) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    first = ["--merge-impl", "peft"] if changed[0] == "--merge-impl" else []
    assert export_main(_args(checkpoint, output, base, *first)) == 0
    code, out, _ = _run(capsys, *_args(checkpoint, output, base, *changed))
    assert code == 1 and "nothing to do" not in out  # another export: refused without --overwrite
    code, out, _ = _run(capsys, *_args(checkpoint, output, base, *changed, "--overwrite"))
    assert code == 0 and "nothing to do" not in out
    # ... and asked again with the same settings, it is a rerun.
    code, out, _ = _run(capsys, *_args(checkpoint, output, base, *changed, "--overwrite"))
    assert code == 0 and "nothing to do" in out


def test_verifying_over_an_unverified_export_verifies(single, tmp_path: Path) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base, "--no-verify")) == 0
    assert export_main(_args(checkpoint, output, base, "--overwrite")) == 0
    assert json.loads((output / "export.json").read_text())["verification"]["passed"] is True


def test_another_tag_of_the_same_directory_is_another_export(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("zero2-fp32")
    checkpoint = tmp_path / "zero"
    shutil.copytree(run / "ckpt", checkpoint)
    tag = (checkpoint / "latest").read_text().strip()
    shutil.copytree(checkpoint / tag, checkpoint / "other")
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base)) == 0
    code, out, _ = _run(capsys, *_args(checkpoint, output, base, "--tag", "other", "--overwrite"))
    assert code == 0 and "nothing to do" not in out
    assert json.loads((output / "export.json").read_text())["source"]["tag"] == "other"


def test_other_probes_of_the_callback_are_another_export(single, tmp_path: Path) -> None:
    from lightning_lora.export import export_checkpoint

    checkpoint, base = single
    output = tmp_path / "out"
    export_checkpoint(checkpoint, output, base_model=str(base))
    again = export_checkpoint(checkpoint, output, base_model=str(base), probes=[[5, 6, 7, 8]], overwrite=True)
    assert not again.get("unchanged")
    assert export_checkpoint(checkpoint, output, base_model=str(base), probes=[[5, 6, 7, 8]]).get("unchanged")


def test_a_damaged_export_is_not_a_rerun(single, tmp_path: Path, capsys) -> None:
    checkpoint, base = single
    output = tmp_path / "out"
    assert export_main(_args(checkpoint, output, base)) == 0
    (output / "merged" / "model.safetensors").write_bytes(b"")
    code, out, _ = _run(capsys, *_args(checkpoint, output, base, "--overwrite"))
    assert code == 0 and "nothing to do" not in out
    assert (output / "merged" / "model.safetensors").stat().st_size > 0


# --- fail fast: settings and the output are checked before the checkpoint is read ---------------------


def _broken_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["--dtype", "int4"], "--dtype='int4'"), (["--max-shard-size", "huge"], "--max-shard-size='huge'"),
     (["--merge-impl", "fast"], "--merge-impl='fast'"), (["--workers", "0"], "--workers=0")],
)
def test_bad_settings_fail_before_the_checkpoint_is_read(extra: list[str], named: str, llama_base: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, *_args(_broken_checkpoint(tmp_path), tmp_path / "out", llama_base, *extra))
    assert code == 1 and named in err and "broken.ckpt" not in err, err


def test_output_and_disk_space_are_checked_before_the_checkpoint_is_read(llama_base: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil as shutil_module
    from collections import namedtuple

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("x")
    code, _, err = _run(capsys, *_args(_broken_checkpoint(tmp_path), occupied, llama_base, "--overwrite"))
    assert code == 1 and "not part of an export" in err and "broken.ckpt" not in err, err

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    code, _, err = _run(capsys, *_args(_broken_checkpoint(tmp_path), tmp_path / "out", llama_base))
    assert code == 1 and "are free on that filesystem" in err and "broken.ckpt" not in err, err
