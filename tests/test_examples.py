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


def _run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / name), *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_export_a_checkpoint(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _run_example("export_a_checkpoint.py", "--output", str(tmp_path), "--max-steps", "12")
    export = tmp_path / "export"
    manifest = json.loads((export / "export.json").read_text())
    # Exported offline from the .ckpt file alone, base and LoRA config read from it.
    assert manifest["verification"]["passed"] and "passed=True" in result.stdout
    assert manifest["source"]["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert manifest["global_step"] == 12 and manifest["base_model"] == "builtin:tiny-llama"
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()  # stock transformers, no PEFT
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model_path"])
    adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(export / "merged")("Human: Add the two numbers. 12 + 30\n\nAssistant:",
                                                         return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged_logits, adapter_logits = merged(input_ids=ids).logits, adapter(input_ids=ids).logits
        assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
        # The export holds the trained adapter, not the base: the LoRA delta changes the logits.
        with adapter.disable_adapter():
            assert not torch.allclose(adapter(input_ids=ids).logits, adapter_logits, atol=1e-3)


def test_two_adapters_one_base(tmp_path: Path) -> None:
    from lightning_lora.inference import generate, load_for_generation

    result = _run_example("two_adapters_one_base.py", "--output", str(tmp_path), "--max-steps", "20")
    report = json.loads((tmp_path / "answers.json").read_text())
    prompts, answers, new = report["prompts"], report["answers"], report["max_new_tokens"]
    assert set(answers) == {"reverse", "add", "disabled", "unloaded"} and len(prompts) == 6
    assert all(f"{name:>9}: {texts[0]!r}" in result.stdout for name, texts in answers.items())
    # Each adapter, sharing the base with the other, answers as it does loaded alone.
    for name, directory in report["adapters"].items():
        alone, tokenizer = load_for_generation(report["base"], {name: directory}, dtype="fp32", device="cpu")
        assert generate(alone, tokenizer, prompts, max_new_tokens=new) == answers[name], name
    # Disabled or unloaded, the adapters leave exactly the base model.
    base, tokenizer = load_for_generation(report["base"], dtype="fp32", device="cpu")
    base_answers = generate(base, tokenizer, prompts, max_new_tokens=new)
    assert answers["disabled"] == base_answers and answers["unloaded"] == base_answers
    # ... and the two adapters are really different ones, both different from the base.
    assert len({tuple(answers["reverse"]), tuple(answers["add"]), tuple(base_answers)}) == 3
