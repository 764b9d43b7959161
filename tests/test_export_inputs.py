"""Inputs the export used to stumble over: damaged base files, a broken adapter config, dtypes it
does not handle, LoRA on tied embeddings, ``lora_bias``, adapters not called ``default``, and a
tokenizer that makes nothing of the probe prompts. Each is handled or refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora.cli import evaluate_main, export_main, generate_main, verify_main

from test_export import _load_dir as _merged

PREFIX = "lightning-lora export: error: "


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], command=export_main, prefix: str = PREFIX) -> str:
    capsys.readouterr()
    code = command([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0][len(prefix):]


def _args(checkpoint: Path, output: Path, base: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base), *extra]


def _copy_base(base: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    return copy


# --- damaged or unsupported base files --------------------------------------------------------------


@pytest.mark.parametrize("impl", ["peft", "streaming"])
def test_truncated_base_shard_is_one_line_naming_it(impl: str, trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    damaged = _copy_base(base, tmp_path)
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = _error(capsys, _args(run / "ckpt", tmp_path / "out", damaged, "--merge-impl", impl))
    assert "--base-model" in message and "model.safetensors" in message and "truncated" in message, message
    assert not (tmp_path / "out").exists()


def test_base_with_fp8_weights_is_refused_in_one_line(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    fp8 = _copy_base(base, tmp_path)
    tensors = load_file(fp8 / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    for impl in ("auto", "streaming"):
        message = _error(capsys, _args(run / "ckpt", tmp_path / "out", fp8, "--merge-impl", impl))
        assert key in message and "F8_E4M3" in message and "--base-model" in message, message


def test_adapter_config_that_is_not_json_names_the_file(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    assert export_main(_args(run / "ckpt", tmp_path / "first", base)) == 0
    adapter = tmp_path / "adapter"
    shutil.copytree(tmp_path / "first" / "adapter", adapter)
    (adapter / "adapter_config.json").write_text("{\n  r: 8,\n")
    message = _error(capsys, _args(adapter, tmp_path / "out", base))
    assert str(adapter / "adapter_config.json") in message and "not valid JSON" in message, message
    message = _error(capsys, _args(run / "ckpt", tmp_path / "out", base, "--lora-config", str(adapter)))
    assert "--lora-config" in message and "not valid JSON" in message, message


def test_no_traceback_reaches_a_user_of_any_command(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("single-fp32")
    assert export_main(_args(run / "ckpt", tmp_path / "out", base)) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    del manifest["dtype"]  # an export.json edited by hand
    (tmp_path / "out" / "export.json").write_text(json.dumps(manifest))
    message = _error(capsys, [str(tmp_path / "out"), "--base-model", str(base)], verify_main, "lightning-lora verify: error: ")
    assert "dtype" in message
    _error(capsys, ["--model", str(tmp_path / "nowhere"), "--prompt", "hi"], generate_main, "lightning-lora generate: error: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 1}\n')
    _error(capsys, ["--model", str(tmp_path / "out" / "merged"), "--data", str(bad)], evaluate_main, "lightning-lora evaluate: error: ")


# --- LoRA on tied embeddings: only the side LoRA trained changes -------------------------------------


@pytest.mark.parametrize("name", ["qwen2-tied-lora-lm-head", "qwen2-tied-lora-embeddings"])
@pytest.mark.parametrize("impl", ["peft", "streaming"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_on_one_side_of_tied_embeddings_unties_and_changes_only_that_side(
    name: str, impl: str, dtype: str, trained_runs, tmp_path: Path
) -> None:
    run, base = trained_runs(name)
    assert export_main(_args(run / "ckpt", tmp_path / "out", base, "--merge-impl", impl, "--dtype", dtype)) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["verification"]["passed"]
    merged, original = _merged(tmp_path / "out" / "merged"), load_file(base / "model.safetensors")
    assert json.loads((tmp_path / "out" / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    embeddings = original["model.embed_tokens.weight"]
    unchanged, changed = ("model.embed_tokens.weight", "lm_head.weight") if "lm-head" in name else ("lm_head.weight", "model.embed_tokens.weight")
    assert torch.equal(merged[unchanged], embeddings.to(target)), f"{unchanged} must stay the original matrix"
    assert not torch.equal(merged[changed], embeddings.to(target)), f"{changed} must carry the trained delta"
    # The stock loader keeps them apart: each is the exported tensor, not the other tied over it.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=target)
    assert torch.equal(loaded.get_input_embeddings().weight, merged["model.embed_tokens.weight"])
    assert torch.equal(loaded.get_output_embeddings().weight, merged["lm_head.weight"])


# --- lora_bias and adapter names ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["peft", "streaming"])
def test_lora_bias_is_merged_into_the_bias(impl: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("qwen2-lora-bias")
    assert export_main(_args(run / "ckpt", tmp_path / "out", base, "--merge-impl", impl)) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["lora_config"]["lora_bias"] is True
    trained = torch.load(run / "trained.pt")
    merged, original = _merged(tmp_path / "out" / "merged"), load_file(base / "model.safetensors")
    scale = manifest["lora_config"]["lora_alpha"] / manifest["lora_config"]["r"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.bias"
    expected = original["model.layers.0.self_attn.q_proj.bias"] + scale * trained[key]
    assert trained[key].abs().max() > 0 and torch.allclose(merged["model.layers.0.self_attn.q_proj.bias"], expected, atol=1e-6)


def test_an_adapter_with_its_own_name_exports_and_several_need_a_choice(trained_runs, tmp_path: Path, capsys) -> None:
    run, base = trained_runs("adapter-name")
    assert export_main(_args(run / "ckpt", tmp_path / "out", base)) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["adapter_name"] == "math" and manifest["verification"]["passed"]
    # The same checkpoint holding a second adapter: the command asks which.
    checkpoint = torch.load(run / "ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    for key in [k for k in state if ".math." in k]:
        state[key.replace(".math.", ".chat.")] = state[key].clone()
    torch.save(checkpoint, tmp_path / "two.ckpt")
    message = _error(capsys, _args(tmp_path / "two.ckpt", tmp_path / "out2", base))
    assert "['chat', 'math']" in message and "--adapter-name" in message, message
    assert export_main(_args(tmp_path / "two.ckpt", tmp_path / "out2", base, "--adapter-name", "math")) == 0
    first, second = _merged(tmp_path / "out" / "merged"), _merged(tmp_path / "out2" / "merged")
    assert all(torch.equal(first[k], second[k]) for k in first)


# --- probes are never empty ---------------------------------------------------------------------------


def test_a_tokenizer_that_drops_the_probe_prompts_still_gets_full_probes(trained_runs, tmp_path: Path) -> None:
    """A domain vocabulary (digits only, no unknown token) turns the fixed English prompts into no
    tokens at all; verification used to crash on the empty probes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    run, base = trained_runs("single-fp32")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["0123456789 " * 50, "12 34 56 78 90"], trainer=trainers.BpeTrainer(vocab_size=40, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert tokenizer("The quick brown fox")["input_ids"] == []
    tokenizer.save_pretrained(tmp_path / "digits")
    assert export_main(_args(run / "ckpt", tmp_path / "out", base, "--tokenizer", str(tmp_path / "digits"))) == 0
    function = json.loads((tmp_path / "out" / "export.json").read_text())["verification"]["function"]
    assert function["probes"] >= 4 and function["tokens"] >= 4 * 64 and function["blocks_checked"] == 2
