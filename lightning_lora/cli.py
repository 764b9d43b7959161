"""The ``lightning-lora`` command: LightningCLI's ``fit|validate|test|predict`` on our module and data,
``export``, which turns a finished checkpoint into a PEFT adapter and a merged model, and ``generate`` /
``evaluate``, which use the result."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from lightning_lora.versions import environment_report, format_environment_report, warn_outside_tested_range

__all__ = ["COMMANDS", "env_main", "evaluate_main", "export_main", "generate_main", "main", "usage",
           "verify_main"]  # LightningLoraCLI: see __getattr__

# Every command, one line each: what `lightning-lora`, `--help` and an unknown command print. Kept here as
# text so that the listing starts without importing Lightning.
COMMANDS: dict[str, str] = {
    "fit": "train a LoRA adapter (LightningCLI: --config configs/quickstart.yaml); HFExport exports at the end",
    "validate": "run the validation loop of a config, optionally on --ckpt_path (LightningCLI)",
    "test": "run the test loop of a config, optionally on --ckpt_path (LightningCLI)",
    "predict": "run the predict loop of a config, optionally on --ckpt_path (LightningCLI)",
    "export": "turn a checkpoint into a PEFT adapter and a merged Hugging Face model, verified",
    "verify": "re-check an export against its export.json and, with --base-model, the trained model",
    "generate": "generate answers with a merged model, or a base model plus LoRA adapters",
    "evaluate": "score a model on held-out data (loss, perplexity, token accuracy, exact match)",
    "env": "print the versions, Python, platform and CUDA to include in a bug report",
}


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import and ``export``/``verify`` never need it: the LightningCLI
    # subclass lives in its own module, imported only by the commands that train.
    if name == "LightningLoraCLI":
        from lightning_lora.lightning_cli import LightningLoraCLI

        return LightningLoraCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-lora`` and ``python -m lightning_lora``.

    ``export``, ``verify``, ``generate``, ``evaluate`` and ``env`` are our own subcommands; ``fit``,
    ``validate``, ``test`` and ``predict`` (and options before a subcommand, such as ``--config``) are
    LightningCLI's. No command, ``-h``/``--help`` or an unknown command print the list of commands.
    """
    args = sys.argv[1:] if argv is None else argv
    if not args:  # as argparse does for a missing subcommand: usage on stderr, exit 2
        print(usage(), file=sys.stderr)
        sys.exit(2)
    if args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"lightning-lora: error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if args[:1] == ["env"]:
        sys.exit(env_main(args[1:]))
    if args[:1] == ["export"]:
        sys.exit(export_main(args[1:]))
    if args[:1] == ["verify"]:
        sys.exit(verify_main(args[1:]))
    if args[:1] == ["generate"]:
        sys.exit(generate_main(args[1:]))
    if args[:1] == ["evaluate"]:
        sys.exit(evaluate_main(args[1:]))
    warn_outside_tested_range()  # before importing Lightning: an import error may be what it explains
    from lightning_lora.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)


