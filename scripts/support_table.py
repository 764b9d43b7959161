"""Write the README's support table from the training runs the tests export (tests/conftest.py RUNS, QLORA_RUNS).

    python scripts/support_table.py          # rewrite the table in README.md
    python scripts/support_table.py --check  # exit 1 if README.md is not up to date

Each run is trained for real (tests/scripts/train_run.py), exported, reloaded with stock
``from_pretrained`` and compared with the trained tensors; a combination is in the table only if a
run covers it. tests/test_docs.py fails when the README's copy is stale.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
ARCH_NAMES = {"llama": "Llama", "qwen2": "Qwen2 (tied embeddings)", "gpt2": "GPT-2 (Conv1D)", "bloom": "Bloom (fused QKV)"}


def _option(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def describe(arch: str, args: list[str]) -> tuple[str, str, str, str]:
    """(strategy, processes, precision, what the run varies) of one train_run.py argument list."""
    strategy = _option(args, "--strategy", "single")
    label = {"single": "single device", "ddp": "DDP"}.get(strategy, f"DeepSpeed ZeRO-{_option(args, '--stage', '2')}")
    processes = _option(args, "--devices", "1")
    if "--num-nodes" in args:
        processes = f"{_option(args, '--num-nodes', '1')} nodes x {processes}"
    precision = _option(args, "--precision", "32-true").replace("32-true", "fp32")
    if "--quantization" in args:
        precision = f"QLoRA: {_option(args, '--quantization', '')} base, {_option(args, '--dtype', 'fp32')} compute"
    variants = [ARCH_NAMES[arch]]
    targets = _option(args, "--targets", "q_proj,v_proj")
    if targets != "q_proj,v_proj":
        variants.append(f"targets `{targets}`")
    for flag, text in (("--rslora", "rsLoRA"), ("--dora", "DoRA"), ("--exclude-frozen", "`exclude_frozen_parameters`"),
                       ("--user-module", "a user's LightningModule (`self.net`)")):
        if flag in args:
            variants.append(text)
    if "--modules-to-save" in args:
        variants.append(f"`modules_to_save=[{_option(args, '--modules-to-save', '')}]`")
    if "--added-tokens" in args:
        variants.append("3 added tokens")
    if "--init" in args:
        variants.append(f"`init_lora_weights={_option(args, '--init', '')}`")
    if "--rank-pattern" in args:
        variants.append("`rank_pattern`")
    if "--lora-bias" in args:
        variants.append("`lora_bias`")
    if "--export-shard-size" in args:
        variants.append("`HFExport` shared by every rank")
    if "--quantization" in args:
        variants.append(f"`HFExport(merge_base={_option(args, '--merge-base', '')})`, drift measured" if "--merge-base" in args
                        else "exported into the dequantized and the original base, drift measured")
    if "--adapter-name" in args:
        variants.append(f"adapter named `{_option(args, '--adapter-name', '')}`")
    return label, processes, precision, ", ".join(variants)


def table() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import QLORA_RUNS, RUNS

    cells: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for arch, args in [*RUNS.values(), *QLORA_RUNS.values()]:
        strategy, processes, precision, variant = describe(arch, args)
        cells[(strategy, processes, precision)].append(variant)
    lines = ["| strategy | processes | precision | architectures and variants, each a trained and exported run |",
             "|---|---|---|---|"]
    for (strategy, processes, precision), variants in sorted(cells.items()):
        lines.append(f"| {strategy} | {processes} | {precision} | {'; '.join(sorted(set(variants)))} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale instead of writing it")
    args = parser.parse_args()
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{table()}\n{END}{tail}"
    if args.check:
        if updated != text:
            print("README.md's support table is stale: run python scripts/support_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
