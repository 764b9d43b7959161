"""The training-step pieces of ``LoraFinetuneModule`` on and off, on this machine's CPU.

One command::

    python benchmarks/training_kernels.py [--steps N] [--vocab V]

Each variant runs in a fresh process (so its peak resident memory is its own): it builds a randomly
initialised Llama-shaped base (hidden 256, 4 layers, the given vocabulary, saved to a temporary
directory), wraps it with ``LoraFinetuneModule`` (r=8 on the seven projections, dropout 0), and
times ``--steps`` training steps (forward through ``TrainingKernels.loss``, backward, AdamW) after
2 warm-up steps, on a fixed batch of 8 rows of 512 tokens whose first half (the prompt) is masked.
Pairs, each against its own baseline in the same run:

- ``linear_cross_entropy``: ``off`` (the model's own loss over the full logits) against
  ``chunked``, fp32;
- ``autocast_lora_inputs``: ``False`` against ``True``, a bf16 base with fp32 LoRA weights under bf16
  autocast (the ``bf16-mixed`` path of a GPU run); also the number of ``aten._to_copy`` calls per step.

The loss pair is in fp32 and the casts pair leaves ``linear_cross_entropy`` at its default.

Results go to ``benchmarks/results/training_kernels.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {
    "loss_off": {"linear_cross_entropy": "off", "precision": "fp32"},
    "loss_chunked": {"linear_cross_entropy": "chunked", "precision": "fp32"},
    "casts_pefts": {"autocast_lora_inputs": False, "dtype": "bf16", "precision": "bf16-mixed"},
    "casts_autocast": {"autocast_lora_inputs": True, "dtype": "bf16", "precision": "bf16-mixed"},
}
PAIRS = (("linear_cross_entropy", "loss_off", "loss_chunked"), ("autocast_lora_inputs", "casts_pefts", "casts_autocast"))
ROWS, LENGTH = 8, 512


def worker(variant: str, base: str, steps: int, out: str) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_lora.module import LoraFinetuneModule

    settings = dict(VARIANTS[variant])
    precision = settings.pop("precision")
    torch.manual_seed(0)
    module = LoraFinetuneModule(base, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"], **settings)
    module.configure_model()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    vocab = module.model.get_base_model().config.vocab_size
    input_ids = torch.randint(3, vocab, (ROWS, LENGTH))
    labels = input_ids.clone()
    labels[:, : LENGTH // 2] = -100
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}

    class CountCopies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.copies += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    def step(counter: CountCopies | None = None) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            if counter is None:
                loss = module.training_kernels.loss(module.model, batch)
            else:
                with counter:
                    loss = module.training_kernels.loss(module.model, batch)
        if counter is None:
            loss.backward()
        else:
            with counter:
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    for _ in range(2):
        step()
    times = [step() for _ in range(steps)]
    counter = CountCopies()
    step(counter)
    result = {"variant": variant, "settings": VARIANTS[variant], "step_s": times, "median_step_s": statistics.median(times),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "to_copy_calls_per_step": counter.copies, "kernels": module.kernels, "torch_threads": torch.get_num_threads()}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    from export_memory import machine, snapshot_code

    from lightning_lora.tiny import build_tiny_base

    work = Path(tempfile.mkdtemp(prefix="training_kernels-"))
    base = build_tiny_base(work / "base", "llama", vocab_size=args.vocab, hidden_size=256, intermediate_size=688,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=LENGTH, initializer_range=0.02)
    report: dict[str, Any] = {"command": "python benchmarks/training_kernels.py " + " ".join(sys.argv[1:]),
                              "machine": machine(), "code": snapshot_code(None, work / "code"),
                              "model": {"hidden_size": 256, "layers": 4, "vocab_size": args.vocab},
                              "batch": {"rows": ROWS, "tokens_per_row": LENGTH, "masked_prompt": LENGTH // 2},
                              "steps": args.steps, "runs": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "code"), os.environ.get("PYTHONPATH", "")])}
    for variant in VARIANTS:
        out = work / f"{variant}.json"
        subprocess.run([sys.executable, __file__, "_worker", variant, str(base), str(args.steps), str(out)],
                       check=True, env=env)
        report["runs"][variant] = json.loads(out.read_text())
        print(variant, report["runs"][variant]["median_step_s"], report["runs"][variant]["peak_rss_gib"], flush=True)
    report["ratios"] = {
        name: {"baseline": off, "step_time": report["runs"][on]["median_step_s"] / report["runs"][off]["median_step_s"],
               "peak_rss": report["runs"][on]["peak_rss_gib"] / report["runs"][off]["peak_rss_gib"]}
        for name, off, on in PAIRS}
    results = Path(args.results)
    (results / "training_kernels.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "training_kernels.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Training-step pieces on CPU", "",
             f"Command: `{report['command']}`; {m['cores']} cores ({m['cpu']}); code at HEAD "
             f"`{report['code']['git_head'][:10]}`. Llama-shaped base, hidden {report['model']['hidden_size']}, "
             f"{report['model']['layers']} layers, vocabulary {report['model']['vocab_size']}; a batch of "
             f"{report['batch']['rows']} x {report['batch']['tokens_per_row']} tokens, the first "
             f"{report['batch']['masked_prompt']} of each row masked; median of {report['steps']} steps after 2 warm-up "
             "steps, each variant in its own process.", "",
             "| variant | settings | median step (s) | peak RSS (GiB) | `_to_copy` calls per step |",
             "|---|---|---:|---:|---:|"]
    for name, run in report["runs"].items():
        lines.append(f"| {name} | {run['settings']} | {run['median_step_s']:.3f} | {run['peak_rss_gib']:.2f} | "
                     f"{run['to_copy_calls_per_step']} |")
    lines += ["", "| setting | baseline | step time x baseline | peak RSS x baseline |", "|---|---|---:|---:|"]
    for name, ratio in report["ratios"].items():
        lines.append(f"| {name} | {ratio['baseline']} | {ratio['step_time']:.2f} | {ratio['peak_rss']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
