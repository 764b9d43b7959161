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
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lightning_lora.errors import ExportError
from lightning_lora.export.trust import remote_code

log = logging.getLogger("lightning_lora")

__all__ = [
    "MANIFEST_FORMAT",
    "check_free_space",
    "check_inputs_apart",
    "check_output",
    "file_manifest",
    "keep_failed",
    "package_versions",
    "publish_atomically",
    "recover_interrupted",
    "save_tokenizer",
    "write_json",
]


MANIFEST_FORMAT = 2


def _export_manifest(directory: Path) -> dict[str, Any] | None:
    """The ``export.json`` of ``directory`` if it is one of ours (a manifest with its file list)."""
    try:
        manifest = json.loads((directory / "export.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and "inputs_fingerprint" in manifest:
        return manifest
    return None


def _foreign_files(directory: Path) -> list[str]:
    """Files under ``directory`` that are not part of the export its ``export.json`` describes
    (everything, when it has none): what replacing it would destroy."""
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    manifest = _export_manifest(directory)
    recorded = set(manifest["files"]) | {"export.json"} if manifest is not None else set()
    return [name for name in files if name not in recorded]


def check_output(output: Path, overwrite: bool, argument: str = "--output") -> None:
    """Refuse an output that is not ours to write: a file, a directory holding anything but one of
    our exports, or (without ``overwrite``) an existing export. An empty directory is taken as none."""
    if output.is_symlink() and not output.exists():
        raise ExportError(f"{argument}={str(output)!r} is a dangling symbolic link; choose another directory")
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"{argument}={str(output)!r} is a file, not an export directory; choose another path")
    foreign = _foreign_files(output)
    if foreign:
        raise ExportError(
            f"{argument}={str(output)!r} holds files that are not part of an export of this tool (e.g. {foreign[:3]}); "
            "it is never replaced, even with --overwrite: choose another directory"
        )
    if any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{argument}={str(output)!r} exists already; pass --overwrite to replace it")


def check_inputs_apart(output: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is, lies inside, or contains any input (checkpoint, base model, ...)."""
    target = output.resolve()
    for argument, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if target == source or source in target.parents:
            raise ExportError(f"--output={str(output)!r} lies inside {argument}={str(value)!r}; choose another directory")
        if target in source.parents:
            raise ExportError(f"--output={str(output)!r} contains {argument}={str(value)!r}; choose another directory")


@contextmanager
def publish_atomically(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; rename it to ``output`` on success.

    On any exception the temporary directory is removed and ``output`` is untouched. An existing
    ``output`` is replaced only with ``overwrite=True``, only if it is an export of ours and
    holds nothing else (checked again right before the replace), and only once the new one is
    complete. A process killed at any moment leaves either nothing or the previous export under
    ``output`` (see :func:`recover_interrupted`, which the next run calls).
    """
    output = output.resolve()
    recover_interrupted(output)
    check_output(output, overwrite)
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
            check_output(output, overwrite)  # it may have changed while the export ran
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

    - a temporary ``.NAME.tmp-PID-*`` or rendezvous ``.NAME.rdv-PID-*`` directory of a process
      that no longer runs is removed;
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
    leftovers = [*output.parent.glob(f".{output.name}.tmp-*"), *output.parent.glob(f".{output.name}.rdv-*")]
    for path in sorted(leftovers):
        kind, pid = path.name.removeprefix(f".{output.name}.").split("-", 2)[:2]
        if pid.isdigit() and (_alive(int(pid)) or (kind == "rdv" and int(pid) == os.getpid())):
            continue  # another export into the same place is running now (or this one's rendezvous)
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
    """Move a finished but failed export aside as ``NAME.failed`` (replacing an older failed export
    of ours, never anything else: then ``NAME.failed-2``, ...)."""
    failed = output.with_name(f"{output.name}.failed")
    number = 1
    while failed.exists() and _foreign_files(failed):
        number += 1
        failed = output.with_name(f"{output.name}.failed-{number}")
    if failed.exists():
        shutil.rmtree(failed)
    tmp.rename(failed)
    return failed


def save_tokenizer(source: str | Path, directory: Path) -> None:
    """The tokenizer files of ``source``, as ``save_pretrained`` writes them."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source, **remote_code()).save_pretrained(directory)


def file_manifest(root: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root``, by path relative to it; ``known`` ones (hashed
    as they were written) are taken as they are when their size agrees."""
    manifest = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if known and name in known and known[name]["size"] == path.stat().st_size:
            manifest[name] = known[name]
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        manifest[name] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
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


def write_json_atomically(path: Path, data: dict[str, Any]) -> str:
    """Write ``data`` as JSON whole or not at all (through a temporary sibling); returns the text."""
    text = json.dumps(data, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return text
