"""The probe inputs of the function check: never empty, never fewer than a fixed minimum.

Every probe is exactly :data:`PROBE_TOKENS` long (no padding, so no attention mask can hide a
difference), and there are at least :data:`MIN_PROBES` of them. Each starts with text (the
validation sequences of the run when the callback has them, fixed prompts otherwise) and is
filled up with token ids drawn from the whole vocabulary, every added token among them: a
tokenizer that turns the prompts into few or no tokens still gets full probes, and the rows of
new tokens are exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_lora.export.trust import remote_code

__all__ = ["MIN_PROBES", "PROBE_TOKENS", "build_probes", "probes_for"]

MIN_PROBES = 4
PROBE_TOKENS = 64
_TEXT_TOKENS = PROBE_TOKENS // 2
PROBE_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Human: What is the capital of France?\n\nAssistant: ",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "The quick brown fox jumps over the lazy dog.",
)


def build_probes(vocab_size: int, tokenizer: Any | None = None, texts: list[list[int]] | None = None,
                 special_ids: list[int] | None = None) -> torch.Tensor:
    """``(probes, PROBE_TOKENS)`` token ids.

    Args:
        vocab_size: rows of the merged model's embeddings; ids are drawn below it.
        tokenizer: tokenizes the fixed prompts (left out: the probes are ids only).
        texts: token id sequences to start the probes with instead (e.g. validation data).
        special_ids: ids that must appear (added tokens); spread over the probes' random parts.
    """
    starts = [list(t)[:_TEXT_TOKENS] for t in (texts or []) if len(t)]
    if tokenizer is not None:
        for prompt in PROBE_PROMPTS[len(starts):]:
            starts.append(list(tokenizer(prompt)["input_ids"])[:_TEXT_TOKENS])
    count = max(MIN_PROBES, len(starts))
    starts += [[] for _ in range(count - len(starts))]
    generator = torch.Generator().manual_seed(0)
    probes = torch.randint(0, vocab_size, (count, PROBE_TOKENS), generator=generator)
    for row, start in enumerate(starts):
        start = [i for i in start if 0 <= i < vocab_size]
        probes[row, : len(start)] = torch.tensor(start, dtype=torch.long)
    # Every special id once, at spread-out positions of the random parts.
    slots = [(row, col) for col in range(_TEXT_TOKENS, PROBE_TOKENS) for row in range(count)]
    wanted = sorted({i for i in (special_ids or []) if 0 <= i < vocab_size})
    for (row, col), token in zip(slots[:: max(1, len(slots) // max(1, len(wanted)))], wanted):
        probes[row, col] = token
    return probes


def probes_for(merged_dir: Path, vocab_size: int, base_vocab: int | None, texts: list[list[int]] | None = None) -> torch.Tensor:
    """The probes of an export: the merged model's own tokenizer on the fixed prompts (or
    ``texts``), every added token, and every row the run added to the base's vocabulary."""
    from transformers import AutoTokenizer

    shipped = (merged_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, **remote_code()) if shipped else None
    added = [] if tokenizer is None else sorted(tokenizer.added_tokens_decoder)
    new_rows = range(base_vocab, vocab_size) if base_vocab else range(0)
    return build_probes(vocab_size, tokenizer, texts, special_ids=[*added, *new_rows])
