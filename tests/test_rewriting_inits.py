"""Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA): the export is the
model that was trained, on ``.ckpt`` files and ZeRO-2 checkpoints alike.

The trained model is rebuilt here independently: PEFT's own ``get_peft_model`` on the original
base, the rewritten base weights and the trained adapter recorded by the training script from the
live model at the end of training, PEFT's own ``merge_and_unload``. The export must equal it, its
adapter must reproduce it on the *original* base (PEFT's conversion), and a verification that
compared against the wrong base would have to fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lora.cli import export_main
from lightning_lora.export.inits import rewrites_base

from conftest import SCRIPT
from test_export import _export
from test_export import _load_dir as _merged

REWRITING = ["pissa", "pissa-niter", "olora", "corda", "lora-ga"]


def trained_model(run: Path, base: Path, lora: dict) -> torch.nn.Module:
    """The model as training left it, rebuilt with PEFT from what the training script recorded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    skip = ("init_lora_weights", "inference_mode", "corda_config", "lora_ga_config", "loftq_config", "eva_config")
    known = {k: v for k, v in lora.items() if k in LoraConfig.__dataclass_fields__ and k not in skip}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**known)).eval()
    state = {**torch.load(run / "trained.pt"), **torch.load(run / "frozen.pt")}
    own = model.state_dict()
    assert set(state) <= set(own), sorted(set(state) - set(own))[:3]
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return model


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", [*REWRITING, *(f"zero2-{n}" for n in REWRITING)])
def test_rewritten_base_exports_the_trained_model(name: str, trained_runs, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, base = trained_runs(name)
    manifest = _export(run / "ckpt", tmp_path / "out", base)
    out = tmp_path / "out"
    trained = trained_model(run, base, manifest["lora_config"])
    original = _merged(base)
    rewritten = {k: v for k, v in torch.load(run / "frozen.pt").items()}
    changed = [k for k, v in rewritten.items() if not torch.equal(v, original[k.removeprefix("base_model.model.").replace(".base_layer", "")])]
    assert len(changed) == len(rewritten) > 0, "the initialisation rewrote no base weight: the test would prove nothing"
    assert manifest["verification"]["passed"] and manifest["verification"]["rewritten_base_tensors"] == len(rewritten)

    # Merged weights: PEFT's own merge of the trained model (fp32: <= 1e-5).
    reference = copy.deepcopy(trained).merge_and_unload().state_dict()
    merged = _merged(out / "merged")
    worst = max((merged[k] - reference[k]).abs().max().item() for k in merged)
    assert worst <= 1e-5, f"{name}: merged weights differ from the trained model's by {worst}"
    vocab = trained.base_model.model.config.vocab_size
    expected = _logits(trained, vocab)
    loaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert (_logits(loaded, vocab) - expected).abs().max().item() <= 1e-4

    # The adapter on the *original* base is the trained model too (PEFT's conversion: rank doubled).
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 * manifest["lora_config"]["r"] and adapter_config["init_lora_weights"] is True
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out / "adapter").eval()
    assert (_logits(on_original, vocab) - expected).abs().max().item() <= 1e-4


