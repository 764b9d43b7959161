"""Model classes that stay whole across ``deepspeed.zero.Init``.

While ``deepspeed.zero.Init`` is active, DeepSpeed wraps the ``__init__`` of every ``nn.Module``
class so that parameters are partitioned as they are created, including classes *created* inside
the context: its ``__init_subclass__`` hook saves the class's ``__init__`` the moment the class
statement finishes, before any class decorator runs. On exit it puts that saved ``__init__`` back.
A class decorator that wrapped ``__init__`` is thereby undone, while what it did to the other
methods stays.

``kernels.use_kernelized_func`` (on the attention classes of transformers >= 5.25) is such a
decorator: its ``forward`` reads ``self._kernel_funcs``, which only its ``__init__`` sets. A model
class first imported inside the context (Lightning enters it around ``configure_model``, where
``from_pretrained`` imports the modeling module) therefore builds instances after the context whose
forward fails with ``AttributeError: ... has no attribute '_kernel_funcs'``: the export's
verification, a later ``generate``, any model the user builds in that process.

Two steps keep such classes whole, both without switching the kernels integration off:

- :func:`import_model_classes` imports a model's classes *before* the context is entered (our
  module's and ``HFExport``'s ``setup``), so DeepSpeed saves, and restores, the decorated
  ``__init__``;
- :func:`restore_class_decorators` repairs the classes that were created inside the context anyway
  (a user's ``configure_model`` importing another architecture): it applies
  ``use_kernelized_func`` again, with the functions the class was declared with, to the class's
  own ``__init__`` and ``forward``. It runs before the export or ``generate`` build a model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = ["import_model_classes", "restore_class_decorators"]

log = logging.getLogger(__name__)

# The attribute in which DeepSpeed's zero.Init keeps the ``__init__`` it restores on exit.
_DEEPSPEED_SAVED_INIT = "_old_init"


def import_model_classes(model: str | os.PathLike[str] | Any, trust_remote_code: bool = False) -> type | None:
    """Import the causal-LM class of ``model`` (a directory, hub id or ``PretrainedConfig``), and so
    every class its modeling module defines, while no ``deepspeed.zero.Init`` is active.

    Returns the class, or ``None`` for a model type transformers does not map (custom code: its
    loading reports that itself).
    """
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lookup imports the modeling module
    except KeyError:
        return None


def restore_class_decorators() -> list[str]:
    """Re-apply ``use_kernelized_func`` to the classes whose decorated ``__init__`` DeepSpeed's
    ``zero.Init`` replaced by the undecorated one on exit; returns their qualified names.

    A class is repaired only when all three hold: its ``__init__`` is the one DeepSpeed saved, that
    ``__init__`` is not the kernels wrapper, and its ``forward`` is. Classes imported before the
    context (whose saved ``__init__`` is the wrapper) are left alone, so a second call does nothing.
    """
    decorate = _kernels_decorator()
    if decorate is None:
        return []
    wrapper_file = decorate.__code__.co_filename  # where its __init__ and forward wrappers are written
    repaired = []
    for cls in _module_classes():
        functions = _unwrapped_kernelized(cls, wrapper_file)
        if functions is None:
            continue
        cls.forward = cls.__dict__["forward"].__wrapped__  # the decorator wraps it again
        decorate(*functions)(cls)
        repaired.append(f"{cls.__module__}.{cls.__qualname__}")
    if repaired:
        log.info("restored the kernels wrappers that deepspeed.zero.Init's exit removed from %s", ", ".join(repaired))
    return repaired


def _kernels_decorator() -> Any:
    try:
        from kernels import use_kernelized_func
    except ImportError:  # no kernels: transformers' decorator leaves the classes as they are
        return None
    return use_kernelized_func


def _module_classes() -> list[type]:
    """Every subclass of ``torch.nn.Module`` defined so far."""
    found, stack = {}, [torch.nn.Module]  # a dict: insertion order, and a class reached twice kept once
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                stack.append(sub)
    return list(found)


def _unwrapped_kernelized(cls: type, wrapper_file: str) -> tuple[Any, ...] | None:
    """The functions of ``cls``'s kernels decorator when DeepSpeed has undone its ``__init__``."""
    own = cls.__dict__
    init, forward = own.get("__init__"), own.get("forward")
    if init is None or init is not own.get(_DEEPSPEED_SAVED_INIT):
        return None
    if _decorator_arguments(init, wrapper_file) is not None:  # imported before the context: whole
        return None
    if not hasattr(forward, "__wrapped__"):  # the forward wrapper is made with functools.wraps
        return None
    return _decorator_arguments(forward, wrapper_file)


def _decorator_arguments(function: Any, wrapper_file: str) -> tuple[Any, ...] | None:
    """The functions a ``use_kernelized_func`` wrapper was made for, or ``None`` for any other function.

    Recognised by where its code was written (``wrapper_file``, the decorator's own file) and the
    name of the closure variable holding them (both its ``__init__`` and its ``forward`` wrapper close
    over it); ``functools.wraps`` copies only names and docs.
    """
    code = getattr(function, "__code__", None)
    if code is None or code.co_filename != wrapper_file or "decorator_args" not in code.co_freevars:
        return None
    return function.__closure__[code.co_freevars.index("decorator_args")].cell_contents
