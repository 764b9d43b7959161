"""The README stays true to the code: the support table is generated from the runs the tests train, and
every error message the troubleshooting table quotes is one the code can still raise."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_support_table_is_generated_from_the_tested_runs() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "support_table.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_troubleshooting_quotes_messages_the_code_raises() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    source = "".join(path.read_text() for path in (REPO / "lightning_lora").rglob("*.py"))
    # A message is written across f-string pieces in the code: compare with quotes and joins removed.
    flat = re.sub(r'"\s*\n\s*f?"', "", source)
    for row in rows:
        first_cell = row.split(" | ")[0]
        for quoted in re.findall(r"`([^`]+)`", first_cell):
            assert quoted in flat, f"README quotes {quoted!r}, which no message in lightning_lora/ contains"
