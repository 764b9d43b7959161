"""A path that a file of an artifact names stays inside that artifact.

Checkpoints and model directories may come from someone else. A name written inside one of their
files (DeepSpeed's ``latest`` tag, a safetensors index's shard, FSDP metadata's file names,
``export.json``'s file list) names a part of the same artifact; followed through ``../`` or a
symbolic link it could make us read, or overwrite, any file the user can reach. :func:`inside`
is the one check every such name goes through. The paths a user passes, and the base, tokenizer
and data paths a run records, are the user's own and are not limited.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_lora.errors import ExportError

__all__ = ["artifact_root", "inside"]

# The Hugging Face hub cache keeps a repository as models--org--name/{snapshots/<rev>,blobs}: a
# snapshot's files are symbolic links to ../../blobs/<sha>, parts of the same repository.
_HUB_REPOS = ("models--", "datasets--", "spaces--")


def artifact_root(directory: str | Path) -> Path:
    """The directory the parts of ``directory`` may lie in: ``directory`` itself (symbolic links
    followed), or for a hub cache snapshot the repository's cache directory, which holds its blobs."""
    resolved = Path(directory).resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith(_HUB_REPOS):
        return resolved.parent.parent
    return resolved


def inside(directory: str | Path, name: str, what: str) -> Path:
    """``directory / name``, once it is checked to stay inside the artifact ``directory`` belongs to
    after every symbolic link is followed.

    Args:
        directory: the artifact's directory (a checkpoint, a model, an export).
        name: the relative path a file of the artifact names.
        what: where ``name`` comes from, for the error: an option (``"--tag"``, printed as
            ``--tag='../x'``) or a phrase (``"'/ckpt/latest'"``, printed as ``... names '../x'``).

    Raises:
        ExportError: ``name`` is not a relative path, or leads outside the artifact.
    """
    subject = f"{what}={name!r}" if re.fullmatch(r"--[a-z][a-z-]*", what) else f"{what} names {name!r}"
    if not isinstance(name, str) or not name or "\x00" in name or Path(name).is_absolute():
        raise ExportError(f"{subject}, which is not a relative path inside {str(directory)!r}")
    path = Path(directory) / name
    try:
        root, target = artifact_root(directory), path.resolve()
    except (OSError, RuntimeError) as err:  # a symbolic link loop
        raise ExportError(f"{subject}, which cannot be resolved inside {str(directory)!r}: {err}") from err
    if not target.is_relative_to(root):
        raise ExportError(f"{subject}, which leads outside {str(root)!r} (to {str(target)!r}): a file of a checkpoint "
                          "or model directory may name only its own parts")
    return path
