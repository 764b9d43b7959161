"""One loader for every pickle the project reads: a checkpoint is data, never code.

Lightning ``.ckpt`` files, DeepSpeed's model and optimizer states, FSDP's ``meta.pt`` and
``.metadata`` are pickles, and a pickle names the functions that rebuild its objects. Here a name is
resolved only through :mod:`lightning_lora.export.allowlist`; any other name is neither imported
nor called: where the file uses it, the value becomes an :class:`Unread` placeholder that does
nothing. A reader then says which values it needs (``needed``): a placeholder there fails the
export in one line naming the file, the key and the type; placeholders elsewhere (a user's
hyper-parameter class, a callback's state) are reported in one line and left alone.

torch's zip format is read by ``torch.load`` itself (memory-mapped), with this module's unpickler
in place of ``pickle``'s: tensors are rebuilt by torch, everything else is resolved here.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, ClassVar

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.allowlist import CALL, NEW, RECORD, is_suspicious, resolve

__all__ = ["ForeignObjectError", "Unread", "load_pickle", "load_torch_file", "require"]

_log = logging.getLogger("lightning_lora")
Key = tuple[Any, ...]


class ForeignObjectError(ExportError):
    """A value the export needs is an object of a type the loader does not read."""


class Unread:
    """Stands where a file put an object of a type that is not allowed: nothing of it was imported
    or run, and it does nothing. ``type_name`` is the name the file gave (``module.name``)."""

    type_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Unread:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    # What the pickle machine calls on an object it builds (BUILD, SETITEMS, APPENDS): all ignored.
    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unread {self.type_name}>"


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler, restricted: names resolve through the allowlist only (the others,
    recorded, become placeholders), and the opcodes that call or change objects act only as each
    allowed name's use says (:mod:`~lightning_lora.export.allowlist`).

    The pure-Python unpickler is the one whose opcodes can be overridden: the C one would let a file
    call any allowed class with any arguments (``torch.Tensor(8, 8)``: uninitialised memory) and set
    attributes on any object it reaches, allowed classes included (``BUILD`` on ``PosixPath``
    changes every path of the process). A checkpoint's pickle is small beside its tensors.
    """

    record: ClassVar[dict[str, type[Unread]]] = {}
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uses: dict[int, str] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = resolve(module, name)
        if allowed is not None:
            value, use = allowed
            self.uses[id(value)] = use
            return value
        full = f"{module}.{name}"
        if full not in self.record:
            self.record[full] = type(f"Unread[{full}]", (Unread,), {"type_name": full, "__module__": __name__})
        return self.record[full]

    def _may(self, target: Any, *uses: str) -> bool:
        return (isinstance(target, type) and issubclass(target, Unread)) or self.uses.get(id(target)) in uses

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if not self._may(func, CALL):
            raise pickle.UnpicklingError(f"the file calls {_name(func)}, which is not allowed to be called")
        return func(*args, **(kwargs or {}))

    def _new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        if not self._may(cls, NEW, RECORD):
            raise pickle.UnpicklingError(f"the file instantiates {_name(cls)}, which is not allowed to be instantiated")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, args))

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Unread):
            return
        if isinstance(target, type) or not self._may(type(target), CALL, NEW, RECORD):
            raise pickle.UnpicklingError(f"the file sets attributes of {_name(target)}, which is not allowed")
        setstate = getattr(type(target), "__setstate__", None)
        if setstate is not None and self._may(type(target), RECORD):
            setstate(target, state)  # the record class's own code (torch's), given values
            return
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for values in (state, slots):
            if not isinstance(values, dict | None):
                raise pickle.UnpicklingError(f"the state of {_name(target)} is a {type(values).__name__}, not a dict")
            for key, value in (values or {}).items():
                # An attribute, never a method or a dunder of the class (`get`, `__class__`).
                if not isinstance(key, str) or key.startswith("__") or callable(getattr(type(target), key, None)):
                    raise pickle.UnpicklingError(f"the file sets {key!r} of {_name(target)}, which is not an attribute")
                if values is slots:
                    object.__setattr__(target, key, value)
                else:
                    target.__dict__[key] = value

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _name(value: Any) -> str:
    named = value if isinstance(value, type) or callable(value) else type(value)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', repr(named))}"


def _unpickler_for(record: dict[str, type[Unread]]) -> type[_RestrictedUnpickler]:
    """A restricted unpickler class that records the names it refused in ``record`` (one per load)."""
    return type("RestrictedUnpickler", (_RestrictedUnpickler,), {"record": record})


def _refuse_legacy(*args: Any, **kwargs: Any) -> Any:
    raise pickle.UnpicklingError("torch's legacy (pre-1.6) format is not read")


def _check_archive(path: Path) -> None:
    """Only torch's zip format is read; a TorchScript archive holds code and is refused. Asked of
    torch's own zip reader, the one ``torch.load`` decides with (another reader can see other
    records in a crafted file)."""
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError("not a torch checkpoint archive (a zip file): truncated, still being written, or "
                                     "another format (torch's legacy format is not read)")
    records = torch._C.PyTorchFileReader(str(path)).get_all_records()
    if any(name == "constants.pkl" or name.startswith("code/") for name in records):
        raise pickle.UnpicklingError("a TorchScript archive, which holds code: not read")


