"""``lightning-lora generate`` / ``evaluate`` and their Python API, on real tiny models and real PEFT.

Adapters here are made without training (random LoRA weights, so each changes the outputs); the
quickstart test trains the shipped quickstart and shows that evaluation sees what training did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from lightning_lora.cli import evaluate_main, generate_main, main
from lightning_lora.evaluation import evaluate
from lightning_lora.inference import adapter_names, generate, load_for_generation, render_prompt, unload

ROWS = [
    {"instruction": "Reverse the letters of the word.", "input": "kitten", "output": "nettik"},
    {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42"},
    {"instruction": "Name a colour.", "output": "yellow"},
]
MAX_NEW = 10


def _make_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so that it changes what the base generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": _make_adapter(llama_base, root / "alpha", 1, ["q_proj", "v_proj"], 8),
        "beta": _make_adapter(llama_base, root / "beta", 2, ["gate_proj", "up_proj", "down_proj"], 4),
    }


def _generate(model: str | Path, adapters=(), **kwargs) -> list[str]:
    net, tokenizer = load_for_generation(model, adapters, device="cpu")
    prompts = [render_prompt(row, "alpaca", tokenizer) for row in ROWS]
    return generate(net, tokenizer, prompts, max_new_tokens=MAX_NEW, **kwargs)


def test_adapters_loaded_together_generate_like_each_alone(llama_base: Path, adapters: dict[str, Path]) -> None:
    base_alone = _generate(llama_base)
    alpha_alone = _generate(llama_base, [adapters["alpha"]])
    beta_alone = _generate(llama_base, [adapters["beta"]])
    # The comparison means something only if the three models answer differently.
    assert base_alone != alpha_alone != beta_alone != base_alone

    net, tokenizer = load_for_generation(llama_base, [adapters["alpha"], adapters["beta"]], device="cpu")
    assert adapter_names(net) == ["alpha", "beta"]  # named after their directories; the first is active
    prompts = [render_prompt(row, "alpaca", tokenizer) for row in ROWS]
    run = lambda **kwargs: generate(net, tokenizer, prompts, max_new_tokens=MAX_NEW, **kwargs)  # noqa: E731
    assert run() == alpha_alone
    assert run(adapter="beta") == beta_alone
    assert run() == beta_alone  # the chosen adapter stays active
    assert run(disable_adapters=True) == base_alone
    assert run(adapter="alpha") == alpha_alone
    # unload() strips every adapter and gives back the base model, unchanged.
    assert generate(unload(net), tokenizer, prompts, max_new_tokens=MAX_NEW) == base_alone


def test_adapter_names_and_errors(llama_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    net, _ = load_for_generation(llama_base, {"first": adapters["beta"], "second": adapters["alpha"]}, device="cpu")
    assert adapter_names(net) == ["first", "second"]
    net, _ = load_for_generation(llama_base, [f"mine={adapters['alpha']}"], device="cpu")
    assert adapter_names(net) == ["mine"]
    with pytest.raises(ValueError, match=r"--adapter-name='gamma' is not one of \['mine'\]"):
        generate(net, _, ["x"], adapter="gamma")
    copy = shutil.copytree(adapters["alpha"], tmp_path / "other" / "alpha")
    with pytest.raises(ValueError, match="are both named 'alpha': name them apart as NAME=DIR"):
        load_for_generation(llama_base, [adapters["alpha"], copy])
    with pytest.raises(ValueError, match=r"--model=.* is an adapter directory"):
        load_for_generation(adapters["alpha"])


def test_merged_directory_generates_like_base_plus_adapter(llama_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from lightning_lora.export import export_checkpoint

    export_checkpoint(adapters["alpha"], tmp_path / "export", base_model=llama_base, progress=False)
    merged = _generate(tmp_path / "export" / "merged")
    assert merged == _generate(llama_base, [adapters["alpha"]])
    assert merged != _generate(llama_base)


def test_sampling_is_seeded(llama_base: Path, adapters: dict[str, Path]) -> None:
    net, tokenizer = load_for_generation(llama_base, [adapters["alpha"]], device="cpu")
    prompts = [render_prompt(row, "human_assistant", tokenizer) for row in ROWS]
    sample = lambda seed: generate(net, tokenizer, prompts, max_new_tokens=MAX_NEW, do_sample=True,  # noqa: E731
                                   temperature=1.5, top_p=0.95, seed=seed)
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_adapter_with_added_tokens_ships_its_tokenizer(llama_base: Path, tmp_path: Path) -> None:
    """A run that added tokens ships its tokenizer in the adapter: the base is grown to it before loading."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_lora.export.tokens import add_tokens, resize_vocab

    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    (tool,) = add_tokens(tokenizer, ["<tool>"], "test")
    model = AutoModelForCausalLM.from_pretrained(llama_base)
    resize_vocab(model, len(tokenizer))
    torch.manual_seed(5)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=False,
                        trainable_token_indices={"embed_tokens": [tool]})
    trained = get_peft_model(model, config).eval()
    with torch.no_grad():  # the new token's embedding is trained: make it differ from the mean row
        trained.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].normal_()
    trained.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    prompt = render_prompt({"instruction": "Call the tool <tool> now."}, "alpaca", tokenizer)
    expected = generate(trained, tokenizer, [prompt], max_new_tokens=MAX_NEW)
    net, loaded_tokenizer = load_for_generation(llama_base, [tmp_path / "adapter"], device="cpu")
    assert len(loaded_tokenizer) == len(tokenizer) and net.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert generate(net, loaded_tokenizer, [prompt], max_new_tokens=MAX_NEW) == expected