def usage() -> str:
    """The usage line and every command with one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: lightning-lora COMMAND [ARGS]   ('lightning-lora COMMAND --help' for its arguments)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def env_main(argv: list[str]) -> int:
    """``lightning-lora env [--json]``: print what a bug report needs; returns the exit code (0)."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora env",
        description="Print lightning-lora's version, the installed version of each package it builds on with its "
        "tested range (ok, OUTSIDE or not installed), Python, the platform and CUDA: include it in bug reports.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = environment_report()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_environment_report(report))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-lora export",
        description="Export a LoRA run (DeepSpeed ZeRO directory, FSDP checkpoint, Lightning .ckpt, or PEFT adapter "
        "directory) as OUTPUT/adapter (PEFT), OUTPUT/merged (Hugging Face) and OUTPUT/export.json, verified against "
        "the trained model before it is published.",
    )
    parser.add_argument("--checkpoint", required=True, help="ZeRO checkpoint directory, FSDP directory, .ckpt file or adapter directory")
    parser.add_argument("--output", required=True, help="export directory to create")
    parser.add_argument("--base-model", help="base model directory (default: the one the checkpoint records)")
    parser.add_argument("--lora-config", help="adapter_config.json or a directory holding one (default: recorded)")
    parser.add_argument("--dtype", default="auto", help="merged weights: auto (the base's), fp32, bf16 or fp16 (or torch's names)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB")
    parser.add_argument("--prefix", help="LightningModule attribute holding the PEFT model, e.g. 'net.' (default: detected)")
    parser.add_argument("--tag", help="ZeRO tag to read instead of the one 'latest' names")
    parser.add_argument("--adapter-name", help="the PEFT adapter to export when the model held several")
    parser.add_argument("--r", type=int, help="override the LoRA rank")
    parser.add_argument("--lora-alpha", type=float, help="override the LoRA alpha")
    parser.add_argument("--merge-impl", default="auto", help="peft: PEFT's merge of the whole model in memory; streaming: "
                        "one tensor at a time, for models larger than memory; auto (default): streaming, which writes "
                        "the same files faster and in less memory")
    parser.add_argument("--workers", type=int, default=1, help="local processes that share the merge and the verification")
    parser.add_argument("--tokenizer", help="tokenizer to ship with the merged model (default: the one the run "
                        "trained with, when the checkpoint records it, else the base model's)")
    parser.add_argument("--device", help="where verification computes, e.g. cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-merge", action="store_true", help="write only the adapter")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the trained model")
    parser.add_argument("--frozen-from-checkpoint", action="store_true",
                        help="take frozen weights from the checkpoint instead of the base model directory")
    parser.add_argument("--merge-base", default="dequantized", help="for a run on a 4-bit base (QLoRA): dequantized "
                        "(default: the 4-bit weights as training saw them, i.e. the model that was trained) or original "
                        "(the 16-bit base directory; drifts from the trained model, reported in export.json)")
    parser.add_argument("--max-drift", type=float, help="QLoRA: fail if more than this fraction of probe tokens' argmax "
                        "differs from the trained 4-bit model (default: report only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --output (never anything else)")
    parser.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def export_main(argv: list[str]) -> int:
    """Run the export command; returns the process exit code."""
    args = _parser().parse_args(argv)
    _quiet(args.debug, keep_info=args.debug)
    warn_outside_tested_range()
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
            adapter_name=args.adapter_name,
            r=args.r,
            lora_alpha=args.lora_alpha,
            merge=not args.no_merge,
            merge_impl=args.merge_impl,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            frozen_from_checkpoint=args.frozen_from_checkpoint,
            merge_base=args.merge_base,
            max_drift=args.max_drift,
            heldout=None if args.no_verify else _recorded_heldout(args.checkpoint, args.trust_remote_code),
            tokenizer=args.tokenizer,
            workers=args.workers,
            device=args.device,
            progress=sys.stderr.isatty(),
            trust_remote_code=args.trust_remote_code,
        )
    except Exception as err:
        return _fail("export", err, args.debug)
    print(_summary(Path(args.output), manifest))
    return 0


def _summary(output: Path, manifest: dict) -> str:
    from lightning_lora.export.verify import summarize_verification

    if manifest.get("unchanged"):
        return f"{output} already holds the export of these inputs: nothing to do"
    files = manifest["files"]
    size = sum(f["size"] for f in files.values()) / 2**20
    line = (
        f"exported {len(files)} files ({size:.1f} MiB, {manifest['dtype']}, "
        f"{manifest['merge_impl'] + ' merge' if 'merged/config.json' in files else 'adapter only'}) "
        f"to {output} in {manifest['seconds']:.1f}s; {summarize_verification(manifest['verification'])}"
    )
    if manifest.get("adapter", "").startswith("left out"):
        line += f"; adapter {manifest['adapter']}"
    return line


