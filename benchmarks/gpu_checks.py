"""GPU checks the CPU suite cannot make: DeepSpeed ZeRO-3 over NCCL and the FSDP preset, fit + HFExport.

One command, on a machine with a CUDA GPU::

    python benchmarks/gpu_checks.py [--devices N] [--checks zero3,fsdp]

Each check trains the quickstart run (``configs/quickstart.yaml``: the built-in tiny Llama, LoRA on
all linear layers, HFExport when fit ends) through ``python -m lightning_lora fit`` (the
``lightning-lora fit`` command; the module form needs no installed script) with a
strategy preset from ``configs/strategies/`` on top, as a user would, in its own process. Then,
independently of the export's own verification, it loads the base with PEFT's
``PeftModel.from_pretrained(adapter)`` and the merged directory with ``from_pretrained`` and
compares their logits on the quickstart test examples (fp32, on the CPU): the merged model must
equal the adapter model, and both must differ from the base (the adapter trained). Results go to
``benchmarks/results/gpu_checks.{json,md}`` with the versions and the GPU.

``--cpu-dry-run`` runs the same steps with the DDP preset on the CPU (NCCL, ZeRO-3 on a GPU and
FSDP need CUDA), to check the script itself on a machine without one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESETS = {"zero3": "deepspeed_zero3.yaml", "fsdp": "fsdp.yaml", "ddp": "ddp.yaml"}
# The merged model's logits against the adapter model's, both fp32, over the logits' scale.
TOLERANCE = 1e-4


def run_config(work: Path) -> Path:
    """configs/quickstart.yaml with every path under ``work`` (data read from the repository)."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())

    def rebase(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("runs/quickstart"):
            return str(work / value.removeprefix("runs/quickstart").lstrip("/"))
        if isinstance(value, str) and value.startswith("data/"):
            return str(REPO / value)
        if isinstance(value, dict):
            return {k: rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebase(v) for v in value]
        return value

    config = rebase(config)
    config["trainer"]["max_epochs"] = 2
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit(name: str, work: Path, devices: int, cpu: bool) -> dict[str, Any]:
    config = run_config(work)
    command = [sys.executable, "-m", "lightning_lora", "fit", "--config", str(config), "--config", str(REPO / "configs/strategies" / PRESETS[name]),
               "--trainer.devices", str(devices)]
    if cpu:
        command += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900)
    (work / "fit.log").write_text(done.stdout + done.stderr)
    return {"command": " ".join(command), "returncode": done.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "log_tail": (done.stdout + done.stderr)[-3000:]}


def compare(export: Path) -> dict[str, Any]:
    """The merged model's logits against PEFT's adapter model's and the base's, on the test examples."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_lora.data import InstructionDataModule
    from lightning_lora.tiny import resolve_model_path

    record = json.loads((export / "export.json").read_text())
    base_path = resolve_model_path(record.get("base_model") or "builtin:tiny-llama")
    data = InstructionDataModule(str(REPO / "data/quickstart/test.jsonl"), tokenizer=base_path, val_split=0.0,
                                 template="human_assistant", max_length=128, packing=False)
    data.setup("fit")
    batch = data.collate(data.train_examples[:32])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        base_logits = base(**inputs).logits
        adapter_logits = PeftModel.from_pretrained(base, export / "adapter").eval()(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
        merged_logits = merged(**inputs).logits
    mask = batch["attention_mask"].bool()
    scale = adapter_logits[mask].abs().max().item()
    diff = (merged_logits - adapter_logits)[mask].abs().max().item()
    trained = (adapter_logits - base_logits)[mask].abs().max().item()
    verified = (record.get("verification") or {}).get("passed") is True
    return {"max_abs_logit_diff_merged_vs_adapter": diff, "logit_scale": scale, "tolerance": TOLERANCE * scale,
            "max_abs_logit_diff_adapter_vs_base": trained, "export_verification": "passed" if verified else "not passed",
            "passed": verified and diff <= TOLERANCE * scale and trained > 100 * TOLERANCE * scale}


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "lightning", "deepspeed", "peft", "transformers", "lightning-lora"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", default="zero3,fsdp", help="comma-separated of %(default)s")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the DDP preset on the CPU (checks the script)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    checks = ["ddp"] if args.cpu_dry_run else [c for c in args.checks.split(",") if c]
    stem = "gpu_checks_cpu_dry_run" if args.cpu_dry_run else "gpu_checks"
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/gpu_checks.py", *sys.argv[1:]]),
                              "versions": versions(), "checks": {}}
    root = Path(tempfile.mkdtemp(prefix="gpu_checks-"))
    for name in checks:
        work = root / name
        work.mkdir()
        result = fit(name, work, args.devices, args.cpu_dry_run)
        export = work / "export"
        if result["returncode"] == 0 and (export / "merged").is_dir():
            result.update(compare(export))
        else:
            result["passed"] = False
        report["checks"][name] = result
        print(f"{name}: {'PASS' if result['passed'] else 'FAIL'} ({result['wall_s']} s)", flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    if not all(check["passed"] for check in report["checks"].values()):
        raise SystemExit(f"a check failed; logs under {root}")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# GPU checks: fit + HFExport with the strategy presets", "", f"Command: `{report['command']}`", "",
             "| check | fit | wall (s) | export verification | merged vs adapter (max abs logit diff) | tolerance "
             "| adapter vs base | result |", "|---|---|---:|---|---:|---:|---:|---|"]
    for name, check in report["checks"].items():
        lines.append(
            f"| {name} | rc {check['returncode']} | {check['wall_s']} | {check.get('export_verification', '-')} | "
            f"{check.get('max_abs_logit_diff_merged_vs_adapter', float('nan')):.2e} | {check.get('tolerance', float('nan')):.2e} | "
            f"{check.get('max_abs_logit_diff_adapter_vs_base', float('nan')):.2e} | {'PASS' if check['passed'] else '**FAIL**'} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
