"""restore_class_decorators against a real deepspeed.zero.Init in a separate process (the context
patches every nn.Module class of the process it runs in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from deepspeed_cpu import free_port


def test_only_classes_created_inside_zero_init_are_restored_and_then_run() -> None:
    script = REPO / "tests" / "scripts" / "zero_init_classes.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["llama_before"] == "ok", report
    if report["decorated"]:
        # The defect, as DeepSpeed leaves it: the class imported inside the context cannot run.
        assert "_kernel_funcs" in report["qwen2_before"], report
        # Exactly that class is repaired, once; the class imported before keeps its own __init__.
        assert report["restored"] == ["transformers.models.qwen2.modeling_qwen2.Qwen2Attention"], report
    else:  # no kernels decorators (kernels not installed, transformers < 5.25): nothing to repair
        assert report["qwen2_before"] == "ok" and report["restored"] == [], report
    assert report["restored_again"] == [], report
    assert report["llama_init_unchanged"], report
    assert report["qwen2_after"] == "ok", report


def test_the_repair_needs_deepspeeds_saved_init_and_a_kernels_forward() -> None:
    """The same three conditions on classes built here with kernels' public decorators, DeepSpeed's
    exit reproduced by its two assignments (``_old_init`` saved at class creation, put back on
    exit): a whole class and a plain one are left alone, a reverted one gets its wrapper back."""
    import torch

    kernels = pytest.importorskip("kernels", reason="kernels' decorators are what is repaired")
    use_kernel_forward_from_hub, use_kernelized_func = kernels.use_kernel_forward_from_hub, kernels.use_kernelized_func

    from lightning_lora.model_classes import restore_class_decorators

    @use_kernel_forward_from_hub("LightningLoraTestIdentity")
    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    class Whole(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return identity(x)

    class Reverted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return identity(x)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()

    undecorated = Reverted.__init__
    Reverted._old_init = undecorated  # what DeepSpeed's __init_subclass__ hook saves
    Whole, Reverted = use_kernelized_func(identity)(Whole), use_kernelized_func(identity)(Reverted)
    Reverted.__init__ = undecorated  # what its exit puts back
    Whole._old_init = Whole.__init__  # entered zero.Init already decorated: saved and restored whole
    Plain._old_init = Plain.__init__
    whole_init = Whole.__init__
    assert not hasattr(Reverted(), "_kernel_funcs")  # the defect

    restored = restore_class_decorators()
    assert [name.rsplit(".", 1)[1] for name in restored] == ["Reverted"]
    assert Whole.__init__ is whole_init
    x = torch.ones(2)
    assert torch.equal(Reverted()(x), x) and hasattr(Reverted(), "_kernel_funcs")
    assert restore_class_decorators() == []


def test_import_model_classes_names_the_causal_lm_class(llama_base) -> None:
    from transformers import CLIPVisionConfig, LlamaForCausalLM

    from lightning_lora.model_classes import import_model_classes

    assert import_model_classes(llama_base) is LlamaForCausalLM
    assert import_model_classes(CLIPVisionConfig()) is None  # no causal LM of that type: loading reports it


def test_module_setup_leaves_a_missing_base_to_configure_model(tmp_path) -> None:
    from lightning_lora import LoraFinetuneModule

    module = LoraFinetuneModule(str(tmp_path / "missing"))
    module.setup("fit")  # quietly: configure_model names model.model_name_or_path
    with pytest.raises(OSError, match="model.model_name_or_path="):
        module.configure_model()
