"""Read DeepSpeed ZeRO checkpoints (stage 1, 2 and 3, any world size) with DeepSpeed's own functions.

Trainable tensors come from ``deepspeed.utils.zero_to_fp32`` (the fp32 master weights). Frozen
weights are never consolidated as a whole: :class:`ZeroFrozenTensors` reads one at a time, from
wherever the stage keeps them, when the export needs it (an initialisation that rewrote the base).
"""

from __future__ import annotations

import inspect
import math
import re
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.paths import inside
from lightning_lora.export.recorded import CLIENT_NEEDED
from lightning_lora.export.unpickle import load_torch_file

__all__ = [
    "ENGINE_KEYS",
    "OPTIM_STATES",
    "ZeroCheckpointError",
    "ZeroFrozenTensors",
    "check_rank_files",
    "check_readable",
    "is_zero_checkpoint",
    "read_model_states",
    "read_zero_checkpoint",
    "resolve_zero_tag",
    "zero_to_fp32_reading",
]

_MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class ZeroCheckpointError(ExportError):
    """A ZeRO checkpoint directory that cannot be read as it is."""


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(_MODEL_STATES.search(p.name) for p in path.iterdir())


def is_zero_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ZeRO checkpoint directory (with ``latest``) or one of its tag directories."""
    # A directory holding tag directories but no 'latest' is one too: resolve_zero_tag lists its tags.
    return path.is_dir() and ((path / "latest").is_file() or _is_tag_dir(path) or bool(_tags(path)))


def resolve_zero_tag(path: Path, tag: str | None = None) -> Path:
    """The tag directory to read: ``path/tag``, the one ``path/latest`` names, or ``path`` itself;
    never a directory outside ``path`` (through ``../`` or a symbolic link)."""
    if tag is not None:
        tag_dir = inside(path, tag, "--tag")
        if not _is_tag_dir(tag_dir):
            raise ZeroCheckpointError(f"--tag={tag!r}: {str(tag_dir)!r} is not a ZeRO tag directory; tags present: {_tags(path)}")
        return tag_dir
    if _is_tag_dir(path):
        return path
    latest = path / "latest"
    if not latest.is_file():
        raise ZeroCheckpointError(
            f"--checkpoint={str(path)!r} has no 'latest' file and no model states; tags present: {_tags(path)} "
            "(choose one with --tag)"
        )
    tag_dir = inside(path, latest.read_text().strip(), repr(str(latest)))
    if not _is_tag_dir(tag_dir):
        raise ZeroCheckpointError(f"{str(latest)!r} names tag {tag_dir.name!r}, but {str(tag_dir)!r} holds no model states")
    return tag_dir


def _tags(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if _is_tag_dir(p)) if path.is_dir() else []


# What the export and zero_to_fp32 read from each file; a foreign object anywhere else is left unread.
_MODEL_NEEDED = [
    *((key,) for key in ("module", "buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
                         "frozen_param_fragments", "ds_version", "dp_world_size")),
    ("ds_config", "zero_optimization"), *CLIENT_NEEDED,
]
_OPTIM_NEEDED = [("optimizer_state_dict", key) for key in (
    "zero_stage", "partition_count", "single_partition_of_fp32_groups", "fp32_flat_groups", "param_alignment_paddings")]


def _load(path: Path, report: bool = True) -> dict[str, Any]:
    """A rank file through the restricted loader, memory-mapped: only the tensors touched are paged in."""
    needed = _OPTIM_NEEDED if OPTIM_STATES.search(path.name) else _MODEL_NEEDED
    try:
        return load_torch_file(path, needed=needed, report=report)
    except (ExportError, OSError):
        raise
    except Exception as err:  # torch raises several types for a damaged file
        raise ZeroCheckpointError(f"{str(path)!r} is not readable: {err}") from err


def check_rank_files(tag_dir: Path, states: dict[str, Any]) -> int:
    """Fail, naming the missing ranks, unless every rank's files are visible here. Returns the world size."""
    world_size = states.get("dp_world_size") or 1
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(stage, int):
        raise ZeroCheckpointError(f"{str(tag_dir)!r}: its model states record dp_world_size={world_size!r} and ZeRO "
                                  f"stage {stage!r}: not a DeepSpeed checkpoint's")
    optim_ranks = {int(m.group(1)) for p in tag_dir.iterdir() if (m := OPTIM_STATES.search(p.name))}
    missing = _missing(world_size, optim_ranks)
    if stage == 3:
        model_ranks = {int(m.group(1)) for p in tag_dir.iterdir() if (m := _MODEL_STATES.search(p.name)) and m.group(1)}
        missing |= _missing(world_size, model_ranks)
    if missing:
        raise ZeroCheckpointError(
            f"checkpoint {str(tag_dir)!r} was written by {world_size} ranks but the files of rank(s) "
            f"{sorted(missing)} are not here. DeepSpeed writes each rank's shard on its own node: the "
            "checkpoint directory must be on a filesystem shared by all nodes (or copy every node's "
            "shards into one directory before exporting)"
        )
    return world_size


