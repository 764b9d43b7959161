"""Write exports in the ecosystem's formats, atomically: a temporary sibling, then one rename.

Layout of an export directory::

    OUTPUT/
      adapter/      adapter_config.json, adapter_model.safetensors (PEFT's layout)
      merged/       config.json, generation_config.json, model*.safetensors (+ index), tokenizer files
      export.json   what was exported from what, file hashes, the verification result
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lightning_lora.export.merge import ExportError

log = logging.getLogger("lightning_lora")

__all__ = [
    "check_free_space",
    "file_manifest",
    "keep_failed",
    "package_versions",
    "publish_atomically",
    "recover_interrupted",
    "save_adapter",
    "save_merged",
    "save_tokenizer",
    "write_json",
]


@contextmanager
def publish_atomically(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; rename it to ``output`` on success.

    On any exception the temporary directory is removed and ``output`` is untouched. An existing
    ``output`` is replaced only with ``overwrite=True``, and only once the new one is complete.
    A process killed at any moment leaves either nothing or the previous export under ``output``
    (see :func:`recover_interrupted`, which the next run calls).
    """
    output = output.resolve()
    recover_interrupted(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output={str(output)!r} exists already; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        try:
            yield tmp
        except (OSError, SafetensorError) as err:  # a full disk, a file size limit, a vanished directory...
            raise ExportError(
                f"writing the export for --output={str(output)!r} failed: {err}; nothing was published "
                "and the temporary directory was removed"
            ) from err
        if output.exists():
            # Move the old export aside first: a crash between the two renames leaves it whole,
            # and recover_interrupted puts it back.
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted(output: Path) -> list[str]:
    """Clean up after an export that was killed: returns what was done, one line each.

    - a temporary ``.NAME.tmp-PID-*`` of a process that no longer runs is removed;
    - a previous export moved aside as ``.NAME.old-PID`` goes back under ``NAME`` if the new one
      never arrived, and is removed if it did.
    """
    done = []
    if not output.parent.is_dir():
        return done
    for path in sorted(output.parent.glob(f".{output.name}.old-*")):
        if output.exists():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by an interrupted replace that had finished")
        else:
            path.rename(output)
            done.append(f"restored the previous export from {path.name} (a replace was interrupted)")
    for path in sorted(output.parent.glob(f".{output.name}.tmp-*")):
        pid = path.name.removeprefix(f".{output.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another export into the same place is running now
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted export")
    for line in done:
        log.warning("%s: %s", output, line)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from an earlier, finished attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free_space(output: Path, needed: int) -> None:
    """Fail early, with the numbers, when the filesystem of ``output`` cannot hold ``needed`` bytes."""
    place = output.resolve()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed:
        raise ExportError(
            f"--output={str(output)!r}: the export needs about {_human(needed)} but only "
            f"{_human(free)} are free on that filesystem"
        )


def _human(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"


def keep_failed(tmp: Path, output: Path) -> Path:
    """Move a finished but failed export aside as ``NAME.failed`` (replacing an older one)."""
    failed = output.with_name(f"{output.name}.failed")
    if failed.exists():
        shutil.rmtree(failed)
    tmp.rename(failed)
    return failed


def save_adapter(model: Any, trained: dict[str, torch.Tensor], directory: Path) -> None:
    """PEFT's own adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Written from the trained tensors (fp32) with PEFT's own key naming, so the same function
    serves a real PEFT model and one on the meta device.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_peft_model_state_dict(
        model,
        state_dict={k: v.float() for k, v in trained.items() if k in trainable},
        save_embedding_layers=False,  # trained rows travel as trainable tokens, a trained matrix as modules_to_save
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(directory)


def save_merged(model: Any, directory: Path, max_shard_size: str) -> None:
    """``save_pretrained`` with safetensors shards (config and generation config included)."""
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)


def save_tokenizer(source: str | Path, directory: Path) -> None:
    """The tokenizer files of ``source``, as ``save_pretrained`` writes them."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(directory)


def file_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root``, by path relative to it."""
    manifest = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        manifest[path.relative_to(root).as_posix()] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
    return manifest


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape an export, for ``export.json``."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("lightning-lora", "torch", "transformers", "peft", "safetensors", "lightning", "deepspeed"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
