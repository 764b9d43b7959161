"""A base model other than the one a run trained on is named as such, in one line, before the merge.

The wrong bases here have the base's exact shapes, config and tokenizer (the same tiny model built
from another seed, or the base with one tensor changed), so nothing but the weights can tell them
apart: the checkpoint's frozen weights where it holds them, the verification where it does not.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from lightning_lora.cli import export_main, verify_main
from lightning_lora.export import pipeline

PREFIX = "lightning-lora export: error: "
NOT_TRAINED_FROM = "is not the model this checkpoint was trained from: "

# Every kind of checkpoint that holds frozen weights: ZeRO-1 (rank 0's module state), ZeRO-2
# (whole fragments), ZeRO-3 (one fragment per rank, bf16 here), a Lightning .ckpt, sharded FSDP.
WITH_FROZEN = {"zero1": "zero1-fp32", "zero2": "zero2-fp32", "zero3-bf16": "zero3-bf16",
               "lightning-ckpt": "single-fp32", "fsdp-sharded": "single-fp32"}


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama base built from another seed: same config, shapes and tokenizer, other weights."""
    from lightning_lora.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("other") / "llama", arch="llama", seed=1)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every worker that starts merging and writing its shards."""
    calls: list[int] = []
    write = pipeline._write_my_shards

    def recorded(job, plan, rank, world, merged_dir):
        calls.append(rank)
        return write(job, plan, rank, world, merged_dir)

    monkeypatch.setattr(pipeline, "_write_my_shards", recorded)
    return calls


def _checkpoint(kind: str, trained_runs, tmp_path: Path) -> tuple[Path, Path]:
    run, base = trained_runs(WITH_FROZEN[kind])
    if kind != "fsdp-sharded":
        return run / "ckpt", base
    from lightning.pytorch.strategies import FSDPStrategy

    state = torch.load(run / "ckpt", map_location="cpu", weights_only=False)
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(state, tmp_path / "fsdp.ckpt")
    return tmp_path / "fsdp.ckpt", base


def _export(capsys: pytest.CaptureFixture[str], checkpoint: Path, output: Path, base: Path) -> tuple[int, list[str]]:
    """Exit code and the error lines of ``lightning-lora export``."""
    capsys.readouterr()
    code = export_main(["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base)])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith(PREFIX)]


def _with_tensor_changed(base: Path, target: Path, key: str) -> Path:
    """A copy of ``base`` whose tensor ``key`` is scaled by 1.5; config and tokenizer unchanged."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, target)
    tensors = load_file(target / "model.safetensors")
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("kind", list(WITH_FROZEN))
def test_a_wrong_base_is_named_in_one_line_before_the_merge(kind: str, trained_runs, other_llama: Path,
                                                          merges: list[int], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, _ = _checkpoint(kind, trained_runs, tmp_path)
    output = tmp_path / "out"
    code, errors = _export(capsys, checkpoint, output, other_llama)
    assert code == 1 and len(errors) == 1, errors
    message = errors[0].removeprefix(PREFIX)
    assert message.startswith(f"--base-model={str(other_llama)!r} {NOT_TRAINED_FROM}"), message
    counts = re.search(r"(\d+) of (\d+) sampled frozen tensors differ \(e\.g\. model\.", message)
    assert counts, message
    differing, sampled = map(int, counts.groups())
    assert 1 <= differing <= sampled <= 8
    # Refused before the merge: no worker merged, nothing was written or kept aside.
    assert merges == [] and not output.exists() and not (tmp_path / "out.failed").exists()


def test_the_right_base_is_compared_and_accepted_when_the_checkpoint_holds_it_in_bf16(
    trained_runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ZeRO-3 bf16 keeps the frozen weights in bf16; the base is fp32: they are equal once the base is cast."""
    from lightning_lora.export.checkpoint import load_checkpoint
    from lightning_lora.export.weights import WeightFiles

    run, base = trained_runs("zero3-bf16")
    frozen = load_checkpoint(run / "ckpt").frozen
    key = next(iter(frozen))
    assert frozen[key].dtype == torch.bfloat16
    assert WeightFiles(base).info("model.embed_tokens.weight").dtype == torch.float32
    caplog.set_level(logging.INFO, logger="lightning_lora")
    manifest = pipeline.export_checkpoint(run / "ckpt", tmp_path / "out", base_model=str(base))
    assert manifest["verification"]["passed"]
    assert "base check: 8 sampled frozen tensors of the checkpoint equal --base-model's" in caplog.text


def test_the_callback_names_a_wrong_base_before_the_merge(llama_base: Path, other_llama: Path, merges: list[int],
                                                          tmp_path: Path) -> None:
    """HFExport at the end of a single-device fit: the frozen weights are the module's own."""
    import lightning as L

    from lightning_lora import InstructionDataModule, LoraFinetuneModule
    from lightning_lora.callbacks import HFExport
    from lightning_lora.tiny import quickstart_rows

    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:8]))
    data = InstructionDataModule(str(data_file), tokenizer=str(llama_base), batch_size=4, val_split=0.0, max_length=64,
                                 template="human_assistant")
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj"],
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    target = tmp_path / "export"
    export = HFExport(dirpath=str(target), base_model=str(other_llama))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[export])
    with pytest.raises(Exception, match=re.escape(f"--base-model={str(other_llama)!r} {NOT_TRAINED_FROM}")):
        trainer.fit(module, datamodule=data)
    assert merges == [] and not target.exists()


