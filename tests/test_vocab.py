"""Export hardening around the vocabulary: added tokens, tied heads, the tokenizer and its special ids.

Every run here is a real training run (tests/scripts/train_run.py); the exports are reloaded with
stock ``from_pretrained`` / ``PeftModel.from_pretrained`` and compared with the trained tensors the
run recorded (``trained.pt``) or with the adapter model, never with the export's own numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.export import export_checkpoint
from lightning_lora.tiny import build_tiny_base

NEW_TOKENS = ["<tool>", "<call>", "<end_call>"]
PROBE = "Human: call the tool <tool> now\n\nAssistant: <call> done <end_call>"


def _merged_tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((export_dir / "merged").glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _stock_adapter_model(base: Path, adapter_dir: Path):
    """The adapter model as a PEFT user loads it: the base resized to the adapter's tokenizer (with
    transformers' default, random initialisation of the new rows), then the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter_dir)))
    return PeftModel.from_pretrained(model, adapter_dir).eval()


@pytest.mark.parametrize("name", ["llama-added-tokens", "qwen2-tied-added-tokens"])
def test_added_tokens_are_embedded_tokenized_and_scored_like_the_adapter_model(name: str, trained_runs) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run, base = trained_runs(name)
    export = run / "export"
    base_vocab = AutoConfig.from_pretrained(base).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    assert ids == list(range(base_vocab, base_vocab + 3))
    encoded = tokenizer(PROBE)["input_ids"]
    assert all(i in encoded for i in ids), "each new token must stay one token"
    config = AutoConfig.from_pretrained(export / "merged")
    assert config.vocab_size == base_vocab + 3
    assert json.loads((export / "export.json").read_text())["vocab_size"] == base_vocab + 3

    # The new rows hold what training left, not the initial mean of the old rows.
    trained = torch.load(run / "trained.pt")
    merged = _merged_tensors(export)
    embed_delta = trained["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    torch.testing.assert_close(merged["model.embed_tokens.weight"][ids], embed_delta, rtol=0, atol=0)
    initial = merged["model.embed_tokens.weight"][:base_vocab].mean(dim=0)
    assert (embed_delta - initial).abs().max() > 1e-3, "the run did not train the new embeddings"
    if config.tie_word_embeddings:  # Qwen2: the head follows the embeddings; one matrix is written
        assert "lm_head.weight" not in merged
    else:
        head_delta = trained["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
        torch.testing.assert_close(merged["lm_head.weight"][ids], head_delta, rtol=0, atol=0)

    merged_model = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
    adapter_model = _stock_adapter_model(base, export / "adapter")
    inputs = torch.tensor([encoded])
    with torch.no_grad():
        merged_logits = merged_model(inputs).logits
        adapter_logits = adapter_model(inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-4)
    # Scored like the adapter model: the log-probability of each new token where the text has it.
    positions = [p for p in range(1, len(encoded)) if encoded[p] in ids]
    merged_scores = merged_logits[0, [p - 1 for p in positions]].log_softmax(-1)[range(len(positions)), [encoded[p] for p in positions]]
    adapter_scores = adapter_logits[0, [p - 1 for p in positions]].log_softmax(-1)[range(len(positions)), [encoded[p] for p in positions]]
    torch.testing.assert_close(merged_scores, adapter_scores, rtol=0, atol=1e-4)


def test_zero3_tied_head_trained_as_modules_to_save_is_untied(trained_runs, tmp_path: Path) -> None:
    """Qwen2 ties lm_head to the embeddings; training the head in full under ZeRO-3 on two processes
    must export a head that from_pretrained cannot re-tie (and so overwrite) on reload."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    run, base = trained_runs("zero3-qwen2-tied-lm-head-trained")
    assert AutoConfig.from_pretrained(base).tie_word_embeddings
    trained = torch.load(run / "trained.pt")
    head = trained["base_model.model.lm_head.modules_to_save.default.weight"]
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    embeddings = base_model.get_input_embeddings().weight.detach().clone()
    assert (head - embeddings).abs().max() > 1e-3, "training did not change the head"

    # (tests/test_export.py also compares both merges, tensor by tensor, on every run)
    exports = {"callback": run / "export"}
    for impl in ("peft", "streaming"):
        export_checkpoint(run / "ckpt", tmp_path / impl, base_model=base, merge_impl=impl, progress=False)
        exports[impl] = tmp_path / impl
    probe = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2]])
    adapter = PeftModel.from_pretrained(base_model, exports["callback"] / "adapter").eval()
    with torch.no_grad():
        adapter_logits = adapter(probe).logits
    for how, export in exports.items():
        assert not AutoConfig.from_pretrained(export / "merged").tie_word_embeddings, how
        merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(merged.get_output_embeddings().weight, head, rtol=0, atol=0, msg=how)
        torch.testing.assert_close(merged.get_input_embeddings().weight, embeddings, rtol=0, atol=0, msg=how)
        with torch.no_grad():
            torch.testing.assert_close(merged(probe).logits, adapter_logits, rtol=0, atol=1e-4, msg=how)


def test_export_ships_the_training_tokenizer_and_reconciles_special_ids(trained_runs, tmp_path: Path) -> None:
    """A base whose config and generation config disagree with the tokenizer the run trained with
    (a server would never stop on the EOS every answer was trained to end with)."""
    from transformers import AutoTokenizer, GenerationConfig

    run, trained_base = trained_runs("llama-added-tokens")
    base = build_tiny_base(tmp_path / "base", "llama", bos_token_id=9, eos_token_id=7, pad_token_id=None)
    # The weights the run trained on (without a pad id the embedding's row 0 would be drawn, not zero:
    # another model, which verification against the trained model would rightly refuse).
    shutil.copy(trained_base / "model.safetensors", base / "model.safetensors")
    generation = json.loads((base / "generation_config.json").read_text())
    generation.update(bos_token_id=9, eos_token_id=[7, 8])
    generation.pop("pad_token_id", None)
    (base / "generation_config.json").write_text(json.dumps(generation))

    manifest = export_checkpoint(run / "ckpt", tmp_path / "out", base_model=base, progress=False)
    merged = tmp_path / "out" / "merged"
    trained_tokenizer = AutoTokenizer.from_pretrained(trained_base)  # plus the added tokens
    shipped = AutoTokenizer.from_pretrained(merged)
    assert len(shipped) == len(trained_tokenizer) + len(NEW_TOKENS)
    assert shipped.chat_template == trained_tokenizer.chat_template
    assert (shipped.eos_token_id, shipped.bos_token_id, shipped.pad_token_id) == (2, 1, 0)

    config = json.loads((merged / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    generation = GenerationConfig.from_pretrained(merged)
    assert generation.eos_token_id == [2, 7, 8]  # the trained EOS first; the base's kept
    assert (generation.bos_token_id, generation.pad_token_id) == (1, 0)
    changes = manifest["special_token_changes"]
    assert any(c.startswith("config.json: eos_token_id 7 -> 2") for c in changes), changes
    assert any(c.startswith("generation_config.json: eos_token_id [7, 8] -> [2, 7, 8]") for c in changes), changes
    assert manifest["tokenizer"].startswith("the checkpoint")


def test_export_of_a_consistent_base_changes_no_special_id(trained_runs, tmp_path: Path) -> None:
    run, base = trained_runs("single-fp32")
    manifest = export_checkpoint(run / "ckpt", tmp_path / "out", base_model=base, progress=False)
    assert manifest["special_token_changes"] == []


def test_tokens_the_model_does_not_embed_fail_before_the_first_step(llama_base: Path, tmp_path: Path) -> None:
    import lightning as L

    from lightning_lora import InstructionDataModule, LoraFinetuneModule

    data_file = tmp_path / "train.jsonl"
    data_file.write_text(json.dumps({"instruction": "say <tool>", "output": "<tool>"}) + "\n")
    data = InstructionDataModule(str(data_file), tokenizer=str(llama_base), val_split=0.0, added_tokens=["<tool>"])
    module = LoraFinetuneModule(str(llama_base))  # model.added_tokens forgotten
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"385 tokens but the model embeds only 384: give model.added_tokens"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


@pytest.mark.parametrize("tokens", [["<a>", "<a>"], ["<a>", " "]])
def test_bad_added_tokens_are_named(tokens: list[str], llama_base: Path, tmp_path: Path) -> None:
    from lightning_lora import InstructionDataModule

    data_file = tmp_path / "train.jsonl"
    data_file.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    data = InstructionDataModule(str(data_file), tokenizer=str(llama_base), added_tokens=tokens)
    with pytest.raises(ValueError, match=r"data\.added_tokens=\[.*must be distinct, non-blank strings"):
        data.setup("fit")


def test_a_base_can_embed_more_rows_than_its_tokenizer_has_tokens(tmp_path: Path) -> None:
    """Real vocabularies are rounded up (Qwen2: 151,936 rows); a tokenizer never needs fewer rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(tmp_path / "wide", "qwen2", vocab_size=1024)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 1024
    assert len(AutoTokenizer.from_pretrained(base)) < 1024
    with pytest.raises(ValueError, match=r"vocab_size=10 is smaller than the tokenizer's \d+ tokens"):
        build_tiny_base(tmp_path / "narrow", "llama", vocab_size=10)
