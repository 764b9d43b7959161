"""Vocabulary and tokenizer consistency between training and export.

- :func:`resize_vocab` grows the embeddings the same way in training and in the export, so that
  rows no adapter tensor covers (e.g. an untrained ``lm_head`` row of a new token) are equal on
  both sides: transformers' default resize draws new rows at random.
- :func:`tokenizer_files` / :func:`write_tokenizer_files` carry the tokenizer a run trained with
  (added tokens, chat template, pad token) inside its checkpoint to the export.
- :func:`reconcile_special_ids` makes ``config.json``, ``generation_config.json`` and the
  tokenizer agree on EOS, BOS and padding, so that a server stops where the model learned to.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.trust import remote_code

__all__ = [
    "TOKENIZER_FILES",
    "add_tokens",
    "check_tokenizer_files",
    "embedding_names",
    "mean_rows",
    "reconcile_special_ids",
    "resize_vocab",
    "tokenizer_files",
    "write_tokenizer_files",
]

# What tokenizers' save_pretrained writes (transformers 5; the vocabulary files of every tokenizer
# class): all a recorded tokenizer may hold. Never a path, never a model's own file (config.json,
# weights, an index, export.json), which a checkpoint could otherwise overwrite in the export.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "bpe.codes", "dict.txt",
    "normalizer.json", "tekken.json",
})

log = logging.getLogger("lightning_lora")


def embedding_names(model: torch.nn.Module) -> tuple[str, str | None]:
    """Leaf names of the input and output embeddings (``embed_tokens``, ``lm_head``; ``wte``...)."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    output = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], names[id(output)] if output is not None else None


@torch.no_grad()
def resize_vocab(model: Any, vocab_size: int) -> None:
    """Grow the embeddings (and an untied head) of a Hugging Face model to ``vocab_size`` rows.

    New rows are the mean of the old ones: deterministic, and a neutral start for a new token.
    Works on the meta device (shapes only). Under DeepSpeed ZeRO-3 the caller must hold the
    embeddings gathered.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size == old:
        return
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size} rows")
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        if weight.device.type != "meta":
            weight[old:] = mean_rows(weight[:old], vocab_size)[old:]


def mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` grown to ``rows`` rows, each new one the mean of the old ones (in fp32, stored in
    ``weight``'s dtype): the one definition of a new token's starting embedding, for training, both
    merges and the verification."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, *weight.shape[1:])])


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The files ``tokenizer.save_pretrained`` writes, by name: a tokenizer as checkpoint data
    (only :data:`TOKENIZER_FILES`, which is all an export will write back)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        paths = sorted(path for path in Path(tmp).iterdir() if path.is_file())
        left_out = [path.name for path in paths if path.name not in TOKENIZER_FILES]
        if left_out:
            log.warning("the checkpoint records the tokenizer without %s: not files an export writes", left_out)
        return {path.name: path.read_text(encoding="utf-8") for path in paths if path.name in TOKENIZER_FILES}


def check_tokenizer_files(files: Any, source: str) -> None:
    """Refuse, in one line, a recorded tokenizer (``{file name: text}``) that is not only tokenizer
    files: a checkpoint whose record would write ``config.json``, weights or a path outside the
    export is not a tokenizer, whoever made it. Nor may it map to custom code unless trusted."""
    from lightning_lora.export.recorded import CHECKPOINT_KEY
    from lightning_lora.export.trust import TRUST_FLAG, custom_code_in

    where = f"--checkpoint={source!r} records under {CHECKPOINT_KEY!r} -> 'tokenizer'"
    if not isinstance(files, dict):
        raise ExportError(f"{where} a {type(files).__name__}, not a mapping of tokenizer file names to their text")
    for name, text in files.items():
        if name not in TOKENIZER_FILES:
            raise ExportError(f"{where} a file named {name!r}, which is not a tokenizer file (one of "
                              f"{sorted(TOKENIZER_FILES)}): refusing to write it into the export")
        if not isinstance(text, str):
            raise ExportError(f"{where} {name!r} as a {type(text).__name__}, not as text")
    try:
        config = json.loads(files.get("tokenizer_config.json") or "{}")
    except ValueError as err:
        raise ExportError(f"{where} a tokenizer_config.json that is not valid JSON: {err}") from err
    found = custom_code_in("tokenizer_config.json", config)
    if found is not None and not remote_code()["trust_remote_code"]:
        raise ExportError(f"{where} a tokenizer that maps to custom code ({found}): pass {TRUST_FLAG} to run it")


def write_tokenizer_files(files: dict[str, str], directory: Path) -> None:
    """Write a recorded tokenizer into ``directory``: tokenizer file names only, never a path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if name not in TOKENIZER_FILES:  # check_tokenizer_files refused it when the checkpoint was read
            raise ExportError(f"{name!r} is not a tokenizer file name; refusing to write it into {str(directory)!r}")
        (directory / name).write_text(text, encoding="utf-8")


def reconcile_special_ids(merged_dir: Path) -> list[str]:
    """Make ``config.json`` and ``generation_config.json`` agree with the tokenizer in ``merged_dir``.

    The tokenizer is the one the run trained with, so its EOS is the token every response was
    trained to end with: generation must stop on it (other EOS ids the base listed are kept), and
    BOS and padding are the tokenizer's. Returns what was changed, one line each.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir, **remote_code())
    vocab_size = json.loads((merged_dir / "config.json").read_text()).get("vocab_size")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the merged model embeds only {vocab_size}: "
            "the run added tokens the checkpoint does not record, or --tokenizer is not the one it trained with"
        )
    wanted = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    changes = []
    for file in ("config.json", "generation_config.json"):
        path = merged_dir / file
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key, value in wanted.items():
            if value is None:
                continue
            current = data.get(key)
            if key == "eos_token_id" and isinstance(current, list):
                if value in current:
                    continue
                new = [value, *current]
            elif current == value:
                continue
            else:
                new = value
            data[key] = new
            changes.append(f"{file}: {key} {current!r} -> {new!r} (the tokenizer's)")
        if any(change.startswith(f"{file}:") for change in changes):
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return changes


def add_tokens(tokenizer: Any, tokens: list[str], key: str) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as whole, never-split tokens; returns their ids.

    Training and data loading both call this with the same list, so the ids agree. ``key`` is the
    setting that named the tokens, for errors.
    """
    bad = [token for token in tokens if not isinstance(token, str) or not token.strip()]
    if bad or len(set(tokens)) != len(tokens):
        raise ValueError(f"{key}={tokens!r} must be distinct, non-blank strings")
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer.convert_tokens_to_ids(tokens)
