"""Training batches: length grouping, the token budget, the share of each rank, and packing.

Packing is checked on real tiny models: every example's loss in a packed row equals its loss in a
padded batch, and an example's logits do not move when another example in its row changes.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data.distributed import DistributedSampler

from lightning_lora import InstructionDataModule, LoraFinetuneModule
from lightning_lora.batching import PACKING_MODEL_TYPES, PADDING_OFFSET, TrainingBatchSampler, count_tokens, padded

IGNORE = -100
WORDS = ["apple", "river", "stone", "cloud", "garden", "silver", "rocket", "window", "pencil", "forest", "candle", "ocean"]


def varied_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of about 15 to 100 tokens, each unique (so that a token sequence names its row)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 2, 4, 7, 12]))]
        rows.append({"instruction": f"Repeat item {i}.", "input": " ".join(words), "output": " ".join(words[::-1])})
    return rows


def make_dm(tmp_path: Path, base: Path, rows: list[dict[str, str]], **kwargs: Any) -> InstructionDataModule:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # Padded, length-grouped batches unless a test says otherwise (the defaults: test_defaults_*).
    kwargs = {"val_split": 0.0, "template": "human_assistant", "max_length": 128, "packing": False,
              "group_by_length": True, **kwargs}
    dm = InstructionDataModule(data_path=str(path), tokenizer=str(base), **kwargs)
    dm.setup("fit")
    return dm


def epoch_batches(dm: InstructionDataModule, epoch: int) -> list[dict[str, Any]]:
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(epoch)
    return list(loader)


def epoch_indices(dm: InstructionDataModule, epoch: int, rank: int = 0, replicas: int = 1) -> list[list[int]]:
    """The example indices of each batch of one rank, through the data module (a stand-in trainer tells it the rank)."""
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank}) if replicas > 1 else None
    loader = dm.train_dataloader()
    dm.trainer = None
    assert isinstance(loader.batch_sampler, TrainingBatchSampler)
    loader.batch_sampler.sampler.set_epoch(epoch)
    batches = list(loader.batch_sampler)
    assert len(batches) == len(loader)
    return batches


def padding_fraction(batches: list[dict[str, Any]]) -> float:
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / total


def packed_segments(batch: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every example in a packed batch: runs of position ids from 0 (padding is single zeros)."""
    segments = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        segments += [(row, a, b) for a, b in itertools.pairwise(starts) if b - a >= 2]
    return segments


# ---------------------------------------------------------------------------------------------- grouping


def test_grouping_by_length_cuts_padding_against_random_batches(tmp_path: Path, llama_base: Path) -> None:
    rows = varied_rows(96)
    grouped = make_dm(tmp_path, llama_base, rows, batch_size=8)
    plain = make_dm(tmp_path, llama_base, rows, batch_size=8, group_by_length=False)
    grouped_padding = padding_fraction(epoch_batches(grouped, 0))
    random_padding = padding_fraction(epoch_batches(plain, 0))
    assert random_padding > 0.3  # the lengths really vary
    assert grouped_padding < 0.25 * random_padding, (grouped_padding, random_padding)