def _missing(world_size: int, present: set[int], limit: int = 16) -> set[int]:
    """Up to ``limit`` ranks below ``world_size`` absent from ``present``, found without listing all
    ranks (a damaged file may record any world size)."""
    missing: set[int] = set()
    rank = 0
    while rank < world_size and len(missing) < limit:
        if rank not in present:
            missing.add(rank)
        rank += 1
    return missing


def check_readable(tag_dir: Path) -> None:
    """Name a truncated or corrupt rank file before DeepSpeed fails on it with no file name.

    torch saves zip archives whose directory sits at the end: a truncated file has none.
    """
    for path in sorted(tag_dir.iterdir()):
        if (_MODEL_STATES.search(path.name) or OPTIM_STATES.search(path.name)) and not zipfile.is_zipfile(path):
            raise ZeroCheckpointError(
                f"{str(path)!r} is truncated or corrupt ({path.stat().st_size} bytes); the checkpoint cannot be "
                "read (was it still being written or copied?)"
            )


def read_model_states(tag_dir: Path, report: bool = True) -> dict[str, Any]:
    """Rank 0's model states: engine metadata, the rank-0 module, and Lightning's client state."""
    return _load(_model_states_files(tag_dir)[0], report)


def _model_states_files(tag_dir: Path) -> list[Path]:
    # Stage 3 writes zero_pp_rank_N_mp_rank_00_model_states.pt; stages 1/2 mp_rank_00_model_states.pt.
    return sorted(p for p in tag_dir.iterdir() if _MODEL_STATES.search(p.name))


class _TorchReadingWith(types.ModuleType):
    """``torch`` as zero_to_fp32 sees it in :func:`zero_to_fp32_reading`: ``load`` is ours."""

    def __init__(self, load: Callable[..., Any]) -> None:
        super().__init__("torch")
        self.load = load

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def zero_to_fp32_reading(load: Callable[..., Any]) -> Callable[..., dict[str, torch.Tensor]]:
    """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reading every file with ``load``.

    zero_to_fp32 reads each rank file with ``torch.load(..., weights_only=False)``, through its
    module's global name ``torch``. Its functions are rebuilt here over a copy of that namespace in
    which ``torch.load`` is ``load``: the restricted loader, for this call only (neither torch nor
    zero_to_fp32 is changed for anyone else in the process).
    """
    from deepspeed.utils import zero_to_fp32

    namespace = dict(vars(zero_to_fp32))
    namespace["torch"] = _TorchReadingWith(load)
    for name, value in vars(zero_to_fp32).items():
        if isinstance(value, types.FunctionType) and value.__module__ == zero_to_fp32.__name__:
            copy = types.FunctionType(value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__)
            copy.__kwdefaults__ = value.__kwdefaults__
            namespace[name] = copy
    return namespace["get_fp32_state_dict_from_zero_checkpoint"]


