"""Regenerate the README's "Tested with" table from compat/results/{oldest,locked,latest}.json.

``python scripts/tested_with.py`` rewrites the table between its markers; tests/test_compat.py fails
when the README and the results differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "compat" / "results"
SETS = ("oldest", "locked", "latest")
PACKAGES = ("torch", "lightning", "deepspeed", "peft", "transformers", "accelerate", "bitsandbytes", "safetensors",
            "kernels", "lm-eval")
START, END = "<!-- tested-with:start -->", "<!-- tested-with:end -->"


def load_results() -> dict[str, dict]:
    return {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in SETS}


def render(results: dict[str, dict]) -> str:
    """The table: one row per package, then the smoke tier's outcome and the date of each set."""
    lines = ["| package | " + " | ".join(f"`{name}`" for name in SETS) + " |", "|---" * (len(SETS) + 1) + "|"]
    for package in PACKAGES:
        cells = [results[name]["versions"].get(package, "not installed") for name in SETS]
        lines.append(f"| {package} | " + " | ".join(cells) + " |")
    outcome = [f"{'pass' if r['passed'] else 'FAIL'} ({r['summary']}, {r['pytest_seconds']:.0f} s)"
               for r in (results[name] for name in SETS)]
    lines.append("| smoke tier | " + " | ".join(outcome) + " |")
    lines.append("| date | " + " | ".join(results[name]["date"] for name in SETS) + " |")
    return "\n".join(lines)


def rewrite(text: str, table: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    new = rewrite(text, render(load_results()))
    if new != text:
        README.write_text(new)
        print(f"{README.name}: Tested with table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
