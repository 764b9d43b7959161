"""InstructionDataModule: load instruction data, apply a prompt template, tokenize, mask, batch."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from lightning_lora.batching import PACKING_MODEL_TYPES, TrainingBatchSampler, TrainingExamples, collate_packed, padded
from lightning_lora.dtypes import IGNORE_INDEX
from lightning_lora.export.tokens import add_tokens
from lightning_lora.templates import TEMPLATES, TemplateName, render_alpaca, render_messages
from lightning_lora.tiny import resolve_model_path

__all__ = ["Example", "InstructionDataModule", "collate", "encode_example", "read_records"]

DataFormat = Literal["auto", "alpaca", "messages", "text"]
_FORMATS = ("auto", "alpaca", "messages", "text")
# The fields each format needs in every row; "input" is optional for Alpaca.
_REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "messages": ("messages",), "text": ("text",)}

Example = dict[str, list[int]]


def read_records(path: str | Path, key: str = "data.data_path") -> list[dict[str, Any]]:
    """Read rows from a ``.json`` / ``.jsonl`` / ``.parquet`` file or a ``datasets.save_to_disk`` directory.

    A ``save_to_disk`` directory holding a ``DatasetDict`` contributes its ``train`` split.
    ``key`` is the setting that named ``path``, for error messages.
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{key}={str(path)!r} holds splits {sorted(loaded)}, none named 'train'")
            loaded = loaded["train"]
        return loaded.to_list()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{key}={str(path)!r} must hold a JSON list of rows, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(
        f"{key}={str(path)!r} has an unsupported suffix {suffix!r}: use .json, .jsonl, .parquet "
        "or a datasets save_to_disk directory"
    )


def detect_format(row: Mapping[str, Any]) -> str:
    """The format a row is written in, judged by its fields."""
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise ValueError(
        f"cannot tell the data format from the fields {sorted(row)}: expected 'instruction'/'output' "
        "(alpaca), 'messages' or 'text'; set data.format explicitly"
    )


def split_prompt_response(row: Mapping[str, Any], fmt: str, template: TemplateName, tokenizer: Any) -> tuple[str, str]:
    """Turn one row into the prompt (not trained on, by default) and the response (trained on)."""
    if fmt == "alpaca":
        prompt = render_alpaca(row["instruction"], row.get("input") or "", template, tokenizer)
        return prompt, row["output"]
    if fmt == "messages":
        messages = row["messages"]
        last_role = messages[-1].get("role") if messages else None
        if last_role != "assistant":
            raise ValueError(f"the last message has role {last_role!r}; it must be 'assistant' (the response trained on)")
        return render_messages(messages[:-1], template, tokenizer), messages[-1]["content"]
    return "", row["text"]


def encode_example(
    prompt: str, response: str, tokenizer: Any, max_length: int, train_on_prompt: bool, add_eos: bool = True
) -> tuple[Example, bool]:
    """Tokenize ``prompt + response (+ EOS)`` and build labels.

    Prompt and response are tokenized separately so that the boundary of the loss mask is exact;
    the prompt gets the tokenizer's special prefix (BOS) if it adds one. Returns the example and
    whether it was truncated to ``max_length``.
    """
    if prompt:
        # A chat template writes the BOS text itself; adding another would double it.
        bos = tokenizer.bos_token
        has_bos = bool(bos) and prompt.startswith(bos)
        prompt_ids = tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        # Plain text: the sequence starts with the response, so it gets the special prefix (BOS).
        prompt_ids = []
        response_ids = tokenizer(response, add_special_tokens=True)["input_ids"]
    if add_eos:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = prompt_labels + response_ids
    truncated = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}, truncated


