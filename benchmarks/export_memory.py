"""Peak memory and wall time of exporting a DeepSpeed ZeRO-3 LoRA checkpoint as a merged HF model.

One command::

    python benchmarks/export_memory.py [--small] [--cache DIR] [--out-of-core]

It builds (once, cached under ``--cache``) a Llama-shaped base model of about 1.1B parameters in
bf16 with several safetensors shards, trains a LoRA (r=16, all-linear) on it for a couple of
steps with real DeepSpeed ZeRO-3 on 2 CPU processes (cached too), and then measures, each in a
fresh process, the peak RSS and the wall time of:

- ``manual``: the recipe users follow today (``zero_to_fp32`` -> PEFT ``merge_and_unload`` ->
  ``save_pretrained``), which verifies nothing;
- ``ours_peft``, ``ours_streaming``: ``lightning-lora export --merge-impl peft|streaming --no-verify``;
  ``ours_streaming_w2`` the latter on 2 local workers;
- ``ours_verify_w1``, ``ours_verify_w2``: the streaming export with its verification, on 1 and on
  2 local workers (``--workers``);
- ``ours_default``: ``lightning-lora export`` with its defaults (``--merge-impl auto``, verified);
- ``verify``: ``lightning-lora verify OUT --base-model BASE`` on ``ours_verify_w1``'s export;
- ``floor``: what any verification of this model must at least do on this machine: read every
  weight of the base and the merged model once (as fp32), and run the fixed probe set (4 x 64
  tokens) through the fp32 model twice (the trained and the merged side);
- ``copy``: ``shutil.copytree`` of the base model directory (the disk-bound floor).

The merged outputs are then compared tensor by tensor (one tensor in memory at a time). Results go
to ``benchmarks/results/export_memory{,_small}.{json,md}``. See ``benchmarks/README.md``.

Peak RSS is the child's own ``ru_maxrss``, read with ``os.wait4`` on exactly that child. A sampler
thread also polls ``/proc/PID/status`` every 20 ms for the split into anonymous and file-backed
resident memory and for ``VmData`` (what ``RLIMIT_DATA`` limits); those are sampled, so they can
miss a short spike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TRAIN_SCRIPT = REPO / "benchmarks" / "_train_zero3.py"
VARIANTS = ("copy", "manual", "ours_peft", "ours_streaming", "ours_streaming_w2", "ours_verify_w1", "ours_verify_w2",
            "ours_default", "verify", "floor")
# name -> (--merge-impl, verified, --workers) of the export variants.
EXPORTS = {"ours_peft": ("peft", False, 1), "ours_streaming": ("streaming", False, 1), "ours_streaming_w2": ("streaming", False, 2),
           "ours_verify_w1": ("streaming", True, 1), "ours_verify_w2": ("streaming", True, 2), "ours_default": ("auto", True, 1)}
GiB = 2**30

# Bump when the way a base or checkpoint is built changes, so stale caches are not reused.
BUILD_VERSION = 1
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        name="llama-1.1b", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
        num_attention_heads=32, num_key_value_heads=4, max_shard_size="500MB",
    ),
    "small": dict(
        name="llama-small", hidden_size=512, num_hidden_layers=4, intermediate_size=1408, vocab_size=32000,
        num_attention_heads=8, num_key_value_heads=2, max_shard_size="20MB",
    ),
}
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own fresh process, started by the driver below.
# --------------------------------------------------------------------------------------------

def worker_build_base(out: str, size: str) -> None:
    """Write a randomly filled Llama base in bf16 (sharded safetensors) and a tokenizer.

    The model is built on the meta device and materialised once, in bf16, with ``to_empty``;
    weights are filled in place (norms with 1, the rest N(0, 0.02)) instead of running the
    model's own (slow, fp32) initialisation.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from lightning_lora.tiny import build_tokenizer

    spec = SIZES[size]
    config = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out, max_shard_size=spec["max_shard_size"])
    build_tokenizer().save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": params}))


