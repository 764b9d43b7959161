"""Normalise checkpoint key names to the names of a PEFT model's own ``state_dict``.

A LightningModule that holds ``self.net = get_peft_model(...)`` saves keys such as::

    net.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight

possibly behind a legacy wrapper prefix (``module.`` up to Lightning 1.7, ``_forward_module.`` in
1.8 - 2.0). The PEFT model itself calls the same tensor
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. Everything here maps
the former to the latter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

__all__ = ["PEFT_ROOT", "adapter_names", "detect_prefix", "normalize_keys", "select_adapter"]

PEFT_ROOT = "base_model.model."
_LEGACY_WRAPPERS = ("_forward_module.", "module.")
T = TypeVar("T")


def _strip_legacy(key: str) -> str:
    for wrapper in _LEGACY_WRAPPERS:
        if key.startswith(wrapper):
            return key[len(wrapper):]
    return key


def _peft_root(key: str) -> int:
    """Where the PEFT model starts in ``key``: the last ``base_model.model.`` that begins a path
    component (an attribute path may itself contain it; HF module names never do), or -1."""
    end = len(key)
    while (index := key.rfind(PEFT_ROOT, 0, end)) > 0 and key[index - 1] != ".":
        end = index + len(PEFT_ROOT) - 1
    return index


def _found_prefixes(keys: Iterable[str]) -> dict[str, str]:
    prefixes: dict[str, str] = {}
    for key in keys:
        key = _strip_legacy(key)
        index = _peft_root(key)
        if index >= 0:
            prefixes.setdefault(key[:index], key)
    return prefixes


def detect_prefix(keys: Iterable[str]) -> str:
    """The LightningModule attribute path in front of ``base_model.model.`` (e.g. ``"model."``).

    Raises:
        ValueError: no key holds a PEFT model, or several attributes do (then ``--prefix`` decides).
    """
    prefixes = _found_prefixes(keys)
    if not prefixes:
        raise ValueError(
            f"no checkpoint key contains {PEFT_ROOT!r}: the checkpoint does not hold a PEFT model "
            "(is it a LoRA training checkpoint?)"
        )
    if len(prefixes) > 1:
        found = ", ".join(repr(p) for p in sorted(prefixes))
        raise ValueError(f"the checkpoint holds several PEFT models under prefixes {found}; choose one with --prefix")
    return next(iter(prefixes))


def normalize_keys(state: Mapping[str, T], prefix: str | None = None) -> dict[str, T]:
    """Rename checkpoint keys to the PEFT model's names, dropping keys outside the PEFT model.

    Args:
        state: checkpoint tensors (or anything else) by key.
        prefix: the attribute path in front of ``base_model.model.`` (``"model."`` for
            ``self.model``); detected when ``None``. ``""`` means the keys start at the PEFT model.
    """
    if prefix is None:
        prefix = detect_prefix(state)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    normalized = {}
    for key, value in state.items():
        # The key as it is first: an attribute may be called ``module`` like the legacy wrapper.
        for candidate in dict.fromkeys((key, _strip_legacy(key))):
            if candidate.startswith(prefix) and candidate[len(prefix):].startswith(PEFT_ROOT):
                normalized[candidate[len(prefix):]] = value
                break
    if not normalized:
        found = ", ".join(repr(p) for p in sorted(_found_prefixes(state))) or "none"
        raise ValueError(
            f"--prefix={prefix!r} matches no checkpoint key followed by {PEFT_ROOT!r}; "
            f"prefixes of PEFT models in the checkpoint: {found}"
        )
    return normalized


# The path components after which PEFT names the adapter: ``...q_proj.lora_A.<adapter>.weight``,
# ``...lm_head.modules_to_save.<adapter>.weight``, ``...token_adapter.trainable_tokens_delta.<adapter>``.
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "modules_to_save", "trainable_tokens_delta", "trainable_tokens_original")
_ADAPTER_KEY = re.compile(rf"(?:^|\.)({'|'.join(_ADAPTER_PARTS)})\.([^.]+)(?=\.|$)")


def adapter_names(keys: Iterable[str]) -> list[str]:
    """The PEFT adapter names the keys belong to (``["default"]`` for a usual run)."""
    return sorted({match.group(2) for key in keys if (match := _ADAPTER_KEY.search(key))})


def select_adapter(state: Mapping[str, T], name: str | None = None, strict: bool = True) -> tuple[str, dict[str, T]]:
    """Keep one adapter's tensors, renamed to PEFT's ``default``, and every non-adapter tensor.

    Args:
        state: tensors (or anything) by PEFT-model key.
        name: the adapter to keep; ``None`` takes the only one there is.
        strict: ``name`` must be among the adapters of ``state`` (off for frozen tensors, which may
            hold only other adapters').

    Returns:
        The adapter's name and the renamed mapping.

    Raises:
        ValueError: several adapters and no ``name``, or ``name`` is not among them.
    """
    found = adapter_names(state)
    if name is None:
        if len(found) > 1:
            raise ValueError(f"the checkpoint holds the adapters {found}; choose one with --adapter-name")
        name = found[0] if found else "default"
    elif strict and found and name not in found:
        raise ValueError(f"--adapter-name={name!r} is not an adapter of the checkpoint; it holds {found}")
    kept: dict[str, T] = {}
    for key, value in state.items():
        match = _ADAPTER_KEY.search(key)
        if match is None:
            kept[key] = value
        elif match.group(2) == name:
            kept[key[: match.start(2)] + "default" + key[match.end(2):]] = value
    return name, kept
