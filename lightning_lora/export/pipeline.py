"""The one export path that the callback and the ``export`` command share.

checkpoint -> trained tensors -> PEFT model on the base (fp32) -> adapter directory -> merge ->
cast -> merged directory (whole model in memory, or streamed tensor by tensor) -> reload both and compare -> ``export.json`` -> publish by rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_lora.export.checkpoint import TrainedCheckpoint, load_checkpoint
from lightning_lora.export.hf import (
    check_free_space,
    file_manifest,
    keep_failed,
    package_versions,
    publish_atomically,
    recover_interrupted,
    save_adapter,
    save_merged,
    save_tokenizer,
    write_json,
)
from lightning_lora.export.merge import (
    ExportError,
    build_peft_model,
    check_merged_files,
    count_tensors,
    load_trained,
    merge,
    resolve_dtype,
    rewrites_base,
    trained_by_model_key,
)
from lightning_lora.export.stream import build_meta_peft_model, choose_merge_impl, parse_size, stream_merge
from lightning_lora.export.tokens import reconcile_special_ids, write_tokenizer_files
from lightning_lora.export.verify import verify_export
from lightning_lora.tiny import resolve_model_path

__all__ = ["export_checkpoint"]

log = logging.getLogger("lightning_lora")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _read_lora_config(value: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if path.is_dir():
        path = path / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--lora-config={str(value)!r}: no adapter_config.json there")
    return json.loads(path.read_text())


def _base_vocab(base_path: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(base_path).get_text_config(), "vocab_size", None)


def _ship_tokenizer(merged_dir: Path, tokenizer: str | Path | None, trained: dict[str, str] | None, base_path: str) -> str:
    """Write the merged model's tokenizer; returns where it came from."""
    if tokenizer is not None:
        save_tokenizer(tokenizer, merged_dir)
        return f"--tokenizer={str(tokenizer)!r}"
    if trained:
        write_tokenizer_files(trained, merged_dir)
        return "the checkpoint (the tokenizer the run trained with)"
    save_tokenizer(base_path, merged_dir)
    return "the base model"


def _check_output(output: Path, checkpoint: Path, base_model: str) -> None:
    output = output.resolve()
    if output == checkpoint.resolve() or checkpoint.resolve() in output.parents:
        raise ExportError(f"--output={str(output)!r} lies inside --checkpoint={str(checkpoint)!r}; choose another directory")
    base = Path(base_model)
    if base.exists() and (output == base.resolve() or base.resolve() in output.parents):
        raise ExportError(f"--output={str(output)!r} lies inside --base-model={base_model!r}; choose another directory")


