"""InstructionDataModule: reading, templating, label masking, truncation, splitting, batching, errors.

Every expected token sequence is built here from the tokenizer and literal prompt strings, never from
the data module's own helpers, so a wrong template, a shifted mask or a doubled BOS shows up as a
difference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_lora.data import InstructionDataModule

IGNORE = -100

# The first row carries every column: pyarrow and datasets infer the columns from the first row.
ALPACA_ROWS = [
    {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42"},
    {"instruction": "Reverse the letters of the word.", "input": "", "output": "elppa"},
    {"instruction": "Count the vowels in the word.", "input": "garden", "output": "2"},
    {"instruction": "Write the word in upper case.", "output": "RIVER STONE"},  # no "input" at all
]

MESSAGE_ROWS = [
    {"messages": [{"role": "user", "content": "Add 12 + 30"}, {"role": "assistant", "content": "42"}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Reverse apple"},
            {"role": "assistant", "content": "elppa"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Upper case river"},
            {"role": "assistant", "content": "RIVER"},
            {"role": "user", "content": "and stone"},
            {"role": "assistant", "content": "STONE"},
        ]
    },
]

TEXT_ROWS = [
    {"text": "apple river stone"},
    {"text": "The garden has 12 silver candles."},
    {"text": "rocket window pencil forest candle ocean planet mirror"},
]

# The prompt text each row should become, written out by hand (Stanford Alpaca wording; the tiny
# tokenizer's chat template writes "<s>", system text, "Human: ...", "Assistant: ...</s>").
_ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


def alpaca_prompt(row: dict[str, str]) -> str:
    if row.get("input"):
        return f"{_ALPACA_HEAD_INPUT}### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    return f"{_ALPACA_HEAD}### Instruction:\n{row['instruction']}\n\n### Response:\n"


def human_assistant_prompt(row: dict[str, str]) -> str:
    question = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return f"Human: {question}\n\nAssistant: "


def chat_prompt_after_bos(messages: list[dict[str, str]]) -> str:
    """What the tiny chat template renders for ``messages`` (without the last), minus the leading ``<s>``."""
    parts = []
    for m in messages[:-1]:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"Human: {m['content']}\n\n")
        else:
            parts.append(f"Assistant: {m['content']}</s>\n\n")
    return "".join(parts) + "Assistant: "


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok: Any, prompt_after_bos: str, response: str) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt length): ``<s>`` + prompt, then response + ``</s>`` as the only trained tokens."""
    prompt_ids = [tok.bos_token_id] + ids(tok, prompt_after_bos)
    response_ids = ids(tok, response) + [tok.eos_token_id]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, len(prompt_ids)


