"""QLoRA against bf16 LoRA at the 1.1B benchmark shape: peak memory of training, and of the export.

One command::

    python benchmarks/qlora_memory.py [--small] [--cache DIR] [--steps N] [--seq-len N]

On the Llama-shaped base of ``export_memory.py`` (random bf16 weights, built once and cached), each
in a fresh process, it measures the peak RSS (``ru_maxrss`` of that child, see
``export_memory.measure``) and the wall time of:

- ``train_bf16``: ``LoraFinetuneModule(dtype="bf16")`` (LoRA r=16 on every linear layer, fp32
  adapters), a Lightning ``Trainer`` on the CPU, ``--steps`` steps of batch 1 x ``--seq-len``
  tokens, gradient checkpointing on: the baseline;
- ``train_nf4``: the same with ``quantization="nf4"`` (double quantization, bf16 compute);
- ``export_bf16``: ``lightning-lora export`` (defaults: streaming, verified) of ``train_bf16``'s
  checkpoint: the streaming figure of this machine;
- ``export_nf4_dequantized``, ``export_nf4_original``: the same on ``train_nf4``'s checkpoint with
  each ``--merge-base`` (verified, drift measured).

Each training worker also reports where its memory goes once the model is built: the bytes of the
packed 4-bit weights and their quantization state, of the parameters kept in floating point (by
dtype: PEFT's k-bit preparation upcasts the embeddings, the head and the norms to fp32), and of
the LoRA parameters. Results go to ``benchmarks/results/qlora_memory{,_small}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_memory import BUILD_VERSION, RESULTS, SIZES, GiB, ensure_base, machine, measure, versions  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def worker_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", name, *args]


def worker_train(base: str, out: str, quantization: str, steps: str, seq_len: str) -> None:
    """Train ``steps`` steps and save a ``.ckpt``; print where the model's memory goes."""
    import lightning as L
    import torch

    from lightning_lora import LoraFinetuneModule

    quantized = quantization != "none"
    module = LoraFinetuneModule(base, dtype="bf16", gradient_checkpointing=True, quantization=quantization if quantized else None,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), **LORA)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (int(steps), 1, int(seq_len)), generator=generator)
    batches = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(steps), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    fit_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
    if out != "-":
        trainer.save_checkpoint(Path(out) / "run.ckpt")
    print(json.dumps({"memory_by_kind": _memory_by_kind(module.model), "fit_peak_rss_bytes": fit_peak,
                      "after_fit": {"rss_bytes": status["VmRSS"], "anon_bytes": status["RssAnon"], "file_bytes": status["RssFile"]}}))


def _memory_by_kind(model: Any) -> dict[str, int]:
    """Bytes of the model's tensors: packed 4-bit weights with their state, LoRA, the rest by dtype."""
    from lightning_lora.export.quantized import quantized_state

    kinds: dict[str, int] = {}

    def add(kind: str, tensor: Any) -> None:
        kinds[kind] = kinds.get(kind, 0) + tensor.numel() * tensor.element_size()

    for name, param in model.named_parameters():
        if param.requires_grad:
            add("lora (trained, fp32)", param)
        elif param.__class__.__name__ == "Params4bit":
            add("4-bit weights (packed)", param)
        elif "embed" in name or "lm_head" in name:
            add(f"embeddings and head ({str(param.dtype).removeprefix('torch.')})", param)
        else:
            add(f"other frozen ({str(param.dtype).removeprefix('torch.')})", param)
    for key, value in quantized_state(model).items():
        if not key.endswith(".weight"):  # the packed weights are parameters, counted above
            add("4-bit quantization state", value)
    return kinds


