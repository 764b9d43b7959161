"""QLoRA: training on a 4-bit (bitsandbytes) base, and the export of the model that was trained.

The references are built here, apart from the exporter:

- the *trained model*: the live PEFT model at the end of training (bitsandbytes' ``Linear4bit``
  layers + the adapter), whose logits on fixed ids the training script records;
- the *original merge*: a merge by hand into the 16-bit base on disk (``reference_merge``);
- the adapter on a base quantized again by transformers, as a user would load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_lora.cli import export_main

from conftest import QLORA_RUNS
from test_export import _export, reference_merge
from test_export import _load_dir as _merged

# Llama and a tied Qwen2, NF4 and FP4, and GPT-2 (Conv1D), fp32 compute.
FP32_RUNS = [*(f"qlora-{arch}-{kind}" for arch in ("llama", "qwen2") for kind in ("nf4", "fp4")), "qlora-gpt2-nf4"]


def _trained(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    recorded = torch.load(run / "trained_logits.pt")
    return recorded["input_ids"], recorded["logits"]


def _logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _quantization(run: Path) -> dict:
    return torch.load(run / "ckpt", weights_only=False, mmap=True)["lightning_lora"]["quantization"]


@pytest.mark.parametrize("name", FP32_RUNS)
def test_dequantized_export_is_the_trained_model(name: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs(name)
    kind = QLORA_RUNS[name][1][QLORA_RUNS[name][1].index("--quantization") + 1]
    recorded = _quantization(run)
    assert (recorded["quant_type"], recorded["double_quant"], recorded["compute_dtype"]) == (kind, True, "fp32")

    manifest = _export(run / "ckpt", tmp_path / "deq", base, "--merge-base", "dequantized", "--dtype", "fp32")
    ids, expected = _trained(run)
    scale = expected.abs().max().item()
    got = _logits(tmp_path / "deq" / "merged", ids)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, scale), f"{name}: the export is not the trained model"
    assert manifest["verification"]["passed"] and manifest["merge_base"] == "dequantized"
    assert manifest["quantization"]["quant_type"] == kind
    drift = manifest["verification"]["drift"]
    assert drift["merge_base"] == "dequantized" and drift["logits"]["argmax_agreement"] == 1.0
    assert drift["logits"]["max_abs_diff"] <= 1e-5 * max(1.0, drift["logits"]["scale"])
    assert len(drift["blocks"]) == 2 and all(block["relative"] <= 1e-5 for block in drift["blocks"])

    # PEFT's whole-model merge writes the same bytes as the streaming one.
    _export(run / "ckpt", tmp_path / "peft", base, "--merge-base", "dequantized", "--dtype", "fp32", "--merge-impl", "peft")
    peft = _merged(tmp_path / "peft" / "merged")
    assert all(torch.equal(peft[k], v) for k, v in _merged(tmp_path / "deq" / "merged").items())

    # A bf16 export is the fp32 one rounded once.
    _export(run / "ckpt", tmp_path / "bf16", base, "--merge-base", "dequantized", "--dtype", "bf16")
    fp32, bf16 = _merged(tmp_path / "deq" / "merged"), _merged(tmp_path / "bf16" / "merged")
    assert set(fp32) == set(bf16)
    for key, value in fp32.items():
        assert bf16[key].dtype == torch.bfloat16
        assert torch.all((bf16[key].float() - value).abs() <= 2.0**-8 * value.abs()), f"{name}: {key} is not one bf16 rounding away"


@pytest.mark.parametrize("name", FP32_RUNS)
def test_original_export_is_a_merge_into_the_16_bit_base(name: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs(name)
    manifest = _export(run / "ckpt", tmp_path / "orig", base, "--merge-base", "original")
    reference = reference_merge(base, torch.load(run / "trained.pt"), manifest["lora_config"])
    merged = _merged(tmp_path / "orig" / "merged")
    if "lm_head.weight" not in merged:  # a tied head: the reference carries the embeddings' copy
        reference.pop("lm_head.weight", None)
    assert set(merged) == set(reference)
    worst = max((merged[k].double() - reference[k]).abs().max().item() for k in merged)
    assert worst <= 1e-6, f"{name}: the original merge differs from a merge by hand by {worst}"
    assert manifest["verification"]["passed"]
    # The trained model ran on the 4-bit weights, not these: the drift must show, plausibly.
    drift = manifest["verification"]["drift"]
    ids, expected = _trained(run)
    actual = (_logits(tmp_path / "orig" / "merged", ids) - expected).abs().max().item()
    assert drift["merge_base"] == "original" and drift["logits"]["max_abs_diff"] > 1e-3
    assert 0.2 * actual <= drift["logits"]["max_abs_diff"] <= 5 * actual, (drift["logits"], actual)
    assert all(block["max_abs_diff"] > 1e-4 for block in drift["blocks"])
    assert 0.0 <= drift["logits"]["argmax_agreement"] <= 1.0


@pytest.mark.parametrize("name", FP32_RUNS)
def test_adapter_loads_onto_the_quantized_base(name: str, trained_runs, tmp_path: Path) -> None:
    """The adapter on the base quantized again (transformers, the recorded settings) is the trained
    model: the quantization is deterministic, so its 4-bit bytes equal the checkpoint's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_lora.export.quantized import keep_training_layout

    run, base = trained_runs(name)
    _export(run / "ckpt", tmp_path / "out", base, "--no-merge")
    recorded = _quantization(run)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recorded["quant_type"],
                                bnb_4bit_use_double_quant=recorded["double_quant"], bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(quantized, tmp_path / "out" / "adapter")
    # Every 4-bit entry (packed weights, scales, nested scales) is the checkpoint's, bit for bit:
    # validation ran between training steps and did not change the layout the checkpoint stores.
    stored = torch.load(run / "ckpt", weights_only=False, mmap=True)["state_dict"]
    mine = model.state_dict()
    quantized = [k for k in stored if ".weight." in k or (k.endswith(".weight") and stored[k].dtype == torch.uint8)]
    assert any(k.endswith("nested_absmax") for k in quantized) and any(k.endswith("base_layer.weight") for k in quantized)
    for key in quantized:
        assert torch.equal(stored[key], mine[key.removeprefix("model.")]), key
    ids, expected = _trained(run)
    model.eval()
    keep_training_layout(model)  # bitsandbytes' CPU inference kernel otherwise: other arithmetic, and 32-row blocks
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_callback_export_and_held_out_loss(trained_runs, tmp_path: Path) -> None:
    """HFExport (from memory) exports what the command exports from the checkpoint, and reports
    the held-out loss of both models, equal for the dequantized base."""
    run, base = trained_runs("qlora-llama-nf4")
    manifest = json.loads((run / "export" / "export.json").read_text())
    _export(run / "ckpt", tmp_path / "cmd", base)
    callback, command = _merged(run / "export" / "merged"), _merged(tmp_path / "cmd" / "merged")
    assert set(callback) == set(command) and all(torch.equal(callback[k], command[k]) for k in callback)
    heldout = manifest["verification"]["drift"]["heldout"]
    assert heldout["tokens"] > 0 and abs(heldout["loss_export"] - heldout["loss_trained"]) <= 1e-4 * heldout["loss_trained"]
    # The command rebuilt the same validation batches from the data module the checkpoint records.
    rebuilt = json.loads((tmp_path / "cmd" / "export.json").read_text())["verification"]["drift"]["heldout"]
    assert (rebuilt["batches"], rebuilt["tokens"]) == (heldout["batches"], heldout["tokens"])
    assert abs(rebuilt["loss_trained"] - heldout["loss_trained"]) <= 1e-5 * heldout["loss_trained"]
    original = _export(run / "ckpt", tmp_path / "orig", base, "--merge-base", "original")["verification"]["drift"]["heldout"]
    assert original["tokens"] == heldout["tokens"] and original["loss_export"] != original["loss_trained"]


