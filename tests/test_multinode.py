"""Two nodes of one process each, simulated on this machine with the launcher a cluster uses.

Each "node" is its own ``torchrun --nnodes 2 --node-rank N`` that meets the other at a rendezvous
address, exactly as on two machines (README, "Several nodes"); only the shared filesystem is
trivially shared here. The run trains with DeepSpeed ZeRO-3 across both, and HFExport exports on
global rank 0 from the checkpoint both nodes wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import SCRIPT
from deepspeed_cpu import free_port


def test_two_nodes_with_torchrun_train_and_export(llama_base: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(SCRIPT), "--base", str(llama_base), "--out", str(tmp_path), "--strategy", "deepspeed",
             "--stage", "3", "--num-nodes", "2", "--export"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for node in range(2)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, (process, log) in enumerate(zip(nodes, logs)):
        assert process.returncode == 0, f"node {node} failed:\n{log[-5000:]}"

    # Both nodes wrote their ZeRO-3 partition of the checkpoint that HFExport exported.
    tag = tmp_path / "export-zero.ckpt" / (tmp_path / "export-zero.ckpt" / "latest").read_text().strip()
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["global_step"] == 4

    # The adapter holds exactly the fp32 master weights gathered from both nodes at the end.
    trained = torch.load(tmp_path / "trained.pt")
    adapter = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(trained) == 8
    for key, value in trained.items():
        torch.testing.assert_close(adapter[key.replace(".default.", ".")], value, rtol=0, atol=0)