def verify_main(argv: list[str]) -> int:
    """``lightning-lora verify DIR [--base-model BASE]``: re-check an export; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora verify",
        description="Re-check an export against its export.json (file hashes and sizes) and, with --base-model, "
        "the merged model against the trained model rebuilt from the checkpoint (tensor by tensor, block by block).",
    )
    parser.add_argument("dir", help="an export directory (holding export.json)")
    parser.add_argument("--base-model", help="base model directory: also verify the merged model against the trained one")
    parser.add_argument("--checkpoint", help="the run's checkpoint (default: the one export.json names; without it, "
                        "the exported adapter is the reference)")
    parser.add_argument("--device", help="where to compute, e.g. cpu or cuda (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    _quiet(args.debug, keep_info=args.debug)
    warn_outside_tested_range()
    try:
        from lightning_lora.export.verify import verify_directory

        report = verify_directory(Path(args.dir), args.base_model, args.checkpoint, args.device, args.trust_remote_code)
    except Exception as err:
        return _fail("verify", err, args.debug)
    if report["problems"]:
        for problem in report["problems"]:
            print(f"lightning-lora verify: {args.dir}: {problem}", file=sys.stderr)
        return 1
    line = f"{args.dir}: {report['files_checked']} files match export.json"
    if "verification" in report:
        from lightning_lora.export.verify import summarize_verification

        line += f"; {summarize_verification(report['verification'])}; reference: {report['verification']['reference']}"
    print(line)
    return 0


def _model_arguments(parser: argparse.ArgumentParser, benchmarks: bool = False) -> None:
    """Where the model comes from and how it runs: shared by ``generate`` and ``evaluate``."""
    from lightning_lora.benchmark import TEMPLATE_NONE
    from lightning_lora.templates import TEMPLATES

    parser.add_argument("--model", help="a merged model directory, or the base model of --adapter "
                        "(a directory, builtin:tiny-llama or a hub id)")
    if benchmarks:
        parser.add_argument("--template", choices=(*TEMPLATES, TEMPLATE_NONE),
                            help="prompt format the model was trained with, as data.template (default: alpaca; with "
                            "--tasks: none, the harness' own prompt as published scores use; chat_template: the "
                            "model's chat template)")
    else:
        parser.add_argument("--template", default="alpaca", choices=TEMPLATES,
                            help="prompt format the model was trained with, as data.template (default: alpaca)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), fp32, bf16 or fp16")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1, or auto: the model spread over this machine's GPUs "
                        "(default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts or examples per forward pass (default: 8)")
    parser.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-lora generate",
        description="Generate answers with a merged model, or with a base model plus one or more LoRA adapters, "
        "prompting in the training template. Several adapters share one base; --adapter-name picks the one "
        "that generates, --no-adapter generates with the base model.",
    )
    _model_arguments(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT adapter directory to load onto --model, repeatable; named NAME, else by its directory name")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--adapter-name", help="which loaded adapter generates (default: the first --adapter)")
    choice.add_argument("--no-adapter", action="store_true", help="generate with the adapters disabled (the base model)")
    parser.add_argument("--prompt", help="an instruction, rendered in --template")
    parser.add_argument("--input", default="", help="the Alpaca 'input' of --prompt (e.g. the word to reverse)")
    parser.add_argument("--prompts", help="a .txt file (one instruction per line) or a .jsonl/.json/.parquet file "
                        "of alpaca or messages rows, as in training (a trailing assistant answer is left out)")
    parser.add_argument("--raw", action="store_true", help="feed --prompt / the .txt lines to the model as they are")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample; default 1.0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (with --do-sample; default 1.0)")
    parser.add_argument("--seed", type=int, help="seed of --do-sample")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"prompt", "output", "adapter"}')
    return parser


_TRUST_HELP = "run the custom code (auto_map) a model, adapter or tokenizer maps to; without it such an input is refused"

# Errors whose message is written for the user (names the argument and the value); anything else
# is a bug or an environment problem, reported with its type and a pointer to --debug.
_USER_ERRORS = (ValueError, OSError, ImportError)


def _fail(command: str, err: BaseException, debug: bool) -> int:
    """One line on stderr (a library's multi-line message folded), the traceback only with --debug."""
    if debug:
        traceback.print_exc()
    message = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, _USER_ERRORS) or isinstance(err, (KeyError, UnicodeError)):
        message = f"unexpected {type(err).__name__}: {message} (rerun with --debug for the traceback)"
    print(f"lightning-lora {command}: error: {message}", file=sys.stderr)
    return 1