def _parse_worker(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and "memory_by_kind" in line:
            return json.loads(line)
    return {}


def export_cmd(checkpoint: Path, base: Path, out: Path, merge_base: str) -> list[str]:
    return [sys.executable, "-m", "lightning_lora", "export", "--checkpoint", str(checkpoint), "--base-model", str(base),
            "--output", str(out), "--overwrite", "--merge-base", merge_base]


def _exports_in_cgroup(limit_gib: float, work: Path, base: Path) -> dict[str, Any]:
    """The three exports again, each in a memory cgroup of ``limit_gib`` (which caps what the kernel
    cannot reclaim: page cache of the memory-mapped checkpoint and base is reclaimed under pressure)."""
    from out_of_core import make_cgroup, run_capped

    try:
        group, procs = make_cgroup(int(limit_gib * GiB))
    except OSError as err:
        return {"limit_gib": limit_gib, "skipped": f"no memory cgroup could be made: {err}"}
    runs = {}
    try:
        for name, checkpoint, merge_base in (("export_bf16", "train_bf16", "dequantized"),
                                             ("export_nf4_dequantized", "train_nf4", "dequantized"),
                                             ("export_nf4_original", "train_nf4", "original")):
            out = work / f"{name}-cgroup"
            code, wall, last = run_capped(procs, export_cmd(work / checkpoint / "run.ckpt", base, out, merge_base))
            runs[name] = {"returncode": code, "wall_s": round(wall, 1), "last_line": last}
            print(f"  {name:<22} in {limit_gib} GiB cgroup: rc={code} wall={wall:.1f}s", flush=True)
    finally:
        group.rmdir()
    return {"limit_gib": limit_gib, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [f"# QLoRA vs bf16 LoRA: peak memory ({report['size']})", "",
             f"`{report['command']}` on {report['machine'].get('cpu', 'this machine')}, "
             f"{report['steps']} steps of batch 1 x {report['seq_len']} tokens, gradient checkpointing on both.", "",
             "Training peak RSS: the whole process (fit, then `trainer.save_checkpoint`); `fit only`: its peak when "
             "`fit` returned, before the checkpoint is written.", "",
             "`after fit`: resident memory when `fit` returned (anonymous + file-backed: the bf16 run's weights stay "
             "memory-mapped from the safetensors files). `mmap128k`: the same fits with `MALLOC_MMAP_THRESHOLD_=131072`, "
             "no checkpoint written.", "",
             "| run | peak RSS (GiB) | ratio | fit only (GiB) | ratio | after fit: anon + file (GiB) | ratio | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs = [("train_bf16", "train_bf16"), ("train_nf4", "train_bf16"), ("train_bf16_mmap128k", "train_bf16_mmap128k"),
             ("train_nf4_mmap128k", "train_bf16_mmap128k"), ("export_bf16", "export_bf16"),
             ("export_nf4_dequantized", "export_bf16"), ("export_nf4_original", "export_bf16")]
    for name, baseline in pairs:
        run = runs.get(name)
        if run is None:
            continue
        ratio = run["peak_rss_bytes"] / runs[baseline]["peak_rss_bytes"]
        fit, fit_ratio, after, after_ratio = "", "", "", ""
        if run.get("fit_peak_rss_bytes"):
            fit = f"{run['fit_peak_rss_bytes'] / GiB:.2f}"
            fit_ratio = f"{run['fit_peak_rss_bytes'] / runs[baseline]['fit_peak_rss_bytes']:.2f}x"
        if run.get("after_fit"):
            mine, theirs = run["after_fit"], runs[baseline]["after_fit"]
            after = f"{mine['anon_bytes'] / GiB:.2f} + {mine['file_bytes'] / GiB:.2f}"
            after_ratio = f"{(mine['anon_bytes'] + mine['file_bytes']) / (theirs['anon_bytes'] + theirs['file_bytes']):.2f}x"
        lines.append(f"| {name} | {run['peak_rss_bytes'] / GiB:.2f} | {ratio:.2f}x {baseline} | {fit} | {fit_ratio} | "
                     f"{after} | {after_ratio} | {run['wall_s']:.1f} |")
    for name in ("train_bf16", "train_nf4"):
        kinds = report.get("memory_by_kind", {}).get(name, {})
        if kinds:
            lines += ["", f"Model tensors of `{name}` after training (GiB):", ""]
            lines += [f"- {kind}: {size / GiB:.3f}" for kind, size in sorted(kinds.items(), key=lambda kv: -kv[1])]
    cgroup = report.get("cgroup") or {}
    if cgroup.get("runs"):
        lines += ["", f"The same exports in a memory cgroup of {cgroup['limit_gib']} GiB (the bf16 base is "
                  f"{report.get('base_bytes', 0) / GiB:.2f} GiB):", ""]
        lines += [f"- {name}: {'completed, verified' if run['returncode'] == 0 else 'failed (rc ' + str(run['returncode']) + ')'}"
                  f" in {run['wall_s']} s" for name, run in cgroup["runs"].items()]
    elif cgroup.get("skipped"):
        lines += ["", f"Exports in a cgroup: {cgroup['skipped']}"]
    drift = report.get("drift", {})
    if drift:
        lines += ["", "Drift of the exports against the trained 4-bit model (probes):", ""]
        lines += [f"- {name}: max |logit diff| {d['logits']['max_abs_diff']:.3g} (scale {d['logits']['scale']:.3g}), "
                  f"argmax agrees at {100 * d['logits']['argmax_agreement']:.1f} % of tokens" for name, d in drift.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the small Llama of export_memory.py, for quick checks")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lightning_lora" / "bench"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--cgroup-gib", type=float, default=1.5,
                        help="also run the three exports in a memory cgroup of this size (0: do not; needs root)")
    args = parser.parse_args()
    size = "small" if args.small else "full"
    spec = SIZES[size]
    cache = Path(args.cache).expanduser().resolve() / f"{spec['name']}-v{BUILD_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    work, logs = cache / "qlora", cache / "logs-qlora"
    work.mkdir(exist_ok=True)
    report: dict[str, Any] = {"size": spec["name"], "machine": machine(), "versions": versions(), "steps": args.steps,
                              "seq_len": args.seq_len, "runs": {}, "memory_by_kind": {}, "drift": {},
                              "command": shlex.join(["python", "benchmarks/qlora_memory.py", *sys.argv[1:]])}
    base = ensure_base(cache, size, logs, {})
    report["base_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    for name, quantization in (("train_bf16", "none"), ("train_nf4", "nf4")):
        out = work / name
        out.mkdir(exist_ok=True)
        run = measure(name, worker_cmd("train", str(base), str(out), quantization, str(args.steps), str(args.seq_len)), logs)
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{run.get('stderr_tail', '')}")
        worker = _parse_worker(logs / f"{name}.stdout")
        report["runs"][name] = {**run, "fit_peak_rss_bytes": worker.get("fit_peak_rss_bytes"), "after_fit": worker.get("after_fit")}
        report["memory_by_kind"][name] = worker.get("memory_by_kind", {})
    # The same two fits with glibc returning every block of 128 KiB or more to the system when it is
    # freed (a fixed mmap threshold), so that peaks are what was in use rather than what the allocator kept.
    for name, quantization in (("train_bf16_mmap128k", "none"), ("train_nf4_mmap128k", "nf4")):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        run = measure(name, worker_cmd("train", str(base), "-", quantization, str(args.steps), str(args.seq_len)), logs, env=env)
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{run.get('stderr_tail', '')}")
        worker = _parse_worker(logs / f"{name}.stdout")
        report["runs"][name] = {**run, "fit_peak_rss_bytes": worker.get("fit_peak_rss_bytes"), "after_fit": worker.get("after_fit")}
    for name, checkpoint, merge_base in (("export_bf16", "train_bf16", "dequantized"),
                                         ("export_nf4_dequantized", "train_nf4", "dequantized"),
                                         ("export_nf4_original", "train_nf4", "original")):
        out = work / f"{name}-out"
        run = measure(name, export_cmd(work / checkpoint / "run.ckpt", base, out, merge_base), logs)
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{run.get('stderr_tail', '')}")
        report["runs"][name] = run
        drift = json.loads((out / "export.json").read_text())["verification"].get("drift")
        if drift:
            report["drift"][name] = {key: drift[key] for key in ("merged_into", "logits", "blocks")}
    if args.cgroup_gib:
        report["cgroup"] = _exports_in_cgroup(args.cgroup_gib, work, base)
    results = Path(args.results)
    stem = "qlora_memory_small" if args.small else "qlora_memory"
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        {"train": worker_train}[sys.argv[2]](*sys.argv[3:])
    else:
        main()
