"""Write exports in the ecosystem's formats, atomically: a temporary sibling, then one rename.

Layout of an export directory::

    OUTPUT/
      adapter/      adapter_config.json, adapter_model.safetensors (PEFT's layout)
      merged/       config.json, generation_config.json, model*.safetensors (+ index), tokenizer files
      export.json   what was exported from what, file hashes, the verification result
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["file_manifest", "package_versions", "publish_atomically", "save_adapter", "save_merged", "write_json"]


@contextmanager
def publish_atomically(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; rename it to ``output`` on success.

    On any exception the temporary directory is removed and ``output`` is untouched. An existing
    ``output`` is replaced only with ``overwrite=True``, and only once the new one is complete.
    """
    output = output.resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output={str(output)!r} exists already; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            # Move the old export aside first so that a crash between the two renames leaves it intact.
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(peft_model: Any, directory: Path) -> None:
    """PEFT's own adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    peft_model.save_pretrained(directory, safe_serialization=True)
    # PEFT also writes a placeholder model card ("More Information Needed"); it describes nothing.
    (directory / "README.md").unlink(missing_ok=True)


def save_merged(model: Any, directory: Path, max_shard_size: str, tokenizer_source: str | Path | None) -> None:
    """``save_pretrained`` with safetensors shards, plus the tokenizer and the generation config."""
    from transformers import AutoTokenizer

    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer_source is not None:
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(directory)


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
