"""Out-of-core proof: export and verify a model larger than the memory the process may use.

Runs, on the cached benchmark model (build it first with ``python benchmarks/export_memory.py
[--small]``), inside a cgroup whose memory limit is smaller than the model:

- ``default``: ``lightning-lora export`` with its defaults: ``--merge-impl auto`` (which must see
  the cgroup's limit and stream) and verification on;
- ``verify``: ``lightning-lora verify OUT --base-model BASE`` on that export;
- ``peft``: the whole-model merge forced with ``--merge-impl peft`` (expected to be killed).

A cgroup limit (unlike ``RLIMIT_DATA``, which also counts private file mappings) caps what the
kernel cannot reclaim: anonymous memory; page cache of the memory-mapped inputs is reclaimed
under pressure.

    python benchmarks/out_of_core.py [--small] [--cache DIR] [--limit-gib 1.5]

Needs root and a cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2. Writes
benchmarks/results/out_of_core{,_small}.json and .md. (The small model is far smaller than the
limit: its run shows the same commands at that size, not an out-of-core export.)
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
    parser.add_argument("--small", action="store_true", help="the small benchmark model")
    args = parser.parse_args()
    root = Path(args.cache) / ("llama-small-v1" if args.small else "llama-1.1b-v1")
    stem = "out_of_core_small" if args.small else "out_of_core"
    base, checkpoint = root / "base", root / "zero3" / "ckpt"
    if not (base / "config.json").is_file() or not checkpoint.is_dir():
        sys.exit(f"no cached benchmark model under {root}: run `python benchmarks/export_memory.py` first")
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    limit = int(args.limit_gib * 2**30)
    group, procs = make_cgroup(limit)
    runs = []
    prefix = [sys.executable, "-m", "lightning_lora"]
    output = root / "ooc-default"
    common = ["--checkpoint", str(checkpoint), "--base-model", str(base), "--max-shard-size", "500MB", "--dtype", "bf16"]
    commands = [
        ("default", [*prefix, "export", *common, "--output", str(output)]),
        ("verify", [*prefix, "verify", str(output), "--base-model", str(base)]),
        ("peft", [*prefix, "export", *common, "--output", str(root / "ooc-peft"), "--merge-impl", "peft"]),
    ]
    try:
        shutil.rmtree(output, ignore_errors=True)
        for variant, command in commands:
            code, wall, last_line = run_capped(procs, command)
            run = {"variant": variant, "returncode": code, "wall_s": round(wall, 1), "last_line": last_line,
                   "command": " ".join(command[2:])}
            if variant == "default" and code == 0:
                manifest = json.loads((output / "export.json").read_text())
                run.update(merge_impl=manifest["merge_impl"], merge_impl_reason=manifest["merge_impl_reason"],
                           verified=manifest["verification"]["passed"])
            runs.append(run)
        shutil.rmtree(root / "ooc-peft", ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
    finally:
        group.rmdir()
    command = "python benchmarks/out_of_core.py" + (" --small" if args.small else "") + f" --limit-gib {args.limit_gib}"
    result = {"model_bytes": model_bytes, "limit_bytes": limit, "runs": runs, "command": command}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Out-of-core export and verification",
        "",
        f"Model weights {model_bytes / 2**30:.2f} GiB (bf16); every command runs in a memory cgroup limited to "
        f"{limit / 2**30:.2f} GiB. Command: `{command}`.",
        "",
        "| variant | exit code | wall (s) | merge | verified | last line |",
        "|---|---:|---:|---|---|---|",
        *[f"| {r['variant']} | {r['returncode']} | {r['wall_s']} | {r.get('merge_impl', '')} | {r.get('verified', '')} | "
          f"{r['last_line'].replace('|', '/')} |" for r in runs],
        "",
        "Exit code -9: killed (SIGKILL) by the kernel's OOM killer at the limit; nothing was published under the output name.",
    ]
    if runs and runs[0].get("merge_impl_reason"):
        lines += ["", f"Why `auto` chose {runs[0]['merge_impl']}: {runs[0]['merge_impl_reason']}."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
