"""Regenerate the shipped quickstart data: ``python data/quickstart/generate.py``.

The rows come from ``lightning_lora.tiny.quickstart_rows``: synthetic tasks (add, reverse, upper
case, sort letters, continue a sequence, count vowels) whose answers a program can check.
"""

import json
from pathlib import Path

from lightning_lora.tiny import quickstart_rows

if __name__ == "__main__":
    here = Path(__file__).parent
    for split in ("train", "test"):
        with (here / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in quickstart_rows(split):
                f.write(json.dumps(row) + "\n")
