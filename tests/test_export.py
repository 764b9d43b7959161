"""The export, end to end: real training runs (single device, DDP, DeepSpeed ZeRO 1/2/3 on CPU
processes), then ``lightning-lora export``, then stock ``from_pretrained`` reloads.

Each run is trained once per session by ``tests/scripts/train_run.py`` in a subprocess, which also
records the trained tensors (for DeepSpeed, the fp32 master weights gathered from the engine).
The merged weights are compared with a reference merged *by hand* in this file from the base
model on disk and those tensors: ``W + scale * B @ A`` (transposed for Conv1D, DoRA-normalised).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.cli import export_main

from conftest import REWRITTEN_BASE, RUNS


def _export(checkpoint: Path, output: Path, base: Path, *extra: str) -> dict:
    code = export_main(["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base), *extra])
    assert code == 0
    return json.loads((output / "export.json").read_text())


def _load_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _default_adapter(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors renamed to PEFT's ``default`` adapter (a run may name its adapter, here "math")."""
    parts = r"(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)"
    return {re.sub(rf"\.{parts}\.[^.]+(\.|$)", r".\1.default\2", key): value for key, value in trained.items()}


def reference_merge(base: Path, trained: dict[str, torch.Tensor], lora: dict) -> dict[str, torch.Tensor]:
    """Merge by hand, in fp64, from the base weights on disk and the trained tensors.

    GPT-2's projections are Conv1D layers, which store the weight as (in, out): the transpose of
    ``B @ A``. (Its square attention ``c_proj`` shows that shapes alone cannot tell.) An embedding's
    LoRA pair is (r, vocab) and (dim, r): its delta is ``(B @ A)^T``. A head tied to the embeddings
    gets its own copy before either side changes.
    """
    config = json.loads((base / "config.json").read_text())
    conv1d = config["model_type"] == "gpt2"
    weights = {k: v.double() for k, v in _load_dir(base).items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        embeddings = next(k for k in weights if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")))
        weights["lm_head.weight"] = weights[embeddings].clone()
    r, alpha = lora["r"], lora["lora_alpha"]
    scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    root = "base_model.model."
    trained = _default_adapter(trained)
    for key, a in trained.items():
        embedding = ".lora_embedding_A.default" in key
        if ".lora_A.default.weight" not in key and not embedding:
            continue
        module = key[len(root):].removesuffix(".lora_A.default.weight").removesuffix(".lora_embedding_A.default")
        b = trained[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].double()
        delta = scale * (b @ a.double())
        weight = weights[f"{module}.weight"]
        if conv1d or embedding:
            delta = delta.T
        merged = weight + delta
        magnitude = trained.get(f"{root}{module}.lora_magnitude_vector.default.weight")
        if magnitude is not None:  # DoRA: rescale each output row to the trained magnitude
            merged = merged * (magnitude.double() / merged.norm(dim=1)).unsqueeze(1)
        weights[f"{module}.weight"] = merged
        bias = trained.get(f"{root}{module}.lora_B.default.bias")
        if bias is not None:  # lora_bias: lora_B's bias, scaled, joins the base bias
            weights[f"{module}.bias"] = weights[f"{module}.bias"] + scale * bias.double()
    for key, value in trained.items():
        if ".modules_to_save.default." in key:
            weights[key[len(root):].replace(".modules_to_save.default.", ".")] = value.double()
    return weights


def _adapter_and_merged_logits(export: Path, base: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), export / "adapter").eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        return (merged(input_ids=ids).logits, adapter(input_ids=ids).logits,
                merged.generate(ids, **kwargs), adapter.generate(ids, **kwargs))


EXPECTED_FILES = {
    "export.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "merged/config.json",
    "merged/generation_config.json",
    "merged/model.safetensors",
    "merged/tokenizer.json",
    "merged/tokenizer_config.json",
    "merged/chat_template.jinja",
}


# Runs that added tokens grow the vocabulary, which the hand merge below does not model: tests/test_vocab.py
# compares those with the trained tensors instead; tests/test_rewriting_inits.py checks the runs whose
# initialisation rewrote the base against the trained model.
@pytest.mark.parametrize("name", [name for name in RUNS if "added-tokens" not in name and name not in REWRITTEN_BASE])
def test_export_matches_an_independent_merge(name: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs(name)
    checkpoint = run / "ckpt"
    manifest = _export(checkpoint, tmp_path / "out", base)
    out = tmp_path / "out"

    # Exactly the promised files, each hashed in export.json.
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    assert set(manifest["files"]) == EXPECTED_FILES - {"export.json"}
    verification = manifest["verification"]
    assert verification["passed"] and verification["function"]["logits"]["argmax_agreement"] == 1.0
    assert verification["tensors"]["checked"] >= len(_load_dir(out / "merged")) and verification["function"]["tokens"] >= 4 * 64
    assert manifest["global_step"] == 4 and manifest["dtype"] == "float32"

    # Merged weights equal the hand-made merge of the trained tensors (fp32 export: <= 1e-5).
    trained = torch.load(run / "trained.pt")
    lora = manifest["lora_config"]
    reference = reference_merge(base, trained, lora)
    merged = _load_dir(out / "merged")
    tied = "lm_head.weight" not in merged
    assert set(merged) == set(reference) - ({"lm_head.weight"} if tied else set())
    worst = max((merged[k].double() - reference[k]).abs().max().item() for k in merged)
    assert worst <= 1e-5, f"{name}: merged weights differ from the reference by {worst}"
    # Coverage: every LoRA pair trained was merged, and no adapter tensor survived into the files.
    assert manifest["tensors"]["lora_modules"] == sum(".lora_A." in k or ".lora_embedding_A." in k for k in trained)
    assert manifest["tensors"]["merged_tensors"] == len(merged)
    assert not [k for k in merged if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    base_weights = _load_dir(base)
    changed = [k for k in merged if k not in base_weights or not torch.equal(merged[k], base_weights[k])]
    assert changed, "training changed nothing: the comparison would prove nothing"

    # A trained head of a tied model is written on its own and untied, or reloading would re-tie it;
    # so are embeddings trained apart from their tied head, whose head keeps the original matrix.
    if "lm_head.weight" in merged and "lm_head.weight" not in base_weights:
        assert json.loads((out / "merged" / "config.json").read_text())["tie_word_embeddings"] is False

    # The merged model behaves as the adapter model: logits and greedy generations.
    merged_logits, adapter_logits, merged_tokens, adapter_tokens = _adapter_and_merged_logits(out, base)
    assert (merged_logits - adapter_logits).abs().max().item() <= 1e-4
    assert torch.equal(merged_tokens, adapter_tokens)


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
def test_fsdp_checkpoints_export_like_the_others(state_dict_type: str, trained_runs, tmp_path: Path) -> None:
    """Lightning's FSDPStrategy writes a run's checkpoint in its two layouts (FSDP itself needs a GPU:
    the state is that of a real single-device run); the export reads both and matches the hand merge."""
    from lightning.pytorch.strategies import FSDPStrategy

    run, base = trained_runs("single-fp32")
    checkpoint = torch.load(run / "ckpt", map_location="cpu", weights_only=False)
    FSDPStrategy(state_dict_type=state_dict_type).save_checkpoint(checkpoint, tmp_path / "fsdp.ckpt")
    assert (tmp_path / "fsdp.ckpt").is_dir() == (state_dict_type == "sharded")
    manifest = _export(tmp_path / "fsdp.ckpt", tmp_path / "out", base)
    assert manifest["source"]["kind"] == ("fsdp" if state_dict_type == "sharded" else "lightning")
    assert manifest["verification"]["passed"] and manifest["global_step"] == 4
    reference = reference_merge(base, torch.load(run / "trained.pt"), manifest["lora_config"])
    merged = _load_dir(tmp_path / "out" / "merged")
    assert max((merged[k].double() - reference[k]).abs().max().item() for k in merged) <= 1e-5


def test_bf16_export_is_within_one_rounding(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("zero2-bf16")
    manifest = _export(run / "ckpt", tmp_path / "out", base, "--dtype", "bf16")
    assert manifest["dtype"] == "bfloat16" and manifest["verification"]["passed"]
    reference = reference_merge(base, torch.load(run / "trained.pt"), manifest["lora_config"])
    for key, value in _load_dir(tmp_path / "out" / "merged").items():
        assert value.dtype == torch.bfloat16
        exact = reference[key].float()
        # One rounding: the distance to the exact value is at most half a bf16 step of that value.
        half_ulp = exact.abs() * 2.0**-8 + 1e-30
        assert ((value.float() - exact).abs() <= half_ulp).all(), key


def test_callback_and_command_produce_the_same_export(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("zero3-bf16")  # trained with HFExport in the 2-process DeepSpeed run
    callback_export = run / "export"
    assert json.loads((callback_export / "export.json").read_text())["verification"]["passed"]
    # The callback exported from the ZeRO checkpoint it saved itself; the command reads that same one.
    _export(run / "export-zero.ckpt", tmp_path / "out", base)
    for part in ("merged", "adapter"):
        ours, theirs = _load_dir(callback_export / part), _load_dir(tmp_path / "out" / part)
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (part, key)
    # And that checkpoint holds the same training state as the one saved after fit.
    _export(run / "ckpt", tmp_path / "out2", base)
    assert _load_dir(tmp_path / "out2" / "merged").keys() == _load_dir(tmp_path / "out" / "merged").keys()


def test_zero1_frozen_weights_from_the_rank0_module_state(trained_runs, tmp_path: Path) -> None:
    # ZeRO-1: zero_to_fp32 returns no frozen weights; they must come from the rank-0 module state.
    run, base = trained_runs("zero1-fp32")
    manifest = _export(run / "ckpt", tmp_path / "out", base, "--frozen-from-checkpoint")
    assert manifest["tensors"]["frozen_tensors_from_checkpoint"] > 0
    reference = reference_merge(base, torch.load(run / "trained.pt"), manifest["lora_config"])
    for key, value in _load_dir(tmp_path / "out" / "merged").items():
        assert (value.double() - reference[key]).abs().max().item() <= 1e-5, key


@pytest.mark.parametrize("impl", ["peft", "streaming"])
def test_tag_directory_and_sharded_output(impl: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("zero2-fp32")
    tag = (run / "ckpt" / "latest").read_text().strip()
    _export(run / "ckpt" / tag, tmp_path / "out", base, "--max-shard-size", "100KB", "--merge-impl", impl)
    merged = tmp_path / "out" / "merged"
    shards = sorted(p.name for p in merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (merged / "model.safetensors").exists()
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # total_size counts each tensor's bytes once.
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _load_dir(merged).values())


@pytest.mark.parametrize("impl", ["peft", "streaming"])
def test_adapter_directory_as_input_round_trips(impl: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("single-fp32")
    _export(run / "ckpt", tmp_path / "first", base)
    # An exported adapter is itself a valid input: exporting it again gives the same merged model.
    _export(tmp_path / "first" / "adapter", tmp_path / "second", base, "--merge-impl", impl)
    first, second = _load_dir(tmp_path / "first" / "merged"), _load_dir(tmp_path / "second" / "merged")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_user_module_checkpoint_without_recorded_config(trained_runs, tmp_path: Path) -> None:
    """A checkpoint of a user's module saved without HFExport records no LoRA config: the command
    asks for --lora-config, and with it (and the attribute found by itself) exports the same model."""
    run, base = trained_runs("user-module-net")
    checkpoint = torch.load(run / "ckpt", weights_only=False)
    checkpoint.pop("lightning_lora")
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    code = export_main(["--checkpoint", str(bare), "--output", str(tmp_path / "x"), "--base-model", str(base)])
    assert code == 1 and not (tmp_path / "x").exists()

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                                  "target_modules": ["q_proj", "v_proj"]}))
    _export(bare, tmp_path / "out", base, "--lora-config", str(config))
    _export(run / "ckpt", tmp_path / "recorded", base)
    ours, recorded = _load_dir(tmp_path / "out" / "merged"), _load_dir(tmp_path / "recorded" / "merged")
    assert all(torch.equal(ours[k], recorded[k]) for k in recorded)
    # The in-memory export of the callback during fit agrees too.
    from_callback = _load_dir(run / "export" / "merged")
    assert all(torch.equal(from_callback[k], recorded[k]) for k in recorded)


@pytest.mark.parametrize("name", list(RUNS))
def test_streaming_merger_equals_peft_merge(name: str, trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs(name)
    for dtype in ("fp32", "bf16"):
        peft_out, stream_out = tmp_path / f"peft-{dtype}", tmp_path / f"stream-{dtype}"
        _export(run / "ckpt", peft_out, base, "--merge-impl", "peft", "--dtype", dtype, "--no-verify")
        manifest = _export(run / "ckpt", stream_out, base, "--merge-impl", "streaming", "--dtype", dtype)
        assert manifest["merge_impl"] == "streaming" and manifest["verification"]["passed"]
        for part in ("merged", "adapter"):
            assert (stream_out / part).is_dir() == (peft_out / part).is_dir()
            ours, peft = _load_dir(stream_out / part), _load_dir(peft_out / part)
            assert ours.keys() == peft.keys(), part
            for key in ours:
                assert ours[key].dtype == peft[key].dtype, key
                if dtype == "fp32" or part == "adapter":
                    assert torch.equal(ours[key], peft[key]), (part, key)
                else:  # identical or one bf16 rounding apart
                    a, b = ours[key].float(), peft[key].float()
                    assert ((a - b).abs() <= b.abs() * 2.0**-7 + 1e-30).all(), key
        config = lambda out: json.loads((out / "merged" / "config.json").read_text())  # noqa: E731
        assert config(stream_out) == config(peft_out)
        if (peft_out / "adapter").is_dir():
            assert json.loads((stream_out / "adapter" / "adapter_config.json").read_text()) == json.loads(
                (peft_out / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", ["single-fp32", "dora", "modules-to-save-lm-head", "gpt2-conv1d"])
def test_both_merges_agree_on_a_bf16_base(name: str, trained_runs, tmp_path: Path) -> None:
    """A bf16 base (the usual case) is merged in fp32 by both implementations: the same tensors,
    whether the export is bf16 or fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base = trained_runs(name)
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(base).save_pretrained(bf16_base)
    for dtype in ("bf16", "fp32"):
        outs = {}
        for impl in ("peft", "streaming"):
            outs[impl] = tmp_path / f"{impl}-{dtype}"
            manifest = _export(run / "ckpt", outs[impl], bf16_base, "--merge-impl", impl, "--dtype", dtype)
            assert manifest["verification"]["passed"]
        peft, streamed = _load_dir(outs["peft"] / "merged"), _load_dir(outs["streaming"] / "merged")
        assert peft.keys() == streamed.keys()
        for key in peft:
            assert torch.equal(peft[key], streamed[key]), (dtype, key)
