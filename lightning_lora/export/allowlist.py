"""The only objects a checkpoint may name: what real Lightning, DeepSpeed, torch and FSDP checkpoints hold.

A pickle names the functions and classes that rebuild its objects (``module.name``), and a plain
``pickle.load`` imports and calls whatever it is told to: a checkpoint is then a program. Our loader
(:mod:`lightning_lora.export.unpickle`) resolves a name only through :data:`ALLOWED`; any other
name is neither imported nor called (the value becomes an inert placeholder, see ``Unread``). Each
entry also says how a file may use it (:data:`CALL`, :data:`NEW`, :data:`RECORD`, :data:`VALUE`),
and the unpickler holds the file to it.

The list was built by scanning real checkpoints of every kind we read (Lightning ``.ckpt`` fp32 and
bf16, DeepSpeed model and optimizer states of ZeRO 1/2/3 with and without
``exclude_frozen_parameters``, QLoRA, FSDP ``meta.pt`` and ``.metadata``) under the oldest and the
latest dependency sets; ``tests/test_unpickle.py`` rebuilds those checkpoints and fails on a name
that is not here; entries that no real checkpoint needs stay out (a value of another type where
the export needs nothing is only reported; ``torch.nn.Parameter`` is in, as torch's own
``weights_only`` loader allows it, for a state dict built from ``named_parameters()``). Nothing here
calls, imports or unpickles what it is given: no ``functools.partial``, ``operator.*``, ``getattr``, ``eval``,
``torch.storage._load_from_bytes``, no ``collections.defaultdict`` (it calls its factory later).
torch's rebuilders are wrapped: ``_rebuild_tensor_v2`` so that a file cannot attach hooks or
attributes to a tensor, and ``_rebuild_from_type_v2`` (which calls any function it is given) so
that it accepts only ``_rebuild_tensor_v2`` and ``torch.Tensor``.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

__all__ = ["ALLOWED", "CALL", "NEW", "RECORD", "SUSPICIOUS_MODULES", "SUSPICIOUS_NAMES", "VALUE", "TensorType", "is_suspicious",
           "resolve"]


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> Any:
    """torch's tensor rebuilder without the parts a file could abuse: backward hooks (callables
    taken from the file) are dropped, and only torch's own boolean flags are kept as metadata."""
    import torch

    kept = {key: value for key, value in metadata.items() if isinstance(value, bool)} if isinstance(metadata, dict) else None
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, OrderedDict(), kept)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None) -> Any:
    """A ``torch.nn.Parameter`` around a tensor; the hooks and attributes a file attaches are dropped."""
    import pickle

    import torch

    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a Parameter around a {type(data).__name__} is not read")
    return torch.nn.Parameter(data, bool(requires_grad))