def test_ddp_training_and_export(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("qlora-ddp")
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["merge_base"] == "original"
    drift = manifest["verification"]["drift"]
    assert drift["logits"]["max_abs_diff"] > 1e-3 and drift["heldout"]["tokens"] > 0
    reference = reference_merge(base, torch.load(run / "trained.pt"), manifest["lora_config"])
    merged = _merged(run / "export" / "merged")
    assert max((merged[k].double() - reference[k]).abs().max().item() for k in merged) <= 1e-6


def test_bf16_compute_drift_is_bf16_arithmetic(trained_runs, tmp_path: Path) -> None:
    """Training multiplied in bf16; the fp32 export of the dequantized weights differs from that model
    by bf16 arithmetic alone (a few roundings of 2**-8 per block), far less than the original base."""
    run, base = trained_runs("qlora-llama-nf4-bf16-compute")
    assert _quantization(run)["compute_dtype"] == "bf16"
    deq = _export(run / "ckpt", tmp_path / "deq", base, "--dtype", "fp32")["verification"]["drift"]
    orig = _export(run / "ckpt", tmp_path / "orig", base, "--merge-base", "original", "--dtype", "fp32")["verification"]["drift"]
    assert all(0 < block["relative"] <= 8 * 2.0**-8 for block in deq["blocks"]), deq["blocks"]
    assert deq["logits"]["max_abs_diff"] * 10 < orig["logits"]["max_abs_diff"]


def test_max_drift_fails_the_export_and_publishes_nothing(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("qlora-llama-fp4")
    args = ["--checkpoint", str(run / "ckpt"), "--base-model", str(base), "--merge-base", "original", "--max-drift", "0"]
    assert export_main([*args, "--output", str(tmp_path / "strict")]) != 0
    assert not (tmp_path / "strict").exists()
    assert export_main([*args[:-4], "--max-drift", "0", "--output", str(tmp_path / "deq")]) == 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"quantization": "int8"}, "LLM.int8 quantizes the activations too"),
    ({"quantization": "nf8"}, "model.quantization='nf8' is not one of"),
    ({"quantization": "nf4", "init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"quantization": "nf4", "use_dora": True}, "model.use_dora=true is not supported with model.quantization='nf4'"),
])
def test_settings_no_export_could_reproduce_are_refused(settings: dict, message: str, llama_base: Path) -> None:
    from lightning_lora import LoraFinetuneModule

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        LoraFinetuneModule(str(llama_base), **settings)


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_sharding_strategies_are_refused_at_setup(strategy: str, llama_base: Path) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_lora import LoraFinetuneModule

    module = LoraFinetuneModule(str(llama_base), quantization="nf4")
    if strategy == "deepspeed":
        chosen = DeepSpeedStrategy(stage=2)
        module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=chosen, logger=False, enable_checkpointing=False)
    else:  # Lightning builds no FSDP Trainer without a GPU: the strategy is all the check reads
        chosen = FSDPStrategy()
        module._trainer = SimpleNamespace(strategy=chosen)
    with pytest.raises(ValueError, match=f"cannot be trained with {type(chosen).__name__}"):
        module.configure_model()