def canon(examples: list[dict[str, list[int]]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Order-free comparison form (the training rows are shuffled by the split)."""
    return sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in examples)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_dm(data_path: Path, tokenizer: Path, **kwargs: Any) -> InstructionDataModule:
    kwargs.setdefault("val_split", 0.0)
    kwargs.setdefault("packing", False)  # these tests check the padded layout; tests/test_batching.py packs
    dm = InstructionDataModule(data_path=str(data_path), tokenizer=str(tokenizer), **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tok(llama_base: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    # The masking checks below are only meaningful if these are distinct real tokens.
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module")
def no_chat_tokenizer(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer saved without a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    tokenizer.chat_template = None
    out = tmp_path_factory.mktemp("no_chat_tokenizer")
    tokenizer.save_pretrained(out)
    assert not AutoTokenizer.from_pretrained(out).chat_template
    return out


# ---------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("template", "render"), [("alpaca", alpaca_prompt), ("human_assistant", human_assistant_prompt)]
)
def test_alpaca_rows_mask_the_prompt_and_train_on_response_plus_eos(
    tmp_path: Path, llama_base: Path, tok: Any, template: str, render: Any
) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS), llama_base, template=template)

    assert len(dm.train_examples) == len(ALPACA_ROWS)
    want = [expected(tok, render(row), row["output"]) for row in ALPACA_ROWS]
    assert canon(dm.train_examples) == sorted((tuple(i), tuple(lab)) for i, lab, _ in want)
    for example in dm.train_examples:
        match = [w for w in want if w[0] == example["input_ids"]]
        assert len(match) == 1
        input_ids, _, n_prompt = match[0]
        assert example["labels"][:n_prompt] == [IGNORE] * n_prompt
        response_ids = input_ids[n_prompt:]
        assert [t for t in example["labels"] if t != IGNORE] == response_ids
        assert response_ids[-1] == tok.eos_token_id
        assert example["input_ids"].count(tok.bos_token_id) == 1 and example["input_ids"][0] == tok.bos_token_id
        assert len(example["input_ids"]) == len(example["labels"])


def test_alpaca_rows_unmasked_labels_decode_to_the_output(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS), llama_base)
    decoded = sorted(tok.decode([t for t in e["labels"] if t != IGNORE]) for e in dm.train_examples)
    assert decoded == sorted(row["output"] + "</s>" for row in ALPACA_ROWS)


def test_messages_rows_use_the_chat_template_with_one_bos(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", MESSAGE_ROWS), llama_base, format="messages")

    want = [expected(tok, chat_prompt_after_bos(r["messages"]), r["messages"][-1]["content"]) for r in MESSAGE_ROWS]
    assert canon(dm.train_examples) == sorted((tuple(i), tuple(lab)) for i, lab, _ in want)
    for example in dm.train_examples:
        input_ids, labels = example["input_ids"], example["labels"]
        # The chat template writes "<s>" itself: the tokenizer must not add a second one.
        assert input_ids[0] == tok.bos_token_id and input_ids[1] != tok.bos_token_id
        assert input_ids.count(tok.bos_token_id) == 1
        n_prompt = next(i for i, (a, b) in enumerate(zip(input_ids, labels)) if b != IGNORE)
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt:] == input_ids[n_prompt:]
    # An earlier assistant turn ("RIVER</s>") is context, not target: only "STONE</s>" is trained.
    multi = next(e for e in dm.train_examples if e["input_ids"].count(tok.eos_token_id) == 2)
    assert tok.decode([t for t in multi["labels"] if t != IGNORE]) == "STONE</s>"
    assert tok.eos_token_id in multi["input_ids"][:-1]  # the earlier turn's EOS is in the (masked) prompt


def test_messages_rows_without_a_chat_template_use_human_assistant_turns(
    tmp_path: Path, no_chat_tokenizer: Path, tok: Any
) -> None:
    rows = [MESSAGE_ROWS[0]]
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", rows), no_chat_tokenizer, format="messages")
    input_ids, labels, _ = expected(tok, "Human: Add 12 + 30\n\nAssistant: ", "42")
    assert dm.train_examples == [{"input_ids": input_ids, "labels": labels}]


def test_alpaca_rows_with_the_chat_template(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    rows = ALPACA_ROWS[:2]
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", rows), llama_base, template="chat_template")
    want = [
        expected(tok, "Human: Add the two numbers.\n\n12 + 30\n\nAssistant: ", "42"),
        expected(tok, "Human: Reverse the letters of the word.\n\nAssistant: ", "elppa"),
    ]
    assert canon(dm.train_examples) == sorted((tuple(i), tuple(lab)) for i, lab, _ in want)


@pytest.mark.parametrize(
    ("rows", "kwargs"),
    [(ALPACA_ROWS, {"template": "alpaca"}), (ALPACA_ROWS, {"template": "human_assistant"}), (MESSAGE_ROWS, {})],
    ids=["alpaca", "human_assistant", "messages"],
)
def test_train_on_prompt_trains_on_every_token(
    tmp_path: Path, llama_base: Path, rows: list[dict[str, Any]], kwargs: dict[str, Any]
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    masked = make_dm(path, llama_base, **kwargs)
    full = make_dm(path, llama_base, train_on_prompt=True, **kwargs)
    assert len(full.train_examples) == len(rows)
    for example in full.train_examples:
        assert example["labels"] == example["input_ids"]
    # Same tokens as the masked run: only the labels differ.
    assert sorted(map(tuple, (e["input_ids"] for e in full.train_examples))) == sorted(
        map(tuple, (e["input_ids"] for e in masked.train_examples))
    )
    assert any(IGNORE in e["labels"] for e in masked.train_examples)


def test_add_eos_false_leaves_the_response_without_eos(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS[:1]), llama_base, add_eos=False)
    prompt_ids = [tok.bos_token_id] + ids(tok, alpaca_prompt(ALPACA_ROWS[0]))
    response_ids = ids(tok, "42")
    assert dm.train_examples == [
        {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}
    ]


# ---------------------------------------------------------------------------------------------- readers


def _write_all_formats(root: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"json": root / "rows.json", "jsonl": root / "rows.jsonl", "parquet": root / "rows.parquet"}
    paths["json"].write_text(json.dumps(rows), encoding="utf-8")
    write_jsonl(paths["jsonl"], rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["dataset"] = root / "dataset"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["dataset"]))
    # A DatasetDict: only its "train" split is training data; "test" holds different rows.
    paths["dataset_dict"] = root / "dataset_dict"
    other = datasets.Dataset.from_list(rows[:1] * 3)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": other}).save_to_disk(
        str(paths["dataset_dict"])
    )
    return paths


@pytest.mark.parametrize("rows", [ALPACA_ROWS, MESSAGE_ROWS, TEXT_ROWS], ids=["alpaca", "messages", "text"])
def test_every_reader_gives_the_same_examples(tmp_path: Path, llama_base: Path, rows: list[dict[str, Any]]) -> None:
    paths = _write_all_formats(tmp_path, rows)
    encoded = {name: make_dm(path, llama_base, seed=3).train_examples for name, path in paths.items()}
    reference = encoded.pop("jsonl")
    assert len(reference) == len(rows)
    for name, examples in encoded.items():
        assert examples == reference, name


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(("rows", "fmt"), [(ALPACA_ROWS, "alpaca"), (MESSAGE_ROWS, "messages"), (TEXT_ROWS, "text")])
def test_auto_format_matches_the_explicit_format(
    tmp_path: Path, llama_base: Path, rows: list[dict[str, Any]], fmt: str
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    auto = make_dm(path, llama_base, format="auto")
    explicit = make_dm(path, llama_base, format=fmt)
    assert len(auto.train_examples) == len(rows)
    assert canon(auto.train_examples) == canon(explicit.train_examples)


def test_auto_format_detects_each_kind(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    alpaca = make_dm(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:1]), llama_base)
    assert alpaca.train_examples[0]["input_ids"] == expected(tok, alpaca_prompt(ALPACA_ROWS[0]), "42")[0]
    messages = make_dm(write_jsonl(tmp_path / "m.jsonl", MESSAGE_ROWS[:1]), llama_base)
    assert messages.train_examples[0]["input_ids"] == expected(tok, "Human: Add 12 + 30\n\nAssistant: ", "42")[0]
    text = make_dm(write_jsonl(tmp_path / "t.jsonl", TEXT_ROWS[:1]), llama_base)
    assert text.train_examples[0]["labels"] == text.train_examples[0]["input_ids"]


def test_text_rows_train_on_all_tokens(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS), llama_base, format="text")
    want = [[tok.bos_token_id] + ids(tok, row["text"]) + [tok.eos_token_id] for row in TEXT_ROWS]
    assert sorted(map(tuple, (e["input_ids"] for e in dm.train_examples))) == sorted(map(tuple, want))
    for example in dm.train_examples:
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"][0] == tok.bos_token_id and example["input_ids"][-1] == tok.eos_token_id
        assert example["input_ids"].count(tok.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------- truncation


def test_long_examples_are_cut_to_max_length_and_counted(
    tmp_path: Path, llama_base: Path, tok: Any, lightning_log: pytest.LogCaptureFixture
) -> None:
    full = [[tok.bos_token_id] + ids(tok, row["text"]) + [tok.eos_token_id] for row in TEXT_ROWS]
    lengths = sorted(len(f) for f in full)
    max_length = lengths[0]  # the shortest fits exactly (not a truncation), the others do not
    n_truncated = sum(len(f) > max_length for f in full)
    assert n_truncated == len(TEXT_ROWS) - 1

    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS), llama_base, max_length=max_length)
    got = sorted(map(tuple, (e["input_ids"] for e in dm.train_examples)))
    assert got == sorted(tuple(f[:max_length]) for f in full)
    assert sorted(len(e["input_ids"]) for e in dm.train_examples) == sorted(min(n, max_length) for n in lengths)
    for example in dm.train_examples:
        assert len(example["labels"]) == len(example["input_ids"])
    messages = [r.getMessage() for r in lightning_log.records]
    assert any(
        re.search(rf"\b{n_truncated} of {len(TEXT_ROWS)}\b", m) and f"max_length={max_length}" in m for m in messages
    ), messages


def test_examples_whose_prompt_fills_max_length_are_dropped(
    tmp_path: Path, llama_base: Path, tok: Any, lightning_log: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"instruction": "Say yes.", "input": "", "output": "yes"},
        {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42"},
        {"instruction": " ".join(["apple river stone cloud garden"] * 6), "input": "", "output": "no"},
    ]
    prompts = [[tok.bos_token_id] + ids(tok, human_assistant_prompt(r)) for r in rows]
    max_length = len(prompts[1]) + 1  # row 1 keeps one response token; row 2's prompt alone is longer
    assert len(prompts[0]) + len(ids(tok, "yes")) + 1 <= max_length
    assert len(prompts[2]) >= max_length

    dm = make_dm(
        write_jsonl(tmp_path / "rows.jsonl", rows), llama_base, template="human_assistant", max_length=max_length
    )
    want = []
    for row, prompt in zip(rows[:2], prompts[:2]):
        response = ids(tok, row["output"]) + [tok.eos_token_id]
        want.append((tuple((prompt + response)[:max_length]), tuple(([IGNORE] * len(prompt) + response)[:max_length])))
    assert canon(dm.train_examples) == sorted(want)
    # The kept-but-cut example has exactly one trained token: the first of "42".
    cut = next(e for e in dm.train_examples if len(e["input_ids"]) == max_length)
    assert [t for t in cut["labels"] if t != IGNORE] == ids(tok, "42")[:1]
    messages = [r.getMessage() for r in lightning_log.records]
    assert any(re.search(r"\b2 of 3\b", m) and re.search(r"\b1 dropped\b", m) for m in messages), messages


def test_nothing_is_logged_when_everything_fits(
    tmp_path: Path, llama_base: Path, lightning_log: pytest.LogCaptureFixture
) -> None:
    make_dm(write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS), llama_base, max_length=512)
    assert not [r for r in lightning_log.records if "truncated" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- validation split


def _numbered_rows(n: int, word: str = "apple") -> list[dict[str, str]]:
    return [{"text": f"{word} number {i}"} for i in range(n)]


def _encoded_text(tok: Any, rows: list[dict[str, str]]) -> set[tuple[int, ...]]:
    return {tuple([tok.bos_token_id] + ids(tok, r["text"]) + [tok.eos_token_id]) for r in rows}


def _ids_set(examples: list[dict[str, list[int]]]) -> set[tuple[int, ...]]:
    return {tuple(e["input_ids"]) for e in examples}


def test_val_split_holds_out_a_deterministic_disjoint_quarter(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    rows = _numbered_rows(20)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    all_ids = _encoded_text(tok, rows)
    assert len(all_ids) == 20

    a = make_dm(path, llama_base, val_split=0.25, seed=1)
    assert len(a.val_examples) == 5 and len(a.train_examples) == 15
    train, val = _ids_set(a.train_examples), _ids_set(a.val_examples)
    assert not train & val
    assert train | val == all_ids

    again = make_dm(path, llama_base, val_split=0.25, seed=1)
    assert _ids_set(again.val_examples) == val and again.train_examples == a.train_examples
    other = make_dm(path, llama_base, val_split=0.25, seed=2)
    assert len(other.val_examples) == 5
    assert _ids_set(other.val_examples) != val


def test_val_data_path_is_used_instead_of_a_split(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    train_rows, val_rows = _numbered_rows(20), _numbered_rows(3, word="river")
    val_path = write_jsonl(tmp_path / "val.jsonl", val_rows)
    dm = make_dm(
        write_jsonl(tmp_path / "train.jsonl", train_rows), llama_base, val_split=0.25, val_data_path=str(val_path)
    )
    assert len(dm.train_examples) == 20 and _ids_set(dm.train_examples) == _encoded_text(tok, train_rows)
    assert len(dm.val_examples) == 3 and _ids_set(dm.val_examples) == _encoded_text(tok, val_rows)
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["input_ids"].shape[0] == 3


# ---------------------------------------------------------------------------------------------- batching


def _varied_rows() -> list[dict[str, str]]:
    words = ["apple", "river", "stone", "cloud", "garden", "silver", "rocket", "window", "pencil", "forest"]
    return [{"text": " ".join(words[: 1 + (3 * i) % len(words)])} for i in range(12)]


def test_batches_are_padded_to_a_multiple_of_8_with_masked_pads(tmp_path: Path, llama_base: Path, tok: Any) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", _varied_rows()), llama_base, batch_size=4)
    known = {tuple(e["input_ids"]): e["labels"] for e in dm.train_examples}
    n_pads = 0
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4]
    for batch in batches:
        input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert input_ids.shape == mask.shape == labels.shape
        lengths = mask.sum(dim=1).tolist()
        width = input_ids.shape[1]
        assert width % 8 == 0 and width - 8 < max(lengths) <= width
        for row in range(input_ids.shape[0]):
            n = lengths[row]
            assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
            real = tuple(input_ids[row, :n].tolist())
            assert real in known and labels[row, :n].tolist() == known[real]
            assert input_ids[row, n:].eq(tok.pad_token_id).all()
            assert labels[row, n:].eq(IGNORE).all()
            n_pads += width - n
    assert n_pads > 0  # the checks above were not vacuous
    assert tok.pad_token_id != tok.eos_token_id


def test_pad_to_multiple_of_is_respected(tmp_path: Path, llama_base: Path) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", _varied_rows()), llama_base, batch_size=12, pad_to_multiple_of=5)
    batch = next(iter(dm.train_dataloader()))
    longest = max(len(e["input_ids"]) for e in dm.train_examples)
    assert batch["input_ids"].shape == (12, -(-longest // 5) * 5)


def _order(dm: InstructionDataModule, loader: Any | None = None) -> list[list[int]]:
    """The training examples in the order the loader yields them, without their padding (which
    depends on the company an example keeps in its batch)."""
    return [
        row[mask.bool()].tolist()
        for batch in (loader or dm.train_dataloader())
        for row, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


def test_training_shuffle_is_reproducible_for_a_seed(tmp_path: Path, llama_base: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", _numbered_rows(16))
    a = make_dm(path, llama_base, batch_size=4, seed=7)
    b = make_dm(path, llama_base, batch_size=4, seed=7)
    c = make_dm(path, llama_base, batch_size=4, seed=8)
    assert _order(a) == _order(b)
    assert sorted(_order(a)) == sorted(_order(c)) and _order(a) != _order(c)
    # Each epoch over the same loader is a new permutation, and it is also reproducible.
    loader_a, loader_b = a.train_dataloader(), b.train_dataloader()
    epochs_a = [_order(a, loader_a) for _ in range(2)]
    assert epochs_a[0] != epochs_a[1]
    assert epochs_a == [_order(b, loader_b) for _ in range(2)]


def test_max_tokens_per_batch_without_group_by_length_fills_random_batches(tmp_path: Path, llama_base: Path) -> None:
    """A token budget needs no length grouping (off by default); the smallest one accepted is
    max_length rounded up to pad_to_multiple_of (100 -> 104)."""
    path = write_jsonl(tmp_path / "rows.jsonl", _numbered_rows(40) + _varied_rows())
    dm = make_dm(path, llama_base, max_length=100, max_tokens_per_batch=104)
    assert dm.group_by_length is False
    dm = make_dm(path, llama_base, max_length=100, max_tokens_per_batch=128)
    loader = dm.train_dataloader()
    assert (loader.batch_sampler.max_tokens, loader.batch_sampler.group_by_length) == (128, False)
    batches = list(loader)
    assert all(batch["input_ids"].numel() <= 128 for batch in batches)
    assert sorted(_order(dm, batches)) == sorted(e["input_ids"] for e in dm.train_examples)
    assert len(batches) == len(loader) < len(dm.train_examples)  # several examples to a batch


def test_validation_batches_are_not_shuffled(tmp_path: Path, llama_base: Path) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", _numbered_rows(20)), llama_base, val_split=0.5, batch_size=4)
    unpadded = [
        row[mask.bool()].tolist()
        for batch in dm.val_dataloader()
        for row, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert len(unpadded) == 10
    assert unpadded == [e["input_ids"] for e in dm.val_examples]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_data_path_fails_at_construction(tmp_path: Path, llama_base: Path) -> None:
    missing = tmp_path / "nowhere" / "rows.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        InstructionDataModule(data_path=str(missing), tokenizer=str(llama_base))
    assert "data.data_path" in str(err.value) and str(missing) in str(err.value)


def test_missing_val_data_path_fails_at_construction(tmp_path: Path, llama_base: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    missing = tmp_path / "val.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        InstructionDataModule(data_path=str(data), tokenizer=str(llama_base), val_data_path=str(missing))
    assert "data.val_data_path" in str(err.value) and str(missing) in str(err.value)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_row_missing_a_field_fails_in_setup_naming_row_field_and_path(
    tmp_path: Path, llama_base: Path, suffix: str
) -> None:
    """A row without ``output`` fails before training, naming its position in the file."""
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]
    del rows[4]["output"]
    if suffix == "jsonl":
        path = write_jsonl(tmp_path / "rows.jsonl", rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "rows.parquet"  # a columnar file stores the missing field as null
        pq.write_table(pa.Table.from_pylist(rows), path)
    dm = InstructionDataModule(data_path=str(path), tokenizer=str(llama_base), val_split=0.0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert re.search(r"\brow 4\b", message), message
    assert "'output'" in message and str(path) in message and "data.data_path" in message


@pytest.mark.parametrize(
    ("kwargs", "key", "value"),
    [
        ({"format": "csv"}, "data.format", "'csv'"),
        ({"template": "vicuna"}, "data.template", "'vicuna'"),
        ({"val_split": 1.5}, "data.val_split", "1.5"),
        ({"val_split": -0.1}, "data.val_split", "-0.1"),
        ({"max_length": 0}, "data.max_length", "0"),
        ({"batch_size": 0}, "data.batch_size", "0"),
        ({"pad_to_multiple_of": 0}, "data.pad_to_multiple_of", "0"),
        ({"max_tokens_per_batch": 511}, "data.max_tokens_per_batch", "511"),  # below max_length=512
        ({"max_length": 100, "max_tokens_per_batch": 100}, "data.max_tokens_per_batch", "100"),  # below 104
    ],
)
def test_bad_values_fail_at_construction_naming_key_and_value(
    tmp_path: Path, llama_base: Path, kwargs: dict[str, Any], key: str, value: str
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(data), tokenizer=str(llama_base), **kwargs)
    assert f"{key}={value}" in str(err.value)


def test_unsupported_suffix_fails_naming_key_path_and_suffix(tmp_path: Path, llama_base: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\nSay yes.,yes\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(path), tokenizer=str(llama_base)).setup("fit")
    message = str(err.value)
    assert str(path) in message and "'.csv'" in message
    assert "data.data_path" in message, message  # DESIGN: name the config key to change


def test_dataset_dict_without_train_split_fails_naming_key_and_splits(tmp_path: Path, llama_base: Path) -> None:
    import datasets

    path = tmp_path / "dataset_dict"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ALPACA_ROWS)}).save_to_disk(str(path))
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(path), tokenizer=str(llama_base)).setup("fit")
    message = str(err.value)
    assert str(path) in message and "'validation'" in message
    assert "data.data_path" in message, message  # DESIGN: name the config key to change


def test_json_file_that_is_not_a_list_fails(tmp_path: Path, llama_base: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": ALPACA_ROWS}), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(path), tokenizer=str(llama_base)).setup("fit")
    assert str(path) in str(err.value) and "list" in str(err.value)


def test_chat_template_without_one_in_the_tokenizer_fails(tmp_path: Path, no_chat_tokenizer: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    dm = InstructionDataModule(data_path=str(data), tokenizer=str(no_chat_tokenizer), template="chat_template")
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "data.template='chat_template'" in message and str(no_chat_tokenizer) in message


def test_messages_row_not_ending_with_the_assistant_fails(tmp_path: Path, llama_base: Path) -> None:
    rows = [MESSAGE_ROWS[0], {"messages": [{"role": "user", "content": "Hello"}]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    # A validation file keeps the training rows in file order, so the row number is unambiguous.
    val = write_jsonl(tmp_path / "val.jsonl", [MESSAGE_ROWS[0]])
    dm = InstructionDataModule(data_path=str(path), tokenizer=str(llama_base), val_data_path=str(val))
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert re.search(r"\brow 1\b", message) and "'assistant'" in message
    assert "data.data_path" in message and str(path) in message


def test_explicit_format_that_does_not_fit_the_rows_fails(tmp_path: Path, llama_base: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS)
    dm = InstructionDataModule(data_path=str(path), tokenizer=str(llama_base), format="alpaca", val_split=0.0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "'instruction'" in message and "data.format='alpaca'" in message and str(path) in message


def test_auto_format_on_unknown_fields_names_the_key(tmp_path: Path, llama_base: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(path), tokenizer=str(llama_base), val_split=0.0).setup("fit")
    assert "data.format" in str(err.value) and "'question'" in str(err.value)


def test_batch_tensors_are_long(tmp_path: Path, llama_base: Path) -> None:
    dm = make_dm(write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS), llama_base, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # token_weighted_loss is off by default
    assert all(batch[key].dtype == torch.long for key in ("input_ids", "attention_mask", "labels"))


def test_max_length_that_leaves_no_example_fails_before_training(tmp_path: Path, llama_base: Path) -> None:
    # The Alpaca preamble alone is longer than 16 tokens: every row would be dropped.
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse the word.", "input": "apple", "output": "elppa"}] * 4)
    with pytest.raises(ValueError, match=r"data.max_length=16"):
        make_dm(path, llama_base, max_length=16, template="alpaca")