class TensorType:
    """What the name ``torch.Tensor`` resolves to: the type :func:`_rebuild_from_type_v2` is told to
    build, never called (``torch.Tensor(8, 8)`` would hand out uninitialised memory)."""


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor saved with attributes (DeepSpeed's ZeRO-3 flat groups): rebuilt as a plain tensor by
    :func:`_rebuild_tensor_v2` only, its attributes dropped. torch's own calls any ``func``."""
    import pickle

    for named in (func, new_type):
        if isinstance(named, type) and hasattr(named, "type_name"):  # a name that is not allowed: its placeholder
            return named()
    if func is not _rebuild_tensor_v2 or new_type is not TensorType:
        raise pickle.UnpicklingError(f"a tensor rebuilt by {func!r} as {new_type!r} is not read")
    return func(*args)


# How a file may use an allowed name (the unpickler enforces it):
CALL = "call"      # called with the file's arguments (REDUCE): a function or class that only stores values
NEW = "new"        # instantiated without __init__ (NEWOBJ), filled by SETITEMS: a dict subclass
RECORD = "record"  # instantiated without __init__ (NEWOBJ), its attributes set from the file (BUILD)
VALUE = "value"    # used as a value only (a dtype); never called

# (module, name) -> (use, why real checkpoints hold it). Resolved by importing that module (one of
# our dependencies), never a module the file names.
ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    # Containers of every Lightning and torch state dict.
    ("collections", "OrderedDict"): (CALL, "state dicts (torch's module.state_dict(), DeepSpeed's param_shapes)"),
    ("lightning.fabric.utilities.data", "AttributeDict"): (NEW, "hyper_parameters as older Lightning saved them"),
    ("lightning_fabric.utilities.data", "AttributeDict"): (NEW, "the same, from the standalone lightning_fabric"),
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): (NEW, "the same, from pytorch_lightning 1.x checkpoints"),
    # torch: tensors (torch.load resolves the *Storage names itself, without us), shapes, dtypes.
    ("torch._utils", "_rebuild_tensor_v2"): (CALL, "every dense tensor (wrapped: hooks and foreign metadata dropped)"),
    ("torch._tensor", "_rebuild_from_type_v2"): (CALL, "a tensor with attributes, ZeRO-3's fp32_flat_groups (wrapped: "
                                                       "only _rebuild_tensor_v2 as torch.Tensor, attributes dropped)"),
    ("torch._utils", "_rebuild_parameter"): (CALL, "a Parameter saved whole, as torch.save writes a dict built from "
                                                   "named_parameters() (wrapped: hooks dropped)"),
    ("torch._utils", "_rebuild_parameter_with_state"): (CALL, "the same, with attributes (wrapped: attributes dropped)"),
    ("torch", "Tensor"): (VALUE, "the type _rebuild_from_type_v2 names (resolved to TensorType)"),
    ("torch", "Size"): (CALL, "DeepSpeed's param_shapes and frozen_param_shapes"),
    **{("torch", dtype): (VALUE, "a dtype, pickled by name (FSDP tensor properties)") for dtype in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2")},
    # DeepSpeed's optimizer states: plain records and an enum.
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): (CALL, "optimizer_state_dict['zero_stage'] (an int enum)"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): (RECORD, "optimizer_state_dict['loss_scaler'] (numbers)"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): (RECORD, "the same, for fp16 runs (dynamic scaling)"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"): (RECORD, "param_slice_mappings of ZeRO 1/2 (two ints)"),
    # torch.distributed.checkpoint's .metadata (sharded FSDP): dataclasses of shapes, offsets and file names.
    ("torch.distributed.checkpoint.metadata", "Metadata"): (RECORD, "the .metadata file's root"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): (RECORD, "one tensor's chunks"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): (RECORD, "a non-tensor entry (optimizer settings)"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): (RECORD, "offsets and sizes of a chunk"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): (RECORD, "dtype and layout of a tensor"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): (CALL, "the memory format of a tensor (an enum)"),
    ("torch.serialization", "_get_layout"): (CALL, "the layout of a tensor: looked up by name among torch's layouts"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): (RECORD, "the key of a storage entry"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): (RECORD, "the checkpoint id (torch >= 2.4)"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): (RECORD, "which shard file holds an entry (relative "
                                                                          "path, offset)"),
    ("pathlib", "PosixPath"): (CALL, "StorageMeta.checkpoint_id, the directory the checkpoint was saved to (a value: "
                                     "nothing is opened)"),
}

# Names that stand in for torch's functions: the wrappers above.
_WRAPPED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Tensor"): TensorType,
}

# Names that could run code, judged from the name alone (never imported to find out).
SUSPICIOUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "builtins", "__builtin__", "sys",
    "shutil", "importlib", "imp", "runpy", "socket", "ctypes", "pickle", "_pickle", "cPickle", "marshal", "code",
    "codeop", "pty", "commands", "platform", "webbrowser", "multiprocessing", "signal", "asyncio", "threading",
    "_thread", "functools", "operator", "types", "inspect", "pydoc", "timeit", "trace", "pdb", "bdb", "cProfile",
    "profile", "tempfile", "zipimport", "pkgutil", "site", "sysconfig", "distutils", "setuptools", "pip", "io",
    "_io", "codecs", "http", "urllib", "urllib3", "requests", "ftplib", "smtplib", "telnetlib", "dill",
    "cloudpickle", "joblib", "numpy.lib.npyio", "torch.hub", "torch.jit", "torch.serialization",  # (but _get_layout)
    "torch.utils.cpp_extension", "torch.package",
})
SUSPICIOUS_NAMES = frozenset({
    ("torch", "load"), ("torch", "save"), ("torch.storage", "_load_from_bytes"), ("numpy", "load"),
    ("torch._tensor", "_rebuild_from_type"), ("copyreg", "_reconstructor"),
    ("torch._utils", "_rebuild_wrapper_subclass"), ("pandas", "read_pickle"), ("torch._ops", "ops"),
})


def is_suspicious(module: str, name: str) -> bool:
    """Whether ``module.name`` names something that could run code (by name; nothing is imported)."""
    parts = module.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return bool(prefixes & SUSPICIOUS_MODULES) or (module, name) in SUSPICIOUS_NAMES or name.startswith("__")


def resolve(module: str, name: str) -> tuple[Any, str] | None:
    """The object an allowed name stands for and how a file may use it, or ``None`` for a name that
    is not allowed."""
    key = (module, name)
    if key not in ALLOWED:
        return None
    use = ALLOWED[key][0]
    if key in _WRAPPED:
        return _WRAPPED[key], use
    try:
        return getattr(importlib.import_module(module), name), use
    except (ImportError, AttributeError):
        return None  # an optional package (pytorch_lightning, an older torch): read as a foreign object