def _recorded_heldout(checkpoint: str, trust_remote_code: bool = False) -> list[dict[str, list[list[int]]]] | None:
    """A 4-bit run's validation batches, rebuilt from the data module its Lightning checkpoint
    records, for the drift report's held-out loss; ``None`` when there are none to rebuild here.

    The recorded settings are the checkpoint's, not the user's: the data and tokenizer must be
    local files (nothing is fetched), the tokenizer runs no custom code unless trusted, and the
    data is read in this process (no workers).
    """
    from lightning_lora.export.recorded import CHECKPOINT_KEY
    from lightning_lora.export.unpickle import ForeignObjectError, load_torch_file

    path = Path(checkpoint)
    if not path.is_file():
        return None
    try:
        # The export reads this file too and names what it leaves unread: no second report here.
        state = load_torch_file(path, needed=[(CHECKPOINT_KEY,), ("datamodule_hyper_parameters",)], report=False)
    except ForeignObjectError as err:
        logging.getLogger("lightning_lora").warning("held-out loss not measured: %s", err)
        return None
    except Exception:  # the export itself reports an unreadable checkpoint, in one line
        return None
    if not isinstance(state, dict) or not (state.get(CHECKPOINT_KEY) or {}).get("quantization"):
        return None
    hparams = state.get("datamodule_hyper_parameters")
    if not hparams:
        return None
    try:
        from lightning_lora.data import HELDOUT_BATCHES, recorded_heldout
        from lightning_lora.export.trust import check_remote_code

        from lightning_lora.tiny import resolve_model_path

        for key in ("data_path", "tokenizer"):
            value = hparams.get(key)
            if not isinstance(value, str) or not Path(resolve_model_path(value) if key == "tokenizer" else value).exists():
                raise ValueError(f"its {key} {value!r} is not a local path here (nothing is downloaded)")
        tokenizer = Path(resolve_model_path(hparams["tokenizer"]))
        if tokenizer.is_dir():
            check_remote_code(tokenizer, "its tokenizer", trust_remote_code)
        return recorded_heldout({**hparams, "num_workers": 0}, HELDOUT_BATCHES)
    except Exception as err:  # another data module, data files not here: the drift is reported without it
        logging.getLogger("lightning_lora").warning("held-out loss not measured: the run's validation data could not "
                                                    "be rebuilt here (%s)", err)
        return None


def _quiet(debug: bool, keep_info: bool = False) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per model load
    logging.basicConfig(level=logging.INFO if keep_info else logging.WARNING, format="%(message)s")
    if not sys.stderr.isatty():
        # No progress bar without a terminal (a batch job's log): a line per verified block instead.
        logging.getLogger("lightning_lora").setLevel(logging.INFO)
    if not debug:
        import warnings

        warnings.simplefilter("ignore", FutureWarning)  # third-party deprecations are not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        hf_logging.set_verbosity_error()
        # bitsandbytes (imported by PEFT when installed) warns about optional CPU kernels on import.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # lm-evaluation-harness warns about an in-memory model and local task data, which are ours to pass.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.model:
        raise ValueError("--model is required: a merged model directory, or the base model of --adapter")
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("pass exactly one of --prompt TEXT and --prompts FILE")
    if args.input and args.prompt is None:
        raise ValueError(f"--input={args.input!r} completes --prompt, which is missing")
    if args.input and args.raw:
        raise ValueError(f"--input={args.input!r} is rendered by --template, which --raw skips")
    for name in ("temperature", "top_p", "seed"):
        if getattr(args, name) is not None and not args.do_sample:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r} applies only with --do-sample")


