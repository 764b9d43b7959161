"""Verification finds what only the numbers can tell: an export edited after the fact with its
manifest's hashes updated, so that every file "matches export.json". ``lightning-lora verify DIR
--base-model`` rebuilds the trained model from the checkpoint and the base and must name the
tensor, or the block, that is wrong. The deltas are those of real training steps, not inflated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora.cli import export_main, verify_main
from lightning_lora.export.hf import file_manifest

TARGET = "model.layers.1.self_attn.v_proj.weight"


def _export(run: Path, base: Path, out: Path, dtype: str) -> None:
    assert export_main(["--checkpoint", str(run / "ckpt"), "--output", str(out), "--base-model", str(base), "--dtype", dtype]) == 0


def _rehash(export: Path) -> None:
    """Make export.json agree with the files again, as someone covering their tracks would."""
    manifest = json.loads((export / "export.json").read_text())
    manifest["files"] = {k: v for k, v in file_manifest(export).items() if k != "export.json"}
    (export / "export.json").write_text(json.dumps(manifest))


def _edit_tensor(export: Path, key: str, value: torch.Tensor) -> None:
    shard = export / "merged" / "model.safetensors"
    tensors = load_file(shard)
    tensors[key] = value.to(tensors[key].dtype).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    _rehash(export)


def _verify(export: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = verify_main([str(export), "--base-model", str(base)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _lora_delta(run: Path, manifest: dict) -> torch.Tensor:
    trained = torch.load(run / "trained.pt")
    prefix = "base_model.model." + TARGET.removesuffix(".weight")
    lora = manifest["lora_config"]
    return lora["lora_alpha"] / lora["r"] * trained[f"{prefix}.lora_B.default.weight"] @ trained[f"{prefix}.lora_A.default.weight"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verify_names_a_tensor_that_lacks_its_lora_delta(dtype: str, trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    _export(run, base, out, dtype)
    code, text = _verify(out, base, capsys)
    assert code == 0 and "tensors match PEFT's merge" in text, text
    original = load_file(base / "model.safetensors")[TARGET]
    delta = _lora_delta(run, json.loads((out / "export.json").read_text()))
    merged = load_file(out / "merged" / "model.safetensors")[TARGET]
    assert not torch.equal(merged, original.to(merged.dtype)), "training left this tensor unchanged: nothing to find"
    # How small the delta is: a few steps' worth, in units of the export's rounding.
    assert delta.abs().median() < original.abs().median()
    _edit_tensor(out, TARGET, original)
    code, text = _verify(out, base, capsys)
    assert code == 1 and f"merged tensor {TARGET!r} differs from PEFT's merge" in text, text


def test_verify_names_a_delta_scaled_by_one_percent(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    _export(run, base, out, "fp32")
    manifest = json.loads((out / "export.json").read_text())
    original = load_file(base / "model.safetensors")[TARGET]
    _edit_tensor(out, TARGET, original + 1.01 * _lora_delta(run, manifest))
    code, text = _verify(out, base, capsys)
    assert code == 1 and f"merged tensor {TARGET!r} differs from PEFT's merge" in text, text


def test_verify_finds_a_config_changed_after_the_export(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    _export(run, base, out, "fp32")
    config = out / "merged" / "config.json"
    data = json.loads(config.read_text())
    data["rms_norm_eps"] = 0.5
    config.write_text(json.dumps(data, indent=2))
    _rehash(out)
    code, text = _verify(out, base, capsys)
    assert code == 1, text
    assert "config.json: rms_norm_eps is 0.5 in the merged model" in text, text
    assert "block 0 (model.layers.0): merged and trained outputs differ" in text, text  # the function check too


def test_verify_without_the_checkpoint_uses_the_exported_adapter(trained_runs, tmp_path: Path, capsys) -> None:
    """A copied export whose checkpoint is gone is still checked, against its own adapter."""
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    _export(run, base, out, "bf16")
    manifest = json.loads((out / "export.json").read_text())
    manifest["source"]["checkpoint"] = str(tmp_path / "gone.ckpt")
    (out / "export.json").write_text(json.dumps(manifest))
    code, text = _verify(out, base, capsys)
    assert code == 0 and "reference: the exported adapter" in text, text
    shutil.copytree(out, tmp_path / "edited")
    _edit_tensor(tmp_path / "edited", TARGET, load_file(base / "model.safetensors")[TARGET])
    code, text = _verify(tmp_path / "edited", base, capsys)
    assert code == 1 and TARGET in text, text