def test_prompts_are_rendered_and_tokenised_as_in_training(llama_base: Path) -> None:
    from transformers import AutoTokenizer

    from lightning_lora.data import encode_example, split_prompt_response
    from lightning_lora.inference import _prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(llama_base)  # it has a chat template, which writes BOS itself
    chat = [{"role": "user", "content": "Reverse kitten"}, {"role": "assistant", "content": "nettik"}]
    prompt, answer = split_prompt_response({"messages": chat}, "messages", "alpaca", tokenizer)
    assert render_prompt({"messages": chat}, "alpaca", tokenizer) == prompt  # the reference answer is left out
    assert render_prompt({"messages": chat[:1]}, "alpaca", tokenizer) == prompt  # an open conversation is asked
    assert render_prompt("Say hi", "human_assistant", tokenizer) == "Human: Say hi\n\nAssistant: "
    assert render_prompt("Say hi", "human_assistant", tokenizer, raw=True) == "Say hi"
    assert render_prompt({"text": "Once upon"}, "alpaca", tokenizer) == "Once upon"
    for text in (prompt, render_prompt(ROWS[0], "alpaca", tokenizer)):
        ids = _prompt_ids(text, tokenizer)
        assert ids.count(tokenizer.bos_token_id) == 1  # one BOS, as in training
        assert encode_example(text, answer, tokenizer, 512, train_on_prompt=False)[0]["input_ids"][:len(ids)] == ids


# --- the command line -------------------------------------------------------------------------------