def test_verification_fails_against_a_merge_into_the_original_base(trained_runs, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The reported bug: the trained adapter merged into the original base instead of the
    rewritten one. Here the exporter is told the run used a plain init, so it does exactly that;
    the verification, which finds the rewritten weights in the checkpoint itself, must refuse."""
    run, base = trained_runs("zero2-olora")
    manifest = _export(run / "ckpt", tmp_path / "good", base)
    wrong = {**manifest["lora_config"], "init_lora_weights": True}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    out = tmp_path / "out"
    capsys.readouterr()
    code = export_main(["--checkpoint", str(run / "ckpt"), "--output", str(out), "--base-model", str(base),
                        "--lora-config", str(tmp_path / "wrong.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert "verification failed: merged tensor 'model.layers." in err and "nothing was published" in err, err
    assert not out.exists() and (tmp_path / "out.failed" / "export.json").is_file()


def test_an_init_without_a_documented_conversion_exports_the_merged_model_only(trained_runs, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """LoftQ replaces the base by a quantized residual; PEFT cannot initialise it on a CPU, so a
    PiSSA checkpoint stands in for one (both leave the rewritten base in the checkpoint)."""
    run, base = trained_runs("pissa")
    recorded = _export(run / "ckpt", tmp_path / "first", base)["lora_config"]
    (tmp_path / "loftq.json").write_text(json.dumps({**recorded, "init_lora_weights": "loftq"}))
    capsys.readouterr()
    manifest = _export(run / "ckpt", tmp_path / "out", base, "--lora-config", str(tmp_path / "loftq.json"))
    assert "adapter left out" in capsys.readouterr().out
    assert not (tmp_path / "out" / "adapter").exists()
    assert manifest["adapter"].startswith("left out: init_lora_weights='loftq'")
    reference = copy.deepcopy(trained_model(run, base, recorded)).merge_and_unload().state_dict()
    merged = _merged(tmp_path / "out" / "merged")
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) <= 1e-5


def test_rslora_with_a_rank_pattern_exports_the_merged_model_only(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("pissa-rslora-rank-pattern")
    manifest = _export(run / "ckpt", tmp_path / "out", base)
    assert manifest["adapter"].startswith("left out: PEFT cannot convert an rsLoRA adapter with rank_pattern")
    assert manifest["verification"]["passed"] and not (tmp_path / "out" / "adapter").exists()
    reference = copy.deepcopy(trained_model(run, base, manifest["lora_config"])).merge_and_unload().state_dict()
    merged = _merged(tmp_path / "out" / "merged")
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) <= 1e-5


def _train(base: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), "--base", str(base), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--stage", "2", "--exclude-frozen"], ["model.init_lora_weights='pissa'", "exclude_frozen_parameters"]),
        (["--stage", "2", "--exclude-frozen", "--user-module", "--export"], ["init_lora_weights='pissa'", "exclude_frozen_parameters=True"]),
        (["--stage", "3"], ["model.init_lora_weights='pissa'", "ZeRO-3"]),
    ],
    ids=["our-module", "own-module-hfexport", "our-module-zero3"],
)
def test_an_unexportable_configuration_is_refused_before_training(args: list[str], named: list[str],
                                                                    tiny_bases: dict[str, Path], tmp_path: Path) -> None:
    result = _train(tiny_bases["llama"], tmp_path / "run", "--strategy", "deepspeed", "--devices", "2", "--init", "pissa", *args)
    assert result.returncode != 0
    assert all(text in result.stderr for text in named), result.stderr[-3000:]
    assert not (tmp_path / "run" / "ckpt").exists() and not (tmp_path / "run" / "trained.pt").exists()


def test_a_checkpoint_without_the_rewritten_base_fails_the_export_saying_why(tiny_bases: dict[str, Path], tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A user's own module, without HFExport, is free to save a PiSSA run without frozen weights."""
    result = _train(tiny_bases["llama"], tmp_path / "run", "--strategy", "deepspeed", "--stage", "2", "--devices", "2",
                    "--init", "pissa", "--user-module", "--exclude-frozen")
    assert result.returncode == 0, result.stderr[-3000:]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "init_lora_weights": "pissa"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))  # what the user's module used
    capsys.readouterr()
    code = export_main(["--checkpoint", str(tmp_path / "run" / "ckpt"), "--output", str(tmp_path / "out"),
                        "--base-model", str(tiny_bases["llama"]), "--lora-config", str(tmp_path / "adapter_config.json")])
    err = capsys.readouterr().err
    assert code == 1 and "rewrote the base weights during training" in err and "exclude_frozen_parameters" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica", "pissa", "pissa_niter_2", "olora"])
def test_which_inits_rewrite_the_base_is_what_peft_does(init: bool | str) -> None:
    """Checked against PEFT's own initialisation code: the base weight changes exactly for the
    methods the export takes from the checkpoint. (CorDA and LoRA-GA need calibration data and
    LoftQ a GPU; their training runs above show the rewrite.)"""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(16, 12))
    before = model.proj.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=init))
    after = peft_model.base_model.model.proj.base_layer.weight
    assert (not torch.equal(before, after)) == rewrites_base({"init_lora_weights": init})