def worker_manual(checkpoint: str, base: str, out: str, max_shard_size: str) -> None:
    """The recipe users follow today, written as a user would write it."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint)
    state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    result = model.load_state_dict(state_dict, strict=False)
    # Not part of the recipe, but a benchmark must not time a merge of untrained adapters.
    missing_lora = [k for k in result.missing_keys if ".lora_" in k]
    if missing_lora or result.unexpected_keys:
        raise SystemExit(f"manual recipe: {len(missing_lora)} LoRA tensors missing, e.g. {missing_lora[:2]}; "
                         f"unexpected {result.unexpected_keys[:2]}")
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def worker_copy(src: str, dst: str) -> None:
    shutil.copytree(src, dst)


def worker_floor(base: str, merged: str) -> None:
    """The floor of a verification: every weight of both models read once as fp32, and two fp32
    forward passes of the fixed probe set (4 x 64 tokens; and of half of it, one worker's share
    of two). Prints the seconds as JSON."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    for directory in (base, merged):
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    f.get_tensor(key).float()
    read_s = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    probes = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    timings = {}
    with torch.no_grad():
        model(input_ids=probes[:1])  # warm-up
        for name, batch in (("forward_x2_4_probes_s", probes), ("forward_x2_2_probes_s", probes[:2])):
            started = time.perf_counter()
            model(input_ids=batch)
            model(input_ids=batch)
            timings[name] = round(time.perf_counter() - started, 3)
    print(json.dumps({"read_both_models_fp32_s": round(read_s, 3), **timings}))


WORKERS = {"build-base": worker_build_base, "manual": worker_manual, "copy": worker_copy, "floor": worker_floor}


# --------------------------------------------------------------------------------------------
# Measuring a child process.
# --------------------------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return pids


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmData"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