def test_a_base_that_differs_where_the_sample_did_not_look_is_named_by_the_verification(
    trained_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final norm (a vector: never sampled while there are matrices) differs; the adapter does
    not touch it, so the merge copies it and only its base can make it differ."""
    run, base = trained_runs("single-fp32")
    other = _with_tensor_changed(base, tmp_path / "other", "model.norm.weight")
    code, errors = _export(capsys, run / "ckpt", tmp_path / "out", other)
    assert code == 1 and len(errors) == 1, errors
    assert re.fullmatch(
        rf"verification failed: --base-model={re.escape(repr(str(other)))} {NOT_TRAINED_FROM}1 of \d+ tensors "
        r"the adapter leaves untouched differ \(e\.g\. model\.norm\.weight\); nothing was published, the export "
        r"is kept aside in .*", errors[0].removeprefix(PREFIX)), errors[0]
    assert not (tmp_path / "out").exists() and (tmp_path / "out.failed" / "export.json").is_file()


@pytest.mark.parametrize(("name", "compared"), [("zero3-exclude-frozen", "tensors the adapter leaves untouched"),
                                                ("zero2-fp32", "sampled frozen tensors")],
                         ids=["without-frozen-weights", "with-frozen-weights"])
def test_verify_names_a_wrong_base_in_one_line(name: str, compared: str, trained_runs, other_llama: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An export re-checked against another base: without frozen weights in the checkpoint only the
    merged model's untouched tensors can tell, with them the checkpoint tells first."""
    run, base = trained_runs(name)
    output = tmp_path / "out"
    code, errors = _export(capsys, run / "ckpt", output, base)
    assert code == 0, errors
    assert verify_main([str(output), "--base-model", str(other_llama)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-lora verify")]
    assert len(lines) == 1, lines
    assert f"--base-model={str(other_llama)!r} {NOT_TRAINED_FROM}" in lines[0], lines[0]
    assert f" {compared} differ (e.g. " in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["zero2", "lightning-ckpt"])
def test_a_base_of_other_shapes_is_named_the_same_way(kind: str, trained_runs, tmp_path: Path, merges: list[int],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """LoRA on q_proj and v_proj fits a base with another MLP width; the frozen MLP weights do not
    (a .ckpt's are checked with the trained tensors, by shape; ZeRO's are the sample's)."""
    from lightning_lora.tiny import build_tiny_base

    checkpoint, base = _checkpoint(kind, trained_runs, tmp_path)
    config = json.loads((base / "config.json").read_text())
    wider = build_tiny_base(tmp_path / "wider", arch="llama", intermediate_size=2 * config["intermediate_size"])
    code, errors = _export(capsys, checkpoint, tmp_path / "out", wider)
    assert code == 1 and len(errors) == 1, errors
    assert f"--base-model={str(wider)!r} {NOT_TRAINED_FROM.rstrip(': ')}" in errors[0], errors[0]
    assert merges == [] and not (tmp_path / "out").exists()
