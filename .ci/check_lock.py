"""Fail when the installed set differs from the lock: ``python .ci/check_lock.py requirements.lock``.

Compares ``pip freeze --exclude-editable`` (local labels such as ``+cpu`` dropped, names normalised)
with the lock's ``name==version`` lines. pip's freeze leaves out pip, setuptools and wheel, so they
are not compared.
"""

from __future__ import annotations

import re
import subprocess
import sys

NOT_FROZEN = {"pip", "setuptools", "wheel", "distribute"}


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, version = (part.strip() for part in line.split("==", 1))
        name = re.sub(r"[-_.]+", "-", name.split("[", 1)[0]).lower()
        if name not in NOT_FROZEN:
            found[name] = version.split("+", 1)[0].split(";", 1)[0].strip()
    return found


def main(lock_path: str) -> int:
    with open(lock_path, encoding="utf-8") as lock_file:
        locked = pins(lock_file.read().splitlines())
    frozen_text = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                                 check=True, capture_output=True, text=True).stdout
    installed = pins(frozen_text.splitlines())
    problems = [f"{name}: locked {locked.get(name, '-')}, installed {installed.get(name, '-')}"
                for name in sorted(set(locked) | set(installed)) if locked.get(name) != installed.get(name)]
    for problem in problems:
        print(f"{lock_path}: {problem}", file=sys.stderr)
    if problems:
        print(f"the installed packages differ from {lock_path} ({len(problems)}); refresh it with "
              "'bash scripts/lock.sh' or install with -c {lock_path}", file=sys.stderr)
        return 1
    print(f"installed packages equal {lock_path} ({len(locked)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
