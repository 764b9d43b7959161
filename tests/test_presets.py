"""The presets in ``configs/models`` and ``configs/strategies``: each parses into the objects it names,
and each model preset trains and exports a tiny base of its own family through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from typing_extensions import override

from lightning_lora.data import InstructionDataModule
from lightning_lora.lightning_cli import LightningLoraCLI
from lightning_lora.module import LoraFinetuneModule
from lightning_lora.tiny import resolve_model_path, tiny_config

QUICKSTART = REPO / "configs" / "quickstart.yaml"
MODEL_PRESETS = sorted((REPO / "configs" / "models").glob("*.yaml"))
STRATEGY_PRESETS = sorted((REPO / "configs" / "strategies").glob("*.yaml"))
# Strategy presets complete a run config and a model preset, in this order, as the README shows.
RUN_AND_MODEL = [QUICKSTART, REPO / "configs" / "models" / "llama.yaml"]


class _ParseOnlyCLI(LightningLoraCLI):
    """Parses a config and builds every class it names except the Trainer, which refuses GPU
    strategies (FSDP, DeepSpeed) on a machine without one."""

    @override
    def instantiate_trainer(self, **kwargs: Any) -> None:  # type: ignore[override]
        return None


def _config_args(*configs: Path) -> list[str]:
    return [arg for config in configs for arg in ("--config", str(config))]


def _short_run(family: str) -> list[str]:
    """Arguments that turn a preset run into two steps on a tiny base of ``family`` on CPU."""
    return [
        f"--model.model_name_or_path=builtin:tiny-{family}",
        "--model.dtype=float32",  # bf16 matmuls are slow on CPU; the dtype is not what is tested here
        f"--data.data_path={REPO / 'data/quickstart/train.jsonl'}",
        f"--data.val_data_path={REPO / 'data/quickstart/test.jsonl'}",
        "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
    ]


def _assert_export_verified(run_dir: Path) -> None:
    """The quickstart's HFExport wrote an export of step 2 whose merged model matched the adapter."""
    export = json.loads((run_dir / "runs/quickstart/export/export.json").read_text())
    assert export["verification"]["passed"] and export["global_step"] == 2


def _parse(*configs: Path) -> _ParseOnlyCLI:
    return _ParseOnlyCLI(LoraFinetuneModule, InstructionDataModule, run=False, args=_config_args(*configs))


def _decoder_block(family: str) -> torch.nn.Module:
    """The first decoder block of a tiny model of ``family`` (its blocks are the first ModuleList)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family, 384))
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]


def _check_ddp(strategy: Strategy) -> None:
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False


def _check_fsdp(strategy: Strategy) -> None:
    from torch.distributed.fsdp import ShardingStrategy

    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # the export reads full checkpoints only
    policy = strategy.kwargs["auto_wrap_policy"]
    for preset in MODEL_PRESETS:  # every shipped family is wrapped one decoder block at a time
        assert policy(_decoder_block(preset.stem), recurse=False), preset.stem


def _check_zero(stage: int, offload: bool) -> Callable[[Strategy], None]:
    def check(strategy: Strategy) -> None:
        assert isinstance(strategy, DeepSpeedStrategy)
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == stage
        assert strategy.exclude_frozen_parameters
        if offload:
            assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
        else:
            assert "offload_optimizer" not in zero and "offload_param" not in zero

    return check


STRATEGY_CHECKS: dict[str, Callable[[Strategy], None]] = {
    "ddp": _check_ddp,
    "fsdp": _check_fsdp,
    "deepspeed_zero2": _check_zero(2, offload=False),
    "deepspeed_zero3": _check_zero(3, offload=False),
    "deepspeed_zero3_offload": _check_zero(3, offload=True),
}


def test_every_strategy_preset_has_a_check() -> None:
    assert {p.stem for p in STRATEGY_PRESETS} == set(STRATEGY_CHECKS)


@pytest.mark.parametrize("preset", STRATEGY_PRESETS, ids=lambda p: p.stem)
def test_strategy_preset_builds_the_strategy_it_names(preset: Path) -> None:
    cli = _parse(*RUN_AND_MODEL, preset)
    trainer = cli.config_init.trainer
    STRATEGY_CHECKS[preset.stem](trainer.strategy)
    assert (trainer.accelerator, trainer.devices, trainer.precision) == ("gpu", "auto", "bf16-mixed")


def test_fsdp_preset_loads_the_base_in_float32() -> None:
    # FSDP flattens base and LoRA weights together, and PEFT keeps LoRA in float32: the preset must
    # win over the model preset's bfloat16.
    assert _parse(*RUN_AND_MODEL, REPO / "configs/strategies/fsdp.yaml").model.dtype_name == "fp32"


def test_offload_preset_swaps_only_the_optimizer_class() -> None:
    optimizer = _parse(*RUN_AND_MODEL, REPO / "configs/strategies/deepspeed_zero3_offload.yaml").config.model.optimizer
    assert optimizer.class_path == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    assert optimizer.init_args.lr == yaml.safe_load(RUN_AND_MODEL[1].read_text())["model"]["optimizer"]["init_args"]["lr"]


# Linear layers per decoder block: attention (q, k, v or fused) + output, MLP in and out.
LINEAR_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "gemma": 7, "phi": 6, "phi3": 4, "gpt2": 4, "bloom": 4}


def _adaptable_layers(model: torch.nn.Module) -> set[str]:
    """Every linear layer except the output head: what a preset that adapts all projections wraps."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def _lora_wrapped(peft_model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("preset", MODEL_PRESETS, ids=lambda p: p.stem)