def collate(examples: Sequence[Example], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one, rounded up to ``pad_to_multiple_of``."""
    longest = max(len(e["input_ids"]) for e in examples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"])
        labels[i, :n] = torch.tensor(example["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class InstructionDataModule(L.LightningDataModule):
    """Instruction-tuning data for a causal LM.

    Args:
        data_path: training data: a ``.json`` (list of rows), ``.jsonl`` or ``.parquet`` file, or a
            ``datasets`` ``save_to_disk`` directory.
        tokenizer: the tokenizer's directory or hub id (the LightningCLI fills it from
            ``model.model_name_or_path``).
        format: ``alpaca`` (``instruction``/``input``/``output``), ``messages`` (a list of
            ``{"role", "content"}``; the last must be the assistant's answer), ``text`` (plain
            ``text``, all tokens trained), or ``auto`` to decide from the first row's fields.
        template: prompt format for ``alpaca`` rows: ``alpaca``, ``human_assistant``
            (``Human: ...\\n\\nAssistant: ``), ``plain``, or ``chat_template`` (the tokenizer's).
            ``messages`` rows always use the tokenizer's chat template when it has one.
        max_length: examples longer than this many tokens are cut (the count is logged).
        batch_size: examples per batch and device (``max_tokens_per_batch`` replaces it for training).
        group_by_length: batch training examples of similar length together, so that batches need
            little padding. The examples are shuffled, sorted by (padded) length within windows of
            50 batches (with ``max_tokens_per_batch``: all of them), and the batches are shuffled,
            every epoch anew (seeded by ``seed`` and the epoch). Off by default: batches of one
            length train worse than random ones (measured on benchmarks/train_throughput.py: 9-25 %
            higher held-out loss after the same steps), and packing removes the padding without
            changing the batches. Every rank gets the same number of batches of disjoint examples
            either way: an epoch's batches are dealt to the ranks in turn, and a rank left short in
            the last round gets a padding batch marked ``batch["loss_weight"] = 0`` (a tensor).
            ``LoraFinetuneModule`` multiplies its loss by it; a LightningModule of your own should
            too (``loss * batch.pop("loss_weight", 1)``). Validation batches keep the file order.
        max_tokens_per_batch: a token budget per batch and device instead of ``batch_size``: each
            training batch takes examples in turn, random ones or, with ``group_by_length``,
            ascending lengths, while they fit in this many tokens. A packed batch (``packing``)
            counts the tokens of its examples, so with ``max_length=4096`` and a budget of 16384
            each device's batch holds about 16k tokens of random examples in rows of 4096; a padded batch
            counts examples times the longest, rounded up to ``pad_to_multiple_of`` (random padded
            batches hold much padding: pack or group them). Must be at least ``max_length`` (rounded
            up to ``pad_to_multiple_of``), so every example fits. The number of batches is the
            same every epoch (Lightning counts the steps once): random batches are split or drawn
            as ``lightning_lora.batching.TrainingBatchSampler`` says; the number of ranks does not
            change them (see ``group_by_length`` for an uneven last round).
        packing: pack each training batch's examples into as few rows of ``max_length`` tokens
            as possible, without padding between them. The batch holds the same examples as
            without packing (except that ``max_tokens_per_batch`` then counts real tokens, so more
            fit) and each example attends only to itself (``position_ids`` restart per example,
            no ``attention_mask``), so the loss is the same and only the padding goes. Needs a
            model type whose attention supports it (Llama, Mistral, Qwen2/3, Gemma, Phi, GPT-2
            and others: see ``lightning_lora.batching.PACKING_MODEL_TYPES``), read from the
            ``config.json`` beside ``tokenizer``. ``auto`` (the default) packs when the model
            type supports it and pads otherwise; ``true`` fails for other types. Validation
            batches are not packed.
        token_weighted_loss: every response token of an epoch weighs the same in training: a batch's
            summed token loss is divided by the mean number of loss tokens per batch over the epoch
            (Hugging Face's ``num_items_in_batch``), not by its own count. Off by default: with
            random batches (the default) both objectives agree on average, and the per-batch mean
            (what the Hugging Face ``Trainer`` optimizes without accumulation) trained slightly
            better in ``benchmarks/train_throughput.py``. Worth turning on with
            ``group_by_length``, where dividing a batch by its own count gives each token of a
            batch of short examples more weight than a token of a batch of long ones. The logged
            ``train_loss`` of a step is then that sum over the mean count; its epoch mean is the
            token-weighted mean loss.
        val_split: fraction of ``data_path`` held out for validation (ignored with ``val_data_path``).
        val_data_path: a separate validation file, read like ``data_path``.
        train_on_prompt: also compute the loss on the prompt tokens.
        add_eos: append the tokenizer's EOS token to every response.
        pad_to_multiple_of: batches are padded to the longest example rounded up to this.
        seed: seed of the validation split and of the training shuffle.
        num_workers: DataLoader worker processes.
        added_tokens: tokens to add to the tokenizer, as whole tokens (give ``model.added_tokens``
            the same list so the model embeds them; the CLI links the two).
    """

    def __init__(
        self,
        data_path: str,
        tokenizer: str,
        format: DataFormat = "auto",
        template: TemplateName = "alpaca",
        max_length: int = 512,
        batch_size: int = 8,
        group_by_length: bool = False,
        max_tokens_per_batch: int | None = None,
        packing: bool | Literal["auto"] = "auto",
        token_weighted_loss: bool = False,
        val_split: float = 0.05,
        val_data_path: str | None = None,
        train_on_prompt: bool = False,
        add_eos: bool = True,
        pad_to_multiple_of: int = 8,
        seed: int = 42,
        num_workers: int = 0,
        added_tokens: list[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("data_path", data_path), ("val_data_path", val_data_path)):
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"data.{name}={value!r} does not exist")
        if format not in _FORMATS:
            raise ValueError(f"data.format={format!r} is not one of {list(_FORMATS)}")
        if template not in TEMPLATES:
            raise ValueError(f"data.template={template!r} is not one of {list(TEMPLATES)}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"data.val_split={val_split!r} must be in [0, 1)")
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value < 1:
                raise ValueError(f"data.{name}={value!r} must be >= 1")
        if max_tokens_per_batch is not None and max_tokens_per_batch < padded(max_length, pad_to_multiple_of):
            raise ValueError(
                f"data.max_tokens_per_batch={max_tokens_per_batch!r} must be at least data.max_length="
                f"{max_length} rounded up to data.pad_to_multiple_of={pad_to_multiple_of}, so that the "
                "longest example fits in a batch"
            )
        self.save_hyperparameters()
        self.data_path = data_path
        self.tokenizer_name = tokenizer
        self.format = format
        self.template = template
        self.max_length = max_length
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.max_tokens_per_batch = max_tokens_per_batch
        if packing not in (True, False, "auto"):
            raise ValueError(f"data.packing={packing!r} is not one of [true, false, 'auto']")
        self.packing = packing
        self.pack = False  # decided in setup (resolve_packing)
        self.token_weighted_loss = token_weighted_loss
        self.loss_tokens_per_batch: float | None = None  # set by train_dataloader
        self.val_split = val_split
        self.val_data_path = val_data_path
        self.train_on_prompt = train_on_prompt
        self.add_eos = add_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.num_workers = num_workers
        self.added_tokens = list(added_tokens or [])
        self.tokenizer: Any = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []

    def load_tokenizer(self) -> Any:
        """Load the tokenizer and give it a pad token (EOS) if it has none."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_name))
        if self.added_tokens:
            add_tokens(tokenizer, self.added_tokens, "data.added_tokens")
        if tokenizer.eos_token_id is None and self.add_eos:
            raise ValueError(f"data.tokenizer={self.tokenizer_name!r} has no EOS token; set data.add_eos=false")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.template == "chat_template" and not tokenizer.chat_template:
            raise ValueError(f"data.template='chat_template' but data.tokenizer={self.tokenizer_name!r} has no chat template")
        return tokenizer

    @override
    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return  # tokenized already; setup runs once per stage
        self.tokenizer = self.load_tokenizer()
        self.pack = self.resolve_packing()
        # Rows keep their position in the file, so that errors can point at the right one.
        rows = list(enumerate(read_records(self.data_path)))
        if self.val_data_path is not None:
            train_rows = rows
            val_rows = list(enumerate(read_records(self.val_data_path, "data.val_data_path")))
        else:
            order = list(range(len(rows)))
            random.Random(self.seed).shuffle(order)
            n_val = round(len(rows) * self.val_split)
            if self.val_split > 0 and n_val == 0:
                n_val = 1
            val_rows = [rows[i] for i in order[:n_val]]
            train_rows = [rows[i] for i in order[n_val:]]
        if not train_rows:
            raise ValueError(f"data.data_path={self.data_path!r} holds no training rows")
        self.train_examples = self.encode_rows(train_rows, "data_path")
        if not self.train_examples:
            raise ValueError(
                f"no example of data.data_path={self.data_path!r} keeps a response token within "
                f"data.max_length={self.max_length}: raise data.max_length or use a shorter data.template"
            )
        self.val_examples = self.encode_rows(val_rows, "val_data_path" if self.val_data_path else "data_path")

    def encode_rows(self, rows: Sequence[tuple[int, Mapping[str, Any]]], source: str) -> list[Example]:
        """Validate, template and tokenize ``(row index in the file, row)`` pairs; drop those left
        with nothing to learn."""
        fmt = detect_format(rows[0][1]) if self.format == "auto" and rows else self.format
        examples, truncated, dropped = [], 0, 0
        for index, row in rows:
            # Columnar files (parquet, datasets) store an absent field as None.
            missing = [field for field in _REQUIRED_FIELDS.get(fmt, ()) if row.get(field) is None]
            if missing:
                raise ValueError(
                    f"row {index} of data.{source}={getattr(self, source)!r} lacks field {missing[0]!r} "
                    f"needed by data.format={fmt!r} (its fields: {sorted(row)})"
                )
            try:
                prompt, response = split_prompt_response(row, fmt, self.template, self.tokenizer)
            except ValueError as err:
                raise ValueError(f"row {index} of data.{source}={getattr(self, source)!r}: {err}") from None
            example, was_truncated = encode_example(
                prompt, response, self.tokenizer, self.max_length, self.train_on_prompt, self.add_eos
            )
            truncated += was_truncated
            # The first label is never a target: each token predicts the next one.
            if all(label == IGNORE_INDEX for label in example["labels"][1:]):
                dropped += 1  # the prompt alone filled max_length: no response token to learn from
                continue
            examples.append(example)
        if truncated or dropped:
            rank_zero_info(
                f"data.{source}: {truncated} of {len(rows)} examples truncated to data.max_length="
                f"{self.max_length}; {dropped} dropped because no response token was left"
            )
        return examples

    def resolve_packing(self) -> bool:
        """Whether training batches are packed: ``data.packing``, with ``auto`` decided by the model
        type; ``true`` fails unless its attention keeps packed examples apart."""
        from transformers import AutoConfig

        if self.packing is False:
            return False
        try:
            model_type = AutoConfig.from_pretrained(resolve_model_path(self.tokenizer_name)).model_type
        except (OSError, ValueError) as err:
            if self.packing == "auto":
                return False
            raise ValueError(
                f"data.packing=true needs the model's config.json to check that its attention keeps packed "
                f"examples apart, and data.tokenizer={self.tokenizer_name!r} has none: {err}"
            ) from err
        if model_type not in PACKING_MODEL_TYPES and self.packing == "auto":
            rank_zero_info(f"data.packing=auto: model type {model_type!r} does not support packing; batches are padded")
            return False
        if model_type not in PACKING_MODEL_TYPES:
            raise ValueError(
                f"data.packing=true is not supported for model type {model_type!r} (data.tokenizer="
                f"{self.tokenizer_name!r}): its attention would let packed examples attend to each other; "
                f"set data.packing=false (supported model types: {sorted(PACKING_MODEL_TYPES)})"
            )
        return True

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def collate_train(self, examples: Sequence[Example]) -> dict[str, Any]:
        # A padding batch (a rank left short in an epoch's last round, see TrainingBatchSampler).
        padding = any(example.get("padding") for example in examples)
        if padding:
            examples = [{key: value for key, value in e.items() if key != "padding"} for e in examples]
        if self.pack:
            batch = collate_packed(examples, self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)
        else:
            batch = self.collate(examples)
        if self.token_weighted_loss and self.loss_tokens_per_batch is not None:
            batch["num_items_in_batch"] = torch.tensor(self.loss_tokens_per_batch)  # see token_weighted_loss
        if padding:
            batch["loss_weight"] = torch.tensor(0.0)
        return batch

    def _replicas(self) -> dict[str, int]:
        """How many ranks share the training data and which one this is, as Lightning's strategy says
        (one rank without a trainer)."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if kwargs is None:
            return {"num_replicas": 1, "rank": 0}
        return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]}

    @override
    def train_dataloader(self) -> DataLoader:
        # Made here, in the hook, so that under DDP and DeepSpeed Lightning can rebuild the batch
        # sampler around its own DistributedSampler (see TrainingBatchSampler).
        batch_sampler = TrainingBatchSampler(
            DistributedSampler(self.train_examples, **self._replicas()),
            self.batch_size,
            [len(e["input_ids"]) for e in self.train_examples],
            max_tokens=self.max_tokens_per_batch,
            group_by_length=self.group_by_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            seed=self.seed,
            packed=self.pack,  # decided in setup, which runs before this hook
        )
        # Every rank has the same number of batches; each token is a loss target except the first
        # of an example (nothing predicts it) and the masked prompt.
        loss_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in self.train_examples)
        self.loss_tokens_per_batch = loss_tokens / (len(batch_sampler) * batch_sampler.sampler.num_replicas)
        return TrainingDataLoader(
            TrainingExamples(self.train_examples),
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_train,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _eval_loader(self, examples: list[Example]) -> DataLoader:
        return DataLoader(examples, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_examples)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_examples)


class TrainingDataLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: Lightning saves its :meth:`state_dict` in every
    checkpoint and gives it back to :meth:`load_state_dict` before a resumed run iterates, which
    then continues with the batch after the last one trained on.

    Its state is the epoch and the position in the epoch's list of batches (all ranks together):
    the batches before it were handed out by some rank. Lightning does not prefetch from a loader
    with a length, so they were trained on (workers may have loaded more; those are not counted).
    The position does not depend on the number of ranks, so a run may resume on another number.
    Data loading draws nothing from the global RNG (the loaders have generators of their own), so
    it cannot shift the dropout of a resumed run.
    """

    _epoch: int | None = None
    _start = 0
    _handed_out = 0

    @override
    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        self._epoch, self._start, self._handed_out = sampler.sampler.epoch, sampler.pending_start(), 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        if self._epoch is None:  # saved before this loader's first pass
            return {"epoch": sampler.sampler.epoch, "position": sampler.pending_start()}
        handed_out = self._start + self._handed_out * sampler.sampler.num_replicas
        return {"epoch": self._epoch, "position": min(handed_out, len(sampler.epoch_batches(self._epoch)))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = state.get("position")
        if position is None:  # written before positions were shared by the ranks: this rank's count
            position = int(state["done"]) * self.batch_sampler.sampler.num_replicas
        self.batch_sampler.resume(int(state["epoch"]), int(position))


# Validation batches on which a 4-bit run's drift report compares the loss of the export and of the
# trained model (HFExport takes them from the trainer, the export command rebuilds them).
HELDOUT_BATCHES = 4


def heldout_batches(batches: Sequence[Any]) -> list[dict[str, list[list[int]]]] | None:
    """Validation batches as the export's drift report takes them (``input_ids``, ``labels``, an
    ``attention_mask``, as lists); packed batches (examples run together) are left out."""
    keys = ("input_ids", "attention_mask", "labels")
    usable = [batch for batch in batches
              if isinstance(batch, dict) and "input_ids" in batch and "labels" in batch and "position_ids" not in batch]
    return [{key: batch[key].tolist() for key in keys if key in batch} for batch in usable] or None


def recorded_heldout(hparams: Mapping[str, Any], count: int) -> list[dict[str, list[list[int]]]] | None:
    """Up to ``count`` validation batches of the InstructionDataModule a checkpoint records the
    hyperparameters of (``datamodule_hyper_parameters``), rebuilt as training built them."""
    data = InstructionDataModule(**dict(hparams))
    data.setup("validate")
    return heldout_batches(list(itertools.islice(data.val_dataloader(), count)))
