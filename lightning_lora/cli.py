"""The ``lightning-lora`` command: LightningCLI's ``fit|validate|test|predict`` on our module and data,
and ``export``, which turns a finished checkpoint into a PEFT adapter and a merged model."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from typing import Any

__all__ = ["export_main", "main", "verify_main"]  # LightningLoraCLI: see __getattr__


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import and ``export``/``verify`` never need it: the LightningCLI
    # subclass lives in its own module, imported only by the commands that train.
    if name == "LightningLoraCLI":
        from lightning_lora.lightning_cli import LightningLoraCLI

        return LightningLoraCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-lora`` and ``python -m lightning_lora``.

    ``export`` and ``verify`` are our own subcommands; everything else (``fit``, ``validate``, ``test``,
    ``predict``) is LightningCLI's.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["export"]:
        sys.exit(export_main(args[1:]))
    if args[:1] == ["verify"]:
        sys.exit(verify_main(args[1:]))
    from lightning_lora.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-lora export",
        description="Export a LoRA run (DeepSpeed ZeRO directory, Lightning .ckpt, or PEFT adapter directory) "
        "as OUTPUT/adapter (PEFT), OUTPUT/merged (Hugging Face) and OUTPUT/export.json.",
    )
    parser.add_argument("--checkpoint", required=True, help="ZeRO checkpoint directory, .ckpt file or adapter directory")
    parser.add_argument("--output", required=True, help="export directory to create")
    parser.add_argument("--base-model", help="base model directory (default: the one the checkpoint records)")
    parser.add_argument("--lora-config", help="adapter_config.json or a directory holding one (default: recorded)")
    parser.add_argument("--dtype", default="auto", help="merged weights: auto (the base's), fp32, bf16 or fp16")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB")
    parser.add_argument("--prefix", help="LightningModule attribute holding the PEFT model, e.g. 'net.' (default: detected)")
    parser.add_argument("--tag", help="ZeRO tag to read instead of the one 'latest' names")
    parser.add_argument("--r", type=int, help="override the LoRA rank")
    parser.add_argument("--lora-alpha", type=float, help="override the LoRA alpha")
    parser.add_argument("--merge-impl", default="auto", choices=["auto", "peft", "streaming"],
                        help="peft: merge_and_unload on the whole model; streaming: one tensor at a time, "
                        "for models larger than memory; auto (default): streaming when the model would not fit comfortably")
    parser.add_argument("--tokenizer", help="tokenizer to ship with the merged model (default: the one the run "
                        "trained with, when the checkpoint records it, else the base model's)")
    parser.add_argument("--no-merge", action="store_true", help="write only the adapter")
    parser.add_argument("--no-verify", action="store_true", help="skip the merged-vs-adapter comparison")
    parser.add_argument("--frozen-from-checkpoint", action="store_true",
                        help="take frozen weights from the checkpoint instead of the base model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def export_main(argv: list[str]) -> int:
    """Run the export command; returns the process exit code."""
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per model load
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    if not args.debug:
        import warnings

        warnings.simplefilter("ignore", FutureWarning)  # third-party deprecations are not the user's concern
    try:
        from lightning_lora.export.pipeline import export_checkpoint

        manifest = export_checkpoint(
            args.checkpoint,
            args.output,
            base_model=args.base_model,
            lora_config=args.lora_config,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            prefix=args.prefix,
            tag=args.tag,
            r=args.r,
            lora_alpha=args.lora_alpha,
            merge_model=not args.no_merge,
            merge_impl=args.merge_impl,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            frozen_from_checkpoint=args.frozen_from_checkpoint,
            tokenizer=args.tokenizer,
            progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"lightning-lora export: error: {err}", file=sys.stderr)
        return 1
    print(_summary(Path(args.output), manifest))
    return 0


def _summary(output: Path, manifest: dict) -> str:
    if manifest.get("unchanged"):
        return f"{output} already holds the export of these inputs: nothing to do"
    files = manifest["files"]
    size = sum(f["size"] for f in files.values()) / 2**20
    line = (
        f"exported {len(files)} files ({size:.1f} MiB, {manifest['dtype']}, "
        f"{manifest['merge_impl'] + ' merge' if 'merged/config.json' in files else 'adapter only'}) "
        f"to {output} in {manifest['seconds']:.1f}s"
    )
    verification = manifest["verification"]
    if "max_abs_logit_diff" in verification:
        line += (
            f"; verified: max |logit diff| {verification['max_abs_logit_diff']:.2e} <= {verification['tolerance']:.2e}, "
            f"greedy tokens agree {100 * verification['token_agreement']:.1f}%"
        )
    else:
        line += f"; not verified ({verification['skipped']})"
    return line


def verify_main(argv: list[str]) -> int:
    """``lightning-lora verify DIR [--base-model BASE]``: re-check an export; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora verify",
        description="Re-check an export against its export.json: file hashes and sizes, tensor shapes, "
        "and with --base-model the merged-vs-adapter logits.",
    )
    parser.add_argument("dir", help="an export directory (holding export.json)")
    parser.add_argument("--base-model", help="base model directory: also compare merged and adapter logits")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    try:
        from lightning_lora.export.verify import verify_directory

        report = verify_directory(Path(args.dir), args.base_model)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"lightning-lora verify: error: {err}", file=sys.stderr)
        return 1
    if report["problems"]:
        for problem in report["problems"]:
            print(f"lightning-lora verify: {args.dir}: {problem}", file=sys.stderr)
        return 1
    line = f"{args.dir}: {report['files_checked']} files match export.json"
    if "logits" in report:
        line += f"; merged vs adapter max |logit diff| {report['logits']['max_abs_logit_diff']:.2e}"
    print(line)
    return 0
