"""How training examples become batches: which examples go together, and how they are packed.

:class:`TrainingBatchSampler` chooses the examples of every batch (length grouping, a token budget,
the share of each rank); :func:`collate_packed` lays one batch's examples out in as few rows as
possible without letting them see each other; :func:`count_tokens` tells real tokens from padding
in either layout.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from lightning_lora.dtypes import IGNORE_INDEX

__all__ = ["PACKING_MODEL_TYPES", "PADDING_OFFSET", "TrainingBatchSampler", "TrainingExamples", "collate_packed", "count_tokens"]

# Length grouping sorts windows of this many batches: enough to find similar lengths, small enough
# that batch composition still changes from epoch to epoch (Hugging Face's megabatches).
_BATCHES_PER_WINDOW = 50
# Random batches under a token budget: their number is the most that any of this many shuffles
# needs (see TrainingBatchSampler). More make an epoch's own shuffle fit more often, at the price of
# a few more split batches every epoch.
_REFERENCE_SHUFFLES = 16
# A padding batch's indices are its examples' plus this (the training dataset maps them back, flagged).
PADDING_OFFSET = 1 << 40
# Model types whose attention builds the block-diagonal mask of packed rows from ``position_ids``
# (transformers' ``create_causal_mask``): checked with a tiny random model of each type on
# transformers 4.56 and 5.24, packed logits equal to those of each example run alone.
# ``tests/test_batching.py`` checks them all against the installed transformers. Absent on
# purpose: bloom, mpt, opt (their masks ignore position ids), qwen2_moe, gptj, stablelm (they
# leak on 4.56), and every type not checked.
PACKING_MODEL_TYPES = frozenset({
    "cohere", "gemma", "gemma2", "gemma3_text", "glm", "gpt2", "gpt_bigcode", "gpt_neox", "llama",
    "mistral", "mixtral", "olmo2", "phi", "phi3", "qwen2", "qwen3", "qwen3_moe", "smollm3", "starcoder2",
})


def padded(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


class TrainingBatchSampler(BatchSampler):
    """Yields, for one rank, the lists of example indices that make its training batches.

    Every epoch the examples are shuffled (seeded by ``seed`` and the epoch, the same on every
    rank), grouped into batches, the batch order is shuffled, and the batches are dealt to the
    ranks in turn, so ranks train disjoint examples. Lengths are compared after padding (rounded
    up to ``pad_to_multiple_of``; a packed token budget takes them as they are): examples that pad
    to the same length cost the same, so among them the company stays random, which keeps batches
    as varied as the padding allows.

    - Fixed size (``max_tokens=None``): the shuffled examples are cut into windows of 50 batches;
      with ``group_by_length`` each window is sorted by length before it is cut into batches, so
      a batch holds examples of similar length and little padding.
    - Token budget (``max_tokens``): each batch takes examples in turn for as long as the next one
      fits in ``max_tokens``. A padded batch costs its number of examples times its longest padded
      example (the tensor the model gets); a ``packed`` one the sum of its examples' lengths (the
      tokens its rows hold: packing removes the padding, so count times the longest would make
      packed batches needlessly small). The rows add only the padding packing cannot avoid: no two
      rows are both half full or less (:func:`collate_packed`), so a batch has fewer than
      ``2 * max_tokens / row_length + 1`` rows.

      - With ``group_by_length`` the examples are taken sorted by cost (equal costs in shuffled
        order). Batches then depend on the lengths only and their number is the same every epoch;
        the batch order and which equal-cost examples go together change (fairseq's
        ``batch_by_size``).
      - Without, in the shuffled order: every batch is a random draw of examples. Padded random
        batches hold much padding; packed ones little. The number of batches a shuffle needs
        varies slightly with the order, but Lightning reads ``len()`` once, at the start of fit
        (before any ``set_epoch``), for its step count and LR schedule, and ends every epoch after
        that many batches; so the number is fixed: the most that any of 16 reference shuffles
        (seeded by ``seed`` alone) needs. An epoch whose own shuffle needs fewer has its largest
        batches split in two until it has that many. One whose shuffle needs more (probability at
        most 1/17: the 17 shuffles are alike) is batched from one of the reference shuffles,
        drawn by the epoch, instead: every example still once, in a random but not new
        composition.

    The list of an epoch's batches (:meth:`epoch_batches`) depends on the seed and the epoch only,
    never on the number of ranks, so a run can resume on another number of ranks exactly where it
    stopped (:meth:`resume` takes a position in that list). The ranks take the batches in turn:
    rank ``r`` of ``N`` the batches ``r, r + N, ...``. Every rank must get the same number of
    batches, or the ranks that finish first would wait forever in the next gradient all-reduce:
    in an epoch's last round a rank left short gets a padding batch (a copy of the epoch's last
    batch, made of :data:`PADDING_OFFSET`-shifted indices that :class:`TrainingExamples` flags),
    which the collate function marks ``loss_weight=0``: the module multiplies its loss by zero, so
    no example weighs twice.

    The ranks and the epoch come from ``sampler``, a ``DistributedSampler`` over the examples
    (its own order is not used). That is the contract Lightning keeps with a batch sampler made
    in a ``*_dataloader`` hook: under DDP or DeepSpeed it rebuilds it around its own
    ``DistributedSampler`` (same ranks), and at the start of every epoch its fit loop calls
    ``set_epoch`` on ``batch_sampler.sampler``. (DeepSpeed also reads ``batch_sampler.batch_size``,
    which is why this is a ``BatchSampler``.) Without ``set_epoch`` each pass takes the next epoch
    (0, 1, 2, ...), like a shuffling ``DataLoader``.

    Args:
        sampler: says how many ranks share the examples (``num_replicas``), which one this is
            (``rank``) and the epoch.
        batch_size: examples per batch (ignored with ``max_tokens``).
        lengths: the length in tokens of every example.
        max_tokens: the token budget of a batch instead of a fixed size; at least the cost of the
            longest example (its padded length, or its length when ``packed``).
        group_by_length: batch examples of similar length together.
        pad_to_multiple_of: the padding of the collate function.
        seed: seed of the shuffles.
        packed: the collate function packs each batch (:func:`collate_packed`), so a batch costs
            the sum of its examples' lengths in ``max_tokens``, not count times the longest.
    """

    def __init__(
        self,
        sampler: DistributedSampler,
        batch_size: int,
        lengths: Sequence[int],
        max_tokens: int | None = None,
        group_by_length: bool = True,
        pad_to_multiple_of: int = 8,
        seed: int = 0,
        packed: bool = False,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.lengths = [padded(n, pad_to_multiple_of) for n in lengths]
        # What an example costs in the budget: packed rows hold its tokens, a padded batch its padded length.
        self.sizes = list(lengths) if packed else self.lengths
        if max_tokens is not None and max_tokens < max(self.sizes, default=0):
            raise ValueError(
                f"max_tokens={max_tokens} is less than the {'' if packed else 'padded '}length of the "
                f"longest example ({max(self.sizes)})"
            )
        self.max_tokens = max_tokens
        self.group_by_length = group_by_length
        self.packed = packed
        self.seed = seed
        self.start = 0  # batches of the next pass's epoch already trained on, all ranks together (a resumed run)
        self._start_epoch = 0  # the epoch ``start`` belongs to

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in training order: the same at any number of ranks."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        at_least = 0
        if self.max_tokens is None:
            batches = self._fixed_size(order)
        elif self.group_by_length:
            order.sort(key=self.sizes.__getitem__)  # stable: equal costs stay shuffled
            batches = self._token_budget(order)
        else:
            batches = self._token_budget(order)
            at_least = self._random_budget_count
            if len(batches) > at_least:
                batches = self._token_budget(self._reference_order(rng.randrange(_REFERENCE_SHUFFLES)))
        batches = _split_to(batches, at_least)
        rng.shuffle(batches)
        return batches

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch`` from position ``start`` of :meth:`epoch_batches` on, in
        training order, a padding batch last where this rank is left short in the last round."""
        rest = self.epoch_batches(epoch)[start:]
        mine = rest[self.sampler.rank :: self.sampler.num_replicas]
        if len(mine) < -(-len(rest) // self.sampler.num_replicas):
            mine.append([index + PADDING_OFFSET for index in rest[-1]])
        return mine

    def _fixed_size(self, order: list[int]) -> list[list[int]]:
        window = self.batch_size * _BATCHES_PER_WINDOW if self.group_by_length else len(order)
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            if self.group_by_length:
                chunk.sort(key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return batches

    def _token_budget(self, order: list[int]) -> list[list[int]]:
        """The examples of ``order``, in turn, into batches that each end before the example that
        would exceed ``max_tokens``."""
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = total = 0
        for index in order:
            size = self.sizes[index]
            cost = total + size if self.packed else (len(batch) + 1) * max(longest, size)
            if batch and cost > self.max_tokens:
                batches.append(batch)
                batch, longest, total = [], 0, 0
            batch.append(index)
            longest, total = max(longest, size), total + size
        return batches + [batch] if batch else batches

    def _reference_order(self, number: int) -> list[int]:
        """Reference shuffle ``number``, seeded by ``seed`` alone (see the class docstring)."""
        order = list(range(len(self.lengths)))
        random.Random(f"{self.seed}:reference:{number}").shuffle(order)
        return order

    @cached_property
    def _random_budget_count(self) -> int:
        """The number of random budgeted batches of every epoch, before evening out across ranks."""
        return max(len(self._token_budget(self._reference_order(n))) for n in range(_REFERENCE_SHUFFLES))

    def resume(self, epoch: int, position: int) -> None:
        """Make the next pass the rest of ``epoch`` after its first ``position`` batches (of
        :meth:`epoch_batches`: all ranks together; a run resumed from a checkpoint taken mid-epoch),
        or the next epoch once ``epoch`` was done; ``len`` stays the whole epoch's, as Lightning counts."""
        if position >= len(self.epoch_batches(epoch)):
            epoch, position = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.start, self._start_epoch = position, epoch

    @override
    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the pass begins (and moves the epoch on) at its first batch, not when the
        # iterator is made. torch's multi-process DataLoader iterator makes one it never uses
        # before the one it reads (_BaseDataLoaderIter.__init__, then _reset).
        epoch, start = self.sampler.epoch, self.pending_start()
        self.sampler.set_epoch(epoch + 1)  # the next pass differs unless set_epoch says otherwise
        self.start = 0
        yield from self.batches(epoch, start)

    def pending_start(self) -> int:
        """Where the next pass begins in its epoch: the resumed position if the epoch is still the
        one it belongs to; Lightning may have moved on to the next (an epoch it ended early, with
        ``limit_train_batches``, is saved as unfinished)."""
        return self.start if self.sampler.epoch == self._start_epoch else 0

    @override
    def __len__(self) -> int:
        return len(self.batches(self.sampler.epoch))


class TrainingExamples(Sequence[Mapping[str, Any]]):
    """The training examples as :class:`TrainingBatchSampler` indexes them: index ``i`` is example
    ``i``, index ``PADDING_OFFSET + i`` a copy of it flagged ``"padding": True``."""

    def __init__(self, examples: Sequence[Mapping[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Mapping[str, Any]:  # type: ignore[override]
        if index >= PADDING_OFFSET:
            return {**self.examples[index - PADDING_OFFSET], "padding": True}
        return self.examples[index]


def _split_to(batches: list[list[int]], at_least: int) -> list[list[int]]:
    """Split the largest batches in two until there are ``at_least`` (see :class:`TrainingBatchSampler`)."""
    while len(batches) < at_least:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[i]) == 1:
            return batches  # nothing left to split: fewer batches, every example still once
        half = len(batches[i]) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def _first_fit(ordered: Sequence[Mapping[str, list[int]]], row_length: int) -> list[list[Mapping[str, list[int]]]]:
    """Each example into the first row with room for it, a new row when none has."""
    rows: list[list[Mapping[str, list[int]]]] = []
    room: list[int] = []
    for example in ordered:
        n = len(example["input_ids"])
        row = next((i for i, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(row_length)
            row = len(rows) - 1
        rows[row].append(example)
        room[row] -= n
    return rows


def collate_packed(
    examples: Sequence[Mapping[str, list[int]]], pad_token_id: int, row_length: int, pad_to_multiple_of: int = 8
) -> dict[str, Any]:
    """Pack a batch's examples into as few rows of at most ``row_length`` tokens as possible.

    Rows are filled first-fit, longest example first, and then made as short as the same number
    of rows allows: the width is the smallest multiple of ``pad_to_multiple_of`` at which
    first-fit still needs no more rows (8 random examples of about 170 tokens fill 3 rows: rather
    than two full rows of 512 and a third mostly empty, three of about 460). Less padding, and
    shorter rows to compute attention over. Each example's ``position_ids`` restart at
    0 and there is no ``attention_mask``: from that, transformers builds a causal mask that is
    block-diagonal per example, so no example attends to another and every example's logits are
    those it gets alone. The first label of every example is ``-100``, so the last token of one
    example is not trained to predict the next one's first token; the loss is then over exactly
    the tokens of the unpacked batch. Padding at the end of a row has position id 0 at every token:
    each padding token is a sequence of its own and attends to nothing else, and a row's real
    tokens end at its last position id above 0 (:func:`count_tokens`); examples have 2 tokens at
    least, since a 1-token example has nothing to learn. ``use_cache=False`` is part of the batch:
    with a cache, transformers does not look for packed sequences and the examples would see each
    other.
    """
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    rows = _first_fit(ordered, row_length)
    lengths = [len(e["input_ids"]) for e in ordered]
    narrowest = padded(max(lengths[0], -(-sum(lengths) // len(rows))), pad_to_multiple_of)
    for limit in range(narrowest, row_length, pad_to_multiple_of):
        narrower = _first_fit(ordered, limit)
        if len(narrower) == len(rows):
            rows = narrower
            break
    width = padded(max(sum(len(e["input_ids"]) for e in row) for row in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row_examples in enumerate(rows):
        start = 0
        for example in row_examples:
            n = len(example["input_ids"])
            input_ids[r, start : start + n] = torch.tensor(example["input_ids"])
            labels[r, start + 1 : start + n] = torch.tensor(example["labels"][1:])
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def count_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """All tokens of a batch's ``input_ids`` and the real ones among them (padding excluded).

    Real tokens are those of the ``attention_mask`` when there is one; in a packed batch
    (``position_ids``, no mask) those up to each row's last position id above 0
    (:func:`collate_packed`); otherwise all tokens. ``input_ids != pad_token_id`` would not do:
    the pad token is often the EOS token, which real examples end with.
    """
    input_ids = batch["input_ids"]
    total = input_ids.numel()
    if batch.get("attention_mask") is not None:
        return total, int(batch["attention_mask"].sum())
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return total, total
    ends = torch.arange(1, position_ids.shape[-1] + 1, device=position_ids.device) * (position_ids > 0)
    return total, int(ends.amax(dim=-1).sum())
