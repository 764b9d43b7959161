"""Every script in examples/ runs as a user would run it, and does what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO


def test_own_module_with_hfexport(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = REPO / "examples" / "own_module_with_hfexport.py"
    result = subprocess.run([sys.executable, str(script), "--output", str(tmp_path), "--max-steps", "12"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "export"
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["global_step"] == 12
    # The user's attribute name was found and the adapter loads onto the base it names.
    base = manifest["lora_config"]["base_model_name_or_path"]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), export / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