def generate_main(argv: list[str]) -> int:
    """``lightning-lora generate``: print the model's answers; returns the exit code."""
    args = _generate_parser().parse_args(argv)
    try:
        _check_generate_args(args)
        _quiet(args.debug)
        warn_outside_tested_range()
        from lightning_lora import inference

        model, tokenizer = inference.load_for_generation(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                         trust_remote_code=args.trust_remote_code)
        if args.prompt is not None:
            row = {"instruction": args.prompt, "input": args.input}
            prompts = [inference.render_prompt(args.prompt if args.raw else row, args.template, tokenizer, args.raw)]
        else:
            prompts = inference.read_prompts(args.prompts, args.template, tokenizer, args.raw)
        outputs = inference.generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
            adapter=args.adapter_name, disable_adapters=args.no_adapter, batch_size=args.batch_size,
        )
        adapter = inference.active_adapter(model, args.no_adapter)
    except Exception as err:
        return _fail("generate", err, args.debug)
    if args.json:
        import json

        rows = [{"prompt": p, "output": o, "adapter": adapter} for p, o in zip(prompts, outputs)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(outputs))  # one answer per prompt, a blank line apart (--json to parse them)
    return 0


def _evaluate_parser() -> argparse.ArgumentParser:
    from lightning_lora.benchmark import EXTRA

    parser = argparse.ArgumentParser(
        prog="lightning-lora evaluate",
        description="Score a model on held-out data as training's validation does (loss, perplexity and "
        "token accuracy over the response tokens, plus exact match of greedy answers; prints JSON), or, with "
        "--tasks, on benchmarks through lm-evaluation-harness (MMLU and the like: accuracy per task and subject; "
        f"prints a table; needs {EXTRA}). Under torchrun each process scores its share; rank 0 prints.",
    )
    _model_arguments(parser, benchmarks=True)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="PEFT adapter directory to load onto --model; with --tasks repeatable, each adapter "
                        "scored in turn on the one base")
    parser.add_argument("--data", help="a .json/.jsonl/.parquet file or a datasets directory of rows, as data.data_path")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks or groups, e.g. mmlu,arc_easy")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per question (default: each task's own)")
    parser.add_argument("--data-dir", help="local task data, nothing downloaded: MMLU's layout (test/<subject>_test.csv, "
                        "dev/...) or <subject-or-task>/<split>.parquet|jsonl|json")
    parser.add_argument("--limit", type=int, help="score only the first N questions of each task (a quick look)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--adapter-name", help="with --tasks: score only this loaded adapter")
    choice.add_argument("--no-adapter", action="store_true", help="with --tasks: score the base, adapters disabled")
    parser.add_argument("--log-samples", action="store_true", help="with --tasks: each question's prompt, choices and "
                        "log-likelihoods in the --output JSON")
    parser.add_argument("--format", default="auto", help="auto (from the first row), alpaca, messages or text")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example, longer ones are cut (default: 512)")
    parser.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=None,
                        help="compare greedy answers with the references (default: on when every reference answer "
                        "is at most 32 tokens)")
    parser.add_argument("--max-new-tokens", type=int, help="exact-match answer length (default: longest reference + 8)")
    parser.add_argument("--output", help="also write the JSON to this file")
    return parser


