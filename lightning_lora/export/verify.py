"""Verification: is the merged model on disk the model that was trained?

Three checks, each independent of the merge (see :mod:`~lightning_lora.export.reference`):

- *config*: ``merged/config.json`` says what the trained model's config says, except the fields
  an export changes on purpose (dtype, vocabulary size, an untied head, special token ids, a
  switch that gives layers a bias for their lora bias: see :mod:`~lightning_lora.export.bias_slots`);
- *tensors* (:mod:`~lightning_lora.export.tensor_check`): every merged tensor against PEFT's own
  merge of that module, or its source, cast once;
- *function* (:mod:`~lightning_lora.export.function_check`): probes through both models block by
  block, then the logits and their argmax.

Memory stays near two decoder blocks in fp32 plus the embeddings, whatever the model size; it
runs on the GPU when the process has one. :func:`verify_directory` re-checks a finished export.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.bias_slots import bias_switches, plan_bias_slots
from lightning_lora.export.function_check import SAFETY, Side, check_function
from lightning_lora.export.probes import build_probes, probes_for
from lightning_lora.export.reference import TrainedModel
from lightning_lora.export.structure import merged_meta_model
from lightning_lora.export.tensor_check import check_tensors, expected_keys
from lightning_lora.export.paths import inside
from lightning_lora.export.trust import check_remote_code, trusting
from lightning_lora.export.weights import WeightFiles

__all__ = ["check_config", "compute_device", "describe_tolerances", "summarize_verification", "verify_directory", "verify_export",
           "verify_tensors"]

# config.json fields an export may change: the dtype it wrote, the vocabulary it grew, a head it
# untied, the special ids it made agree with the shipped tokenizer, and bookkeeping.
_EXPORT_FIELDS = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "vocab_size", "tie_word_embeddings",
                  "eos_token_id", "bos_token_id", "pad_token_id", "architectures"}


def compute_device(requested: str | torch.device | None = None) -> torch.device:
    """The GPU this process uses when it has one (the end of a GPU training run), else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_tolerances(dtype: torch.dtype) -> dict[str, str]:
    name = str(dtype).removeprefix("torch.")
    return {
        "tensors": f"LoRA-merged: 1 ulp of {name} at max(|W|, |delta|) per element; everything else: bit for bit",
        "function": f"{SAFETY:g} * (u + 2^-24 * sqrt(hidden_size)) * scale, u the unit roundoff of {name}, "
                    "scale the largest |output - input| of the block (|logit| for the logits)",
    }


def check_config(trained: Any, merged: Any, vocab_rows: int, switched: tuple[str, ...] = ()) -> list[str]:
    """Fields of the merged config that differ from the trained model's, beyond an export's own changes
    (``switched``: the bias switches it turned on)."""
    want, got = trained.to_dict(), merged.to_dict()
    problems = [
        f"config.json: {key} is {got.get(key)!r} in the merged model, the trained model's is {want.get(key)!r}"
        for key in sorted(set(want) | set(got))
        if key not in _EXPORT_FIELDS and key not in switched and want.get(key) != got.get(key)
    ]
    rows = getattr(merged.get_text_config(), "vocab_size", None)
    if rows is not None and rows != vocab_rows:
        problems.append(f"config.json: vocab_size is {rows}, the trained model embeds {vocab_rows} tokens")
    return problems