def load_torch_file(path: str | Path, *, argument: str = "--checkpoint", needed: Iterable[Key] = (),
                    report: bool = True, mmap: bool = True) -> Any:
    """What ``torch.save`` wrote to ``path``, read without importing or calling anything not allowed.

    Args:
        path: a torch zip archive (``.ckpt``, DeepSpeed's ``*_states.pt``, FSDP's ``meta.pt``).
        argument: the option that named the checkpoint, for errors.
        needed: key paths (``("state_dict",)``, ``("optimizer_state_dict", "zero_stage")``) whose
            values the caller uses: an object not read there fails in one line.
        report: log one line naming the objects left unread elsewhere.
        mmap: memory-map the tensors (only those touched are paged in).

    Raises:
        ForeignObjectError: a needed value is an object of a type that is not allowed.
        pickle.UnpicklingError: not a torch zip archive, a TorchScript archive, or damaged (the
            caller names the file in its own words); ``OSError`` as ``open`` raises it.
    """
    path = Path(path)
    _check_archive(path)
    record: dict[str, type[Unread]] = {}
    module = SimpleNamespace(__name__=__name__, Unpickler=_unpickler_for(record), load=_refuse_legacy)
    try:
        data = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False, pickle_module=module)
    except RuntimeError as err:
        if "explicit pickle_module" in str(err):  # torch refuses any unpickler but its own then
            raise ExportError("TORCH_FORCE_WEIGHTS_ONLY_LOAD is set: torch then refuses the restricted loader that reads "
                              "checkpoints here (it allows only its own unpickler, which cannot read them); unset it") from err
        raise
    if record:
        _account(path, data, record, needed, argument, report)
    return data


def load_pickle(file: IO[bytes], path: str | Path, *, argument: str = "--checkpoint", needed: Iterable[Key] = (),
                report: bool = True) -> Any:
    """A plain pickle stream (torch.distributed.checkpoint's ``.metadata``), read like :func:`load_torch_file`."""
    record: dict[str, type[Unread]] = {}
    data = _unpickler_for(record)(file).load()
    if record:
        _account(Path(path), data, record, needed, argument, report)
    return data


def require(value: Any, source: str | Path, key: Key, argument: str = "--checkpoint") -> None:
    """Fail in one line if ``value`` (at ``key`` of the file ``source``), which the caller is about to
    use, is or holds an object the loader left unread: for values needed only in some cases."""
    for inner, type_name in _placeholders(value, tuple(key)):
        raise ForeignObjectError(_needed_message(argument, Path(source), inner, type_name))


def _needed_message(argument: str, path: Path, key: Key, type_name: str) -> str:
    return (f"{argument}: {str(path)!r} key {_key_text(key)} holds a {_type_text(type_name)}, which the export needs; "
            "only the types listed in lightning_lora/export/allowlist.py are read (nothing of it was imported or run)")


def _account(path: Path, data: Any, record: dict[str, type[Unread]], needed: Iterable[Key], argument: str,
             report: bool) -> None:
    """Fail on a placeholder where a needed value is; name the others in one line."""
    found = list(_placeholders(data, ()))
    needed = [tuple(key) for key in needed]
    for key, type_name in found:
        if any(_overlaps(key, want) for want in needed):
            raise ForeignObjectError(_needed_message(argument, path, key, type_name))
    if not report:
        return
    places: dict[str, list[str]] = {name: [] for name in record}
    for key, type_name in found:
        places.setdefault(type_name, []).append(_key_text(key))
    parts = [f"{_type_text(name)} at {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" if keys
             else f"{_type_text(name)} (dropped)" for name, keys in places.items()]
    _log.warning("%s: %s: left unread (not needed by the export; nothing of it was imported or run): %s",
                 argument, str(path), "; ".join(parts))


def _placeholders(value: Any, key: Key, seen: set[int] | None = None) -> Iterable[tuple[Key, str]]:
    """``(key path, type name)`` of every placeholder inside ``value`` (dicts, sequences, objects)."""
    if isinstance(value, Unread) or (isinstance(value, type) and issubclass(value, Unread)):
        yield key, value.type_name
        return
    if isinstance(value, (torch.Tensor, str, bytes, int, float, type(None))) or isinstance(value, type):
        return
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _placeholders(name, (*key, "<key>"), seen)
            yield from _placeholders(item, (*key, name), seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            yield from _placeholders(item, (*key, index), seen)
    elif hasattr(value, "__dict__"):
        for name, item in vars(value).items():
            yield from _placeholders(item, (*key, name), seen)


def _overlaps(key: Key, needed: Key) -> bool:
    """Whether the value at ``key`` is, holds, or is held by the value at ``needed``."""
    shorter = min(len(key), len(needed))
    return key[:shorter] == needed[:shorter]


def _key_text(key: Key) -> str:
    return "".join(f"[{part!r}]" for part in key) or "(the whole file)"


def _type_text(type_name: str) -> str:
    module, _, name = type_name.rpartition(".")
    suspicious = " (suspicious: names code that could run)" if is_suspicious(module, name) else ""
    return f"{type_name}{suspicious}"
