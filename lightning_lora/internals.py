"""Every private name of another package that lightning_lora imports, and why we need it.

A private name (a dotted path with a component starting with ``_``) can change or vanish in any
release, without a deprecation. Listing them in one place tells whoever bumps a dependency what to
look at first, and tells a reviewer that a new one was taken on purpose. ``tests/test_internals.py``
scans the package's source and fails on a private name used but not listed here, and on a listed
name no longer used.

The scan sees imports (``from a._b import c``, ``from a import _c``, ``import a._b``) and private
attributes read from an imported name (``torch._C._x``, ``getattr(module, "_x")``). It cannot see
private attributes read from instances (``module._parameters`` of an ``nn.Module``, DeepSpeed's
``_old_init`` on a class, ``ModelCheckpoint._last_checkpoint_saved``): those are named in comments
where they are used.
"""

from __future__ import annotations

__all__ = ["PRIVATE_IMPORTS"]

# Dotted path of the name as the code writes it -> why it is needed (and, where one exists, the public
# alternative and why it does not do).
PRIVATE_IMPORTS: dict[str, str] = {
    "torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner": (
        "Loads chosen tensors of a sharded FSDP (torch.distributed.checkpoint) checkpoint into an empty state "
        "dict, without knowing their shapes beforehand, as torch's own dcp_to_torch_save does."
    ),
    "torch.distributed.checkpoint.state_dict_loader._load_state_dict": (
        "Reads an FSDP checkpoint in one process with no process group (no_dist=True) and the empty-state-dict "
        "planner, which the public load does not accept in that combination."
    ),
    "torch._utils._rebuild_tensor_v2": (
        "Rebuilds each dense tensor of a torch.save file, as torch.save names it; the restricted loader's "
        "allowlist calls it through a wrapper that drops the hooks and metadata a file could attach (no public "
        "equivalent)."
    ),
    "torch._C.PyTorchFileReader": (
        "The zip reader torch.load itself uses to tell a TorchScript archive (which it would hand to torch.jit.load, "
        "running its code) from a checkpoint; another zip reader can be shown other records by a crafted file."
    ),
    "pickle._Unpickler": (
        "The pure-Python unpickler, whose opcodes the restricted loader overrides (REDUCE, NEWOBJ, BUILD) so that a "
        "file calls and changes only what the allowlist says; the C unpickler exposes only find_class."
    ),
    "pickle._Unpickler.dispatch": (
        "The pure-Python unpickler's opcode table, copied so that the restricted loader replaces four of its "
        "handlers for its own class only."
    ),
    "liger_kernel.transformers.monkey_patch._apply_liger_kernel_to_instance": (
        "Patches the layers of one model instance with Liger's kernels; the public apply_liger_kernel_to_* "
        "functions also replace transformers' classes for every model built later in the process."
    ),
}
