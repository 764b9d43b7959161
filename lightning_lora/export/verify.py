"""Reload an export from disk and compare the merged model with the adapter model.

Both are loaded the way a user would (``AutoModelForCausalLM.from_pretrained`` on the merged
directory, ``PeftModel.from_pretrained`` on the base plus the adapter) and run in fp32, so the
comparison measures the export (merge and one cast to the target dtype), not inference noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lightning_lora.export.tokens import resize_vocab

__all__ = ["TOLERANCE", "default_probes", "verify_directory", "verify_export"]

# Allowed max |merged - adapter| logit difference, relative to max(1, max |logit|), per export dtype.
# bf16 keeps 8 significand bits: one rounding of every merged weight moves logits by about 1e-2
# of their scale on deep models; fp16 keeps 11.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROBE_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Human: What is the capital of France?\n\nAssistant: ",
    "def fibonacci(n):",
    "The quick brown fox",
)
GENERATE_TOKENS = 32


def default_probes(tokenizer: Any | None, vocab_size: int) -> list[list[int]]:
    """Fixed prompts through the tokenizer, or fixed pseudo-random ids without one."""
    if tokenizer is not None:
        return [tokenizer(p)["input_ids"] for p in PROBE_PROMPTS]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (len(PROBE_PROMPTS), 16), generator=generator).tolist()


def _pad(probes: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so that generation continues every probe from its last real token."""
    length = max(len(p) for p in probes)
    ids = torch.full((len(probes), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, probe in enumerate(probes):
        ids[i, length - len(probe):] = torch.tensor(probe)
        mask[i, length - len(probe):] = 1
    return ids, mask


@torch.no_grad()
def verify_export(
    merged_dir: Path, adapter_dir: Path, base_model: str | Path, dtype: torch.dtype, probes: list[list[int]] | None = None
) -> dict[str, Any]:
    """Compare logits and 32-token greedy generations of the merged and the adapter model.

    Returns a report with ``max_abs_logit_diff``, ``tolerance``, ``token_agreement`` (fraction of
    generated tokens that agree) and ``passed``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    resize_vocab(base, merged.get_input_embeddings().weight.shape[0])  # a run that added tokens
    adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    if probes is None:
        tokenizer = AutoTokenizer.from_pretrained(merged_dir) if (merged_dir / "tokenizer_config.json").exists() else None
        probes = default_probes(tokenizer, merged.config.vocab_size)
    pad_id = merged.generation_config.pad_token_id
    if pad_id is None:
        pad_id = merged.generation_config.eos_token_id
    pad_id = (pad_id[0] if isinstance(pad_id, list) else pad_id) or 0
    input_ids, attention_mask = _pad(probes, pad_id)

    merged_logits = merged(input_ids=input_ids, attention_mask=attention_mask).logits
    adapter_logits = adapter(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    diff = (merged_logits - adapter_logits)[real].abs().max().item()
    scale = max(1.0, adapter_logits[real].abs().max().item())
    tolerance = TOLERANCE[dtype] * scale

    generate = dict(
        attention_mask=attention_mask, max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS,
        do_sample=False, pad_token_id=pad_id,
    )
    merged_tokens = merged.generate(input_ids=input_ids, **generate)[:, input_ids.shape[1]:]
    adapter_tokens = adapter.generate(input_ids=input_ids, **generate)[:, input_ids.shape[1]:]
    agreement = (merged_tokens == adapter_tokens).float().mean().item()
    return {
        "probes": len(probes),
        "compute_dtype": "float32",
        "max_abs_logit_diff": diff,
        "logit_scale": scale,
        "tolerance": tolerance,
        "generated_tokens": int(merged_tokens.numel()),
        "token_agreement": agreement,
        "passed": diff <= tolerance,
    }


def verify_directory(export_dir: Path, base_model: str | Path | None = None) -> dict[str, Any]:
    """Re-check a finished export against its ``export.json``.

    Checks that every recorded file is there with its size and sha256, that no unrecorded file
    was added, and that the merged weights have the shapes the merged ``config.json`` implies.
    With ``base_model``, also compares merged and adapter logits as after the export.

    Returns:
        A report; ``problems`` lists what failed (empty when the export is intact).
    """
    from lightning_lora.export.hf import file_manifest

    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"DIR={str(export_dir)!r} holds no export.json: not an export directory")
    manifest = json.loads(manifest_path.read_text())
    recorded, actual = manifest["files"], file_manifest(export_dir)
    actual.pop("export.json", None)
    problems = [f"missing file {name}" for name in sorted(set(recorded) - set(actual))]
    problems += [f"unrecorded file {name}" for name in sorted(set(actual) - set(recorded))]
    for name in sorted(set(recorded) & set(actual)):
        if recorded[name] != actual[name]:
            problems.append(f"{name} differs from export.json (size {actual[name]['size']} vs {recorded[name]['size']}, sha256)")
    merged_dir = export_dir / "merged"
    if (merged_dir / "config.json").is_file() and not problems:
        problems += _shape_problems(merged_dir)
    report: dict[str, Any] = {"files_checked": len(recorded), "problems": problems}
    if base_model is not None and not problems and (export_dir / "adapter").is_dir() and merged_dir.is_dir():
        from lightning_lora.tiny import resolve_model_path

        dtype = getattr(torch, manifest["dtype"])
        report["logits"] = verify_export(merged_dir, export_dir / "adapter", resolve_model_path(str(base_model)), dtype)
        if not report["logits"]["passed"]:
            problems.append(
                f"merged and adapter logits differ by {report['logits']['max_abs_logit_diff']:.3g} "
                f"(tolerance {report['logits']['tolerance']:.3g})"
            )
    return report


def _shape_problems(merged_dir: Path) -> list[str]:
    """Tensors whose shape in the safetensors files is not what the merged config implies."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(merged_dir)).state_dict()
    problems = []
    for file in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key not in expected:
                    problems.append(f"{file.name} holds {key!r}, which the merged config has no place for")
                elif tuple(expected[key].shape) != shape:
                    problems.append(f"{key!r} has shape {shape} in {file.name}, the config implies {tuple(expected[key].shape)}")
    return problems