def _files_signature(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under ``path``: cheap, and changes with the content."""
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def inputs_fingerprint(checkpoint: TrainedCheckpoint, base_path: str, options: dict[str, Any]) -> str:
    """A digest of everything an export depends on: checkpoint, base model files, and settings.

    Files are identified by name, size and modification time; an in-memory checkpoint (the
    callback on one device or DDP) by the bytes of its tensors, which are only the adapter's.
    """
    digest = hashlib.sha256()
    if checkpoint.kind == "memory":
        for key in sorted(checkpoint.tensors):
            digest.update(key.encode())
            digest.update(checkpoint.tensors[key].float().numpy().tobytes())
    else:
        digest.update(json.dumps(_files_signature(Path(checkpoint.source))).encode())
    digest.update(json.dumps(_files_signature(Path(base_path))).encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _previous_export(output: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of a finished export of the same inputs under ``output``, if there is one."""
    try:
        manifest = json.loads((output / "export.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("inputs_fingerprint") == fingerprint else None


def export_checkpoint(
    checkpoint: str | Path | TrainedCheckpoint,
    output: str | Path,
    base_model: str | Path | None = None,
    lora_config: str | Path | dict[str, Any] | None = None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    prefix: str | None = None,
    tag: str | None = None,
    r: int | None = None,
    lora_alpha: float | None = None,
    merge_model: bool = True,
    merge_impl: str = "auto",
    save_adapter_dir: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    probes: list[list[int]] | None = None,
    tokenizer: str | Path | None = None,
    frozen_from_checkpoint: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a finished LoRA run as a PEFT adapter and a merged Hugging Face model.

    Args:
        checkpoint: a DeepSpeed ZeRO directory, a Lightning ``.ckpt`` file, a PEFT adapter
            directory, or an already read :class:`TrainedCheckpoint`.
        output: the export directory to create (``adapter/``, ``merged/``, ``export.json``).
        base_model: the base model directory (or ``builtin:...``); defaults to the one the
            checkpoint records.
        lora_config: a PEFT ``adapter_config.json``, a directory holding one, or a dict;
            defaults to the one the checkpoint records.
        dtype: ``auto`` (the base's dtype), ``fp32``, ``bf16`` or ``fp16`` for the merged weights.
        max_shard_size: largest safetensors shard of the merged model, e.g. ``"2GB"``.
        prefix: the LightningModule attribute holding the PEFT model, e.g. ``"net."``.
        tag: the ZeRO tag to read instead of ``latest``.
        r: override the LoRA rank of the recorded config.
        lora_alpha: override the LoRA alpha of the recorded config.
        merge_model: write ``merged/``.
        merge_impl: ``peft`` (PEFT's ``merge_and_unload`` on the whole model in memory),
            ``streaming`` (one tensor at a time, for models larger than memory), or ``auto``:
            streaming when the whole-model merge would not fit comfortably in available memory.
        save_adapter_dir: write ``adapter/``.
        verify: reload and compare merged with adapter outputs; a failure publishes nothing.
        overwrite: replace an existing ``output``.
        probes: token id lists to compare logits on (fixed prompts when ``None``).
        tokenizer: the tokenizer to ship with the merged model; by default the one the run trained
            with if the checkpoint records it (added tokens, chat template, pad token), else the base's.
        frozen_from_checkpoint: take frozen weights from the checkpoint instead of the base
            directory (automatic for PiSSA-like inits, which rewrite them).
        progress: show a progress bar.

    Returns:
        The content of ``export.json``.
    """
    started = time.perf_counter()
    output = Path(output)
    parse_size(max_shard_size)  # fail before anything is loaded, naming --max-shard-size
    if r is not None and r <= 0:
        raise ExportError(f"--r={r} is not a positive integer")
    steps = tqdm(total=5, desc="export", disable=not progress, unit="step")

    steps.set_postfix_str("reading checkpoint")
    if not isinstance(checkpoint, TrainedCheckpoint):
        if base_model is not None:
            _check_output(output, Path(checkpoint), str(base_model))
        checkpoint = load_checkpoint(checkpoint, prefix=prefix, tag=tag, include_frozen=frozen_from_checkpoint)
    config = _read_lora_config(lora_config) if lora_config is not None else checkpoint.lora_config
    if config is None:
        raise ExportError(f"{checkpoint.source!r} does not record its LoRA config; pass --lora-config")
    config = {**config, **({"r": r} if r is not None else {}), **({"lora_alpha": lora_alpha} if lora_alpha is not None else {})}
    base_name = base_model if base_model is not None else checkpoint.base_model
    if base_name is None:
        raise ExportError(f"{checkpoint.source!r} does not record its base model; pass --base-model")
    base_path = resolve_model_path(str(base_name))
    _check_output(output, Path(checkpoint.source), base_path)
    options = dict(lora_config=config, dtype=dtype, max_shard_size=max_shard_size, merge=merge_model,
                   adapter=save_adapter_dir, tokenizer=str(tokenizer), frozen_from_checkpoint=frozen_from_checkpoint,
                   vocab_size=checkpoint.vocab_size, trained_tokenizer=checkpoint.tokenizer_files)
    fingerprint = inputs_fingerprint(checkpoint, base_path, options)
    recover_interrupted(output.resolve())
    previous = _previous_export(output, fingerprint)
    if previous is not None:
        log.info("%s holds an export of these same inputs already: nothing to do", output)
        steps.close()
        return {**previous, "unchanged": True}
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output={str(output)!r} exists already; pass --overwrite to replace it")
    steps.update()

    tokenizer_source, special_changes = None, []
    steps.set_postfix_str("loading base + LoRA")
    impl, why = choose_merge_impl(merge_impl, base_path)
    log.info("merge implementation: %s (%s)", impl, why)
    vocab = checkpoint.vocab_size
    try:
        # The streaming merger needs only the model's structure: built on the meta device, it costs no memory.
        build = build_peft_model if impl == "peft" else build_meta_peft_model
        model = build(base_path, config, vocab)
    except OSError as err:
        raise ExportError(f"--base-model={str(base_name)!r} could not be loaded: {err}") from err
    except ValueError as err:  # a recorded vocabulary smaller than the base's
        raise ExportError(f"--base-model={str(base_name)!r} is not the model this run trained: {err}") from err
    grown = vocab is not None and vocab != _base_vocab(base_path)
    from_checkpoint = frozen_from_checkpoint or rewrites_base(config)
    trained = trained_by_model_key(model, checkpoint)
    counts = count_tensors(model, trained, from_checkpoint)
    target = resolve_dtype(dtype, model.base_model.model.config)
    # The merged weights in the target dtype plus the adapter in fp32 (a replaced export keeps its
    # place until the rename, so what is free now must hold the new one whole).
    element = torch.empty((), dtype=target).element_size()
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    check_free_space(output, (frozen_params * element if merge_model else 0) + adapter_bytes)
    steps.update()

    with publish_atomically(output, overwrite=overwrite) as tmp:
        steps.set_postfix_str("saving adapter")
        # The adapter is needed for verification even when it is not to be published.
        adapter_dir = tmp / "adapter" if save_adapter_dir else tmp / ".verify-adapter"
        if save_adapter_dir or (merge_model and verify):
            save_adapter(model, trained, adapter_dir)
            if grown and checkpoint.tokenizer_files:
                # PEFT's convention for added tokens: the adapter ships the tokenizer, whose length
                # is what the base must be resized to before loading the adapter.
                write_tokenizer_files(checkpoint.tokenizer_files, adapter_dir)
        steps.update()

        steps.set_postfix_str("merging")
        merged_dir = tmp / "merged"
        if merge_model:
            if impl == "peft":
                load_trained(model, trained, frozen_from_checkpoint=from_checkpoint)
                save_merged(merge(model, target), merged_dir, max_shard_size)
            else:
                streamed = stream_merge(model, trained, Path(base_path), merged_dir, target, max_shard_size, from_checkpoint)
                if streamed["merged_modules"] != counts["lora_modules"]:
                    raise ExportError(
                        f"the streaming merger merged {streamed['merged_modules']} modules but LoRA wraps "
                        f"{counts['lora_modules']}; nothing was published (try --merge-impl peft)"
                    )
            counts["merged_tensors"] = check_merged_files(merged_dir)
            tokenizer_source = _ship_tokenizer(merged_dir, tokenizer, checkpoint.tokenizer_files, base_path)
            special_changes = reconcile_special_ids(merged_dir)
            for change in special_changes:
                log.info("special tokens: %s", change)
        del model, trained
        steps.update()

        steps.set_postfix_str("verifying")
        verification: dict[str, Any] = {"skipped": "no merged model"} if not merge_model else {"skipped": "--no-verify"}
        if merge_model and verify:
            verification = verify_export(merged_dir, adapter_dir, base_path, target, probes)
        if not save_adapter_dir and adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        steps.update()
        steps.close()
        manifest = {
            "format": 1,
            "inputs_fingerprint": fingerprint,
            "source": {"checkpoint": checkpoint.source, "kind": checkpoint.kind, "tag": checkpoint.tag},
            "global_step": checkpoint.global_step,
            "base_model": str(base_name),
            "base_model_path": base_path,
            "lora_config": config,
            "merge_impl": impl,
            "merge_impl_reason": why,
            "dtype": _DTYPE_NAMES[target],
            "max_shard_size": max_shard_size,
            "vocab_size": vocab,
            "tokenizer": tokenizer_source,
            "special_token_changes": special_changes,
            "tensors": counts,
            "files": file_manifest(tmp),
            "versions": package_versions(),
            "verification": verification,
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(tmp / "export.json", manifest)
        if verification.get("passed") is False:
            failed = keep_failed(tmp, output.resolve())
            raise ExportError(
                f"verification failed: merged and adapter logits differ by {verification['max_abs_logit_diff']:.3g} "
                f"(tolerance {verification['tolerance']:.3g} for {_DTYPE_NAMES[target]}); nothing was published, "
                f"the export is kept aside in {str(failed)!r} with its report"
            )
    return manifest