@pytest.mark.parametrize("merge_base", ["dequantized", "original"])
def test_verify_command_rechecks_either_export(merge_base: str, trained_runs, tmp_path: Path) -> None:
    """``lightning-lora verify`` rebuilds the chosen base from the checkpoint again, and refuses a
    dequantized export whose checkpoint is gone instead of checking it against the wrong base."""
    from lightning_lora.cli import verify_main

    run, base = trained_runs("qlora-qwen2-nf4")
    out = tmp_path / "out"
    _export(run / "ckpt", out, base, "--merge-base", merge_base)
    assert verify_main([str(out), "--base-model", str(base)]) == 0
    moved = tmp_path / "elsewhere.ckpt"
    (run / "ckpt").rename(moved)
    try:
        assert verify_main([str(out), "--base-model", str(base)]) == (1 if merge_base == "dequantized" else 0)
        assert verify_main([str(out), "--base-model", str(base), "--checkpoint", str(moved)]) == 0
    finally:
        moved.rename(run / "ckpt")


def test_a_dequantization_unlike_training_fails_the_export(trained_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strict check and the merge share the exporter's dequantization; only the drift, which runs
    bitsandbytes' own layers, can see it go wrong. Here it goes wrong the way a transposed square
    matrix would (GPT-2's c_proj): the export must fail, not publish a "verified" wrong model."""
    from lightning_lora.errors import VerificationError
    from lightning_lora.export.pipeline import export_checkpoint
    from lightning_lora.export.quantized import QuantizedBase

    run, base = trained_runs("qlora-llama-fp4")
    right = QuantizedBase.dequantize
    monkeypatch.setattr(QuantizedBase, "dequantize", lambda self, key: right(self, key).T.contiguous()
                        if right(self, key).shape[0] == right(self, key).shape[1] else right(self, key))
    with pytest.raises(VerificationError, match="the dequantized base is not what training multiplied with"):
        export_checkpoint(run / "ckpt", tmp_path / "out", base_model=str(base))
    assert not (tmp_path / "out").exists()


def test_a_4bit_run_resumes_from_its_checkpoint(trained_runs, tmp_path: Path) -> None:
    """Resuming quantizes the base again; its bytes are the checkpoint's, the adapter and the step
    continue where they were, and a checkpoint of another base is refused with the tensor's name."""
    from conftest import run_train_script

    run, base = trained_runs("qlora-llama-fp4")
    args = [*QLORA_RUNS["qlora-llama-fp4"][1], "--resume-from", str(run / "ckpt"), "--record"]
    args[args.index("--steps") + 1] = "18"
    run_train_script("qlora-resume", base, tmp_path / "resumed", args)
    start = torch.load(tmp_path / "resumed" / "start.pt")
    saved = torch.load(run / "ckpt", weights_only=False, mmap=True)["state_dict"]
    assert start["global_step"] == 16
    assert start["trainable"] and all(torch.equal(value, saved[f"model.{key}"].float()) for key, value in start["trainable"].items())
    assert json.loads((tmp_path / "resumed" / "finished.json").read_text())["global_step"] == 18

    from lightning_lora import LoraFinetuneModule

    other = LoraFinetuneModule(str(base), quantization="fp4", dtype="bf16", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    other.configure_model()
    with pytest.raises(ValueError, match="differs from the base quantized now"):
        other.on_load_checkpoint(torch.load(run / "ckpt", weights_only=False))