def _cli(command, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = command(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_command(llama_base: Path, adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = ["--model", str(llama_base), "--adapter", str(adapters["alpha"]), "--adapter", str(adapters["beta"]), "--device", "cpu"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    for flags, expected in ((["--adapter-name", "beta"], _generate(llama_base, [adapters["beta"]])),
                            (["--no-adapter"], _generate(llama_base))):
        code, out, _ = _cli(generate_main, [*both, *flags, "--prompts", str(prompts),
                                            "--max-new-tokens", str(MAX_NEW), "--json"], capsys)
        assert code == 0
        rows = json.loads(out)
        assert [row["output"] for row in rows] == expected
        assert {row["adapter"] for row in rows} == ({"beta"} if "beta" in flags else {None})
        assert rows[0]["prompt"].endswith("### Input:\nkitten\n\n### Response:\n")
    # One prompt, plain text out; a .txt file holds one instruction per line.
    code, out, _ = _cli(generate_main, [*both, "--prompt", ROWS[2]["instruction"], "--max-new-tokens", str(MAX_NEW)], capsys)
    assert code == 0 and out == _generate(llama_base, [adapters["alpha"]])[2] + "\n"
    (tmp_path / "prompts.txt").write_text("Name a colour.\n\nName a colour.\n")
    code, out, _ = _cli(generate_main, [*both, "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0 and len(json.loads(out)) == 2
    with pytest.raises(SystemExit) as exit_info:  # the dispatch of `lightning-lora generate`
        main(["generate", "--model", str(llama_base), "--raw", "--prompt", "Hello", "--max-new-tokens", "2", "--device", "cpu"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "hi"], "--model is required: a merged model directory, or the base model of --adapter"),
        (["--model", "{base}", "--adapter", "{base}", "--prompt", "hi"], "--adapter='{base}' has no adapter_config.json"),
        (["--model", "{base}", "--adapter", "{alpha}", "--adapter-name", "gamma", "--prompt", "hi"],
         "--adapter-name='gamma' is not one of ['alpha']"),
        (["--model", "{base}", "--adapter-name", "alpha", "--prompt", "hi"], "--adapter-name='alpha' names an adapter, but no --adapter was loaded"),
        (["--model", "{base}/missing", "--prompt", "hi"], "--model='{base}/missing' is not a directory"),
        (["--model", "{base}", "--prompt", "hi", "--temperature", "0.5"], "--temperature=0.5 applies only with --do-sample"),
        (["--model", "{base}", "--prompt", "hi", "--do-sample", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
        (["--model", "{base}"], "pass exactly one of --prompt TEXT and --prompts FILE"),
    ],
)
def test_generate_errors_name_the_argument(
    argv: list[str], message: str, llama_base: Path, adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fill = {"base": str(llama_base), "alpha": str(adapters["alpha"])}
    code, out, err = _cli(generate_main, [a.format(**fill) for a in argv], capsys)
    assert code == 1 and out == ""
    assert err == f"lightning-lora generate: error: {message.format(**fill)}\n"  # one line, no traceback


# --- evaluate ---------------------------------------------------------------------------------------


def test_evaluate_equals_masked_cross_entropy_computed_here(llama_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:2]))
    net, tokenizer = load_for_generation(llama_base, [adapters["alpha"]], device="cpu")
    metrics = evaluate(net, tokenizer, data, template="human_assistant", batch_size=2)

    losses, hits = [], []
    with torch.no_grad():
        for row in ROWS[:2]:
            prompt = f"Human: {row['instruction']}\n\n{row['input']}\n\nAssistant: "
            prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS, as training tokenises a prompt
            answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logits = net(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
            scored = logits[len(prompt_ids) - 1:-1]  # the positions that predict the answer and its EOS
            targets = torch.tensor(answer_ids)
            losses.append(F.cross_entropy(scored, targets, reduction="none"))
            hits.append(scored.argmax(-1) == targets)
    assert metrics["tokens"] == sum(len(t) for t in losses)
    assert metrics["loss"] == pytest.approx(torch.cat(losses).mean().item(), abs=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(torch.cat(hits).float().mean().item(), abs=1e-6)
    assert metrics["exact_match"] is not None  # short answers: on by default
    assert evaluate(net, tokenizer, data, template="human_assistant", exact_match=False)["exact_match"] is None


def test_evaluate_errors_name_the_argument(llama_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "some plain text to score"}) + "\n")
    cases = [
        (["--data", str(text)], "--model is required: a merged model directory, or the base model of --adapter"),
        (["--model", str(llama_base), "--data", str(tmp_path / "nope.jsonl")], f"--data='{tmp_path / 'nope.jsonl'}' does not exist"),
        (["--model", str(llama_base), "--data", str(text), "--exact-match"],
         f"--exact-match needs prompt/answer rows (alpaca or messages); --data='{text}' holds text rows"),
        (["--model", str(llama_base), "--data", str(text), "--format", "csv"], "--format='csv' is not one of ['auto', 'alpaca', 'messages', 'text']"),
    ]
    for argv, message in cases:
        code, out, err = _cli(evaluate_main, argv, capsys)
        assert (code, out, err) == (1, "", f"lightning-lora evaluate: error: {message}\n")
    code, out, _ = _cli(evaluate_main, ["--model", str(llama_base), "--data", str(text), "--device", "cpu"], capsys)
    assert code == 0 and json.loads(out)["exact_match"] is None  # plain text: scored, no answers to match


def test_quickstart_fine_tuning_shows_on_held_out_data(
    tmp_path: Path, trained_quickstart: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = trained_quickstart
    export, test = quickstart / "runs/quickstart/export", str(quickstart / "data/quickstart/test.jsonl")
    common = ["--data", test, "--template", "human_assistant", "--device", "cpu"]
    runs = {
        "base": ["--model", "builtin:tiny-llama"],
        "merged": ["--model", str(export / "merged"), "--output", str(tmp_path / "merged.json")],
        "adapter": ["--model", "builtin:tiny-llama", "--adapter", str(export / "adapter")],
    }
    results = {}
    for name, argv in runs.items():
        code, out, err = _cli(evaluate_main, [*argv, *common], capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    print(json.dumps({name: {k: r[k] for k in ("loss", "token_accuracy", "exact_match")} for name, r in results.items()}))
    base, merged, adapter = results["base"], results["merged"], results["adapter"]
    assert json.loads((tmp_path / "merged.json").read_text()) == merged
    assert merged["examples"] == base["examples"] == 120 and merged["tokens"] == base["tokens"]
    # The merged model and the base + adapter are the same model.
    assert merged["loss"] == pytest.approx(adapter["loss"], abs=1e-4)
    assert merged["token_accuracy"] == pytest.approx(adapter["token_accuracy"], abs=1e-6)
    assert merged["exact_match"] == adapter["exact_match"]
    # Fine-tuning shows on held-out data: lower loss, more tokens right, some answers exactly right.
    assert merged["loss"] < base["loss"] - 2.0
    assert merged["token_accuracy"] > base["token_accuracy"] + 0.3
    assert merged["exact_match"] > base["exact_match"]