class Sampler(threading.Thread):
    """Poll the memory of a process tree: peaks, and a coarse timeline (summed over the tree)."""

    def __init__(self, pid: int, interval: float = 0.02, timeline_every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.timeline_every = pid, interval, timeline_every
        self.peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmData": 0}
        self.timeline: list[tuple[float, int, int, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        start = last = time.perf_counter()
        while not self.stop_event.is_set():
            total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmData": 0}
            for pid in _tree(self.pid):
                for key, value in _status(pid).items():
                    total[key] += value
            for key, value in total.items():
                self.peaks[key] = max(self.peaks[key], value)
            now = time.perf_counter()
            if total["VmRSS"] and (now - last >= self.timeline_every or not self.timeline):
                self.timeline.append((round(now - start, 2), total["RssAnon"], total["RssFile"], total["VmData"]))
                last = now
            self.stop_event.wait(self.interval)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(variant: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None,
            data_limit: int | None = None, timeout: float = 6 * 3600) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process; return its peak RSS (``ru_maxrss`` via ``wait4``) and wall time."""
    logs.mkdir(parents=True, exist_ok=True)
    tag = variant if data_limit is None else f"{variant}-capped"
    stdout, stderr = (logs / f"{tag}.stdout").open("w"), (logs / f"{tag}.stderr").open("w")

    def limit() -> None:
        if data_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    load = load_average()
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, preexec_fn=limit, cwd=REPO)
    sampler = Sampler(child.pid)
    sampler.start()
    killer = threading.Timer(timeout, child.kill)
    killer.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    killer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen consistent
    sampler.stop_event.set()
    sampler.join()
    stdout.close()
    stderr.close()
    run = {
        "variant": variant,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "wall_s": round(wall, 3),
        "returncode": child.returncode,
        "sampled_peak_rss_anon_bytes": sampler.peaks["RssAnon"],
        "sampled_peak_rss_file_bytes": sampler.peaks["RssFile"],
        "sampled_peak_vmdata_bytes": sampler.peaks["VmData"],
        "user_cpu_s": round(usage.ru_utime, 2),
        "system_cpu_s": round(usage.ru_stime, 2),
        "load_before": load,
        "command": shlex.join(cmd),
    }
    (logs / f"{tag}.timeline.json").write_text(json.dumps(sampler.timeline))
    if data_limit is not None:
        run["rlimit_data_bytes"] = data_limit
    if child.returncode != 0:
        run["stderr_tail"] = (logs / f"{tag}.stderr").read_text()[-1500:]
    print(f"  {tag:<22} rc={child.returncode} peak_rss={run['peak_rss_bytes'] / GiB:6.2f} GiB "
          f"wall={wall:8.1f}s  (anon<= {sampler.peaks['RssAnon'] / GiB:.2f} GiB, "
          f"VmData<= {sampler.peaks['VmData'] / GiB:.2f} GiB, load {load[0]})", flush=True)
    return run


def worker_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", name, *args]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "lightning-lora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_lora"]


def export_cmd(variant: str, checkpoint: Path, base: Path, out: Path, max_shard_size: str) -> list[str]:
    impl, verified, workers = EXPORTS[variant]
    return [*_command(), "export", "--checkpoint", str(checkpoint), "--base-model", str(base), "--output", str(out),
            "--merge-impl", impl, *([] if verified else ["--no-verify"]), "--workers", str(workers),
            "--max-shard-size", max_shard_size, "--dtype", "bf16"]


def verify_cmd(export: Path, base: Path) -> list[str]:
    return [*_command(), "verify", str(export), "--base-model", str(base)]


# --------------------------------------------------------------------------------------------
# Correctness: compare merged directories one tensor at a time.
# --------------------------------------------------------------------------------------------

def weight_files(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            files.update({k: file for k in f.keys()})
    return files


def _ordered(bits: Any) -> Any:
    """bf16 bit patterns as integers ordered like the values (so the difference counts ulps)."""
    import torch

    bits = bits.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def compare_dirs(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two merged models: identical elements, max distance in bf16 ulps."""
    import torch
    from safetensors import safe_open

    files_a, files_b = weight_files(a), weight_files(b)
    report: dict[str, Any] = {
        "keys_equal": set(files_a) == set(files_b),
        "only_in_first": sorted(set(files_a) - set(files_b))[:5],
        "only_in_second": sorted(set(files_b) - set(files_a))[:5],
    }
    tensors = elements = different = over_one_ulp = tensors_different = 0
    max_ulp, max_abs = 0, 0.0
    for key in sorted(set(files_a) & set(files_b)):
        # Files opened (memory-mapped) per tensor, so that no more than two tensors are resident.
        with safe_open(files_a[key], "pt") as fa, safe_open(files_b[key], "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.shape != y.shape or x.dtype != y.dtype:
                report.setdefault("mismatched", []).append(
                    f"{key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
                continue
            tensors += 1
            elements += x.numel()
            unequal = x != y
            n = int(unequal.sum())
            if n:
                tensors_different += 1
                different += n
                max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
                if x.dtype == torch.bfloat16:
                    ulps = (_ordered(x) - _ordered(y)).abs()
                    max_ulp = max(max_ulp, int(ulps.max()))
                    over_one_ulp += int((ulps > 1).sum())
            del x, y, unequal
    report.update(tensors=tensors, elements=elements, tensors_not_identical=tensors_different,
                  elements_not_identical=different, fraction_not_identical=different / max(elements, 1),
                  max_abs_diff=max_abs, max_ulp_bf16=max_ulp, elements_over_one_ulp=over_one_ulp)
    report["within_one_bf16_rounding"] = bool(report["keys_equal"] and "mismatched" not in report and max_ulp <= 1)
    return report


def changed_vs_base(merged: Path, base: Path) -> dict[str, int]:
    """How many merged tensors differ from the base at all (the merge is not a no-op)."""
    from safetensors import safe_open

    files_m, files_b = weight_files(merged), weight_files(base)
    changed = elements_changed = 0
    for key in sorted(files_m):
        with safe_open(files_m[key], "pt") as fm, safe_open(files_b[key], "pt") as fb:
            x, y = fm.get_tensor(key), fb.get_tensor(key)
            n = int((x != y).sum()) if x.shape == y.shape else x.numel()
        changed += bool(n)
        elements_changed += n
        del x, y
    return {"tensors": len(files_m), "tensors_changed": changed, "elements_changed": elements_changed}


def largest_shard(directory: Path) -> int:
    return max((p.stat().st_size for p in directory.glob("*.safetensors")), default=0)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from lightning_lora.export.hf import package_versions

    return {"python": platform.python_version(), **package_versions()}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            "cpu": cpu, "kernel": platform.release(), "load": {"start": load_average()}}


def snapshot_code(ref: str | None, dest: Path) -> dict[str, Any]:
    """Copy the ``lightning_lora`` package (working tree, or ``git archive REF``) to ``dest``.

    Every ``lightning-lora export`` of one benchmark run imports this copy (``PYTHONPATH``), so
    edits to the working tree during a run cannot mix versions, and the results name the code
    they measured.
    """
    import hashlib

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git = ["git", "-C", str(REPO)]
    if ref is None:
        shutil.copytree(REPO / "lightning_lora", dest / "lightning_lora", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run([*git, "archive", ref, "lightning_lora"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    digest = hashlib.sha256()
    for file in sorted((dest / "lightning_lora").rglob("*.py")):
        digest.update(file.relative_to(dest).as_posix().encode())
        digest.update(file.read_bytes())

    def git_out(*args: str) -> str:
        result = subprocess.run([*git, *args], capture_output=True, text=True)
        return result.stdout.rstrip() if result.returncode == 0 else ""

    return {
        "measured": "working tree" if ref is None else f"git {ref}",
        "git_head": git_out("rev-parse", "HEAD"),
        "commit": git_out("rev-parse", ref) if ref else git_out("rev-parse", "HEAD"),
        "uncommitted_changes": git_out("status", "--porcelain", "lightning_lora").splitlines() if ref is None else [],
        "lightning_lora_sha256": digest.hexdigest(),
    }


def ensure_base(cache: Path, size: str, logs: Path, phases: dict[str, Any]) -> Path:
    base = cache / "base"
    record = cache / "base.json"
    if (base / "config.json").is_file():
        phases["build_base"] = {"cached": True, **(json.loads(record.read_text()) if record.is_file() else {})}
        return base
    print(f"building the {SIZES[size]['name']} base model in {base} (once) ...", flush=True)
    tmp = cache / ".base-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run = measure("build-base", worker_cmd("build-base", str(tmp), size), logs)
    if run["returncode"] != 0:
        raise SystemExit(f"building the base failed:\n{run.get('stderr_tail', '')}")
    tmp.rename(base)
    info = {"wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    record.write_text(json.dumps(info, indent=2) + "\n")
    phases["build_base"] = {"cached": False, **info}
    return base


def ensure_checkpoint(cache: Path, base: Path, logs: Path, phases: dict[str, Any]) -> Path:
    run_dir = cache / "zero3"
    checkpoint = run_dir / "ckpt"
    if (run_dir / "DONE").is_file():
        phases["train_zero3"] = {"cached": True, **json.loads((run_dir / "DONE").read_text())}
        return checkpoint
    print(f"training LoRA with DeepSpeed ZeRO-3 on 2 CPU processes into {run_dir} (once) ...", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--base", str(base), "--out", str(run_dir)]
    run = measure("train-zero3", cmd, logs, env=env)
    if run["returncode"] != 0:
        raise SystemExit(f"ZeRO-3 training failed (logs in {logs}):\n{run.get('stderr_tail', '')}")
    timing = json.loads((run_dir / "train_timing.json").read_text())
    # Both ranks together (the sampler sums the process tree); the launcher's own ru_maxrss is rank 0's.
    info = {"wall_s": run["wall_s"], "rank0_peak_rss_bytes": run["peak_rss_bytes"],
            "sampled_peak_rss_anon_both_ranks_bytes": run["sampled_peak_rss_anon_bytes"],
            "checkpoint_bytes": dir_bytes(checkpoint), **timing}
    (run_dir / "DONE").write_text(json.dumps(info, indent=2) + "\n")
    phases["train_zero3"] = {"cached": False, **info}
    return checkpoint


def warm_page_cache(*paths: Path) -> None:
    """Read every input file once so that no variant pays for cold reads the others do not."""
    for root in paths:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            with file.open("rb") as f:
                while f.read(1 << 24):
                    pass


def run_variant(variant: str, checkpoint: Path, base: Path, out: Path, shard: str, logs: Path,
                data_limit: int | None = None, code: Path | None = None) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    verified = out.parent / "ours_verify_w1"
    if variant == "copy":
        cmd = worker_cmd("copy", str(base), str(out))
    elif variant == "manual":
        cmd = worker_cmd("manual", str(checkpoint), str(base), str(out), shard)
    elif variant == "floor":
        cmd = worker_cmd("floor", str(base), str(verified / "merged"))
    elif variant == "verify":
        cmd = verify_cmd(verified, base)
    else:
        cmd = export_cmd(variant, checkpoint, base, out, shard)
    ours = variant.startswith("ours_") or variant == "verify"
    env = {**os.environ, "PYTHONPATH": str(code)} if code is not None and ours else None
    run = measure(variant, cmd, logs, data_limit=data_limit, env=env)
    if variant in ("floor", "verify"):
        if variant == "floor" and run["returncode"] == 0:
            run["floor"] = json.loads((logs / "floor.stdout").read_text().strip().splitlines()[-1])
        os.sync()
        return run
    merged = out / "merged" if variant.startswith("ours_") else out
    if variant.startswith("ours_") and run["returncode"] == 0:
        manifest = json.loads((out / "export.json").read_text())
        verification = manifest["verification"]
        run["export_s"] = manifest["seconds"]
        run["verification_s"] = verification.get("seconds")
        run["merge_impl"] = manifest["merge_impl"]
        run["verified"] = verification.get("passed")
    if run["returncode"] == 0:
        run["largest_output_shard_bytes"] = largest_shard(merged)
        run["output_weight_bytes"] = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
        run["output_shards"] = len(list(merged.glob("*.safetensors")))
    os.sync()  # flush this run's writes so that the next run does not pay for them
    return run


def median_runs(runs: list[dict[str, Any]], variant: str) -> dict[str, float] | None:
    mine = [r for r in runs if r["variant"] == variant and r["returncode"] == 0]
    if not mine:
        return None
    return {"peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine)}


def ratios_and_targets(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    med = {v: median_runs(runs, v) for v in VARIANTS}
    ratios: dict[str, Any] = {}
    for variant, m in med.items():
        if m is None:
            continue
        ratios[variant] = {}
        for ref in ("manual", "copy"):
            if med.get(ref):
                ratios[variant][f"peak_rss_vs_{ref}"] = round(m["peak_rss_bytes"] / med[ref]["peak_rss_bytes"], 4)
                ratios[variant][f"wall_vs_{ref}"] = round(m["wall_s"] / med[ref]["wall_s"], 4)
    targets: dict[str, Any] = {}
    s, p, man, cp = med.get("ours_streaming"), med.get("ours_peft"), med.get("manual"), med.get("copy")
    shard = max((r.get("largest_output_shard_bytes", 0) for r in runs if r["variant"] == "ours_streaming"), default=0)

    def target(name: str, value: float | None, limit: float | None, unit: str) -> None:
        met = None if value is None or limit is None else bool(value <= limit)
        targets[name] = {"value": value, "limit": limit, "unit": unit, "met": met}

    if s and man:
        target("streaming peak RSS <= 0.25 x manual", s["peak_rss_bytes"], 0.25 * man["peak_rss_bytes"], "bytes")
        target("streaming wall <= 0.6 x manual", s["wall_s"], 0.6 * man["wall_s"], "s")
    if s:
        target("streaming peak RSS <= largest output shard + 1 GiB", s["peak_rss_bytes"], shard + GiB, "bytes")
    if s and cp:
        target("streaming wall <= 3 x copy", s["wall_s"], 3 * cp["wall_s"], "s")
    if p and man:
        target("ours_peft peak RSS <= manual", p["peak_rss_bytes"], man["peak_rss_bytes"], "bytes")
        target("ours_peft wall <= manual", p["wall_s"], man["wall_s"], "s")
    # Verification (issue: at any model size, shared by the workers).
    w2 = med.get("ours_verify_w2")
    if w2 and man:
        target("verified export, 2 workers: wall <= manual (which verifies nothing)", w2["wall_s"], man["wall_s"], "s")
    for variant, unverified in (("ours_verify_w1", "ours_streaming"), ("ours_verify_w2", "ours_streaming_w2")):
        if med.get(variant) and med.get(unverified):
            # What verification adds to the wall time: the same export with and without it.
            share = 1 - med[unverified]["wall_s"] / med[variant]["wall_s"]
            target(f"{variant}: verification (its wall time over {unverified}'s) <= 0.5 x export wall", share, 0.5, "ratio")
    for variant in ("ours_verify_w1", "ours_verify_w2", "ours_default", "verify"):
        if med.get(variant):
            target(f"{variant}: peak RSS per worker <= 1.2 GiB", med[variant]["peak_rss_bytes"], 1.2 * GiB, "bytes")
    return ratios, targets


def out_of_core(checkpoint: Path, base: Path, work: Path, shard: str, logs: Path, cap: int, model_bytes: int,
                adapter: Path | None, code: Path | None) -> dict[str, Any]:
    """Streaming and peft exports under RLIMIT_DATA = ``cap`` (smaller than the model)."""
    print(f"out-of-core: RLIMIT_DATA = {cap / GiB:.2f} GiB (model {model_bytes / GiB:.2f} GiB)", flush=True)
    result: dict[str, Any] = {"rlimit_data_bytes": cap, "model_bytes": model_bytes,
                              "cap_smaller_than_model": cap < model_bytes, "runs": []}
    for variant in ("ours_streaming", "ours_peft"):
        run = run_variant(variant, checkpoint, base, work / f"capped-{variant}", shard, logs, data_limit=cap, code=code)
        run["source"] = "zero3 checkpoint"
        result["runs"].append(run)
        shutil.rmtree(work / f"capped-{variant}", ignore_errors=True)
    if adapter is not None and adapter.is_dir():
        # The same merge fed from the PEFT adapter directory instead of the ZeRO files: separates
        # the cost of reading the ZeRO checkpoint from the cost of the merge itself.
        # Workaround: the streaming merger rebuilds the PEFT model with the adapter's own
        # "inference_mode": true (PEFT writes it so), which freezes the LoRA tensors, and then
        # rejects every adapter tensor; a copy with inference_mode false avoids that.
        trainable = work / "adapter-inference-mode-false"
        shutil.rmtree(trainable, ignore_errors=True)
        shutil.copytree(adapter, trainable)
        config = json.loads((trainable / "adapter_config.json").read_text())
        config["inference_mode"] = False
        (trainable / "adapter_config.json").write_text(json.dumps(config, indent=2))
        result["adapter_workaround"] = "adapter_config.json copied with inference_mode=false (see README)"
        for variant in ("ours_streaming", "ours_peft"):
            run = run_variant(variant, trainable, base, work / f"capped-adapter-{variant}", shard, logs, data_limit=cap,
                              code=code)
            run["variant"] = f"{variant} (from adapter dir)"
            run["source"] = "adapter directory"
            result["runs"].append(run)
            shutil.rmtree(work / f"capped-adapter-{variant}", ignore_errors=True)
    for run in result["runs"]:
        run["succeeded"] = run["returncode"] == 0
    return result


def fmt_gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Export memory benchmark ({report['model']['name']})", ""]
    m = report["machine"]
    lines += [
        f"Model: {report['model']['parameters'] / 1e9:.3f}B parameters, bf16, "
        f"{fmt_gib(report['model_bytes'])} GiB of weights "
        f"in {report['model']['base_shards']} safetensors shards; LoRA r={LORA['r']}, alpha={LORA['lora_alpha']}, "
        f"all-linear; DeepSpeed ZeRO-3 checkpoint from 2 CPU processes ({fmt_gib(report['checkpoint_bytes'])} GiB). "
        f"Output shards of at most {report['max_shard_size']}.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {fmt_gib(m['memory_bytes'])} GiB RAM, load average "
        f"{m['load']['start']} at the start, {m['load'].get('end')} at the end. Command: `{report['command']}`.",
        "",
        f"Code measured: lightning_lora from the {report['code']['measured']} (HEAD `{report['code']['git_head'][:10]}`"
        + (f", uncommitted changes: {', '.join(c.split()[-1] for c in report['code']['uncommitted_changes'])}"
           if report['code']['uncommitted_changes'] else "")
        + f"; sources sha256 `{report['code']['lightning_lora_sha256'][:12]}`).",
        "",
        "Medians over the runs of each variant (range in brackets when a variant ran more than once):",
        "",
        "| variant | runs | peak RSS (GiB) | x manual | x copy | wall (s) | x manual | x copy "
        "| anon RSS peak* (GiB) | VmData peak* (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        mine = [r for r in report["runs"] if r["variant"] == variant]
        if not mine:
            continue
        ok = [r for r in mine if r["returncode"] == 0]
        if not ok:
            lines.append(f"| {variant} | {len(mine)} | failed (rc {mine[0]['returncode']}) | | | | | | | |")
            continue
        r = report["ratios"].get(variant, {})
        rss = [x["peak_rss_bytes"] for x in ok]
        wall = [x["wall_s"] for x in ok]
        rss_range = f" [{min(rss) / GiB:.2f}-{max(rss) / GiB:.2f}]" if len(ok) > 1 else ""
        wall_range = f" [{min(wall):.1f}-{max(wall):.1f}]" if len(ok) > 1 else ""
        lines.append(
            f"| {variant} | {len(ok)}{'' if len(ok) == len(mine) else f' (+{len(mine) - len(ok)} failed)'} | "
            f"{statistics.median(rss) / GiB:.2f}{rss_range} | {fmt_ratio(r.get('peak_rss_vs_manual'))} | "
            f"{fmt_ratio(r.get('peak_rss_vs_copy'))} | {statistics.median(wall):.1f}{wall_range} | "
            f"{fmt_ratio(r.get('wall_vs_manual'))} | {fmt_ratio(r.get('wall_vs_copy'))} | "
            f"{fmt_gib(max(x['sampled_peak_rss_anon_bytes'] for x in ok))} | "
            f"{fmt_gib(max(x['sampled_peak_vmdata_bytes'] for x in ok))} |"
        )
    lines += ["", "\\* sampled every 20 ms from `/proc/PID/status`, summed over the worker processes; peak RSS "
              "itself is the child's `ru_maxrss` (anonymous + file-backed pages, including memory-mapped input "
              "files), for several workers that of the largest one.", ""]
    lines += verification_lines(report)
    lines += ["", "## Targets", "",
              "| target | value | limit | met |", "|---|---:|---:|---|"]
    for name, t in report["targets"].items():
        show = {"bytes": lambda v: f"{v / GiB:.2f} GiB", "s": lambda v: f"{v:.1f} s", "ratio": lambda v: f"{v:.2f}"}[t["unit"]]
        lines.append(f"| {name} | {show(t['value'])} | {show(t['limit'])} | {'yes' if t['met'] else 'NO'} |")
    c = report.get("correctness", {})
    if c:
        lines += ["", "## Correctness (merged tensors, compared one at a time)", "",
                  "| pair | tensors | not bit-identical (elements) | max diff (bf16 ulps) | within one bf16 rounding |",
                  "|---|---:|---:|---:|---|"]
        for pair, v in c.items():
            if "tensors_changed" in v:
                continue
            lines.append(f"| {pair} | {v['tensors']} | {v['elements_not_identical']:,} of {v['elements']:,} | "
                         f"{v['max_ulp_bf16']} | {'yes' if v['within_one_bf16_rounding'] else 'NO'} |")
        if "ours_streaming vs base" in c:
            v = c["ours_streaming vs base"]
            lines += ["", f"The merge is not a no-op: {v['tensors_changed']} of {v['tensors']} merged tensors "
                      f"({v['elements_changed']:,} elements) differ from the base."]
    ooc = report.get("out_of_core")
    if ooc:
        lines += ["", "## Out of core", "",
                  f"Each export run in a fresh process with `RLIMIT_DATA` = {fmt_gib(ooc['rlimit_data_bytes'])} GiB "
                  f"(model {fmt_gib(ooc['model_bytes'])} GiB: "
                  + ("the cap is smaller than the model). " if ooc["cap_smaller_than_model"]
                     else "the cap is NOT smaller than the model, so this proves nothing). ")
                  + "`RLIMIT_DATA` counts private writable mappings, file-backed ones included.", "",
                  "| variant | input | result | peak RSS (GiB) | anon RSS peak* (GiB) | VmData peak* (GiB) "
                  "| wall (s) | error |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for run in ooc["runs"]:
            error = ""
            if not run["succeeded"]:
                error = run.get("stderr_tail", "").strip().splitlines()[-1:] or [""]
                error = error[0].removeprefix("lightning-lora export: error: ")
                error = re.sub(r"(?<=[\s'<])/(?:[^/\s'<>]+/)+", ".../", error)[:200].replace("|", "/")
            lines.append(f"| {run['variant'].split(' ')[0]} | {run['source']} | "
                         f"{'succeeded' if run['succeeded'] else 'failed (rc ' + str(run['returncode']) + ')'} | "
                         f"{fmt_gib(run['peak_rss_bytes'])} | {fmt_gib(run['sampled_peak_rss_anon_bytes'])} | "
                         f"{fmt_gib(run['sampled_peak_vmdata_bytes'])} | {run['wall_s']:.1f} | {error} |")
    lines += ["", "## Phases", "", "| phase | wall (s) |", "|---|---:|"]
    for name, p in report["phases"].items():
        wall = p.get("wall_s")
        if p.get("cached"):
            wall = f"cached (took {wall:.1f} when built)" if wall is not None else "cached"
        lines.append(f"| {name} | {wall} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def verification_lines(report: dict[str, Any]) -> list[str]:
    """How much of each verified export was verification, beside the floor on this machine."""
    rows = [r for r in report["runs"] if r.get("verification_s") and r["returncode"] == 0]
    floors = [r["floor"] for r in report["runs"] if r["variant"] == "floor" and "floor" in r]
    if not rows and not floors:
        return []
    lines = ["## Verification", "", "Each export's own clock (`export.json`): its whole run, and its slowest worker's tensor and "
             "function checks (the tensor check of a worker's shards overlaps the others' merging).", "",
             "| variant | merge | export (s) | verification, slowest worker (s) | share |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['merge_impl']} | {r['export_s']:.1f} | {r['verification_s']:.1f} | "
                     f"{r['verification_s'] / r['export_s']:.2f} |")
    if floors:
        f = {key: statistics.median(x[key] for x in floors) for key in floors[0]}
        lines += ["", f"Floor of any verification on this machine (`floor` variant, medians of {len(floors)}): reading every weight of both models "
                  f"once as fp32 {f['read_both_models_fp32_s']:.1f} s; two fp32 forward passes of the 4 x 64 probes "
                  f"{f['forward_x2_4_probes_s']:.1f} s (of 2 x 64, one of two workers' share: "
                  f"{f['forward_x2_2_probes_s']:.1f} s). One worker's floor: "
                  f"{f['read_both_models_fp32_s'] + f['forward_x2_4_probes_s']:.1f} s; each of two workers': "
                  f"{f['read_both_models_fp32_s'] + f['forward_x2_2_probes_s']:.1f} s."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak memory and wall time of LoRA exports from a ZeRO-3 checkpoint.")
    parser.add_argument("--small", action="store_true", help="a much smaller Llama, for quick checks")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lightning_lora" / "bench"),
                        help="where the base model, the checkpoint and the outputs live (default: %(default)s)")
    parser.add_argument("--out-of-core", action="store_true",
                        help="also run the streaming and peft exports under RLIMIT_DATA smaller than the model")
    parser.add_argument("--cap", type=float, help="the RLIMIT_DATA of --out-of-core, in GiB "
                        "(default: largest output shard + 1 GiB)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant (ratios use the medians)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the exported directories in the cache")
    parser.add_argument("--ref", help="measure the lightning_lora package of this git revision (e.g. HEAD) "
                        "instead of the working tree")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the markdown from the existing results JSON (measures nothing)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and markdown go (default: %(default)s)")
    args = parser.parse_args()
    size = "small" if args.small else "full"
    stem = "export_memory_small" if args.small else "export_memory"
    if args.render:
        results = Path(args.results)
        (results / f"{stem}.md").write_text(markdown(json.loads((results / f"{stem}.json").read_text())))
        print(f"wrote {results / (stem + '.md')}")
        return
    spec = SIZES[size]
    shard = spec["max_shard_size"]
    cache = Path(args.cache).expanduser().resolve() / f"{spec['name']}-v{BUILD_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    work, logs = cache / "work", cache / "logs"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    work.mkdir()
    report: dict[str, Any] = {"machine": machine(), "versions": versions(), "phases": {},
                              "command": shlex.join(["python", "benchmarks/export_memory.py", *sys.argv[1:]])}
    phases = report["phases"]

    code = work / "code"
    report["code"] = snapshot_code(args.ref, code)
    print(f"measuring lightning_lora from the {report['code']['measured']} (HEAD {report['code']['git_head'][:10]}, "
          f"{len(report['code']['uncommitted_changes'])} uncommitted changes)", flush=True)
    base = ensure_base(cache, size, logs, phases)
    checkpoint = ensure_checkpoint(cache, base, logs, phases)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    report["model_bytes"] = int(index["metadata"]["total_size"])
    report["checkpoint_bytes"] = dir_bytes(checkpoint)
    report["max_shard_size"] = shard
    report["model"] = {**spec, "parameters": report["model_bytes"] // 2, "dtype": "bfloat16",
                       "base_shards": len(set(index["weight_map"].values())), "lora": LORA}

    started = time.perf_counter()
    warm_page_cache(base, checkpoint)
    phases["warm_page_cache"] = {"wall_s": round(time.perf_counter() - started, 1)}

    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    variants = [v for v in args.variants.split(",") if v]
    for repeat in range(args.repeat):
        print(f"measuring (round {repeat + 1} of {args.repeat}) ...", flush=True)
        for variant in variants:
            runs.append(run_variant(variant, checkpoint, base, work / variant, shard, logs, code=code))
            if variant == "copy":
                shutil.rmtree(work / variant, ignore_errors=True)
    phases["measure"] = {"wall_s": round(time.perf_counter() - started, 1)}
    report["runs"] = runs
    report["ratios"], report["targets"] = ratios_and_targets(runs)

    started = time.perf_counter()
    print("checking the merged tensors ...", flush=True)
    merged = {"manual": work / "manual", "ours_peft": work / "ours_peft" / "merged",
              "ours_streaming": work / "ours_streaming" / "merged"}
    merged = {k: v for k, v in merged.items() if (v / "config.json").is_file()}
    correctness: dict[str, Any] = {}
    for first, second in (("ours_streaming", "ours_peft"), ("ours_streaming", "manual"), ("ours_peft", "manual")):
        if first in merged and second in merged:
            correctness[f"{first} vs {second}"] = compare_dirs(merged[first], merged[second])
            print(f"  {first} vs {second}: max {correctness[f'{first} vs {second}']['max_ulp_bf16']} ulp", flush=True)
    if "ours_streaming" in merged:
        correctness["ours_streaming vs base"] = changed_vs_base(merged["ours_streaming"], base)
    report["correctness"] = correctness
    phases["check"] = {"wall_s": round(time.perf_counter() - started, 1)}

    if args.out_of_core:
        started = time.perf_counter()
        cap = int(args.cap * GiB) if args.cap else parse_shard(shard) + GiB
        adapter = work / "ours_streaming" / "adapter"
        report["out_of_core"] = out_of_core(checkpoint, base, work, shard, logs, cap, report["model_bytes"],
                                            adapter if adapter.is_dir() else None, code)
        phases["out_of_core"] = {"wall_s": round(time.perf_counter() - started, 1)}

    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load"]["end"] = load_average()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {results / (stem + '.json')} and {results / (stem + '.md')}; logs in {logs}")


def parse_shard(size: str) -> int:
    from lightning_lora.export.plan import parse_size

    return parse_size(size)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        WORKERS[sys.argv[2]](*sys.argv[3:])
    else:
        main()