def test_model_preset_trains_and_exports_its_family(preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    family = preset.stem
    own = yaml.safe_load(preset.read_text())["model"]
    monkeypatch.chdir(tmp_path)  # the quickstart writes runs/quickstart/{checkpoints,logs,export} here
    cli = LightningLoraCLI(
        LoraFinetuneModule,
        InstructionDataModule,
        args=["fit", *_config_args(QUICKSTART, preset), *_short_run(family)],
    )
    module = cli.model
    # What the file sets is what the module took (over the quickstart's values).
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "gradient_checkpointing"):
        assert module.hparams[key] == own.get(key, False), key
    # The family's preset adapts every linear layer of its blocks, and nothing else.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(f"builtin:tiny-{family}"))
    expected = _adaptable_layers(base)
    assert len(expected) == LINEAR_PER_BLOCK[family] * base.config.num_hidden_layers
    assert _lora_wrapped(module.model) == expected
    _assert_export_verified(tmp_path)


def test_ddp_preset_trains_two_processes_from_a_cold_builtin_cache(tmp_path: Path) -> None:
    # Lightning starts rank 1 by re-running the command line, so the run is a subprocess. An empty
    # cache makes both ranks build builtin:tiny-llama once the process group exists.
    env = {**os.environ, "LIGHTNING_LORA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    ddp = REPO / "configs/strategies/ddp.yaml"
    command = [sys.executable, "-m", "lightning_lora", "fit", *_config_args(*RUN_AND_MODEL, ddp), *_short_run("llama"),
               "--trainer.accelerator=cpu", "--trainer.devices=2"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    _assert_export_verified(tmp_path)


def test_qlora_fragment_trains_and_exports_the_trained_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    qlora = REPO / "configs" / "qlora.yaml"
    cli = LightningLoraCLI(LoraFinetuneModule, InstructionDataModule,
                           args=["fit", *_config_args(*RUN_AND_MODEL, qlora), *_short_run("llama")])
    assert (cli.model.quantization, cli.model.double_quantization) == ("nf4", True)
    assert type(cli.model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    _assert_export_verified(tmp_path)
    export = json.loads((tmp_path / "runs/quickstart/export/export.json").read_text())
    assert export["merge_base"] == "dequantized" and export["quantization"]["quant_type"] == "nf4"
    drift = export["verification"]["drift"]
    assert drift["logits"]["argmax_agreement"] == 1.0 and drift["heldout"]["tokens"] > 0
