"""HFExport on several ranks: it exports the checkpoint of the step that ended (never an older one
ModelCheckpoint happens to call "best"), any failure before the ranks part reaches all of them at
once, and the ranks share the merge and the verification through files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_lora.cli import export_main

from conftest import SCRIPT
from test_export import _load_dir as _merged


def _train(base: Path, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), "--base", str(base), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_deepspeed_export_takes_the_checkpoint_of_the_last_step_not_the_best(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    """save_top_k=2 by a monitored score, no save_last: step 2 is "best", step 4's checkpoint was
    written last. The export must be of step 4, the end of training."""
    run = tmp_path / "run"
    result = _train(tiny_bases["llama"], run, "--strategy", "deepspeed", "--stage", "2", "--devices", "2",
                    "--top-k-checkpoints", "--export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["global_step"] == 4 and manifest["source"]["checkpoint"].endswith("epoch=0-step=4.ckpt")
    # And it is the trained model of step 4: the same merge as the checkpoint saved after fit.
    assert export_main(["--checkpoint", str(run / "ckpt"), "--output", str(tmp_path / "after"),
                        "--base-model", str(tiny_bases["llama"])]) == 0
    ours, after = _merged(run / "export" / "merged"), _merged(tmp_path / "after" / "merged")
    assert all(torch.equal(ours[k], after[k]) for k in after)


def test_export_on_exception_takes_the_last_checkpoint_written(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(tiny_bases["llama"], run, "--top-k-checkpoints", "--export", "--export-on-exception",
                    "--fail-at", "4", "--steps", "6")
    assert result.returncode != 0 and "simulated failure" in result.stderr
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["global_step"] == 4 and manifest["source"]["checkpoint"].endswith("epoch=0-step=4.ckpt")


def test_a_failure_before_the_ranks_part_reaches_every_rank_at_once(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    """Rank 0 cannot read the final checkpoint (an OSError, as from a network filesystem). With a
    process-group timeout of 60 s, a rank left waiting in a collective would fail this test by
    taking a minute and ending with a timeout instead of the error."""
    started = time.monotonic()
    result = _train(tiny_bases["llama"], tmp_path / "run", "--strategy", "deepspeed", "--stage", "2", "--devices", "2",
                    "--export", "--inject-oserror", "--pg-timeout", "60", timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert result.stderr.count("Input/output error") >= 2, result.stderr[-3000:]  # raised on both ranks
    assert "timeout" not in result.stderr.lower() and elapsed < 60 + 45, elapsed
    assert not (tmp_path / "run" / "export").exists()


def test_two_deepspeed_ranks_share_the_export_and_write_what_one_worker_writes(trained_runs, tmp_path: Path) -> None:
    """HFExport on 2 DeepSpeed ranks: each merged and tensor-checked its own shards and ran half the
    probes; every file equals the one a single worker writes, and two local workers write the same."""
    run, base = trained_runs("zero2-shared-export")
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["workers"]["count"] == 2
    writers = manifest["workers"]["shards"]
    assert len(writers) > 2 and set(writers.values()) == {0, 1}, writers
    assert manifest["verification"]["function"]["probes"] >= 4
    checkpoint = manifest["source"]["checkpoint"]
    for workers in ("1", "2"):
        out = tmp_path / f"workers-{workers}"
        assert export_main(["--checkpoint", checkpoint, "--output", str(out), "--base-model", str(base),
                            "--max-shard-size", "100KB", "--workers", workers]) == 0
        other = json.loads((out / "export.json").read_text())
        assert other["files"] == manifest["files"], f"--workers {workers} wrote other bytes"
        assert other["verification"]["passed"] and set(other["workers"]["shards"].values()) == set(range(int(workers)))
