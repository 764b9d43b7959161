"""Property tests: both merge implementations agree with PEFT's own merge of a single layer, over
random shapes, ranks, alphas, rsLoRA, DoRA and Conv1D (fan_in_fan_out) layers."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from lightning_lora.export.merge import merge
from lightning_lora.export.plan import Update, lora_scale
from lightning_lora.export.stream import merged_value


class OneLayer(torch.nn.Module):
    """The smallest model PEFT can wrap: one projection, Linear or GPT-2's Conv1D."""

    def __init__(self, n_in: int, n_out: int, conv1d: bool) -> None:
        super().__init__()
        self.proj = Conv1D(n_out, n_in) if conv1d else torch.nn.Linear(n_in, n_out)
        self.config = type("Config", (), {"tie_word_embeddings": False, "to_dict": lambda self: {}})()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def get_output_embeddings(self) -> None:
        return None


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.sampled_from([1, 2, 8, 16, 32, 0.5]),
    rslora=st.booleans(),
    dora=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_both_merges_equal_peft(n_in: int, n_out: int, r: int, alpha: float, rslora: bool, dora: bool, conv1d: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model = get_peft_model(
        OneLayer(n_in, n_out, conv1d),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora, use_dora=dora, fan_in_fan_out=conv1d),
    )
    layer = model.base_model.model.proj
    with torch.no_grad():  # trained-looking adapters: B is not zero, the magnitude is not the norm
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
        if dora:
            layer.lora_magnitude_vector["default"].weight.uniform_(0.5, 2.0)
    base_weight = layer.base_layer.weight.detach().clone()
    a = layer.lora_A["default"].weight.detach().clone()
    b = layer.lora_B["default"].weight.detach().clone()
    magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone() if dora else None

    # The streaming merger's arithmetic, from the tensors alone.
    config = model.peft_config["default"]
    update = Update(lora=(a, b, lora_scale(config, "proj", r), conv1d), magnitude=magnitude)
    streamed = merged_value(base_weight, update, torch.float32)

    # PEFT's merge, and ours around it (fp32 throughout here).
    reference = model.merge_and_unload(safe_merge=True).proj.weight.detach()
    assert streamed.shape == reference.shape
    assert torch.allclose(streamed, reference, rtol=1e-6, atol=1e-6), (streamed - reference).abs().max()

    # The PEFT implementation of the export wraps the same merge.
    again = get_peft_model(
        OneLayer(n_in, n_out, conv1d),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora, use_dora=dora, fan_in_fan_out=conv1d),
    )
    again_layer = again.base_model.model.proj
    with torch.no_grad():
        again_layer.base_layer.weight.copy_(base_weight)
        again_layer.lora_A["default"].weight.copy_(a)
        again_layer.lora_B["default"].weight.copy_(b)
        if dora:
            again_layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    ours = merge(again, torch.float32).proj.weight.detach()
    assert torch.equal(ours, reference)

    # And the scale is the one the LoRA papers define.
    expected_scale = alpha / r**0.5 if rslora else alpha / r
    assert abs(lora_scale(config, "proj", r) - expected_scale) < 1e-12