def read_zero_checkpoint(tag_dir: Path) -> tuple[dict[str, torch.Tensor], ZeroFrozenTensors, dict[str, Any]]:
    """Consolidate a ZeRO tag directory's trained tensors; find its frozen weights without reading them.

    Returns:
        The trained tensors (fp32 master weights) by checkpoint key, the frozen weights the
        checkpoint holds (read one at a time on access, see :class:`ZeroFrozenTensors`), and the
        client state Lightning stored beside them (``global_step``, ``hyper_parameters``, ...).
    """
    from deepspeed.utils import zero_to_fp32

    check_readable(tag_dir)
    states = read_model_states(tag_dir)
    check_rank_files(tag_dir, states)
    kwargs: dict[str, Any] = {"tag": tag_dir.name}
    # Feature detection instead of version checks: older DeepSpeed lacks this argument.
    parameters = inspect.signature(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint).parameters
    if "exclude_frozen_parameters" in parameters:
        kwargs["exclude_frozen_parameters"] = True
    reported = {_model_states_files(tag_dir)[0]}  # read_model_states named what it left unread

    def load(file: str, *args: Any, **options: Any) -> dict[str, Any]:
        path = Path(file)
        states = _load(path, report=path not in reported)
        reported.add(path)
        return states

    try:
        tensors = zero_to_fp32_reading(load)(str(tag_dir.parent), **kwargs)
    except ExportError:
        raise
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError) as err:
        raise ZeroCheckpointError(f"DeepSpeed could not consolidate {str(tag_dir)!r}: {err}") from err
    # Owned copies: the values may be views into memory-mapped checkpoint files.
    tensors = {key: value.contiguous().clone() for key, value in tensors.items()}
    frozen = ZeroFrozenTensors(tag_dir, states, trained=set(tensors))
    client_state = {key: value for key, value in states.items() if key not in ENGINE_KEYS}
    return tensors, frozen, client_state


class ZeroFrozenTensors(Mapping[str, torch.Tensor]):
    """The frozen weights a ZeRO checkpoint holds, by checkpoint key, each read when it is asked for.

    Where they are depends on the stage: ZeRO-1 keeps them only in rank 0's ``module`` state,
    ZeRO-2 also as ``frozen_param_fragments`` (whole tensors), ZeRO-3 as one fragment per rank
    that must be concatenated. The rank files are memory-mapped, so a tensor costs memory only
    while it is used (ZeRO-3: one concatenated copy). A checkpoint written with
    ``exclude_frozen_parameters`` holds none: the mapping is empty.
    """

    def __init__(self, tag_dir: Path, states: dict[str, Any], trained: set[str]) -> None:
        self.tag_dir = tag_dir
        self.stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        self._rank_states: list[dict[str, Any]] | None = None
        shapes = states.get("frozen_param_shapes") or {}
        self._fragments = states.get("frozen_param_fragments") or {}
        if self.stage == 3:
            self._shapes = {key: tuple(shape) for key, shape in shapes.items()}
            self._module: dict[str, torch.Tensor] = {}
        else:
            # Stages 1 and 2 keep every parameter whole in the module state (trained ones as their
            # working copies, which the fp32 masters supersede).
            buffers = set(states.get("buffer_names") or [])
            self._module = {
                key: value for key, value in (states.get("module") or {}).items()
                if isinstance(value, torch.Tensor) and value.numel() > 0 and key not in trained and key not in buffers
            }
            self._shapes = {key: tuple(value.shape) for key, value in self._module.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        if self.stage != 3:
            return self._module[key]
        fragments = [state["frozen_param_fragments"][key] for state in self._all_ranks()]
        numel = math.prod(self._shapes[key])
        return torch.cat([f.reshape(-1) for f in fragments]).narrow(0, 0, numel).view(self._shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        """Some rows of a frozen weight, reading only those (ZeRO-3: from the fragments that hold them)."""
        if self.stage != 3:
            return self[key][indices]
        shape = self._shapes[key]
        width = math.prod(shape[1:])
        fragments = [state["frozen_param_fragments"][key].reshape(-1) for state in self._all_ranks()]
        starts = [0]
        for fragment in fragments:
            starts.append(starts[-1] + fragment.numel())
        picked = []
        for row in indices:
            begin, end, parts = row * width, (row + 1) * width, []
            for fragment, start, stop in zip(fragments, starts, starts[1:]):
                if start < end and begin < stop:
                    parts.append(fragment[max(begin, start) - start: min(end, stop) - start])
            picked.append(torch.cat(parts).view(shape[1:]))
        return torch.stack(picked)

    def _all_ranks(self) -> list[dict[str, Any]]:
        if self._rank_states is None:
            files = sorted(
                (p for p in self.tag_dir.iterdir() if (m := _MODEL_STATES.search(p.name)) and m.group(1) is not None),
                key=lambda p: int(_MODEL_STATES.search(p.name).group(1)),
            )
            self._rank_states = [_load(file, report=False) for file in files]
        return self._rank_states


# What DeepSpeed itself stores in the model states; the rest is Lightning's client state.
ENGINE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version",
})