RANDOM_BUDGET = {"max_tokens_per_batch": 256, "group_by_length": False}


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 4}, {"batch_size": 4, "group_by_length": False}, {"max_tokens_per_batch": 256},
     RANDOM_BUDGET, {**RANDOM_BUDGET, "packing": True}],
    ids=["grouped", "random", "token-budget", "random-token-budget", "packed-random-token-budget"],
)
def test_each_epoch_trains_every_example_once_in_a_new_reproducible_order(
    tmp_path: Path, llama_base: Path, kwargs: dict[str, Any]
) -> None:
    rows = varied_rows(40)
    dm = make_dm(tmp_path, llama_base, rows, seed=3, **kwargs)
    epochs = [epoch_indices(dm, epoch) for epoch in range(3)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    assert epochs[0] != epochs[1] != epochs[2]
    assert len({len(batches) for batches in epochs}) == 1  # Lightning counts the steps of an epoch once
    again = make_dm(tmp_path, llama_base, rows, seed=3, **kwargs)
    assert [epoch_indices(again, epoch) for epoch in range(3)] == epochs
    other = make_dm(tmp_path, llama_base, rows, seed=4, **kwargs)
    assert epoch_indices(other, 0) != epochs[0]
    # Without set_epoch, every pass over the loader is the next epoch.
    loader = again.train_dataloader()
    assert [list(loader.batch_sampler), list(loader.batch_sampler)] == epochs[:2]


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 4}, {"max_tokens_per_batch": 200}, RANDOM_BUDGET, {**RANDOM_BUDGET, "packing": True}],
    ids=["grouped", "token-budget", "random-token-budget", "packed-random-token-budget"],
)
def test_ranks_get_disjoint_examples_covering_all_in_equally_many_batches(
    tmp_path: Path, llama_base: Path, replicas: int, kwargs: dict[str, Any]
) -> None:
    rows = varied_rows(33)  # 9 batches of 4: not a multiple of the ranks, so a rank gets a padding batch
    dm = make_dm(tmp_path, llama_base, rows, **kwargs)
    for epoch in range(2):
        shares = [epoch_indices(dm, epoch, rank, replicas) for rank in range(replicas)]
        assert len({len(share) for share in shares}) == 1, [len(s) for s in shares]
        trained = [batch for share in shares for batch in share if batch[0] < PADDING_OFFSET]
        seen = [i for batch in trained for i in batch]
        assert sorted(seen) == list(range(len(rows)))  # disjoint and complete: nothing repeated or dropped


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 64), min_size=1, max_size=80),
    replicas=st.integers(1, 4),
    batch_size=st.integers(1, 9),
    budget=st.one_of(st.none(), st.integers(64, 300)),
    group_by_length=st.booleans(),
    packed=st.booleans(),
    epoch=st.integers(0, 5),
)
def test_sampler_shares_are_equal_disjoint_and_within_budget(
    lengths: list[int], replicas: int, batch_size: int, budget: int | None, group_by_length: bool, packed: bool,
    epoch: int,
) -> None:
    shares = []
    for rank in range(replicas):
        ranks = DistributedSampler(lengths, num_replicas=replicas, rank=rank)
        sampler = TrainingBatchSampler(ranks, batch_size, lengths, max_tokens=budget, group_by_length=group_by_length,
                                       seed=1, pad_to_multiple_of=8, packed=packed)
        assert len({len(sampler.batches(e)) for e in (epoch, epoch + 1)}) == 1  # the same number every epoch
        ranks.set_epoch(epoch)
        shares.append(list(sampler))
        assert len(sampler) == len(shares[-1])
    assert len({len(share) for share in shares}) == 1
    batches = [batch for share in shares for batch in share if batch[0] < PADDING_OFFSET]
    padding = [batch for share in shares for batch in share if batch[0] >= PADDING_OFFSET]
    assert len(padding) < replicas and all(share[-1] == p for share in shares for p in share if p in padding)
    assert all([i - PADDING_OFFSET for i in p] in batches for p in padding)  # copies of real batches
    seen = sorted(i for batch in batches for i in batch)
    assert seen == list(range(len(lengths)))  # each example once
    # The epoch's list is the same at any number of ranks; the ranks take it in turn.
    single = TrainingBatchSampler(DistributedSampler(lengths, num_replicas=1, rank=0), batch_size, lengths,
                                  max_tokens=budget, group_by_length=group_by_length, seed=1, packed=packed)
    assert single.epoch_batches(epoch) == [shares[k % replicas][k // replicas] for k in range(len(batches))]
    for batch in batches:
        assert batch
        if budget is None:
            assert len(batch) <= batch_size
        elif packed:
            assert sum(lengths[i] for i in batch) <= budget
        else:
            assert len(batch) * padded(max(lengths[i] for i in batch), 8) <= budget


def test_token_budget_bounds_every_padded_batch(tmp_path: Path, llama_base: Path) -> None:
    dm = make_dm(tmp_path, llama_base, varied_rows(64), max_tokens_per_batch=256)
    batches = epoch_batches(dm, 0)
    assert all(b["input_ids"].numel() <= 256 for b in batches)
    sizes = [b["input_ids"].shape[0] for b in batches]
    assert max(sizes) >= 4 * min(sizes)  # short examples go many to a batch, long ones few
    real = sum(count_tokens(b)[1] for b in batches)
    assert real == sum(len(e["input_ids"]) for e in dm.train_examples)


def batch_cost(dm: InstructionDataModule, batch: dict[str, Any]) -> int:
    """What a batch costs in the token budget: its real tokens when packed, its padded size otherwise."""
    total, real = count_tokens(batch)
    return real if dm.pack else total


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_random_token_budget_batches_are_within_budget_and_new_every_epoch(
    tmp_path: Path, llama_base: Path, packing: bool, replicas: int
) -> None:
    dm = make_dm(tmp_path, llama_base, varied_rows(96), max_tokens_per_batch=384, group_by_length=False,
                 packing=packing)
    assert dm.pack == packing
    epochs = []
    for epoch in range(3):
        shares = [epoch_indices(dm, epoch, rank, replicas) for rank in range(replicas)]
        assert len({len(share) for share in shares}) == 1
        batches = [batch for share in shares for batch in share if batch[0] < PADDING_OFFSET]
        assert sorted(i for batch in batches for i in batch) == list(range(len(dm.train_examples)))
        for indices in batches:
            collated = dm.collate_train([dm.train_examples[i] for i in indices])
            assert ("position_ids" in collated) == packing
            assert batch_cost(dm, collated) <= 384
        epochs.append({frozenset(batch) for batch in batches})
    assert len({len(batches) for batches in epochs}) == 1
    for a, b in itertools.combinations(epochs, 2):
        assert len(a & b) <= len(a) // 4, len(a & b)  # few batches recur in another epoch


def sorted_runs(batches: list[list[int]], costs: list[int]) -> float:
    """The share of the batches of two or more examples that are runs of the examples sorted by cost:
    no example of another batch costs strictly more than the batch's cheapest and less than its dearest."""
    runs = []
    for batch in batches:
        if len(batch) < 2:
            continue
        low, high = min(costs[i] for i in batch), max(costs[i] for i in batch)
        inside = set(batch)
        runs.append(not any(low < cost < high for i, cost in enumerate(costs) if i not in inside))
    return sum(runs) / len(runs)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_random_token_budget_batches_are_not_sorted_by_length(tmp_path: Path, llama_base: Path, packing: bool) -> None:
    """A length-sorted fill makes every batch a run of the sorted examples; random batches of
    several examples (here of 28 to 128 tokens) almost never are one."""
    rows = varied_rows(240)
    grouped = make_dm(tmp_path, llama_base, rows, max_tokens_per_batch=512, packing=packing)
    random_ = make_dm(tmp_path, llama_base, rows, max_tokens_per_batch=512, group_by_length=False, packing=packing)
    costs = [len(e["input_ids"]) if packing else padded(len(e["input_ids"]), 8) for e in random_.train_examples]
    assert sorted_runs(epoch_indices(grouped, 0), costs) == 1.0  # the measure sees sorting
    for epoch in range(2):
        batches = epoch_indices(random_, epoch)
        assert len(batches) >= 20
        assert sorted_runs(batches, costs) < 0.1


@pytest.mark.parametrize("group_by_length", [False, True], ids=["random", "grouped"])
def test_packed_token_budget_counts_the_tokens_the_rows_hold(
    tmp_path: Path, llama_base: Path, group_by_length: bool
) -> None:
    """Packed, a batch costs the sum of its examples' lengths: batches fill up to the budget, which
    count times the longest would leave far from full."""
    budget, max_length = 512, 128
    dm = make_dm(tmp_path, llama_base, varied_rows(96), max_tokens_per_batch=budget, max_length=max_length,
                 group_by_length=group_by_length, packing=True)
    assert dm.train_dataloader().batch_sampler.packed
    for epoch in range(2):
        batches = epoch_batches(dm, epoch)
        real = [count_tokens(batch)[1] for batch in batches]
        assert sum(real) == sum(len(e["input_ids"]) for e in dm.train_examples)
        assert max(real) <= budget
        # Filled: a batch ends when the next example (at most max_length) would not fit; only the
        # last of the fill and the halves of split batches hold less.
        assert sorted(real)[len(real) // 2] >= budget - max_length, real
        lengths = [sorted(end - start for _, start, end in packed_segments(batch)) for batch in batches]
        assert any(len(batch) * batch[-1] > budget for batch in lengths)  # which count times the longest refuses
        if group_by_length:  # exactly the ascending lengths, cut where the sum would pass the budget
            expected, batch = [], []
            for n in sorted(len(e["input_ids"]) for e in dm.train_examples):
                if sum(batch) + n > budget:
                    expected.append(batch)
                    batch = []
                batch.append(n)
            assert sorted(lengths) == sorted([*expected, batch])


@pytest.mark.parametrize("references", [1, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_random_token_budget_has_the_same_number_of_batches_every_epoch(
    monkeypatch: pytest.MonkeyPatch, packed: bool, references: int
) -> None:
    """The shuffles need different numbers of batches; every epoch has as many as the reference
    shuffles' most, whether its own shuffle needs fewer (split) or more (a reference shuffle instead:
    with one reference, about every other epoch)."""
    from lightning_lora import batching

    monkeypatch.setattr(batching, "_REFERENCE_SHUFFLES", references)
    rng = random.Random(0)
    lengths = [rng.choice([3, 20, 50, 90, 150, 200]) + rng.randrange(8) for _ in range(300)]
    budget = 400
    ranks = DistributedSampler(lengths, num_replicas=1, rank=0)
    sampler = TrainingBatchSampler(ranks, 1, lengths, max_tokens=budget, group_by_length=False, seed=2, packed=packed)
    needed = {len(sampler._token_budget(sampler._reference_order(n))) for n in range(16)}
    assert len(needed) > 2, needed  # the number of batches depends on the order
    counts = set()
    for epoch in range(30):
        ranks.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        for batch in batches:
            sizes = [lengths[i] for i in batch]
            assert (sum(sizes) if packed else len(sizes) * padded(max(sizes), 8)) <= budget
    assert counts == {max(len(sampler._token_budget(sampler._reference_order(n))) for n in range(references))}


def test_validation_batches_are_not_grouped_or_packed(tmp_path: Path, llama_base: Path) -> None:
    dm = make_dm(tmp_path, llama_base, varied_rows(24), val_split=0.5, batch_size=4, packing=True)
    rows = [r[m.bool()].tolist() for b in dm.val_dataloader() for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert rows == [e["input_ids"] for e in dm.val_examples]


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_batches_hold_the_same_examples_laid_out_apart(
    tmp_path: Path, llama_base: Path, train_on_prompt: bool
) -> None:
    rows = varied_rows(48)
    common = {"batch_size": 8, "train_on_prompt": train_on_prompt, "token_weighted_loss": True}
    plain = make_dm(tmp_path, llama_base, rows, **common)
    packed = make_dm(tmp_path, llama_base, rows, packing=True, **common)
    examples = {tuple(e["input_ids"]): e["labels"] for e in packed.train_examples}
    plain_batches, packed_batches = epoch_batches(plain, 1), epoch_batches(packed, 1)
    assert len(plain_batches) == len(packed_batches)
    fewer_rows = 0
    for unpacked, batch in zip(plain_batches, packed_batches):
        assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache", "num_items_in_batch"}
        assert batch["use_cache"] is False and batch["num_items_in_batch"] == unpacked["num_items_in_batch"]
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width <= padded(packed.max_length, 8)
        got = []
        for row, start, end in packed_segments(batch):
            ids = tuple(batch["input_ids"][row, start:end].tolist())
            got.append(ids)
            assert batch["position_ids"][row, start:end].tolist() == list(range(end - start))
            # The first label is masked: no example learns to predict the next one's first token.
            assert batch["labels"][row, start:end].tolist() == [IGNORE] + examples[ids][1:]
        want = [tuple(r[m.bool()].tolist()) for r, m in zip(unpacked["input_ids"], unpacked["attention_mask"])]
        assert sorted(got) == sorted(want)  # the very examples of the unpacked batch
        for row in range(batch["input_ids"].shape[0]):
            end = max(e for r, _, e in packed_segments(batch) if r == row)
            assert batch["position_ids"][row, end:].eq(0).all() and batch["labels"][row, end:].eq(IGNORE).all()
            assert batch["input_ids"][row, end:].eq(packed.tokenizer.pad_token_id).all()
        assert count_tokens(batch) == (batch["input_ids"].numel(), sum(len(ids) for ids in got))
        fewer_rows += batch["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    assert fewer_rows > len(packed_batches) // 2  # packing did pack


def _per_example_losses(model: Any, batch: dict[str, Any], packed: bool) -> dict[tuple[int, ...], torch.Tensor]:
    """Each example's mean next-token loss, from the logits of the batch it sits in, keyed by its tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    if packed:
        spans = packed_segments(batch)
    else:
        spans = [(r, 0, int(n)) for r, n in enumerate(batch["attention_mask"].sum(dim=1))]
    losses = {}
    for row, start, end in spans:
        targets = batch["labels"][row, start + 1 : end]
        keep = targets != IGNORE
        loss = F.cross_entropy(logits[row, start : end - 1][keep], targets[keep])
        losses[tuple(batch["input_ids"][row, start:end].tolist())] = loss
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packing_leaves_every_example_loss_and_the_batch_loss_unchanged(
    tmp_path: Path, tiny_bases: dict[str, Path], arch: str
) -> None:
    from transformers import AutoModelForCausalLM

    base = tiny_bases[arch]
    rows = varied_rows(24)
    # Every token trained, the first included: the first label must not become a target across examples.
    plain = make_dm(tmp_path, base, rows, batch_size=8, train_on_prompt=True)
    packed = make_dm(tmp_path, base, rows, batch_size=8, packing=True, train_on_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pairs = list(zip(epoch_batches(plain, 0), epoch_batches(packed, 0)))
    assert any(batch["input_ids"].shape[0] < unpacked["input_ids"].shape[0] for unpacked, batch in pairs)
    for unpacked, batch in pairs:
        alone = _per_example_losses(model, unpacked, packed=False)
        together = _per_example_losses(model, batch, packed=True)
        assert alone.keys() == together.keys()
        for ids, loss in alone.items():
            torch.testing.assert_close(together[ids], loss, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).loss, model(**unpacked).loss, atol=1e-5, rtol=1e-5)


def test_packed_rows_are_as_short_as_their_number_allows() -> None:
    """Examples of 300, 200, 100 and 100 tokens in rows of up to 512 need 2 rows. Filled to 512
    first-fit they make rows of 500 and 200 tokens (width 504); the same 2 rows can be 400 and 300
    (300 + 100, 200 + 100), and no width below 400 holds them in 2 rows with the longest first
    (at 392: 300 | 200 + 100 | 100). So the batch is 2 x 400, and each example is whole in it."""
    from lightning_lora.batching import collate_packed

    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (100, 300, 100, 200)]
    batch = collate_packed(examples, 0, row_length=512)
    assert batch["input_ids"].shape == (2, 400)
    segments = sorted(end - start for _, start, end in packed_segments(batch))
    assert segments == [100, 100, 200, 300]
    for row, start, end in packed_segments(batch):
        assert set(batch["input_ids"][row, start:end].tolist()) == {end - start}
    # Nothing to gain: one example per row, or a single row already as short as it gets.
    assert collate_packed(examples[:1], 0, row_length=512)["input_ids"].shape == (1, 104)
    assert collate_packed([{"input_ids": [5] * 510, "labels": [5] * 510}] * 2, 0, 512)["input_ids"].shape == (2, 512)


@pytest.mark.parametrize(("arch", "isolated"), [("llama", True), ("qwen2", True), ("gpt2", True), ("bloom", False)])
def test_changing_one_packed_example_does_not_move_the_others_logits(
    tiny_bases: dict[str, Path], arch: str, isolated: bool
) -> None:
    """The check that would catch a leak: it does catch one where transformers skips the packed mask
    (with a cache, or in Bloom, which we refuse to pack)."""
    from transformers import AutoModelForCausalLM

    from lightning_lora.batching import collate_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_bases[arch], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, 300, (n,), generator=gen).tolist() for n in (13, 9))
    batch = collate_packed([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}], 0, 32)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 1:13] = torch.randint(3, 300, (12,), generator=gen)

    def second_logits(b: dict[str, Any], **overrides: Any) -> torch.Tensor:
        with torch.no_grad():
            return model(**{**b, **overrides, "labels": None}).logits[0, 13:22]

    moved = (second_logits(changed) - second_logits(batch)).abs().max().item()
    assert (moved < 1e-5) is isolated, moved
    if isolated:  # the same inputs with a cache (no packed mask): the change does reach the second example
        assert (second_logits(changed, use_cache=True) - second_logits(batch, use_cache=True)).abs().max() > 1e-3


# Transformers ignores settings a config does not have, so one set fits every model type.
_TINY = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "pad_token_id": 0,
    "initializer_range": 0.5, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8,
    "num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
    "sliding_window": 64, "use_sliding_window": False,
}


@pytest.mark.parametrize("model_type", sorted(PACKING_MODEL_TYPES))
def test_every_model_type_allowed_to_pack_keeps_packed_examples_apart(model_type: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_TINY)).float().eval()
    a, b = torch.randint(3, 290, (1, 7)), torch.randint(3, 290, (1, 5))
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits], 1)
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits
    assert (packed - alone).abs().max() < 1e-3


def test_packing_refuses_a_model_type_whose_attention_would_leak(tmp_path: Path, tiny_bases: dict[str, Path]) -> None:
    with pytest.raises(ValueError) as err:
        make_dm(tmp_path, tiny_bases["bloom"], varied_rows(8), packing=True)
    message = str(err.value)
    assert "data.packing=true" in message and "'bloom'" in message and str(tiny_bases["bloom"]) in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_tokens_per_batch": 64}, "data.max_tokens_per_batch=64"),
        ({"max_tokens_per_batch": 0}, "data.max_tokens_per_batch=0"),
    ],
)
def test_bad_batching_values_fail_at_construction_naming_key_and_value(
    tmp_path: Path, llama_base: Path, kwargs: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(varied_rows(1)[0]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        InstructionDataModule(data_path=str(path), tokenizer=str(llama_base), max_length=96, **kwargs)
    assert expected in str(err.value)


def test_validation_metrics_of_a_packed_batch_equal_the_unpacked_ones(tmp_path: Path, llama_base: Path) -> None:
    rows = varied_rows(16)
    plain = make_dm(tmp_path, llama_base, rows, batch_size=8, train_on_prompt=True)
    packed = make_dm(tmp_path, llama_base, rows, batch_size=8, train_on_prompt=True, packing=True)
    module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj", "v_proj"])
    module.configure_model()
    module.eval()
    results = []
    for dm in (plain, packed):
        with torch.no_grad():
            for batch in epoch_batches(dm, 0):
                module.validation_step(batch, 0)
        results.append((module.val_loss.compute(), module.val_accuracy.compute()))
        module.val_loss.reset()
        module.val_accuracy.reset()
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- with a Trainer


class _Record(L.Callback):
    """What the model was given, and the losses."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.model_inputs: list[set[str]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.model_inputs.append({k for k, v in batch.items() if v is not None})


def test_packed_training_through_a_lightning_trainer(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loops import fit_loop

    set_by_lightning, passes = [], []
    set_sampler_epoch, sampler_iter = fit_loop._set_sampler_epoch, TrainingBatchSampler.__iter__

    def spy_set(loader: Any, epoch: int) -> None:
        set_sampler_epoch(loader, epoch)
        set_by_lightning.append((epoch, loader.batch_sampler.sampler.epoch))

    def spy_iter(self: TrainingBatchSampler) -> Any:
        passes.append(self.sampler.epoch)
        return sampler_iter(self)

    monkeypatch.setattr(fit_loop, "_set_sampler_epoch", spy_set)
    monkeypatch.setattr(TrainingBatchSampler, "__iter__", spy_iter)
    dm = make_dm(tmp_path, llama_base, varied_rows(32), batch_size=8, packing=True, val_split=0.25)
    module = LoraFinetuneModule(
        str(llama_base), target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
    )
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record], default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.train_dataloader.batch_sampler, TrainingBatchSampler)
    assert set_by_lightning == [(0, 0), (1, 1), (2, 2)]  # Lightning's set_epoch reaches our sampler
    assert passes == [0, 1, 2]  # and every epoch draws its own batches
    assert len(record.losses) == 9 and all(torch.isfinite(torch.tensor(record.losses)))
    assert all(keys == {"input_ids", "labels", "position_ids", "use_cache"} for keys in record.model_inputs)
    assert sum(record.losses[-3:]) < sum(record.losses[:3])
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_lightning_ddp_rebuilds_the_batch_sampler_with_its_ranks_and_settings(tmp_path: Path, llama_base: Path) -> None:
    """Under DDP, Lightning puts its own DistributedSampler into a loader that has none, rebuilding a
    batch sampler made in the hook around it: ours must keep its settings and take the ranks."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import BatchSampler, DataLoader

    dm = make_dm(tmp_path, llama_base, varied_rows(33), max_tokens_per_batch=256, seed=5)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm.trainer = trainer
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook: recording the arguments
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    batch_sampler = prepared.batch_sampler
    assert isinstance(batch_sampler, TrainingBatchSampler) and batch_sampler is not loader.batch_sampler
    assert isinstance(batch_sampler.sampler, DistributedSampler)
    assert (batch_sampler.sampler.num_replicas, batch_sampler.sampler.rank) == (2, 0)
    for epoch in range(2):
        assert batch_sampler.batches(epoch) == loader.batch_sampler.batches(epoch)  # same settings, same seed
    assert batch_sampler.batches(0) == epoch_indices(dm, 0, rank=0, replicas=2)


def test_token_weighted_loss_weighs_every_response_token_of_the_epoch_alike(tmp_path: Path, llama_base: Path) -> None:
    """Grouped batches hold different numbers of loss tokens. With token_weighted_loss the
    mean of the epoch's step losses is the mean loss over all its response tokens, computed here from
    each example alone; dividing each batch by its own count, it is not."""
    from transformers import AutoModelForCausalLM

    rows = varied_rows(40)
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).eval()
    weighted = make_dm(tmp_path, llama_base, rows, batch_size=8, token_weighted_loss=True)
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        for example in weighted.train_examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            mask = targets != IGNORE
            total += F.cross_entropy(logits[mask], targets[mask], reduction="sum")
            count += int(mask.sum())
        batches = epoch_batches(weighted, 0)
        for batch in batches:
            assert float(batch["num_items_in_batch"]) == pytest.approx(count / len(batches))
        epoch_mean = torch.stack([model(**b).loss for b in batches]).mean()
        torch.testing.assert_close(epoch_mean, total / count, rtol=1e-5, atol=1e-5)

        per_batch = make_dm(tmp_path, llama_base, rows, batch_size=8)  # the default: each batch by its own count
        plain_batches = epoch_batches(per_batch, 0)
        assert "num_items_in_batch" not in plain_batches[0]
        plain_mean = torch.stack([model(**b).loss for b in plain_batches]).mean()
    assert abs(float(plain_mean - total / count)) > 1e-3


def test_defaults_pack_random_batches_where_the_model_supports_it(tmp_path: Path, tiny_bases: dict[str, Path]) -> None:
    """Out of the box: random batches (grouping costs quality), packed when the attention keeps
    packed examples apart (Llama), padded otherwise (Bloom), without an error either way."""
    rows = varied_rows(32)
    for arch, packs in (("llama", True), ("bloom", False)):
        path = tmp_path / f"{arch}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        dm = InstructionDataModule(data_path=str(path), tokenizer=str(tiny_bases[arch]), val_split=0.0, batch_size=8)
        dm.setup("fit")
        assert (dm.packing, dm.group_by_length, dm.pack) == ("auto", False, packs)
        batch = next(iter(dm.train_dataloader()))
        assert ("position_ids" in batch and "attention_mask" not in batch) == packs
    with pytest.raises(ValueError, match=r"data.packing='yes' is not one of"):
        InstructionDataModule(data_path=str(path), tokenizer=str(tiny_bases["llama"]), packing="yes")
