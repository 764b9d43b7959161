"""PEFT's ``lora_bias`` on layers whose base has no bias: the export knows at step 0 what it can be.

Llama has config switches that give its projections a bias (``attention_bias``, ``mlp_bias``): the
merged model turns on those it needs, merges each lora bias into a zero bias and carries zero
biases elsewhere, verified like every export, by both merge implementations. Qwen2's ``o_proj``
and Phi-3's projections have no such switch: the export command refuses in one line naming
``--no-merge`` before it opens a base weight file, and ``HFExport`` says so at fit start and
exports the adapter alone. Adapters are built directly with PEFT (random weights and biases) and
saved as adapter directories: the tiny bases make each export take about a second.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.callbacks import HFExport
from lightning_lora.cli import export_main
from lightning_lora.errors import ExportError
from lightning_lora.export import export_checkpoint, verify_export
from lightning_lora.export.options import ExportOptions
from lightning_lora.export.sources import read_sources
from lightning_lora.tiny import quickstart_rows, tiny_config

R, ALPHA = 4, 8  # the adapters' scale is ALPHA / R
LAYERS = (0, 1)  # the tiny bases have two decoder layers
# Layers PEFT gives a lora bias that the base layer has no bias for.
UNMERGEABLE = {"qwen2": ["q_proj", "o_proj"], "phi3": ["qkv_proj"]}


def _adapter(base: Path, targets: list[str], out: Path) -> Path:
    """A PEFT adapter with ``lora_bias`` on ``targets``, every trained tensor random (biases included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_bias=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT 0.21 takes a 1-D lora_B bias for an unsharded ZeRO-3 tensor
        model.save_pretrained(out)
    return out


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bias_switches_are_found_by_building_the_model_with_each_field_on() -> None:
    from lightning_lora.export.bias_slots import bias_switches

    attention = {f"model.layers.{i}.self_attn.{name}.bias" for i in LAYERS
                 for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = {f"model.layers.{i}.mlp.{name}.bias" for i in LAYERS for name in ("gate_proj", "up_proj", "down_proj")}
    found = bias_switches(tiny_config("llama", 384))
    assert {name: set(keys) for name, keys in found.items()} == {"attention_bias": attention, "mlp_bias": mlp}
    assert found["mlp_bias"]["model.layers.0.mlp.down_proj.bias"] == [64]  # hidden size: down_proj's output
    assert bias_switches(tiny_config("qwen2", 384)) == {} and bias_switches(tiny_config("phi3", 384)) == {}


def test_llama_merged_model_turns_on_the_switches_it_needs(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    """q_proj and down_proj carry lora biases: attention_bias and mlp_bias go on; both merges write
    the same bytes, which from_pretrained loads without PEFT and which compute the adapter's function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_bases["llama"]
    adapter = _adapter(base, ["q_proj", "down_proj"], tmp_path / "adapter")
    manifests = {impl: export_checkpoint(adapter, tmp_path / impl, base_model=str(base), merge_impl=impl)
                 for impl in ("streaming", "peft")}
    for impl, manifest in manifests.items():
        assert manifest["verification"]["passed"], (impl, manifest["verification"]["problems"])
        assert manifest["bias_slots"]["switches"] == {"attention_bias": True, "mlp_bias": True}
    weights = [manifests[impl]["files"]["merged/model.safetensors"] for impl in ("streaming", "peft")]
    assert weights[0] == weights[1]  # sha256 and size

    config = json.loads((tmp_path / "peft" / "merged" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    merged = load_file(tmp_path / "peft" / "merged" / "model.safetensors")
    trained = load_file(adapter / "adapter_model.safetensors")
    for i in LAYERS:
        for module in ("self_attn.q_proj", "mlp.down_proj"):  # 0 + lora_B's bias * alpha / r, in fp32
            lora_bias = trained[f"base_model.model.model.layers.{i}.{module}.lora_B.bias"]
            assert torch.equal(merged[f"model.layers.{i}.{module}.bias"], lora_bias * (ALPHA / R))
        for module in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            bias, weight = merged[f"model.layers.{i}.{module}.bias"], merged[f"model.layers.{i}.{module}.weight"]
            assert bias.shape == weight.shape[:1] and not bias.any()

    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "streaming" / "merged").eval()(ids).logits
    # fp32 both ways; the merged product W + s*BA is rounded once where PEFT sums Wx and s*B(Ax).
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_verification_checks_the_biases_the_switch_adds(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    """A zero bias that is not zero, and a lora bias that is not the trained one, are each named."""
    base = tiny_bases["llama"]
    adapter = _adapter(base, ["q_proj"], tmp_path / "adapter")
    export_checkpoint(adapter, tmp_path / "export", base_model=str(base))
    weights = tmp_path / "export" / "merged" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.k_proj.bias"][5] = 1e-3
    tensors["model.layers.1.self_attn.q_proj.bias"][7] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    sources = read_sources(adapter, ExportOptions(base_model=str(base)))
    report = verify_export(weights.parent, sources.peft_model, sources.trained, sources.frozen, sources.base,
                           torch.float32)
    problems = " ".join(report["problems"])
    zero = "'model.layers.0.self_attn.k_proj.bias' differs from its source cast once (added zero bias"
    assert zero in problems, problems
    assert "'model.layers.1.self_attn.q_proj.bias' differs from PEFT's merge" in problems, problems
    assert "q_proj.bias" not in problems.replace("layers.1.self_attn.q_proj.bias", "")  # layer 0's is right


@pytest.mark.parametrize("arch", sorted(UNMERGEABLE))
def test_no_merged_model_without_a_bias_switch(arch: str, tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = _adapter(tiny_bases[arch], UNMERGEABLE[arch], tmp_path / "adapter")
    for impl in ("streaming", "peft"):
        with pytest.raises(ExportError, match=r"no merged model can hold the trained lora_B biases: pass --no-merge"):
            export_checkpoint(adapter, tmp_path / impl, base_model=str(tiny_bases[arch]), merge_impl=impl)
        assert not (tmp_path / impl).exists()
    manifest = export_checkpoint(adapter, tmp_path / "adapter-only", base_model=str(tiny_bases[arch]), merge=False)
    assert manifest["merged"] == "not requested"
    assert (tmp_path / "adapter-only" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("arch", sorted(UNMERGEABLE))
def test_export_command_refuses_before_opening_a_base_weight_file(
    arch: str, tiny_bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = Path(shutil.copytree(tiny_bases[arch], tmp_path / "base"))
    adapter = _adapter(base, UNMERGEABLE[arch], tmp_path / "adapter")  # records this base
    for weights in base.glob("*.safetensors"):
        weights.unlink()
    layer = "qkv_proj" if arch == "phi3" else "o_proj"
    capsys.readouterr()  # what building the adapter printed
    for extra in ([], ["--base-model", str(base)], ["--merge-impl", "peft"], ["--merge-impl", "streaming"]):
        assert export_main(["--checkpoint", str(adapter), "--output", str(tmp_path / "out"), *extra]) == 1
        line = _stderr_line(capsys)
        assert line.startswith("lightning-lora export: error: lora_bias=True on 2 layer(s) without a bias"), line
        assert f"model.layers.0.self_attn.{layer}" in line and "pass --no-merge" in line, line
    # --no-merge goes on, and needs the base weights this test deleted: the refusal came before them.
    assert export_main(["--checkpoint", str(adapter), "--output", str(tmp_path / "out"), "--no-merge"]) == 1
    assert "holds no safetensors weights" in _stderr_line(capsys)


def _fit(base: Path, tmp_path: Path, targets: list[str], export: HFExport | None, seen: list[str]) -> L.Trainer:
    """Two steps of LoraFinetuneModule(lora_bias=True); ``seen`` gets the warnings issued before the first step."""
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows("train")[:8]))
    data = InstructionDataModule(str(data_file), tokenizer=str(base), batch_size=4, val_split=0.0, max_length=32,
                                 template="human_assistant")
    module = LoraFinetuneModule(str(base), target_modules=targets, lora_bias=True, lora_dropout=0.0)

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 0:
                seen.extend(str(w.message) for w in caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[*([export] if export else []), FirstStep()], default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data)
    return trainer


def test_hfexport_says_at_fit_start_and_exports_the_adapter_alone(tiny_bases: dict[str, Path], tmp_path: Path,
                                                                   lightning_log: pytest.LogCaptureFixture) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen: list[str] = []
    export = HFExport(dirpath=str(tmp_path / "export"))
    _fit(tiny_bases["qwen2"], tmp_path, ["q_proj", "o_proj"], export, seen)
    assert export.result["global_step"] == 2
    told = [m for m in seen if m.startswith("HFExport: lora_bias=True on 2 layer(s) without a bias")]
    assert len(told) == 1 and "writes the adapter alone" in told[0] and "\n" not in told[0], seen
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["merged"].startswith("not written: lora_bias=True on 2 layer(s) without a bias (e.g. "
                                         "['model.layers.0.self_attn.o_proj', 'model.layers.1.self_attn.o_proj'])")
    assert export.result["merged"] == manifest["merged"] and not (tmp_path / "export" / "merged").exists()
    assert "not verified (no merged model: lora_bias=True on 2 layer(s)" in lightning_log.text
    base = AutoModelForCausalLM.from_pretrained(tiny_bases["qwen2"])
    model = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter")
    assert model.base_model.model.model.layers[0].self_attn.o_proj.lora_B["default"].bias is not None


def test_hfexport_merges_a_llama_run_through_the_switch(tiny_bases: dict[str, Path], tmp_path: Path,
                                                        lightning_log: pytest.LogCaptureFixture) -> None:
    export = HFExport(dirpath=str(tmp_path / "export"), merge_impl="peft")
    _fit(tiny_bases["llama"], tmp_path, ["v_proj"], export, [])
    told = "HFExport: lora_bias on layers without a bias: the merged model will set attention_bias=true"
    assert told in lightning_log.text
    assert export.result["global_step"] == 2 and export.result["merged"] == "written"
    assert export.result["verification"]["passed"]
    assert export.result["bias_slots"]["switches"] == {"attention_bias": True}


def test_the_module_says_it_at_fit_start_without_hfexport(tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    seen: list[str] = []
    _fit(tiny_bases["phi3"], tmp_path, ["qkv_proj"], None, seen)
    told = [m for m in seen if m.startswith("LoraFinetuneModule: lora_bias=True on 2 layer(s) without a bias")]
    assert len(told) == 1 and "Phi3Config" in told[0] and told[0].endswith("`lightning-lora export --no-merge`"), seen


@pytest.mark.parametrize(("settings", "message"), [
    ({"lora_bias": "yes"}, "model.lora_bias='yes' must be true or false"),
    ({"lora_bias": True, "use_dora": True}, "model.lora_bias=True cannot be combined with model.use_dora=True"),
    ({"lora_bias": True, "init_lora_weights": "pissa"},
     "model.lora_bias=True needs model.init_lora_weights true or false"),
])
def test_lora_bias_settings_are_checked_where_the_module_is_built(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraFinetuneModule("builtin:tiny-llama", **settings)
