"""The tested version envelope of the packages whose internals we build on, and the report for bug reports.

A leaf module: it imports nothing from Lightning, torch or the rest of the package at import time, so
every command can call :func:`warn_outside_tested_range` before it imports anything heavy, and the
``lightning-lora`` command listing stays fast.

Running outside the envelope is allowed (it may well work): the user gets one warning line per package,
once per process, on global rank 0, never a refusal.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
from typing import Any

__all__ = ["TESTED", "environment_report", "format_environment_report", "installed_versions", "outside_tested_range",
           "warn_outside_tested_range"]

# The tested range of each deep dependency: (oldest, latest), both ends inclusive. The two ends are the
# versions that `scripts/compat.sh` installed in its `oldest` and `latest` sets and recorded in
# compat/results/oldest.json and latest.json; tests/test_versions.py checks they agree. After a compat
# run, copy the recorded versions here (for a package absent from the oldest set, such as kernels, which
# only transformers >= 5.25 pulls in, the low end is the latest set's version).
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.6.0", "2.14.1"),
    "lightning": ("2.5.5", "2.6.6"),
    "deepspeed": ("0.19.8", "0.19.8"),
    "peft": ("0.21.2", "0.21.2"),
    "transformers": ("5.0.0", "5.25.0"),
    "accelerate": ("1.2.0", "1.16.0"),
    "bitsandbytes": ("0.49.0", "0.50.2"),
    "safetensors": ("0.4.3", "0.8.0"),
    "kernels": ("0.19.1", "0.19.1"),
    "lm-eval": ("0.4.13", "0.4.13"),  # the [eval] extra: evaluate --tasks, BenchmarkScores
}

log = logging.getLogger("lightning_lora")

# Set once the warnings were logged: every command and the callback call the warning, a process warns once.
_warned = False


def installed_versions() -> dict[str, str | None]:
    """The installed version of every package in :data:`TESTED`, as its distribution records it.

    Returns:
        Package name -> version string (local label included, e.g. ``2.13.0+cpu``), ``None`` when
        the package is not installed.
    """
    versions: dict[str, str | None] = {}
    for name in TESTED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _sort_key(version: str) -> Any:
    """A comparable key of a release: the local label (``+cpu``) and post-releases (packaging fixes)
    ignored, while a pre-release or dev build sorts before its release, so that one of the next
    version counts as outside the range and one of the oldest version as below it."""
    public = version.split("+", 1)[0]
    try:
        # packaging is not our declared dependency but always present: transformers, lightning, peft,
        # accelerate and deepspeed all require it. The fallback below only guards a broken install.
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _own_sort_key(public)
    try:
        parsed = Version(public)
    except InvalidVersion:
        return _own_sort_key(public)
    return (0, parsed if parsed.pre is not None or parsed.dev is not None else Version(parsed.base_version))


def _own_sort_key(version: str) -> tuple[int, tuple[int, ...], int]:
    """Numeric components, trailing zeros dropped; anything after them (``rc1``, ``.dev0``) a pre-release."""
    match = re.match(r"v?(\d+(?:\.\d+)*)(.*)", version.strip())
    if match is None:
        return (1, (), 0)  # unparseable: compares with nothing, so it counts as outside
    release = tuple(int(part) for part in match.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    rest = match.group(2).lower()
    final = not rest or rest.lstrip(".-_").startswith(("post", "rev"))
    return (1, release, 1 if final else 0)


def _in_range(version: str, oldest: str, latest: str) -> bool:
    key, low, high = _sort_key(version), _sort_key(oldest), _sort_key(latest)
    if not (key[0] == low[0] == high[0]):  # one parsed by packaging, another not: unknown, so outside
        return False
    if key[0] == 1 and not key[1]:
        return False
    return low <= key <= high


def outside_tested_range() -> list[str]:
    """One message for each installed package outside its tested range; absent packages are skipped.

    Returns:
        Messages such as ``transformers 5.26.0 is outside the tested range 5.0.0 - 5.25.0 of
        lightning-lora (...)``, in the order of :data:`TESTED`.
    """
    messages = []
    for name, version in installed_versions().items():
        if version is None or name not in TESTED:
            continue
        oldest, latest = TESTED[name]
        if not _in_range(version, oldest, latest):
            messages.append(f"{name} {version} is outside the tested range {oldest} - {latest} of lightning-lora "
                            "(it may work; report problems with the output of 'lightning-lora env')")
    return messages


def _global_rank() -> int:
    # The environment variables Lightning's rank_zero_only reads, in its order, without importing it.
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def warn_outside_tested_range(logger: logging.Logger | None = None) -> None:
    """Log one warning line per installed package outside its tested range.

    Only on global rank 0 and only once per process; a warning, never a refusal, and it never raises
    (a broken distribution's metadata must not stop a training run).

    Args:
        logger: where to log; default the ``lightning_lora`` logger.
    """
    global _warned
    if _warned or _global_rank() != 0:
        return
    _warned = True
    try:
        messages = outside_tested_range()
    except Exception:  # noqa: BLE001 - reading metadata must never stop the command
        return
    for message in messages:
        (logger or log).warning(message)


def _cuda() -> dict[str, Any]:
    """Whether torch sees CUDA, its CUDA version and the devices' names; every import guarded."""
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - the report is for broken installs too
        return {"available": False, "error": f"torch not importable: {type(err).__name__}: {err}"}
    report: dict[str, Any] = {"available": False, "version": getattr(torch.version, "cuda", None), "devices": []}
    try:
        report["available"] = bool(torch.cuda.is_available())
        if report["available"]:
            report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # noqa: BLE001 - a driver problem is what the report should show
        report["error"] = f"{type(err).__name__}: {err}"
    return report


def environment_report() -> dict[str, Any]:
    """What a bug report needs: our version, each package's version and whether it is in range,
    Python, the platform and CUDA.

    Returns:
        A JSON-serialisable dict with keys ``lightning_lora``, ``python``, ``platform``,
        ``packages`` (name -> ``version``, ``tested`` [oldest, latest], ``status``: ``ok``,
        ``OUTSIDE`` or ``not installed``) and ``cuda``.
    """
    from lightning_lora import __version__  # the package itself, already imported as our parent

    packages = {}
    for name, version in installed_versions().items():
        oldest, latest = TESTED[name]
        if version is None:
            status = "not installed"
        else:
            status = "ok" if _in_range(version, oldest, latest) else "OUTSIDE"
        packages[name] = {"version": version, "tested": [oldest, latest], "status": status}
    return {
        "lightning_lora": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "cuda": _cuda(),
    }


def format_environment_report(report: dict[str, Any]) -> str:
    """The report of :func:`environment_report` as the lines ``lightning-lora env`` prints.

    Args:
        report: a dict from :func:`environment_report`.

    Returns:
        One line per package (``name version (tested X - Y: ok|OUTSIDE|not installed)``), then
        Python, platform and CUDA.
    """
    width = max(len(name) for name in report["packages"])
    lines = [f"{'lightning-lora':<{width}} {report['lightning_lora']}"]
    for name, entry in report["packages"].items():
        oldest, latest = entry["tested"]
        lines.append(f"{name:<{width}} {entry['version'] or '-'} (tested {oldest} - {latest}: {entry['status']})")
    lines.append(f"{'python':<{width}} {report['python']}")
    lines.append(f"{'platform':<{width}} {report['platform']}")
    cuda = report["cuda"]
    if cuda.get("available"):
        devices = ", ".join(cuda["devices"])
        line = f"{cuda.get('version') or 'available'}: {len(cuda['devices'])} device(s): {devices}"
    else:
        built = f"torch built with CUDA {cuda['version']}" if cuda.get("version") else "torch built without CUDA"
        line = f"not available ({cuda['error'] if 'error' in cuda else built})"
    lines.append(f"{'cuda':<{width}} {line}")
    return "\n".join(lines)
