"""The ``lightning-lora`` command line: every shipped YAML parses, and the quickstart runs end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_lora.cli import main
from lightning_lora.module import _check_module_names
from lightning_lora.tiny import quickstart_rows

from conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
MODEL_PRESETS = sorted((REPO / "configs" / "models").glob("*.yaml"))
STRATEGY_PRESETS = sorted((REPO / "configs" / "strategies").glob("*.yaml"))


def _print_config(*configs: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_parses(config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root
    # Presets are fragments: they complete the quickstart config, as the README shows.
    configs = [config] if config.name == "quickstart.yaml" else [REPO / "configs" / "quickstart.yaml", config]
    printed = _print_config(*configs, capsys=capsys)
    own = yaml.safe_load(config.read_text())
    # What the file sets is what the parser took.
    for section in ("model", "data"):
        for key, value in own.get(section, {}).items():
            if not isinstance(value, dict):
                assert printed[section][key] == value, (section, key)
    if "strategy" in own.get("trainer", {}):
        strategy = own["trainer"]["strategy"]
        assert printed["trainer"]["strategy"]["class_path"] == strategy["class_path"]
        for key, value in strategy["init_args"].items():
            taken = printed["trainer"]["strategy"]["init_args"][key]
            if isinstance(value, list):  # a set (FSDP's auto_wrap_policy), printed in any order
                assert sorted(taken) == sorted(value), ("trainer.strategy", key)
            else:
                assert taken == value, ("trainer.strategy", key)


def test_repeated_configs_combine(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    printed = _print_config(
        REPO / "configs/quickstart.yaml", REPO / "configs/models/llama.yaml", REPO / "configs/strategies/deepspeed_zero3.yaml",
        capsys=capsys,
    )
    assert printed["model"]["model_name_or_path"] == "meta-llama/Llama-3.2-1B"  # from the model preset
    assert printed["trainer"]["strategy"]["init_args"]["stage"] == 3  # from the strategy preset
    assert printed["data"]["data_path"] == "data/quickstart/train.jsonl"  # kept from the quickstart


@pytest.mark.parametrize("preset", MODEL_PRESETS, ids=lambda p: p.stem)
def test_model_preset_targets_exist_in_its_family(preset: Path, tiny_bases: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    family = preset.stem
    model = AutoModelForCausalLM.from_pretrained(tiny_bases[family])
    _check_module_names(model, "target_modules", yaml.safe_load(preset.read_text())["model"]["target_modules"])


def test_shipped_quickstart_data_matches_its_generator_and_answers_are_right() -> None:
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in (REPO / "data/quickstart" / f"{split}.jsonl").read_text().splitlines()]
        assert shipped == quickstart_rows(split)
    train = {json.dumps(r, sort_keys=True) for r in quickstart_rows("train")}
    assert len(quickstart_rows("test")) == 120 and len(quickstart_rows("train")) == 480
    assert len(train) > 300  # a few hundred distinct tasks, not one repeated
    for row in quickstart_rows("train"):
        instruction, given, answer = row["instruction"], row["input"], row["output"]
        if instruction.startswith("Add"):
            a, b = given.split(" + ")
            assert int(answer) == int(a) + int(b)
        elif instruction.startswith("Reverse"):
            assert answer == "".join(reversed(given))
        elif instruction.startswith("Write the word in upper"):
            assert answer == given.upper()
        elif instruction.startswith("Sort"):
            assert list(answer) == sorted(given)
        elif instruction.startswith("Continue"):
            numbers = [int(x) for x in given.split(", ")]
            assert int(answer) - numbers[-1] == numbers[1] - numbers[0]
        else:
            assert int(answer) == len([c for c in given if c in "aeiou"])


def test_quickstart_runs_end_to_end_shortened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", "configs/quickstart.yaml",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ])
    run = tmp_path / "runs" / "quickstart"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    val_losses = [float(row.split(",")[header.index("val_loss")]) for row in metrics[1:] if row.split(",")[header.index("val_loss")]]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    # The run ends with a verified export: the PEFT adapter and the merged model.
    export = json.loads((run / "export" / "export.json").read_text())
    assert export["verification"]["passed"] and export["global_step"] == 8
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "export" / "merged" / "config.json").is_file()


def test_console_entry_points() -> None:
    for command in (["lightning-lora", "--help"], [sys.executable, "-m", "lightning_lora", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "fit" in result.stdout and "validate" in result.stdout
