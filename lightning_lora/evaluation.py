"""Score a fine-tuned model on held-out instruction data: loss, perplexity and token accuracy over the
response tokens, masked exactly as training's validation masks them, plus exact match of greedy
answers for data with short answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_lora.dtypes import IGNORE_INDEX
from lightning_lora.inference import (
    _adapter_context,
    _batches,
    _check_template,
    _generate_ids,
    _generation_config,
    _prompt_ids,
)

__all__ = ["SHORT_ANSWER_TOKENS", "evaluate"]

# Exact match is on by default when every reference answer is at most this many tokens: a short
# answer (a number, a word) is either right or wrong, a long one is better judged by its loss.
SHORT_ANSWER_TOKENS = 32
# Room beyond the longest reference answer for its EOS and for tokenising the answer differently.
_ANSWER_SLACK_TOKENS = 8


def _encode_data(data: str | Path, fmt: str, template: str, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Examples (tokens and labels exactly as in training), their prompts and reference answers."""
    from lightning_lora.data import (
        _FORMATS,
        _REQUIRED_FIELDS,
        detect_format,
        encode_example,
        read_records,
        split_prompt_response,
    )

    _check_template(template, tokenizer)
    if fmt not in _FORMATS:
        raise ValueError(f"--format={fmt!r} is not one of {list(_FORMATS)}")
    if max_length < 1:
        raise ValueError(f"--max-length={max_length!r} must be >= 1")
    rows = read_records(data, key="--data")
    if not rows:
        raise ValueError(f"--data={str(data)!r} holds no rows")
    fmt = detect_format(rows[0]) if fmt == "auto" else fmt
    encoded: dict[str, Any] = {"format": fmt, "examples": [], "prompts": [], "answers": [], "truncated": 0, "skipped": 0}
    for index, row in enumerate(rows):
        missing = [field for field in _REQUIRED_FIELDS[fmt] if row.get(field) is None]
        if missing:
            raise ValueError(f"row {index} of --data={str(data)!r} lacks field {missing[0]!r} needed by --format={fmt!r}")
        try:
            prompt, answer = split_prompt_response(row, fmt, template, tokenizer)
        except ValueError as err:
            raise ValueError(f"row {index} of --data={str(data)!r}: {err}") from None
        example, truncated = encode_example(prompt, answer, tokenizer, max_length, train_on_prompt=False)
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            encoded["skipped"] += 1  # the prompt alone fills max_length: nothing to score
            continue
        encoded["truncated"] += truncated
        encoded["examples"].append(example)
        encoded["prompts"].append(prompt)
        encoded["answers"].append(answer)
    if not encoded["examples"]:
        raise ValueError(f"no row of --data={str(data)!r} keeps a response token within --max-length={max_length}")
    return encoded


def _score(model: Any, examples: Sequence[dict[str, list[int]]], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Mean per-token loss and next-token accuracy over response tokens, as the module's validation."""
    from torchmetrics import MeanMetric

    from lightning_lora.data import collate

    device = next(model.parameters()).device
    loss_metric, accuracy_metric, tokens = MeanMetric().to(device), MeanMetric().to(device), 0
    for chunk in _batches(examples, batch_size):
        batch = {key: value.to(device) for key, value in collate(chunk, pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logits, targets = logits[:, :-1][mask].float(), labels[mask]
        loss_metric.update(F.cross_entropy(logits, targets, reduction="none"))
        accuracy_metric.update((logits.argmax(dim=-1) == targets).float())
        tokens += int(mask.sum())
    loss = float(loss_metric.compute())
    return {"tokens": tokens, "loss": loss, "perplexity": math.exp(loss), "token_accuracy": float(accuracy_metric.compute())}


@torch.inference_mode()
def evaluate(
    model: Any,
    tokenizer: Any,
    data: str | Path,
    *,
    format: str = "auto",
    template: str = "alpaca",
    max_length: int = 512,
    batch_size: int = 8,
    exact_match: bool | None = None,
    max_new_tokens: int | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Score ``data`` as training's validation does, and optionally check greedy answers.

    Loss (mean cross entropy per response token), perplexity (its exp) and token accuracy (greedy
    next-token hits) count the response tokens and the EOS after each, never prompt tokens, exactly
    as training masks them. ``exact_match`` greedily generates each answer and compares it, stripped,
    with the stripped reference; ``None`` turns it on when every reference answer is at most
    ``SHORT_ANSWER_TOKENS`` tokens long (and the rows have prompts). ``max_new_tokens`` defaults to
    the longest reference answer plus 8 tokens. ``adapter`` picks one of the loaded adapters.
    """
    started = time.perf_counter()
    encoded = _encode_data(data, format, template, tokenizer, max_length)
    answer_lengths = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in encoded["answers"]]
    if exact_match is None:
        exact_match = encoded["format"] != "text" and max(answer_lengths) <= SHORT_ANSWER_TOKENS
    elif exact_match and encoded["format"] == "text":
        raise ValueError(f"--exact-match needs prompt/answer rows (alpaca or messages); --data={str(data)!r} holds text rows")
    result: dict[str, Any] = {"examples": len(encoded["examples"])}
    with _adapter_context(model, adapter, disable_adapters=False):
        result.update(_score(model, encoded["examples"], tokenizer.pad_token_id, batch_size))
        result.update(exact_match=None, format=encoded["format"], template=template, skipped=encoded["skipped"],
                      truncated=encoded["truncated"], max_new_tokens=None)
        if exact_match:
            new_tokens = max(answer_lengths) + _ANSWER_SLACK_TOKENS if max_new_tokens is None else max_new_tokens
            config = _generation_config(model, tokenizer, new_tokens, False, 1.0, 1.0)
            prompts = [_prompt_ids(prompt, tokenizer) for prompt in encoded["prompts"]]
            outputs = _generate_ids(model, tokenizer, prompts, config, batch_size)
            hits = [out.strip() == answer.strip() for out, answer in zip(outputs, encoded["answers"])]
            result.update(exact_match=sum(hits) / len(hits), max_new_tokens=new_tokens)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
