"""How much memory this process may still use, and the merge implementation ``auto`` takes.

``/proc/meminfo`` tells what the machine has free, not what a container, a SLURM job or a
``ulimit`` allows: under a 1.5 GiB cgroup on a 24 GiB machine the whole-model merge was once
chosen and OOM-killed. ``auto`` now always streams (see :func:`choose_merge_impl`), and the limit
read here says how much the export may use. The effective limit is the smallest of: the machine's available memory; every
cgroup (v1 and v2) on the path from this process's group to the root, less what the group
already uses that the kernel cannot reclaim; ``RLIMIT_AS`` and ``RLIMIT_DATA`` less what the
process already has mapped.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
from pathlib import Path

from lightning_lora.errors import ExportError
from lightning_lora.export.weights import WeightFiles

log = logging.getLogger("lightning_lora")

__all__ = ["MERGE_IMPLS", "available_memory", "choose_merge_impl", "export_memory_needs"]

MERGE_IMPLS = ("auto", "peft", "streaming")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 62
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    return int(text) if text.isdigit() else None


def _reclaimable(stat_file: Path, key: str) -> int:
    """Page cache the kernel can drop under pressure (inactive file pages), from memory.stat."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_paths() -> list[tuple[str, str]]:
    """(controllers, path) of each hierarchy this process belongs to, from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    return [(parts[1], parts[2]) for line in lines if len(parts := line.split(":", 2)) == 3]


def _cgroup_limits() -> list[tuple[int, str]]:
    """(bytes still usable, where) for every memory cgroup on the way from ours to the root."""
    found = []
    for controllers, path in _cgroup_paths():
        if controllers == "":  # cgroup v2
            root, limit_name, usage_name, stat_key = _CGROUP_ROOT, "memory.max", "memory.current", "inactive_file"
            if (_CGROUP_ROOT / "unified" / "cgroup.controllers").is_file() and not (_CGROUP_ROOT / "cgroup.controllers").is_file():
                root = _CGROUP_ROOT / "unified"
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name, stat_key = _CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        group = root / path.lstrip("/")
        while True:
            limit, usage = _read_int(group / limit_name), _read_int(group / usage_name)
            if limit is not None and limit < _UNLIMITED // 2 and usage is not None:
                used = max(0, usage - _reclaimable(group / "memory.stat", stat_key))
                found.append((max(0, limit - used), f"cgroup {group} ({limit_name} {limit / 2**30:.2f} GiB)"))
            if group == root or root not in group.parents:
                break
            group = group.parent
    return found


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rlimits() -> list[tuple[int, str]]:
    found = []
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            found.append((max(0, soft - _status_kib(field)), f"{name} ({soft / 2**30:.2f} GiB)"))
    return found


def _machine() -> tuple[int, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "the machine's available memory"
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the machine's free memory"


def available_memory() -> tuple[int, str]:
    """Bytes this process can still allocate, and what sets that bound."""
    return min([_machine(), *_cgroup_limits(), *_rlimits()], key=lambda found: found[0])


def export_memory_needs(base: WeightFiles, trained_bytes: int) -> dict[str, int]:
    """Peak bytes of each step, estimated from the base's headers.

    - ``peft``: the whole base in its own dtype, plus one fp32 layer while it merges;
    - ``streaming``: the largest tensor three times in fp32 (start, delta, cast result);
    - ``verify``: two decoder blocks in fp32 and the largest tensor outside them twice (the
      reference and the merged embeddings or head), plus the trained tensors.
    """
    blocks: dict[int, int] = {}
    outside = 0
    largest = 0
    for key, info in base.tensors.items():
        fp32 = 4 * math.prod(info.shape)
        largest = max(largest, fp32)
        match = _LAYER.search(f".{key}")
        if match:
            blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0) + fp32
        else:
            outside = max(outside, fp32)
    block = max(blocks.values(), default=0)
    return {
        "peft": base.nbytes + largest + trained_bytes,
        "streaming": 3 * largest + trained_bytes,
        "verify": 2 * block + 2 * outside + trained_bytes,
    }


def choose_merge_impl(requested: str, base: WeightFiles, trained_bytes: int, workers: int, verify: bool) -> tuple[str, str]:
    """The merge implementation to use, and why.

    ``auto`` streams: it writes the same files as the whole-model merge, at least as fast (twice
    as fast on the 1.1B benchmark) in a fraction of the memory, and several workers can share it.
    The memory this process may use is still read (machine, cgroups, rlimits) and recorded; when
    even the streaming export and its verification would not fit in it, a warning says so.
    """
    if requested not in MERGE_IMPLS:
        raise ExportError(f"--merge-impl={requested!r} is not one of {list(MERGE_IMPLS)}")
    if requested == "peft" and workers > 1:
        raise ExportError(f"--merge-impl=peft cannot be shared by --workers={workers}; use streaming (or auto)")
    needs = export_memory_needs(base, trained_bytes)
    available, bound = available_memory()
    impl = "streaming" if requested == "auto" else requested
    peak = max(needs[impl], needs["verify"] if verify else 0)
    if peak > available:
        log.warning("the export needs about %.2f GiB but only %.2f GiB may be used (%s): it may be killed",
                     peak / 2**30, available / 2**30, bound)
    why = "requested" if requested != "auto" else "the streaming merge writes the same files in less time and memory"
    return impl, f"{why}; needs about {peak / 2**30:.2f} GiB, {available / 2**30:.2f} GiB may be used ({bound})"
