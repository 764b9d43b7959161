"""Packed, token-budget batches, length-grouped and random, under real two-process DDP (about 20 s
each: two Python processes start).

The in-process tests in ``test_batching.py`` check the sampler's arithmetic; this one checks that
Lightning, with its own ``DistributedSampler`` injection on, trains each example once per epoch on
exactly one rank, that both ranks step equally often (no hang on an uneven split), and that the
epochs differ. Random batches also check that Lightning, which counts an epoch's batches once,
trains all of every epoch's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lightning_lora import InstructionDataModule

SCRIPT = REPO / "tests" / "scripts" / "batching_ddp_run.py"


# Random batches only: what two processes add (Lightning's sampler injection, equal step counts, set_epoch
# reaching the sampler) is the same for length-grouped ones, whose arithmetic test_batching.py checks at
# 1-4 ranks in-process; tests/test_elastic.py follows fixed-size batches across ranks exactly.
@pytest.mark.parametrize("order", ["random"])
def test_ddp_ranks_train_disjoint_examples_in_equally_many_packed_batches(
    tmp_path: Path, llama_base: Path, order: str
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(llama_base), "--out", str(tmp_path)]
        + (["--random"] if order == "random" else []),
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # The examples, built here from the same file: the token sequences every epoch must cover.
    data = InstructionDataModule(str(tmp_path / "train.jsonl"), tokenizer=str(llama_base), val_split=0.0, max_length=64)
    data.setup("fit")
    want = sorted(e["input_ids"] for e in data.train_examples)
    assert ranks[0]["num_examples"] == len(want) == 37

    for epoch in range(2):
        shares = [rank["epochs"][epoch] for rank in ranks]
        assert len(shares[0]) == len(shares[1]) > 0  # equally many steps: neither rank waits forever
        trained = sorted(example for share in shares for batch in share for example in batch)
        assert trained == want  # each example once, on one rank
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # Lightning's set_epoch reached the sampler
    assert all(math.isfinite(loss) for rank in ranks for loss in rank["losses"])
    assert all(loss == 0.0 for rank in ranks for loss in rank["padding_losses"])
