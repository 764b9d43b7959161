"""Out-of-core proof: export a model larger than the memory the process may use.

Runs ``lightning-lora export`` on the cached 1.1B benchmark (build it first with
``python benchmarks/export_memory.py``) inside a cgroup whose memory limit is smaller than the
model, once with ``--merge-impl streaming`` and once with ``--merge-impl peft``. A cgroup limit
(unlike ``RLIMIT_DATA``, which also counts private file mappings) caps what the kernel cannot
reclaim: anonymous memory; page cache of the memory-mapped inputs is reclaimed under pressure.

    python benchmarks/out_of_core.py [--cache DIR] [--limit-gib 1.5]

Needs root and a cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2. Writes
benchmarks/results/out_of_core.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_cgroup(limit: int) -> tuple[Path, Path]:
    """A fresh memory cgroup with ``limit`` bytes; returns (its directory, its procs file)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        group = v1 / f"lightning-lora-ooc-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group, group / "cgroup.procs"
    group = Path("/sys/fs/cgroup") / f"lightning-lora-ooc-{os.getpid()}"
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group, group / "cgroup.procs"


def run_capped(procs: Path, command: list[str]) -> tuple[int, float, str]:
    """Run ``command`` inside the cgroup (the child joins it before exec)."""
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
        preexec_fn=lambda: procs.write_text(str(os.getpid())),
    )
    text = result.stdout if result.returncode == 0 else result.stderr
    tail = text.strip().splitlines()[-1:] or [""]
    return result.returncode, time.monotonic() - started, tail[0][-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lightning_lora" / "bench"))
    parser.add_argument("--limit-gib", type=float, default=1.5)
    args = parser.parse_args()
    root = Path(args.cache) / "llama-1.1b-v1"
    base, checkpoint = root / "base", root / "zero3" / "ckpt"
    if not (base / "config.json").is_file() or not checkpoint.is_dir():
        sys.exit(f"no cached benchmark model under {root}: run `python benchmarks/export_memory.py` first")
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    limit = int(args.limit_gib * 2**30)
    group, procs = make_cgroup(limit)
    runs = []
    try:
        for impl in ("streaming", "peft"):
            output = root / f"ooc-{impl}"
            shutil.rmtree(output, ignore_errors=True)
            command = [sys.executable, "-m", "lightning_lora", "export", "--checkpoint", str(checkpoint),
                       "--base-model", str(base), "--output", str(output), "--merge-impl", impl,
                       "--no-verify", "--max-shard-size", "500MB", "--dtype", "bf16"]
            code, wall, last_line = run_capped(procs, command)
            published = (output / "export.json").is_file()
            runs.append({"variant": f"ours_{impl}", "returncode": code, "wall_s": round(wall, 1),
                         "published": published, "last_line": last_line})
            shutil.rmtree(output, ignore_errors=True)
    finally:
        group.rmdir()
    result = {"model_bytes": model_bytes, "limit_bytes": limit, "runs": runs,
              "command": "python benchmarks/out_of_core.py --limit-gib " + str(args.limit_gib)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "out_of_core.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Out-of-core export",
        "",
        f"Model weights {model_bytes / 2**30:.2f} GiB (bf16, 1.1B parameters); the export runs in a memory cgroup "
        f"limited to {limit / 2**30:.2f} GiB. Command: `{result['command']}`.",
        "",
        "| variant | exit code | published | wall (s) | last line |",
        "|---|---:|---|---:|---|",
        *[f"| {r['variant']} | {r['returncode']} | {r['published']} | {r['wall_s']} | {r['last_line'].replace('|', '/')} |" for r in runs],
        "",
        "Exit code -9: killed (SIGKILL) by the kernel's OOM killer at the limit; nothing was published under the output name.",
    ]
    (RESULTS / "out_of_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
