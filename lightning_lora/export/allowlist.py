"""The only objects a checkpoint may name: what real Lightning, DeepSpeed, torch and FSDP checkpoints hold.

A pickle names the functions and classes that rebuild its objects (``module.name``), and a plain
``pickle.load`` imports and calls whatever it is told to: a checkpoint is then a program. Our loader
(:mod:`lightning_lora.export.unpickle`) resolves a name only through :data:`ALLOWED`; any other
name is neither imported nor called (the value becomes an inert placeholder, see ``Unread``).

The list was built by scanning real checkpoints of every kind we read (Lightning ``.ckpt`` fp32 and
bf16, DeepSpeed model and optimizer states of ZeRO 1/2/3 with and without
``exclude_frozen_parameters``, QLoRA, FSDP ``meta.pt`` and ``.metadata``) under the oldest and the
latest dependency sets; ``tests/test_unpickle.py`` rebuilds those checkpoints and fails on a name
that is not here. Nothing here calls, imports or unpickles what it is given: no ``functools.partial``,
``operator.*``, ``getattr``, ``eval``, ``torch.storage._load_from_bytes``, and no rebuild helper that
takes a function (``torch._tensor._rebuild_from_type_v2``). torch's own tensor rebuilders are
wrapped so that a file cannot attach hooks or attributes to a tensor.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["ALLOWED", "SUSPICIOUS_MODULES", "SUSPICIOUS_NAMES", "is_suspicious", "resolve"]


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> Any:
    """torch's tensor rebuilder without the parts a file could abuse: backward hooks (callables
    taken from the file) are dropped, and only torch's own boolean flags are kept as metadata."""
    import torch

    kept = {key: value for key, value in metadata.items() if isinstance(value, bool)} if isinstance(metadata, dict) else None
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, OrderedDict(), kept)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None) -> Any:
    """A ``torch.nn.Parameter`` around ``data``; hooks and attributes the file attaches are dropped."""
    import torch

    return torch.nn.Parameter(data, requires_grad) if isinstance(data, torch.Tensor) else data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor saved with attributes (DeepSpeed's ZeRO-3 flat groups): rebuilt as a plain tensor by
    one of the rebuilders above only, its attributes dropped. torch's own would call any ``func``."""
    import pickle

    import torch

    for named in (func, new_type):
        if isinstance(named, type) and hasattr(named, "type_name"):  # a name that is not allowed: its placeholder
            return named()
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"a tensor rebuilt by {func!r} as {new_type!r} is not read")
    return func(*args)