def verify_tensors(merged: WeightFiles, keys: list[str], peft_model: Any, trained: dict[str, torch.Tensor],
                   frozen: Mapping[str, torch.Tensor], base: WeightFiles, dtype: torch.dtype, tied: bool,
                   device: str | torch.device | None = None,
                   slots: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """The tensor check of ``keys`` of the merged files (one worker's own shards, as soon as it
    wrote them): see :mod:`~lightning_lora.export.tensor_check`. ``tied``: the export ties the
    head to the input embeddings; ``slots``: the biases it adds (key -> shape), whose config
    :func:`verify_export` checks once it is written."""
    reference = TrainedModel(peft_model, trained, frozen, base)
    return _tensor_report(merged, keys, reference, dtype, compute_device(device), tied, slots)


def _tensor_report(merged: WeightFiles, keys: list[str], reference: TrainedModel, dtype: torch.dtype, device: torch.device,
                   tied: bool, slots: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    result = check_tensors(merged, keys, reference, dtype, device, tied, slots)
    return {"tensors": {**result.as_dict(), "seconds": round(time.perf_counter() - started, 3)},
            "problems": list(result.problems), "rewritten_base_tensors": sorted(reference.rewritten)}


def verify_export(
    merged_dir: Path,
    peft_model: Any,
    trained: dict[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    base: WeightFiles,
    dtype: torch.dtype,
    probes: torch.Tensor | None = None,
    keys: list[str] | None = None,
    complete: bool = True,
    function: bool = True,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compare the merged directory with the trained model rebuilt from the sources.

    Args:
        merged_dir: the merged model directory (config, weights).
        peft_model: the run's PEFT model on the meta device (structure only).
        trained: the checkpoint's trained tensors by PEFT-model key.
        frozen: the frozen weights the checkpoint holds (lazily read; may be empty).
        base: the base model's weight files.
        dtype: the export dtype.
        probes: ``(n, tokens)`` ids for the function check (the fixed minimum set when ``None``).
        keys: the merged tensors to tensor-check (all when ``None``; none when the workers
            checked their own shards already).
        complete: also check that the merged files hold every tensor of the trained model and
            nothing else (once, by one worker).
        function: run the function check (a worker without probes of its own skips it).
        device: where to compute (the process's GPU when it has one).
        progress: called with (blocks done, blocks) during the function check.

    Returns:
        The report for ``export.json``; ``passed`` is false and ``problems`` names what failed.
    """
    started = time.perf_counter()
    device = compute_device(device)
    reference = TrainedModel(peft_model, trained, frozen, base)
    merged_model, merged_config = merged_meta_model(merged_dir)
    merged_files = WeightFiles(merged_dir, "merged", merged_model.base_model_prefix)
    hf_model = peft_model.base_model.model
    tied = bool(getattr(merged_config.get_text_config(), "tie_word_embeddings", False))
    report: dict[str, Any] = {"device": str(device), "tolerances": describe_tolerances(dtype)}
    switched, slots = _added_biases(hf_model.config, merged_config)
    problems = check_config(hf_model.config, merged_config, hf_model.get_input_embeddings().weight.shape[0], switched)
    problems += [f"config.json: no bias for the trained lora bias of {key.removesuffix('.bias')!r} (the merged model "
                 "would lose it)" for key in plan_bias_slots(peft_model, "default").needed if key not in slots]
    report["config"] = {"problems": list(problems)}
    if complete:
        want, have = expected_keys(peft_model, tied) | set(slots), set(merged_files.keys())
        problems += [f"the merged files lack {key!r}" for key in sorted(want - have)]
        problems += [f"the merged files hold {key!r}, which the merged config has no use for" for key in sorted(have - want)]
    keys = sorted(merged_files.keys()) if keys is None else keys
    tensors = _tensor_report(merged_files, keys, reference, dtype, device, tied, slots)
    problems += tensors["problems"]
    report["tensors"] = tensors["tensors"]
    function_started = time.perf_counter()

    if function:
        if probes is None:
            probes = build_probes(hf_model.get_input_embeddings().weight.shape[0])
        value_of = lambda name: reference.value(name) if name in reference.shapes else None  # noqa: E731
        sides = [Side("trained", peft_model, value_of, device),
                 Side("merged", merged_model, lambda name: merged_files.get(name) if name in merged_files else None, device)]
        try:
            result = check_function(sides[0], sides[1], probes, dtype, progress)
            problems += result.problems
            report["function"] = {**result.as_dict(), "seconds": round(time.perf_counter() - function_started, 3)}
        except ExportError as err:  # a tensor the merged model needs is not in its files
            problems.append(f"function check: {err}")
        finally:
            for side in sides:
                side.close()
    report["rewritten_base_tensors"] = sorted(reference.rewritten)
    report["problems"] = problems
    report["passed"] = not problems
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _added_biases(trained: Any, merged: Any) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """The bias switches the merged config turned on, and the biases (key -> shape) they add to the
    trained model's layers: found from the two configs, whatever the exporter decided."""
    before, after = trained.get_text_config(), merged.get_text_config()
    if not any(getattr(after, name, None) is True for name, value in before.to_dict().items()
               if "bias" in name.lower() and value is False):
        return (), {}  # the usual case: no model is built to find out
    switches = bias_switches(trained)
    on = tuple(name for name in switches if getattr(after, name, None) is True)
    return on, {key: shape for name in on for key, shape in switches[name].items()}


def _shape_problems(merged_dir: Path) -> list[str]:
    """Tensors whose shape in the safetensors files is not what the merged config implies (cheap:
    file headers against the model built on the meta device)."""
    model, _ = merged_meta_model(merged_dir)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files = WeightFiles(merged_dir, "merged", model.base_model_prefix)
    problems = []
    for key, info in files.tensors.items():
        want = expected.get(key, expected.get(f"{model.base_model_prefix}.{key}"))
        if want is None:
            problems.append(f"{info.file.name} holds {key!r}, which the merged config has no place for")
        elif want != info.shape:
            problems.append(f"{key!r} has shape {info.shape} in {info.file.name}, the config implies {want}")
    return problems


def verify_directory(export_dir: Path, base_model: str | Path | None = None, checkpoint: str | Path | None = None,
                     device: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Re-check a finished export: see :func:`_check_directory`. ``trust_remote_code`` lets a base or
    merged model that maps to custom code (``auto_map``) run it; without it such a model is refused."""
    with trusting(trust_remote_code):
        return _check_directory(Path(export_dir), base_model, checkpoint, device)


def _check_directory(export_dir: Path, base_model: str | Path | None = None, checkpoint: str | Path | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """Re-check a finished export against its ``export.json``, and with ``base_model`` against the trained model.

    Checks that every recorded file is there with its size and sha256 and that no unrecorded file
    was added. With ``base_model``, the merged model is verified as after the export, against
    the trained model rebuilt from ``checkpoint`` (by default the one ``export.json`` names, if it
    is still there; otherwise the exported adapter, which is then the reference).

    Returns:
        A report; ``problems`` lists what failed (empty when the export is intact and verified).
    """
    from lightning_lora.export.hf import file_manifest

    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise ExportError(f"DIR={str(export_dir)!r} holds no export.json: not an export directory")
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"DIR={str(export_dir)!r}: export.json is not an export manifest ({err})") from err
    for name in recorded:  # the names export.json lists, and every link in the export: none may lead out
        inside(export_dir, name, f"DIR={str(export_dir)!r}: export.json")
    for path in export_dir.rglob("*"):
        inside(export_dir, path.relative_to(export_dir).as_posix(), f"DIR={str(export_dir)!r}")
    actual = file_manifest(export_dir)
    actual.pop("export.json", None)
    problems = [f"missing file {name}" for name in sorted(set(recorded) - set(actual))]
    problems += [f"unrecorded file {name}" for name in sorted(set(actual) - set(recorded))]
    for name in sorted(set(recorded) & set(actual)):
        if recorded[name] != actual[name]:
            problems.append(f"{name} differs from export.json (size {actual[name]['size']} vs {recorded[name]['size']}, sha256)")
    report: dict[str, Any] = {"files_checked": len(recorded), "problems": problems}
    merged_dir = export_dir / "merged"
    if (merged_dir / "config.json").is_file() and not problems:
        check_remote_code(merged_dir, "DIR's merged model")
        problems += _shape_problems(merged_dir)
    if base_model is not None and merged_dir.is_dir() and not problems:
        from lightning_lora.export.base_check import check_base, untouched_verdict
        from lightning_lora.export.sources import open_sources

        sources = open_sources(manifest, export_dir, str(base_model), checkpoint)
        check_base(sources)
        dtype = getattr(torch, manifest["dtype"])
        probes = probes_for(merged_dir, sources.vocab_size, sources.base_vocab)
        result = verify_export(merged_dir, sources.peft_model, sources.trained, sources.frozen, sources.base, dtype,
                               probes=probes, device=device)
        result["reference"] = sources.description
        report["verification"] = result
        # Only tensors the adapter leaves untouched differ: the base is the one problem, the rest follows from it.
        verdict = untouched_verdict(result["tensors"], sources.base_name)
        problems += [verdict] if verdict is not None else result["problems"]
    return report


def summarize_verification(verification: dict) -> str:
    """The verification result in one phrase, for the command's and the callback's summary line."""
    if "skipped" in verification:
        return f"not verified ({verification['skipped']})"
    tensors, function = verification.get("tensors", {}), verification.get("function", {})
    text = f"verified: {tensors.get('checked', 0)} tensors match PEFT's merge of the trained model"
    if function:
        logits = function.get("logits") or {}
        text += (f"; {function.get('blocks_checked', 0)} blocks and the logits agree on {function.get('tokens', 0)} probe tokens "
                 f"(max |logit diff| {logits.get('max_abs_diff', 0):.2e} <= {logits.get('tolerance', 0):.2e}, "
                 f"argmax agrees at {100 * logits.get('argmax_agreement', 1.0):.1f}% of positions)")
    if verification.get("drift"):
        from lightning_lora.export.drift import summarize_drift

        text += f"; {summarize_drift(verification['drift'])}"
    return text
