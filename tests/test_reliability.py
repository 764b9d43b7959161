"""Exports are atomic, idempotent and verified: reruns, kills, full disks and failed verifications
never leave a half-written or wrong model under the final name."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_lora.cli import export_main, verify_main
from lightning_lora.export import ExportError, export_checkpoint, verify_directory
from lightning_lora.export import function_check


def _export_args(run: Path, base: Path, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(run / "ckpt"), "--base-model", str(base), "--output", str(output), *extra]


def _siblings(output: Path) -> list[str]:
    """Temporary or set-aside leftovers next to ``output``."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def test_rerun_on_same_inputs_is_a_no_op(trained_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    assert export_main(_export_args(run, base, out)) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert export_main(_export_args(run, base, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # not one file rewritten
    # Other inputs (here: the dtype) are a different export: refused without --overwrite, the old one kept.
    assert export_main(_export_args(run, base, out, "--dtype", "bf16")) == 1
    assert json.loads((out / "export.json").read_text())["dtype"] == "float32"
    assert export_main(_export_args(run, base, out, "--dtype", "bf16", "--overwrite")) == 0
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"
    assert _siblings(out) == []


def test_sigkill_at_any_moment_leaves_nothing_or_a_good_export(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    assert export_main(_export_args(run, base, out)) == 0
    good = json.loads((out / "export.json").read_text())
    command = [sys.executable, "-m", "lightning_lora", "export", *_export_args(run, base, out, "--dtype", "bf16", "--overwrite")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Measure one full replace, then kill fresh ones at spread-out moments within it.
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    duration = time.monotonic() - started
    shutil.rmtree(out)
    assert export_main(_export_args(run, base, out)) == 0
    rng = random.Random(0)
    outcomes = set()
    for fraction in (0.2, 0.5, 0.85, rng.uniform(0.3, 0.99)):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        # Whatever the moment: under the final name, either the previous good export or a complete new one.
        if out.exists():
            assert verify_directory(out)["problems"] == []
            outcomes.add(json.loads((out / "export.json").read_text())["dtype"])
        else:
            outcomes.add("nothing")  # killed between the two renames: the next run restores
        # The next run cleans up after the killed one and succeeds (back to the fp32 export).
        assert export_main(_export_args(run, base, out, "--overwrite")) == 0
        assert _siblings(out) == []
        assert verify_directory(out)["problems"] == []
        assert json.loads((out / "export.json").read_text())["inputs_fingerprint"] == good["inputs_fingerprint"]
    assert outcomes <= {"float32", "bfloat16", "nothing"} and outcomes


def test_interrupted_replace_is_restored(trained_runs, tmp_path: Path) -> None:
    """A kill between moving the old export aside and renaming the new one into place."""
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    assert export_main(_export_args(run, base, out)) == 0
    out.rename(tmp_path / ".out.old-4242")
    (tmp_path / ".out.tmp-4242-x").mkdir()  # and the new one, half-written
    assert export_main(_export_args(run, base, out)) == 0  # restored, found identical: nothing to do
    assert verify_directory(out)["problems"] == [] and _siblings(out) == []


def test_failed_verification_publishes_nothing_and_keeps_the_report(
    trained_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, base = trained_runs("single-fp32")
    # No merged model can be within a negative tolerance: this forces the function check to fail.
    monkeypatch.setattr(function_check, "SAFETY", -1.0)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"verification failed.*out\.failed"):
        export_checkpoint(run / "ckpt", out, base_model=base, progress=False)
    assert not out.exists() and _siblings(out) == []
    report = json.loads((tmp_path / "out.failed" / "export.json").read_text())
    assert report["verification"]["passed"] is False
    assert (tmp_path / "out.failed" / "merged" / "config.json").is_file()


def test_full_disk_removes_the_temporary_directory(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"

    def limit_file_size() -> None:
        # Files may not grow past 64 KiB; the kernel's SIGXFSZ is ignored so writes fail with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run(
        [sys.executable, "-m", "lightning_lora", "export", *_export_args(run, base, out)],
        capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightning-lora export: error:")]
    assert len(errors) == 1 and "--output=" in errors[0] and "File too large" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() and _siblings(out) == []


def test_verify_command_finds_tampering(trained_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    assert export_main(_export_args(run, base, out)) == 0
    assert verify_main([str(out), "--base-model", str(base)]) == 0
    assert "match export.json" in capsys.readouterr().out

    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    config = tampered / "merged" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', ' "hidden_act"'))
    (tampered / "adapter" / "notes.txt").write_text("added later")
    assert verify_main([str(tampered)]) == 1
    errors = capsys.readouterr().err
    assert "merged/config.json differs from export.json" in errors and "unrecorded file adapter/notes.txt" in errors

    # A shard replaced by tensors of other shapes, with export.json updated to match its hash:
    # the hashes agree, the shapes the config implies do not.
    from safetensors.torch import load_file, save_file

    from lightning_lora.export.hf import file_manifest

    reshaped = tmp_path / "reshaped"
    shutil.copytree(out, reshaped)
    shard = reshaped / "merged" / "model.safetensors"
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    manifest = json.loads((reshaped / "export.json").read_text())
    manifest["files"] = {k: v for k, v in file_manifest(reshaped).items() if k != "export.json"}
    (reshaped / "export.json").write_text(json.dumps(manifest))
    assert verify_main([str(reshaped)]) == 1
    assert f"{key!r} has shape" in capsys.readouterr().err

    assert verify_main([str(tmp_path / "nowhere")]) == 1
    assert "holds no export.json" in capsys.readouterr().err


def test_not_enough_free_space_fails_before_writing(trained_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, base = trained_runs("single-fp32")
    out = tmp_path / "out"
    # The filesystem reports 1 KiB free: far less than the ~0.6 MiB this export writes.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(ExportError, match=r"--output=.*needs about 0\.[1-9]\d MiB but only 0\.00 MiB are free"):
        export_checkpoint(run / "ckpt", out, base_model=base, progress=False)
    assert not out.exists() and _siblings(out) == []
