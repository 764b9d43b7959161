"""The one export path that the callback and the ``export`` command share.

:func:`export_checkpoint` is a sequence of named steps::

    options   validate every setting                        (options.py)
    prepare   read the checkpoint and the base's headers, check the output, compare a few of the
              checkpoint's frozen weights with the base's (base_check.py), fingerprint the inputs
    share     each worker: plan the shards, merge and write its own, tensor-check them (rank 0 also
              writes config, index, tokenizer and adapter), then run its part of the probes through
              both models block by block                    (plan.py, stream.py, verify.py)
    finish    rank 0: gather the reports, write export.json, publish by one rename (hf.py)

One worker runs every step itself; ``workers=N`` starts N-1 local processes, and
:func:`export_shared` lets the N ranks of a training job do the same. Ranks meet through files
(:mod:`~lightning_lora.export.rendezvous`), never in a collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.dtypes import dtype_name
from lightning_lora.errors import ExportError, VerificationError
from lightning_lora.export.adapter import write_adapter
from lightning_lora.export.base_check import check_base, untouched_verdict
from lightning_lora.export.bias_slots import (
    BiasSlots,
    add_zero_biases,
    plan_bias_slots,
    refuse_unmergeable,
    unmergeable,
)
from lightning_lora.export.checkpoint import TrainedCheckpoint
from lightning_lora.export.drift import measure_drift
from lightning_lora.export.hf import (
    MANIFEST_FORMAT,
    check_free_space,
    check_inputs_apart,
    check_output,
    file_manifest,
    keep_failed,
    package_versions,
    publish_atomically,
    recover_interrupted,
    save_tokenizer,
    write_json,
)
from lightning_lora.export.memory import choose_merge_impl
from lightning_lora.export.merge import load_trained, merge, resolve_dtype
from lightning_lora.export.options import ExportOptions
from lightning_lora.export.paths import inside
from lightning_lora.export.plan import MergePlan, assign_shards, plan_merge
from lightning_lora.export.probes import probes_for
from lightning_lora.export.quantized import describe_quantization
from lightning_lora.export.rendezvous import Rendezvous
from lightning_lora.export.sources import Sources, base_files, read_sources, resolve_base
from lightning_lora.export.stream import streamed_values, write_config, write_index, write_shards
from lightning_lora.export.structure import build_peft_model, count_tensors
from lightning_lora.export.tokens import reconcile_special_ids, write_tokenizer_files
from lightning_lora.export.trust import check_remote_code, trusting
from lightning_lora.export.verify import compute_device, verify_export, verify_tensors
from lightning_lora.export.weights import WeightFiles, read_config

__all__ = ["export_checkpoint", "export_shared"]

log = logging.getLogger("lightning_lora")


@dataclass
class Job:
    """One export, as every worker sees it once the inputs are read."""

    sources: Sources
    options: ExportOptions
    output: Path
    dtype: torch.dtype
    impl: str
    impl_reason: str
    fingerprint: str
    previous: dict[str, Any] | None = None
    slots: BiasSlots = field(default_factory=BiasSlots)  # the biases the merged model adds for lora_bias


# --- prepare --------------------------------------------------------------------------------------

def _files_signature(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under ``path``: cheap, and changes with the content."""
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def inputs_fingerprint(sources: Sources, options: ExportOptions) -> str:
    """A digest of everything an export depends on: checkpoint and base files, every setting that
    changes a weight, a file or what is checked, and the versions of the packages that compute it.

    Files are identified by name, size and modification time; an in-memory checkpoint (the
    callback on one device or DDP) by the bytes of its trained tensors.
    """
    digest = hashlib.sha256()
    checkpoint = sources.checkpoint
    if checkpoint.kind == "memory":
        for key in sorted(checkpoint.tensors):
            digest.update(key.encode())
            digest.update(checkpoint.tensors[key].float().cpu().numpy().tobytes())
        for key in sorted(sources.rewritten - sources.dequantized):
            digest.update(sources.frozen[key].float().cpu().numpy().tobytes())
        for key in sorted(sources.dequantized):  # the packed 4-bit bytes, not their dequantization
            digest.update(sources.quantized.frozen[key].cpu().numpy().tobytes())
    else:
        digest.update(json.dumps(_files_signature(Path(checkpoint.source))).encode())
    digest.update(json.dumps(_files_signature(Path(sources.base_path))).encode())
    for extra in (options.tokenizer, options.lora_config if isinstance(options.lora_config, str) else None):
        if extra is not None:
            digest.update(json.dumps(_files_signature(Path(extra))).encode())
    settings = {**options.fingerprinted(), "lora_config": sources.lora_config, "vocab_size": checkpoint.vocab_size,
                "trained_tokenizer": checkpoint.tokenizer_files, "versions": package_versions(), "format": MANIFEST_FORMAT}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _previous_export(output: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of a finished export of the same inputs under ``output``, if it is intact."""
    try:
        manifest = json.loads((output / "export.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("inputs_fingerprint") != fingerprint:
        return None
    files = manifest.get("files") or {}
    try:
        paths = {name: inside(output, name, f"{str(output / 'export.json')!r}") for name in files}
    except ExportError:
        return None  # not a list of this export's own files: export again
    if any(not path.is_file() or path.stat().st_size != files[name].get("size") for name, path in paths.items()):
        return None  # damaged since: export again
    return manifest


def _check_apart(output: Path, checkpoint: str | Path | TrainedCheckpoint, options: ExportOptions, base_path: str | None) -> None:
    source = None if isinstance(checkpoint, TrainedCheckpoint) and checkpoint.kind == "memory" else (
        checkpoint.source if isinstance(checkpoint, TrainedCheckpoint) else checkpoint)
    check_inputs_apart(output, {"--checkpoint": source, "--base-model": base_path, "--tokenizer": options.tokenizer})


def _check_space(output: Path, base: Any, dtype: torch.dtype, options: ExportOptions, trained_bytes: int = 0) -> None:
    """The merged weights in the target dtype plus the adapter: what must fit beside the output
    (a replaced export keeps its place until the rename, so what is free now must hold the new one)."""
    element = torch.empty((), dtype=dtype).element_size()
    merged = sum(element * math.prod(info.shape) if info.dtype.is_floating_point else info.nbytes
                 for info in base.tensors.values())
    check_free_space(output, (merged if options.merge else 0) + 2 * trained_bytes)


def prepare(checkpoint: str | Path | TrainedCheckpoint, output: Path, options: ExportOptions) -> Job:
    """Read the inputs and check everything that can be checked before anything large is loaded:
    the output, the base's headers and the disk space come before the checkpoint is read."""
    given = resolve_base(options.base_model) if options.base_model is not None else None
    if options.tokenizer is not None:
        check_remote_code(options.tokenizer, "--tokenizer")
    _check_apart(output, checkpoint, options, given[1] if given else None)
    recover_interrupted(output.resolve())
    check_output(output, overwrite=True)  # never anything but an export of ours, whatever the settings
    refuse_unmergeable(checkpoint, options)  # from the recorded configs, before any base weight file is opened
    base = None
    if given is not None:
        name, path = given
        base = base_files(path, name)
        _check_space(output, base, resolve_dtype(options.dtype, read_config(path, "--base-model")), options)
    sources = read_sources(checkpoint, options, base)
    _check_apart(output, checkpoint, options, sources.base_path)
    check_base(sources)  # a wrong base of the same shapes, named before the merge writes a whole model
    dtype = resolve_dtype(options.dtype, sources.peft_model.base_model.model.config)
    fingerprint = inputs_fingerprint(sources, options)
    job = Job(sources, options, output, dtype, "", "", fingerprint, slots=_slots(sources, options))
    job.previous = _previous_export(output, fingerprint)
    if job.previous is not None:
        return job
    check_output(output, options.overwrite)
    trained_bytes = sum(t.numel() * t.element_size() for t in sources.trained.values())
    if options.merge:
        job.impl, job.impl_reason = choose_merge_impl(options.merge_impl, sources.base, trained_bytes, options.workers, options.verify)
        log.info("merge implementation: %s (%s)", job.impl, job.impl_reason)
    _check_space(output, sources.base, dtype, options, trained_bytes)
    return job


def _slots(sources: Sources, options: ExportOptions) -> BiasSlots:
    """Where the merged model holds the run's lora biases; an export that cannot have one fails."""
    if not options.merge:
        return BiasSlots()
    slots = plan_bias_slots(sources.peft_model, "default")
    if slots.problem is not None:
        raise ExportError(unmergeable(slots.problem))
    if slots.switches:
        log.info("lora_bias on layers without a bias: the merged model sets %s (zero biases where no lora bias lands)",
                 ", ".join(f"{name}=true" for name in slots.switches))
    return slots


# --- share: each worker's part --------------------------------------------------------------------

def _merged_in_memory(job: Job) -> Any:
    """The whole-model merge (one worker): PEFT's own merge of the rebuilt model, in memory; the
    values :func:`write_shards` takes, laid out by the same plan as the streaming merger's."""
    sources = job.sources
    try:
        model = build_peft_model(sources.base_path, sources.lora_config, sources.checkpoint.vocab_size)
    except OSError as err:
        raise ExportError(f"--base-model={sources.base_name!r} could not be loaded: {err}") from err
    load_trained(model, sources.trained, sources.frozen, sources.rewritten)
    add_zero_biases(model, job.slots.added)  # PEFT merges a lora bias only into a bias the layer has
    state = merge(model, job.dtype).state_dict()

    def value(entry: Any) -> torch.Tensor:
        tensor = state[entry.key]
        return tensor if tensor.dtype == entry.dtype else tensor.to(entry.dtype)

    return value


def _plan(job: Job) -> MergePlan:
    sources = job.sources
    return plan_merge(sources.peft_model, sources.trained, sources.frozen, sources.base, sources.rewritten, job.dtype,
                      job.options.max_shard_size, job.slots.added)


def _write_metadata(job: Job, tmp: Path, plan: MergePlan | None) -> dict[str, Any]:
    """Rank 0's files besides the weights: config, index, tokenizer, special ids, the adapter."""
    sources, options = job.sources, job.options
    merged_dir = tmp / "merged"
    written: dict[str, Any] = {}
    if options.merge:
        write_index(plan, merged_dir)
        write_config(sources.peft_model, Path(sources.base_path), merged_dir, job.dtype, plan.untie, job.slots.switches)
        written["tokenizer"] = _ship_tokenizer(merged_dir, options.tokenizer, sources.checkpoint.tokenizer_files, sources.base_path)
        written["special_token_changes"] = reconcile_special_ids(merged_dir)
        for change in written["special_token_changes"]:
            log.info("special tokens: %s", change)
    if options.save_adapter:
        written["adapter_left_out"] = write_adapter(sources, tmp / "adapter")
        if written["adapter_left_out"] is None and sources.grown and sources.checkpoint.tokenizer_files:
            # PEFT's convention for added tokens: the adapter ships the tokenizer, whose length
            # is what the base must be resized to before loading the adapter.
            write_tokenizer_files(sources.checkpoint.tokenizer_files, tmp / "adapter")
    return written


def _ship_tokenizer(merged_dir: Path, tokenizer: str | None, trained: dict[str, str] | None, base_path: str) -> str:
    """Write the merged model's tokenizer; returns where it came from."""
    if tokenizer is not None:
        save_tokenizer(tokenizer, merged_dir)
        return f"--tokenizer={tokenizer!r}"
    if trained:
        write_tokenizer_files(trained, merged_dir)
        return "the checkpoint (the tokenizer the run trained with)"
    save_tokenizer(base_path, merged_dir)
    return "the base model"


def _probes(job: Job, merged_dir: Path) -> torch.Tensor:
    """The fixed minimum probe set, started with the run's own sequences when there are some."""
    return probes_for(merged_dir, job.sources.vocab_size, job.sources.base_vocab, job.options.probes)


def _progress(job: Job, rank: int) -> Any:
    """A per-block callback: a bar on a terminal, log lines otherwise."""
    if job.options.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(desc="verify", unit="block", leave=False)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
            if done == total:
                bar.close()

        return update
    return lambda done, total: log.info("verify (rank %d): block %d/%d matches", rank, done, total)


def _write_my_shards(job: Job, plan: MergePlan, rank: int, world: int, merged_dir: Path) -> dict[str, dict[str, Any]]:
    """Merge and write the shards this worker owns; the merge's memory (a whole model for
    ``peft``, the streaming workspace) is freed when this returns, before verification."""
    sources = job.sources
    mine = [number for number, owner in enumerate(assign_shards(plan.shards, world)) if owner == rank]
    if job.impl == "peft":
        values = _merged_in_memory(job)
    else:
        values = streamed_values(plan, sources.base, sources.frozen, job.dtype)
    return write_shards(plan, mine, values, merged_dir)


def _reference(job: Job) -> tuple[Any, ...]:
    sources = job.sources
    return sources.peft_model, sources.trained, sources.frozen, sources.base


def _tied(peft_model: Any, plan: MergePlan) -> bool:
    config = peft_model.base_model.model.config.get_text_config()
    return bool(getattr(config, "tie_word_embeddings", False)) and not plan.untie


def _joined(tensors: dict[str, Any], function: dict[str, Any]) -> dict[str, Any]:
    """One worker's report from its tensor check and its function check."""
    problems = tensors["problems"] + function["problems"]
    return {**function, "tensors": tensors["tensors"], "problems": problems, "passed": not problems,
            "rewritten_base_tensors": sorted(set(tensors["rewritten_base_tensors"]) | set(function["rewritten_base_tensors"])),
            "seconds": round(tensors["tensors"]["seconds"] + function["seconds"], 3)}


def run_share(job: Job, tmp: Path, rendezvous: Rendezvous) -> dict[str, Any]:
    """One worker's part of an export; returns its report (rank 0 also writes the metadata)."""
    rank, world = rendezvous.rank, rendezvous.world
    sources, options = job.sources, job.options
    merged_dir = tmp / "merged"
    report: dict[str, Any] = {"rank": rank, "shards": [], "seconds": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["seconds"][name] = round(now - clock, 3)
        clock = now

    if options.merge:
        # One layout for both merges and any number of workers: the plan decides every shard.
        plan = _plan(job)
        report["hashes"] = _write_my_shards(job, plan, rank, world, merged_dir)
        report["shards"] = sorted(report["hashes"])
        report["merged_modules"] = plan.merged_modules
        report["merged_tensors"] = len(plan.entries)
        lap("merge")
        if options.verify:  # this worker's own shards, while the others may still be writing theirs
            files = WeightFiles(merged_dir, "merged", sources.peft_model.base_model.model.base_model_prefix,
                                files=[merged_dir / name for name in report["shards"]])
            tensors = verify_tensors(files, files.keys(), *_reference(job), job.dtype, _tied(sources.peft_model, plan),
                                     options.device, job.slots.added)
            lap("tensor check")
        if rank == 0:
            report["metadata"] = _write_metadata(job, tmp, plan)
        rendezvous.report("written", report["shards"])
        rendezvous.wait("written")
        lap("metadata and waiting for the other workers")
        if options.verify:  # every block, on this worker's share of the probes
            probes = _probes(job, merged_dir)[rank::world]
            function = verify_export(merged_dir, *_reference(job), job.dtype, probes=probes, keys=[], complete=rank == 0,
                                     function=len(probes) > 0, device=options.device, progress=_progress(job, rank))
            report["verification"] = _joined(tensors, function)
            lap("function check")
            if rank == 0 and sources.quantized is not None:
                report["verification"]["drift"] = measure_drift(
                    merged_dir, sources, _probes(job, merged_dir), options.heldout, compute_device(options.device),
                    options.max_drift, options.merge_base, job.dtype)
                lap("drift")
    elif rank == 0:
        report["metadata"] = _write_metadata(job, tmp, None)
    rendezvous.report("verified", report)
    return report


# --- finish ---------------------------------------------------------------------------------------

def _combine(reports: dict[int, dict[str, Any]], options: ExportOptions, reference: str) -> dict[str, Any]:
    """One verification report from every worker's."""
    if not options.merge:
        return {"skipped": f"no merged model: {options.merge_skipped}" if options.merge_skipped else "no merged model"}
    if not options.verify:
        return {"skipped": "--no-verify"}
    parts = {rank: reports[rank]["verification"] for rank in sorted(reports)}
    problems = [f"rank {rank}: {p}" if len(parts) > 1 else p for rank, part in parts.items() for p in part["problems"]]
    drift = parts[0].get("drift")
    problems += drift["problems"] if drift else []
    tensors: dict[str, Any] = {"checked": 0, "by_kind": {}, "worst": {}, "differing": {}}
    for part in parts.values():
        tensors["checked"] += part["tensors"]["checked"]
        for kind, count in part["tensors"]["by_kind"].items():
            tensors["by_kind"][kind] = tensors["by_kind"].get(kind, 0) + count
        for kind, keys in part["tensors"].get("differing", {}).items():
            tensors["differing"][kind] = sorted(tensors["differing"].get(kind, []) + keys)
        for kind, worst in part["tensors"]["worst"].items():
            if kind not in tensors["worst"] or worst["max_abs_diff"] > tensors["worst"][kind]["max_abs_diff"]:
                tensors["worst"][kind] = worst
    functions = [part["function"] for part in parts.values() if part.get("function")]
    first = parts[min(parts)]
    return {
        "passed": not problems,
        "problems": problems,
        "reference": reference,
        "device": first["device"],
        "tolerances": first["tolerances"],
        "config": first["config"],
        "tensors": tensors,
        "function": _combine_functions(functions, len(parts)),
        "rewritten_base_tensors": len({k for part in parts.values() for k in part["rewritten_base_tensors"]}),
        "drift": drift,
        "seconds": max(part["seconds"] for part in parts.values()),
    }


def _ratio(entry: dict[str, Any]) -> float:
    return entry["max_abs_diff"] / max(entry["tolerance"], 1e-30)


def _combine_functions(functions: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    if not functions:
        return {}
    tokens = sum(f["tokens"] for f in functions)
    logits = [f["logits"] for f in functions if f["logits"]]
    combined: dict[str, Any] = {
        "probes": sum(f["probes"] for f in functions),
        "tokens": tokens,
        "blocks_checked": max(f["blocks_checked"] for f in functions),
        "worst_block": max((f["worst_block"] for f in functions if f["worst_block"]), key=_ratio, default=None),
        "logits": max(logits, key=_ratio, default={}),
        # Split by probes, not by blocks: a block's input is the previous block's output, so
        # splitting the blocks would make every worker run the ones before its own.
        "split": f"{workers} worker(s), each running its share of the probes through every block",
    }
    if logits:
        agreement = sum(f["logits"]["argmax_agreement"] * f["tokens"] for f in functions if f["logits"]) / max(1, tokens)
        combined["logits"] = {**combined["logits"], "argmax_agreement": agreement}
    return combined


def finish(job: Job, tmp: Path, reports: dict[int, dict[str, Any]], started: float) -> dict[str, Any]:
    """Rank 0: check and record everything in ``export.json``; a failed verification is kept aside."""
    sources, options = job.sources, job.options
    rank0 = reports[0]
    metadata = rank0.get("metadata", {})
    counts = count_tensors(sources.peft_model, sources.rewritten)
    if options.merge:
        # The plan writes only the unwrapped model's tensors (no adapter tensor can survive); it
        # must have found every module LoRA wraps.
        counts["merged_tensors"] = rank0["merged_tensors"]
        if rank0["merged_modules"] != counts["lora_modules"]:
            raise ExportError(f"the merge plan covers {rank0['merged_modules']} LoRA modules but LoRA wraps "
                              f"{counts['lora_modules']}; nothing was published")
    verification = _combine(reports, options, sources.description)
    checkpoint = sources.checkpoint
    manifest = {
        "format": MANIFEST_FORMAT,
        "prefix": job.options.prefix,
        "inputs_fingerprint": job.fingerprint,
        "source": {"checkpoint": checkpoint.source, "kind": checkpoint.kind, "tag": checkpoint.tag},
        "adapter_name": checkpoint.adapter_name,
        "global_step": checkpoint.global_step,
        "base_model": sources.base_name,
        "base_model_path": sources.base_path,
        "lora_config": sources.lora_config,
        "merged": ("written" if options.merge else f"not written: {options.merge_skipped}" if options.merge_skipped
                   else "not requested"),
        "bias_slots": job.slots.record(),
        "merge_impl": job.impl or None,
        "merge_impl_reason": job.impl_reason or None,
        "dtype": dtype_name(job.dtype),
        "max_shard_size": options.max_shard_size,
        "vocab_size": checkpoint.vocab_size,
        "tokenizer": metadata.get("tokenizer"),
        "special_token_changes": metadata.get("special_token_changes", []),
        "adapter": ("not requested" if not options.save_adapter else
                    f"left out: {metadata['adapter_left_out']}" if metadata.get("adapter_left_out") else
                    "converted to the original base (PEFT's conversion)" if sources.rewritten - sources.dequantized else
                    f"written (load it onto the base quantized as in training: {describe_quantization(checkpoint.quantization)})"
                    if sources.quantized is not None else "written"),
        "quantization": checkpoint.quantization if sources.quantized is not None else None,
        "merge_base": options.merge_base if sources.quantized is not None else None,
        "tensors": counts,
        "workers": {"count": len(reports), "shards": {name: rank for rank, r in sorted(reports.items()) for name in r["shards"]},
                    "seconds": {rank: r["seconds"] for rank, r in sorted(reports.items())}},
        "files": file_manifest(tmp, {f"merged/{name}": digest for r in reports.values() for name, digest in r.get("hashes", {}).items()}),
        "versions": package_versions(),
        "verification": verification,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(tmp / "export.json", manifest)
    if verification.get("passed") is False:
        failed = keep_failed(tmp, job.output.resolve())
        raise VerificationError(f"{_failure(verification, sources.base_name)}; nothing was published, the export is "
                                f"kept aside in {str(failed)!r} with its report")
    return manifest


def _failure(verification: dict[str, Any], base_name: str) -> str:
    """Why verification failed, in one phrase: a wrong base when only tensors the adapter leaves
    untouched differ from their source (the rest then follows from it), else the first problem."""
    verdict = untouched_verdict(verification["tensors"], base_name)
    if verdict is not None:
        return f"verification failed: {verdict}"
    problems = verification["problems"]
    return f"verification failed: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


# --- the entry points -----------------------------------------------------------------------------

def export_checkpoint(checkpoint: str | Path | TrainedCheckpoint, output: str | Path, **settings: Any) -> dict[str, Any]:
    """Export a finished LoRA run as a PEFT adapter and a merged Hugging Face model, verified.

    Args:
        checkpoint: a DeepSpeed ZeRO directory, a (sharded) FSDP checkpoint, a Lightning ``.ckpt``
            file, a PEFT adapter directory, or an already read :class:`TrainedCheckpoint`.
        output: the export directory to create (``adapter/``, ``merged/``, ``export.json``).
        **settings: see :class:`~lightning_lora.export.options.ExportOptions` (``base_model``,
            ``dtype``, ``max_shard_size``, ``verify``, ``workers``, ``overwrite``, ...).

    Returns:
        The content of ``export.json`` (with ``"unchanged": True`` when the output already held
        the export of these same inputs).
    """
    started = time.perf_counter()
    options = ExportOptions(**settings)
    meeting = _meeting_place(Path(output))
    # The other workers start now: their start-up and their reading of the checkpoint overlap
    # this process's checks; if there is nothing to do, they are stopped.
    processes = _start_workers(options, checkpoint, meeting)
    finished = False
    try:
        with trusting(options.trust_remote_code):
            job = prepare(checkpoint, Path(output), options)
            if job.previous is not None:
                log.info("%s holds an export of these same inputs already: nothing to do", output)
                return {**job.previous, "unchanged": True}
            with _threads(_threads_per_worker(options.workers)):
                manifest = _lead(job, meeting, started, alive=lambda r: processes[r].is_alive() or processes[r].exitcode == 0)
        finished = True
        return manifest
    finally:
        for process in processes.values():
            process.join(timeout=30 if finished else 0)
            if process.is_alive():
                process.kill()


def _threads_per_worker(workers: int) -> int:
    """Local workers share the machine's cores (``OMP_NUM_THREADS`` decides when it is set)."""
    import os

    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // workers)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _meeting_place(output: Path) -> Path:
    """The rendezvous directory: a sibling of the output, like its temporary directory."""
    import os

    return output.resolve().parent / f".{output.name}.rdv-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _message(err: BaseException) -> str:
    return str(err) if isinstance(err, (ExportError, FileExistsError)) else f"{type(err).__name__}: {err}"


def _lead(job: Job, meeting: Path, started: float, alive: Any = None) -> dict[str, Any]:
    """Rank 0: write into a temporary directory with the others, publish it, tell them."""
    world = job.options.workers
    with Rendezvous(meeting, 0, world, alive=alive) as rendezvous:
        try:
            with publish_atomically(job.output, overwrite=job.options.overwrite) as tmp:
                rendezvous.report("begin", {"tmp": str(tmp), "impl": job.impl})
                run_share(job, tmp, rendezvous)
                manifest = finish(job, tmp, rendezvous.wait("verified"), started)
        except BaseException as err:
            rendezvous.fail(_message(err))
            rendezvous.settle(timeout_s=30)  # let the others read why before the directory goes
            shutil.rmtree(meeting, ignore_errors=True)
            raise
        rendezvous.report("published")
        if world > 1:
            try:
                rendezvous.wait("done", ranks=list(range(1, world)), timeout_s=60)
            except ExportError as err:
                log.warning("export published; %s", err)
    shutil.rmtree(meeting, ignore_errors=True)
    return manifest


def _follow(checkpoint: str | Path, options: ExportOptions, meeting: Path, rank: int, world: int) -> None:
    """Ranks 1..N-1: read the inputs (while rank 0 checks them), do this rank's share in rank 0's
    temporary directory, then wait for the publish."""
    sources, problem = None, None
    try:
        sources = read_sources(checkpoint, options)
    except BaseException as err:  # reported once the rendezvous exists
        problem = err
    with Rendezvous(meeting, rank, world) as rendezvous:
        try:
            if problem is not None:
                raise problem
            begin = rendezvous.wait("begin", ranks=[0])[0]
            dtype = resolve_dtype(options.dtype, sources.peft_model.base_model.model.config)
            tmp = Path(begin["tmp"])
            job = Job(sources, options, tmp, dtype, begin["impl"], "", "", slots=_slots(sources, options))
            run_share(job, tmp, rendezvous)
            rendezvous.wait("published", ranks=[0])
            rendezvous.report("done")
        except BaseException as err:
            rendezvous.fail(_message(err))
            raise


def _start_workers(options: ExportOptions, checkpoint: Any, meeting: Path) -> dict[int, Any]:
    """Local processes for ranks 1..N-1 of ``export_checkpoint(..., workers=N)``."""
    world = options.workers
    if world == 1:
        return {}
    if isinstance(checkpoint, TrainedCheckpoint):
        raise ExportError(f"--workers={world} needs a checkpoint path (each worker reads it); this one is in memory")
    context = multiprocessing.get_context("spawn")
    spec = {"checkpoint": str(checkpoint), "meeting": str(meeting), "world": world,
            "options": {**asdict(options), "progress": False}}
    processes = {rank: context.Process(target=_worker_main, args=({**spec, "rank": rank},), daemon=True) for rank in range(1, world)}
    for process in processes.values():
        process.start()
    return processes


def _worker_main(spec: dict[str, Any]) -> None:
    """A local worker process (rank >= 1) of ``export_checkpoint(..., workers=N)``."""
    torch.set_num_threads(_threads_per_worker(spec["world"]))
    options = ExportOptions(**spec["options"])
    try:
        with trusting(options.trust_remote_code):
            _follow(spec["checkpoint"], options, Path(spec["meeting"]), spec["rank"], spec["world"])
    except BaseException:
        raise SystemExit(1) from None


def export_shared(checkpoint: str | Path, output: str | Path, rank: int, world: int, agree: Any, **settings: Any) -> dict[str, Any] | None:
    """Export one checkpoint with the ``world`` ranks of a running job, each doing its share.

    Every rank calls this. ``agree(value)`` must return rank 0's ``value`` on every rank (one
    short broadcast, e.g. ``trainer.strategy.broadcast``); it is called once, right away, never
    while a rank works. Rank 0 prepares (a failure there fails every rank at once); then the
    ranks merge, check and meet through files beside the output, and rank 0 publishes once all
    reported success. Returns the manifest on rank 0, ``None`` on the others.
    """
    started = time.perf_counter()
    if settings.get("merge_impl") == "peft" and world > 1:
        log.warning("merge_impl='peft' cannot be shared by %d ranks; the streaming merge writes the same files", world)
        settings = {**settings, "merge_impl": "streaming"}
    options = ExportOptions(**{**settings, "workers": world})
    with trusting(options.trust_remote_code):
        return _share(checkpoint, Path(output), rank, world, agree, options, started)


def _share(checkpoint: str | Path, output: Path, rank: int, world: int, agree: Any, options: ExportOptions,
           started: float) -> dict[str, Any] | None:
    """:func:`export_shared` once its settings are read."""
    job, decision = None, {"problem": ""}
    if rank == 0:
        try:
            job = prepare(checkpoint, output, options)
            decision = {"problem": "", "unchanged": job.previous is not None, "impl": job.impl,
                        "fingerprint": job.fingerprint, "meeting": str(_meeting_place(job.output))}
        except Exception as err:  # every failure before the ranks part must reach all of them
            decision = {"problem": _message(err)}
    decision = agree(decision)
    if decision["problem"]:
        raise ExportError(decision["problem"])
    if decision["unchanged"]:
        return {**job.previous, "unchanged": True} if job is not None else None
    if rank == 0:
        return _lead(job, Path(decision["meeting"]), started)
    _follow(checkpoint, options, Path(decision["meeting"]), rank, world)
    return None