# (module, name) -> why real checkpoints hold it. Resolved by importing that module (one of our
# dependencies), never a module the file names.
ALLOWED: dict[tuple[str, str], str] = {
    # Containers and values of every Lightning and torch state dict.
    ("collections", "OrderedDict"): "state dicts (torch's module.state_dict(), DeepSpeed's param_shapes)",
    ("collections", "defaultdict"): "optimizer state of some torch optimizers (defaultdict(dict))",
    ("builtins", "set"): "DeepSpeed's sparse_tensor_module_names, a set; checkpoints written with protocol < 2",
    ("builtins", "frozenset"): "hyper-parameters holding a frozenset (protocol < 4 writes it by name)",
    ("builtins", "slice"): "a slice in hyper-parameters or loop state",
    ("builtins", "complex"): "a complex number in hyper-parameters",
    ("builtins", "bytearray"): "raw bytes written with protocol < 5",
    ("datetime", "datetime"): "timestamps in callback state and hyper-parameters",
    ("datetime", "timedelta"): "Trainer(max_time=...) and timer callback state",
    ("pathlib", "PosixPath"): "paths in hyper-parameters and ModelCheckpoint state (a value, nothing is opened)",
    ("pathlib", "WindowsPath"): "the same, written on Windows",
    ("pathlib", "PurePosixPath"): "the same, pure paths",
    ("lightning.fabric.utilities.data", "AttributeDict"): "Lightning's hparams container (a dict)",
    ("lightning_fabric.utilities.data", "AttributeDict"): "the same, from the standalone lightning_fabric package",
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): "the same, from pytorch_lightning < 2",
    # torch: tensors, their storages (torch.load resolves *Storage names itself), dtypes and devices.
    ("torch._utils", "_rebuild_tensor_v2"): "every dense tensor (wrapped: hooks and foreign metadata dropped)",
    ("torch._utils", "_rebuild_parameter"): "a torch.nn.Parameter saved whole (wrapped: hooks dropped)",
    ("torch._utils", "_rebuild_parameter_with_state"): "a Parameter with attributes (wrapped: attributes dropped)",
    ("torch._tensor", "_rebuild_from_type_v2"): "a tensor with attributes, ZeRO-3's fp32_flat_groups (wrapped: only "
                                                "the rebuilders above, attributes dropped)",
    ("torch", "Tensor"): "the type named by _rebuild_from_type_v2",
    ("torch", "Size"): "DeepSpeed's param_shapes and frozen_param_shapes; FSDP metadata",
    ("torch", "device"): "a device recorded in hyper-parameters or FSDP metadata",
    ("torch", "dtype"): "a dtype recorded by value",
    ("torch", "layout"): "FSDP tensor properties",
    ("torch.serialization", "_get_layout"): "FSDP tensor properties: a layout looked up by name among torch's layouts",
    ("torch", "strided"): "FSDP tensor properties (the default layout)",
    ("torch", "contiguous_format"): "FSDP tensor properties (the default memory format)",
    ("torch", "preserve_format"): "FSDP tensor properties",
    ("torch", "channels_last"): "FSDP tensor properties",
    **{("torch", dtype): "a dtype, pickled by name (a value; nothing runs)" for dtype in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")},
    # DeepSpeed's optimizer states: plain records and an enum, nothing that runs on construction.
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): "optimizer_state_dict['zero_stage'] (an int enum)",
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): "optimizer_state_dict['loss_scaler'] (a record of numbers)",
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): "the same, with fp16 dynamic loss scaling",
    ("deepspeed.utils.tensor_fragment", "fragment_address"): "param_slice_mappings of ZeRO 1/2 (a dataclass of ints)",
    # torch.distributed.checkpoint's .metadata (sharded FSDP): dataclasses of shapes, offsets and file names.
    ("torch.distributed.checkpoint.metadata", "Metadata"): "the .metadata file's root",
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): "one tensor's chunks",
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): "a non-tensor entry (optimizer step)",
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): "offsets and sizes of a chunk",
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): "dtype and layout of a tensor",
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): "the memory format of a tensor (an enum)",
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): "the key of a storage entry",
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): "the checkpoint id (torch >= 2.4)",
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): "which shard file holds an entry (relative path, offset)",
    ("torch.distributed.checkpoint.planner", "LoadItemType"): "an enum in older metadata",
    ("torch.distributed.checkpoint.planner", "WriteItemType"): "an enum in older metadata",
}

# Names that stand in for torch's functions: the wrappers above.
_WRAPPED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}

# Names that could run code, judged from the name alone (never imported to find out).
SUSPICIOUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "builtins", "__builtin__", "sys",
    "shutil", "importlib", "imp", "runpy", "socket", "ctypes", "pickle", "_pickle", "cPickle", "marshal", "code",
    "codeop", "pty", "commands", "platform", "webbrowser", "multiprocessing", "signal", "asyncio", "threading",
    "_thread", "functools", "operator", "types", "inspect", "pydoc", "timeit", "trace", "pdb", "bdb", "cProfile",
    "profile", "tempfile", "zipimport", "pkgutil", "site", "sysconfig", "distutils", "setuptools", "pip", "io",
    "_io", "codecs", "http", "urllib", "urllib3", "requests", "ftplib", "smtplib", "telnetlib", "dill",
    "cloudpickle", "joblib", "numpy.lib.npyio", "torch.hub", "torch.jit", "torch.serialization",
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


def resolve(module: str, name: str) -> Any:
    """The object an allowed name stands for, or ``None`` for a name that is not allowed."""
    key = (module, name)
    if key not in ALLOWED:
        return None
    if key in _WRAPPED:
        return _WRAPPED[key]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # an optional package (pytorch_lightning, an older torch): read as a foreign object
