"""No input runs code unless the user asks for it by name.

Two ways a model directory or adapter from someone else could run code when we load it:

- **Custom code.** ``auto_map`` in ``config.json`` / ``tokenizer_config.json`` maps an auto class to
  a Python file of the directory, which ``from_pretrained(..., trust_remote_code=True)`` imports.
  :func:`check_remote_code` refuses such a directory in one line, before anything large is read,
  unless the user passed ``--trust-remote-code`` (``HFExport(trust_remote_code=True)``); every
  ``from_pretrained`` of the export passes the answer on (:func:`remote_code`), ``False`` by
  default, so transformers itself never runs the directory's code either.
- **Pickles.** Weights from safetensors, or from ``.bin`` only through ``weights_only=True`` on a
  torch whose restricted unpickler cannot run code (>= 2.6, CVE-2025-32434):
  :func:`check_pickled_weights`.

The user's answer is set once where an export or a verification starts (:func:`trusting`) and
read by each loader: a context variable, so that it needs no threading through every function
between them, and a thread or process that did not set it gets the safe default.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from lightning_lora.errors import ExportError

__all__ = ["TRUST_FLAG", "check_pickled_weights", "check_remote_code", "copy_code_files", "custom_code",
           "custom_code_in", "pickle_loading_is_safe", "remote_code", "trusting"]

log = logging.getLogger("lightning_lora")

TRUST_FLAG = "--trust-remote-code"
_TRUSTED: ContextVar[bool] = ContextVar("lightning_lora_trust_remote_code", default=False)
_CONFIG_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json")


@contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Within the block, loaders run a directory's custom code only if ``trust`` is true."""
    token = _TRUSTED.set(bool(trust))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def remote_code() -> dict[str, bool]:
    """The ``trust_remote_code`` argument of a ``from_pretrained``: always explicit, false unless asked."""
    return {"trust_remote_code": _TRUSTED.get()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: its own loader reports that


def custom_code_in(file_name: str, data: Any) -> str | None:
    """What ``file_name`` (its JSON content ``data``) maps to code of its own, in words, or ``None``.

    Any ``auto_map`` counts, even beside a model type transformers has built in (which it would then
    use with ``trust_remote_code=False``): the directory was written to run that code, and whether
    it may is the user's decision, not a guess of ours about which classes transformers will pick.
    """
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not auto_map:
        return None
    text = json.dumps(auto_map)
    return f"{file_name} auto_map: {text if len(text) <= 200 else text[:197] + '...'}"


def custom_code(directory: str | Path) -> str | None:
    """What in ``directory`` maps to code of its own that loading it would run, in words, or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for file_name in _CONFIG_FILES:
        found = custom_code_in(file_name, _read_json(directory / file_name))
        if found is not None:
            return found
    return None


def check_remote_code(directory: str | Path, argument: str, trust: bool | None = None, flag: str = TRUST_FLAG) -> None:
    """Refuse, in one line naming ``argument`` and the directory, a directory whose loading would run
    its own code, unless ``trust`` (by default the answer :func:`trusting` set) allows it; the error
    names ``flag``, the setting that allows it."""
    found = custom_code(directory)
    if found is None:
        return
    if _TRUSTED.get() if trust is None else trust:
        log.warning("%s=%r maps to custom code (%s): running it, as %s asks", argument, str(directory), found, flag)
        return
    raise ExportError(f"{argument}={str(directory)!r} maps to custom code ({found}): pass {flag} to run it")


def copy_code_files(source: Path, target: Path) -> list[str]:
    """Copy the Python files ``source/config.json``'s ``auto_map`` names (and the files they import
    relatively) into ``target``, as ``save_pretrained`` ships a custom model's code beside it;
    returns their names. Only when trusted: then transformers runs that code even for a model type
    it has built in, and the merged model's config maps to it."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from lightning_lora.export.paths import inside

    config = _read_json(source / "config.json")
    if not _TRUSTED.get() or not isinstance(config, dict) or not isinstance(config.get("auto_map"), dict):
        return []
    what = f"{str(source / 'config.json')!r} auto_map"
    files: set[str] = set()
    for value in config["auto_map"].values():
        for reference in value if isinstance(value, list) else [value]:
            if not isinstance(reference, str) or "--" in reference or "." not in reference:
                continue  # "repo--module.Class" is another repository's code, not shipped here
            module = inside(source, reference.rsplit(".", 1)[0].replace(".", "/") + ".py", what)
            if module.is_file():
                files |= {str(module), *get_relative_import_files(str(module))}
    names = sorted({os.path.relpath(file, source) for file in files})
    for name in names:
        inside(source, name, what)  # a relative import may climb out of the directory
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    return names


def pickle_loading_is_safe(version: str | None = None) -> bool:
    """Whether ``torch.load(..., weights_only=True)`` cannot run code on torch ``version`` (this
    torch by default): before 2.6 its restricted unpickler could (CVE-2025-32434)."""
    import torch
    from packaging.version import Version

    text = str(torch.__version__ if version is None else version)
    return Version(text.split("+")[0]) >= Version("2.6")


def check_pickled_weights(file: Path, argument: str) -> None:
    """Refuse, in one line, to unpickle the weights ``file`` where this torch cannot do it safely."""
    import torch

    if not pickle_loading_is_safe():
        raise ExportError(
            f"{argument}={str(file.parent)!r} holds its weights as {file.name} (a pickle), which torch "
            f"{torch.__version__} cannot load without risking running code in it (CVE-2025-32434): convert it to "
            "safetensors or use torch >= 2.6"
        )
