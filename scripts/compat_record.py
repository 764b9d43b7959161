"""Write a compatibility run's result file (called by scripts/compat.sh inside the run's virtualenv).

``python scripts/compat_record.py SET STATUS SECONDS PYTEST_LOG OUT.json``
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path


def installed() -> dict[str, str]:
    """Every distribution in this environment, names normalised, local labels (``+cpu``) dropped."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name != "lightning-lora":
            versions[name] = dist.version.split("+", 1)[0]
    return dict(sorted(versions.items()))


def pip_settings() -> dict[str, str]:
    """``pip config list`` as a mapping (index, find-links, machine-wide constraint files)."""
    text = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def held_back(settings: dict[str, str], versions: dict[str, str]) -> dict[str, dict[str, str]]:
    """Packages a machine-wide pip constraint held below the newest release the index offers."""
    held = {}
    for key, value in settings.items():
        if not key.endswith(".constraint"):
            continue
        path = Path(value.strip("'\""))
        for line in path.read_text().splitlines() if path.is_file() else []:
            line = line.split("#", 1)[0].strip()
            match = re.match(r"([A-Za-z0-9_.-]+)\s*([<>=!~].*)", line)
            if not match or match.group(1).lower() not in versions:
                continue
            name = match.group(1).lower()
            newest = _newest(name)
            if newest and newest != versions[name]:
                held[name] = {"installed": versions[name], "newest": newest, "held_by": f"{path}: {line}"}
    return held


def _newest(name: str) -> str | None:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--isolated"],
                         capture_output=True, text=True).stdout
    match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


def main(set_name: str, status: str, seconds: str, log: str, out: str) -> None:
    text = Path(log).read_text()
    summary = [line.strip("= ") for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    timed = re.search(r" in ([\d.]+)s", summary[-1]) if summary else None
    versions = installed()
    settings = pip_settings()
    result = {
        "set": set_name,
        "date": datetime.date.today().isoformat(),
        "passed": status == "0",
        "summary": re.sub(r" in [\d.]+s.*", "", summary[-1]) if summary else f"pytest exit status {status}",
        "pytest_seconds": float(timed.group(1)) if timed else float(seconds),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "pip_settings": settings,
        # Only `latest` lets pip choose: the other sets name their versions, whatever a cap allows.
        "held_back": held_back(settings, versions) if set_name == "latest" else {},
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{out}: {result['summary']} in {result['pytest_seconds']}s")


if __name__ == "__main__":
    main(*sys.argv[1:])