def evaluate_main(argv: list[str]) -> int:
    """``lightning-lora evaluate``: print the metrics as JSON (held-out data) or a table (--tasks);
    returns the exit code."""
    from lightning_lora.benchmark import TEMPLATE_NONE

    args = _evaluate_parser().parse_args(argv)
    if args.tasks is not None:
        return _benchmark_main(args)
    try:
        benchmark_only = [flag for flag, given in (("--num-fewshot", args.num_fewshot is not None), ("--data-dir", args.data_dir),
                          ("--limit", args.limit is not None), ("--adapter-name", args.adapter_name),
                          ("--no-adapter", args.no_adapter), ("--log-samples", args.log_samples)) if given]
        if benchmark_only:
            raise ValueError(f"{benchmark_only[0]} applies to --tasks (benchmarks), which is not given")
        if len(args.adapter) > 1:
            raise ValueError(f"--adapter is given {len(args.adapter)} times: held-out data is scored with one adapter "
                             "(--tasks scores several in turn)")
        if args.template == TEMPLATE_NONE:
            raise ValueError("--template='none' applies to --tasks; held-out data is rendered in its training template")
        args.template = args.template or "alpaca"
        if not args.model:
            raise ValueError("--model is required: a merged model directory, or the base model of --adapter")
        if not args.data:
            raise ValueError("--data is required: the file of rows to score")
        if not Path(args.data).exists():
            raise ValueError(f"--data={args.data!r} does not exist")
        _quiet(args.debug)
        warn_outside_tested_range()
        from lightning_lora import evaluation, inference

        model, tokenizer = inference.load_for_generation(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                         trust_remote_code=args.trust_remote_code)
        metrics = evaluation.evaluate(
            model, tokenizer, args.data, format=args.format, template=args.template, max_length=args.max_length,
            batch_size=args.batch_size, exact_match=args.exact_match, max_new_tokens=args.max_new_tokens,
        )
        report = {"model": args.model, "adapter": args.adapter[0] if args.adapter else None, "data": args.data, **metrics}
        text = _write_json(report, args.output)
    except Exception as err:
        return _fail("evaluate", err, args.debug)
    print(text)
    return 0


def _benchmark_main(args: argparse.Namespace) -> int:
    """``lightning-lora evaluate --tasks``: a table on the terminal, the whole report with --output."""
    try:
        if not args.model:
            raise ValueError("--model is required: a merged model directory, or the base model of --adapter")
        if args.data:
            raise ValueError(f"--data={args.data!r} and --tasks score different things: pass one")
        held_out_only = [flag for flag, given in (("--exact-match", args.exact_match is not None),
                         ("--max-new-tokens", args.max_new_tokens is not None)) if given]
        if held_out_only:
            raise ValueError(f"{held_out_only[0]} applies to --data (held-out data), not to --tasks")
        _quiet(args.debug)
        warn_outside_tested_range()
        from lightning_lora import benchmark, inference

        benchmark.check_installed()
        device = _distributed_device(args.device)
        model, tokenizer = inference.load_for_generation(args.model, args.adapter, dtype=args.dtype, device=device,
                                                         trust_remote_code=args.trust_remote_code)
        loaded = inference.adapter_names(model)
        if args.no_adapter:
            runs = {"base (adapters disabled)": (None, True)}
        elif args.adapter_name or loaded:
            runs = {f"adapter {name!r}": (name, False) for name in ([args.adapter_name] if args.adapter_name else loaded)}
        else:
            runs = {"model": (None, False)}
        report = benchmark.run_benchmarks(
            model, tokenizer, args.tasks.split(","), num_fewshot=args.num_fewshot, data_dir=args.data_dir,
            template=args.template or benchmark.TEMPLATE_NONE, batch_size=args.batch_size, limit=args.limit, runs=runs,
            samples=args.log_samples,
        )
        _leave_process_group()
        if report is None:
            return 0  # not rank 0: rank 0 prints
        report["settings"].update(model=args.model, adapters=args.adapter)
        _write_json(report, args.output)
    except Exception as err:
        return _fail("evaluate", err, args.debug)
    print(benchmark.format_table(report))
    return 0


def _leave_process_group() -> None:
    """Every rank done: leave the process group before exiting (gloo's threads otherwise abort the exit now and then)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _distributed_device(device: str | None) -> str | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group; each process takes its own GPU."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device == "auto":
        raise ValueError("--device='auto' spreads one process's model over this machine's GPUs, but torchrun started "
                         f"{os.environ['WORLD_SIZE']} processes, each of which takes its own GPU: pass one of the two")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device is None and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return device


def _write_json(report: dict, output: str | None) -> str:
    """The report as JSON text, also written to ``output`` (whole, through a temporary sibling)."""
    import json

    from lightning_lora.export.hf import write_json_atomically

    return write_json_atomically(Path(output), report) if output else json.dumps(report, indent=2)
