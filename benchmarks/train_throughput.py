"""Training throughput of LoRA fine-tuning: Hugging Face ``Trainer`` + PEFT against ours.

One command::

    python benchmarks/train_throughput.py [--small] [--repeats N]

It builds (in a temporary directory, every run) a randomly initialised Llama-shaped base with
``lightning_lora.tiny.build_tiny_base`` and synthetic instruction data whose tokenized lengths
follow a lognormal distribution clipped to 16..512 tokens, then trains one epoch of LoRA on the
same tokenized examples, each variant in a fresh process, in a fixed interleaved order:

- ``hf_bs1_ga8``: ``transformers.Trainer`` + PEFT, ``per_device_train_batch_size=1``,
  ``gradient_accumulation_steps=8``, ``DataCollatorForSeq2Seq(tokenizer, padding=True)`` (the
  tutorial recipe);
- ``hf_bs8``: the same with batch 8 and no accumulation (padding to the longest in the batch):
  the baseline every ratio is against;
- ``ours``: ``LoraFinetuneModule`` + ``InstructionDataModule`` (its defaults, batch 8) through a
  Lightning ``Trainer``;
- ``ours_packed``: the same with ``packing=True``.

The HF variants are fed ``InstructionDataModule(...).train_examples`` (``input_ids``/``labels``
after ``setup``) as a list-of-dicts dataset, so all variants train on identical token sequences
and labels. Same LoRA (r=8, alpha=16, dropout 0, the seven projections), AdamW (same lr, constant
schedule, weight decay 0, no clipping), seed, precision, effective batch 8, one epoch, and the same
number of torch threads everywhere; the LoRA matrices are drawn from one CPU generator on both
sides, so both start from the same weights on every device. Measured per run: the wall time from
the start of the first optimizer step to the end of the last (a callback on each side), the
non-padding tokens processed per second (counted from the data), the padding fraction of the
batches actually fed to the model, the final training loss (mean of the per-step losses over the
last 10 % of the steps, at least 10) and, after training (not timed), the loss on held-out
examples. With ``--repeats N`` round r trains every variant with seed + r (the example order and
the LoRA init; the base and the data stay), so the loss comparison is over N draws, paired by round.
``--variants`` also
accepts the diagnostics ``ours_ungrouped`` and ``ours_packed_ungrouped`` (``group_by_length=False``)
and ``ours`` variants with other data module settings, e.g. ``ours+token_weighted_loss=false``.
Results go to ``benchmarks/results/train_throughput{,_small}.{json,md}``. See ``benchmarks/README.md``.

``--gpu`` runs the same comparison on a CUDA GPU with a Qwen2-0.5B-shaped model (its 151,936-token
vocabulary too) in bf16 on 1024 examples, and adds model FLOPs utilisation (MFU) and peak GPU memory;
results go to ``benchmarks/results/train_throughput_gpu.{json,md}``. ``benchmarks/lora_step_profile.py``
shows where such a step spends its time.

``--gpu-8b`` (a Llama-3-8B shape) and ``--gpu-packed`` (the Qwen2-0.5B shape) compare the two over a
fixed number of packed token-budget optimizer steps with identical tokens per step, a timed window
after warm-up steps, MFU and peak memory; ``--dry-run`` runs that code on the CPU with a tiny shape.
They live in ``train_steps.py``, which also holds what every mode shares (the data generator, the
LoRA init, the FLOPs formula from the config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from export_memory import load_average, machine, snapshot_code
from train_steps import (
    PEAK_BF16,
    TEMPLATE,
    _init_lora,
    _sync,
    _trainable_sum,
    instruction_rows,
    length_stats,
    model_flops,
    percent,
    versions,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("hf_bs1_ga8", "hf_bs8", "ours", "ours_packed")
# Diagnostics, run only when named in --variants: ours without length grouping (random batches like
# hf_bs8), unpacked and packed. Any ours variant also takes other InstructionDataModule settings
# after "+", e.g. "ours+token_weighted_loss=false" or "ours_packed+group_by_length=false".
EXTRA_VARIANTS = ("ours_ungrouped", "ours_packed_ungrouped")
BASELINE = "hf_bs8"
EFFECTIVE_BATCH = 8

SIZES: dict[str, dict[str, Any]] = {
    # A real model's initializer range: the tiny bases' 0.2 (made for hidden size 64) starts this
    # one at a loss of 13.7 (ln 384 = 5.95) and makes its training chaotic: two recipes that compute
    # the same gradients (hf_bs1_ga8, hf_bs8) ended 1-6 % apart, so 5 % could not be resolved.
    "full": {"name": "llama-24m", "arch": "llama", "hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1408,
             "num_attention_heads": 8, "num_key_value_heads": 4, "initializer_range": 0.02, "examples": 512},
    "small": {"name": "llama-3m", "arch": "llama", "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 688,
              "num_attention_heads": 4, "num_key_value_heads": 2, "examples": 320},
    # --gpu: Qwen2-0.5B's shape (its vocabulary too: the tokenizer uses the first few hundred ids, the
    # head computes all 151,936 logits like the real model's) and its initializer range, in bf16.
    "gpu": {"name": "qwen2-0.5b", "arch": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
            "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "initializer_range": 0.02, "examples": 1024},
}
# Total tokens of an example (prompt + response + EOS, BOS included): lognormal, clipped.
LENGTHS = {"median": 128, "sigma": 0.8, "min": 16, "max": 512}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# The final loss is the mean of the per-step training losses over the last 10 % of the optimizer
# steps, but at least 10 steps: a step's loss depends on which examples it holds (with length
# grouping, on their length), so a mean over a handful of steps is too noisy to compare.
LAST_FRACTION, LAST_MIN_STEPS = 0.1, 10
FINAL_LOSS = "mean of the per-step training losses over the last 10 % of the optimizer steps, at least 10 steps"
HELDOUT = 64  # held-out examples (drawn like the training ones) for a loss after training, not timed


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own fresh process, started by the driver below.
# --------------------------------------------------------------------------------------------

def worker_prepare(spec_path: str) -> None:
    """Build the base model and write the synthetic instruction data (``data.jsonl``)."""
    spec = json.loads(Path(spec_path).read_text())
    from lightning_lora.tiny import build_tiny_base

    size = spec["size"]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "initializer_range")
    base = build_tiny_base(spec["base"], size["arch"], seed=spec["seed"], max_position_embeddings=LENGTHS["max"],
                           **{k: size[k] for k in keys if k in size})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    rng = random.Random(f"train-throughput-{spec['seed']}")
    rows, drawn = instruction_rows(tokenizer, LENGTHS, rng, count=spec["examples"] + HELDOUT)
    for path, part in ((spec["data"], rows[:spec["examples"]]), (spec["heldout"], rows[spec["examples"]:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
    print(json.dumps({"parameters": params, "drawn_lengths": drawn[:spec["examples"]]}))


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def data_settings(variant: str) -> dict[str, Any]:
    """The ``InstructionDataModule`` settings an ``ours*`` variant changes from the defaults."""
    name, *pairs = variant.split("+")
    settings: dict[str, Any] = {}
    if name.startswith("ours_packed"):
        settings["packing"] = True
    if name.endswith("_ungrouped"):
        settings["group_by_length"] = False
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = _parse_value(value)
    return settings


def _digest(examples: list[dict[str, list[int]]]) -> str:
    """The examples as a set: the order depends on the round's seed, the examples must not."""
    digest = hashlib.sha256()
    for text in sorted(json.dumps([e["input_ids"], e["labels"]]) for e in examples):
        digest.update(text.encode())
    return digest.hexdigest()


def _heldout_loss(model: Any, examples: list[dict[str, list[int]]], pad_id: int) -> float:
    """Token-weighted mean loss on the response tokens of ``examples``, the same code for every variant."""
    import torch
    import torch.nn.functional as F

    from lightning_lora.data import collate

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for i in range(0, len(examples), EFFECTIVE_BATCH):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + EFFECTIVE_BATCH], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            total += float(F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
            count += int(mask.sum())
    return total / count


def worker_train(variant: str, spec_path: str, out_path: str, seed: str) -> None:
    """Train one variant for one epoch and write what was measured to ``out_path``.

    ``seed`` seeds this run's training (example order, LoRA init); the base and the data are the
    ones ``prepare`` made with the spec's seed."""
    spec = {**json.loads(Path(spec_path).read_text()), "seed": int(seed)}
    import torch

    torch.set_num_threads(spec["threads"])
    import lightning_lora
    from lightning_lora.data import InstructionDataModule

    data_kwargs: dict[str, Any] = {"template": TEMPLATE, "val_split": 0.0, "seed": spec["seed"]}
    if variant.startswith("ours"):
        data_kwargs.update(data_settings(variant))
    dm = InstructionDataModule(spec["data"], tokenizer=spec["base"], **data_kwargs)
    dm.setup("fit")
    examples = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in dm.train_examples]
    pad_id = dm.tokenizer.pad_token_id
    if any(pad_id in e["input_ids"] for e in examples):
        raise SystemExit(f"the pad token {pad_id} occurs in the data: padding could not be counted from input_ids")
    result: dict[str, Any] = {
        "variant": variant, "train_seed": spec["seed"], "examples": len(examples), "examples_sha256": _digest(examples),
        "nonpad_tokens": sum(len(e["input_ids"]) for e in examples), "lengths": [len(e["input_ids"]) for e in examples],
        "loss_tokens": sum(sum(label != -100 for label in e["labels"]) for e in examples),
        "lightning_lora_file": lightning_lora.__file__, "torch_threads": torch.get_num_threads(),
    }
    heldout_dm = InstructionDataModule(spec["heldout"], tokenizer=spec["base"], template=TEMPLATE, val_split=0.0)
    heldout_dm.setup("fit")
    heldout = heldout_dm.train_examples
    if variant.startswith("hf_"):
        model, measured = _train_hf(variant, spec, dm.tokenizer, examples, pad_id)
    else:
        result["data_module"] = {k: v for k, v in dm.hparams.items() if k not in ("data_path", "tokenizer")}
        model, measured = _train_ours(spec, dm, pad_id)
    result.update(measured)
    if torch.cuda.is_available():
        result["device_name"] = name = torch.cuda.get_device_name()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_bf16_flops"] = spec["peak_flops"] or next((f for key, f in PEAK_BF16 if key in name), None)
    config = json.loads((Path(spec["base"]) / "config.json").read_text())
    flops = model_flops(config, LORA, result["lengths"])
    result.update(frozen_linear_parameters=flops["frozen_linear_parameters"], lora_parameters=flops["lora_parameters"],
                  epoch_flops=flops["flops"], epoch_flops_six_n=flops["flops_six_n"])
    result["heldout_loss"] = _heldout_loss(model, heldout, pad_id)
    result["heldout_examples"] = len(heldout)
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")


def _train_hf(variant: str, spec: dict[str, Any], tokenizer: Any, examples: list[dict[str, list[int]]],
              pad_id: int) -> tuple[Any, dict[str, Any]]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    batch = 1 if variant == "hf_bs1_ga8" else EFFECTIVE_BATCH
    accumulate = EFFECTIVE_BATCH // batch
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)

    class CountingCollator:
        """The recipe's collator, counting the tokens of the batches it builds (padding included)."""

        def __init__(self) -> None:
            self.tokens = self.nonpad = self.rows = self.batches = 0

        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            out = collator(features)
            ids = out["input_ids"]
            self.tokens += ids.numel()
            self.nonpad += int((ids != pad_id).sum())
            self.rows += ids.shape[0]
            self.batches += 1
            return out

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.steps = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.start is None:
                _sync()
                self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync()
            self.end = time.perf_counter()
            self.steps = state.global_step

    bf16 = spec["precision"] == "bf16"
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA))
    _init_lora(model, spec["seed"])
    init = _trainable_sum(model)
    args = TrainingArguments(
        output_dir=spec["work"] + f"/hf-{variant}", per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate, num_train_epochs=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=0.0,
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=spec["device"] == "cpu", seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, remove_unused_columns=False, bf16=bf16, fp16=False,
    )
    counting, recorder = CountingCollator(), Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=counting, callbacks=[recorder])
    started = time.perf_counter()
    trainer.train()
    fit_wall = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    return model, {"wall_s": recorder.end - recorder.start, "train_call_wall_s": fit_wall,
            "optimizer_steps": trainer.state.global_step, "callback_steps": recorder.steps, "step_losses": losses,
            "batch_tokens": counting.tokens, "batch_nonpad_tokens": counting.nonpad, "batch_rows": counting.rows,
            "batches": counting.batches, "micro_batch_size": batch, "gradient_accumulation_steps": accumulate,
            "initial_trainable_sum": init,
            "loss_normalised_over_accumulation": bool(trainer.model_accepts_loss_kwargs)}


def _train_ours(spec: dict[str, Any], dm: Any, pad_id: int) -> tuple[Any, dict[str, Any]]:
    import lightning as L
    import torch

    from lightning_lora.module import LoraFinetuneModule

    class Recorder(L.Callback):
        """Times the first step's start to the last step's end; counts the batches; records the losses."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.losses: list[float] = []
            self.returned: list[float] = []  # the losses as training_step returned them, when they differ
            self.tokens = self.nonpad = self.rows = self.batches = 0
            self.init = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            _init_lora(pl_module, spec["seed"])
            self.init = _trainable_sum(pl_module)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.start is None:
                _sync()
                self.start = time.perf_counter()
            ids = batch["input_ids"]
            self.tokens += ids.numel()
            self.nonpad += int((ids != pad_id).sum())
            self.rows += ids.shape[0]
            self.batches += 1

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = float(outputs["loss"])
            items = batch.get("num_items_in_batch")
            if items is not None:
                # token_weighted_loss: the step's loss is its summed token loss over the epoch's mean
                # count per batch. Recorded as the mean over its own tokens, as on the HF side.
                self.returned.append(loss)
                loss *= float(items) / int((batch["labels"][:, 1:] != -100).sum())
            self.losses.append(loss)  # float() waited for the step's kernels
            _sync()
            self.end = time.perf_counter()

    callbacks: list[Any] = [recorder := Recorder()]
    throughput = None
    try:
        from lightning_lora.callbacks import TokenThroughput
    except ImportError:
        TokenThroughput = None  # not there yet: measured without it
    if TokenThroughput is not None:
        callbacks.append(throughput := TokenThroughput())
    L.seed_everything(spec["seed"], verbose=False)
    bf16 = spec["precision"] == "bf16"
    module = LoraFinetuneModule(
        spec["base"], **LORA, dtype="bfloat16" if bf16 else "float32", lr_schedule="constant", warmup_steps=0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0),
    )
    trainer = L.Trainer(
        accelerator="gpu" if spec["device"] == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if bf16 else "32-true", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_wall = time.perf_counter() - started
    result = {"wall_s": recorder.end - recorder.start, "train_call_wall_s": fit_wall,
              "optimizer_steps": trainer.global_step, "step_losses": recorder.losses,
              "step_losses_as_returned": recorder.returned or None,
              "batch_tokens": recorder.tokens, "batch_nonpad_tokens": recorder.nonpad, "batch_rows": recorder.rows,
              "batches": recorder.batches, "micro_batch_size": dm.batch_size, "gradient_accumulation_steps": 1,
              "initial_trainable_sum": recorder.init}
    if throughput is not None:
        result["token_throughput_callback"] = {
            k: v for k, v in vars(throughput).items()
            if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return module.model, result


WORKERS = {"prepare": worker_prepare, "train": worker_train}


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------

def run_worker(name: str, args: list[str], env: dict[str, str], logs: Path, tag: str) -> dict[str, Any]:
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", name, *args]
    started = time.perf_counter()
    with (logs / f"{tag}.stdout").open("w") as out, (logs / f"{tag}.stderr").open("w") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, env=env, check=False)
    run = {"returncode": proc.returncode, "process_wall_s": round(time.perf_counter() - started, 2)}
    if proc.returncode != 0:
        run["stderr_tail"] = (logs / f"{tag}.stderr").read_text()[-3000:]
    return run


def final_loss_steps(steps: int) -> int:
    return min(steps, max(LAST_MIN_STEPS, math.ceil(steps * LAST_FRACTION)))


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """The per-run figures, from what a worker recorded."""
    run["nonpad_tokens_per_s"] = run["nonpad_tokens"] / run["wall_s"]
    run["tokens_per_s"] = run["batch_tokens"] / run["wall_s"]
    run["padding_fraction"] = 1 - run["batch_nonpad_tokens"] / run["batch_tokens"]
    run["final_loss_steps"] = final_loss_steps(len(run["step_losses"]))
    run["final_loss"] = statistics.fmean(run["step_losses"][-run["final_loss_steps"]:])
    run["first_loss"] = run["step_losses"][0]
    run["rows_per_batch"] = run["batch_rows"] / run["batches"]
    run["padded_length"] = run["batch_tokens"] / run["batch_rows"]
    if run.get("peak_bf16_flops"):
        run["mfu"] = run["epoch_flops"] / run["wall_s"] / run["peak_bf16_flops"]
        run["mfu_six_n"] = run["epoch_flops_six_n"] / run["wall_s"] / run["peak_bf16_flops"]
    return run


def medians(runs: list[dict[str, Any]], variant: str) -> dict[str, float] | None:
    mine = [r for r in runs if r["variant"] == variant and r["returncode"] == 0]
    if not mine:
        return None
    keys = ("wall_s", "nonpad_tokens_per_s", "tokens_per_s", "final_loss", "heldout_loss", "padding_fraction",
            "train_call_wall_s", "mfu", "mfu_six_n", "peak_memory_gib")
    out: dict[str, Any] = {k: statistics.median(r[k] for r in mine) for k in keys if all(k in r for r in mine)}
    out["runs"] = len(mine)
    out["range"] = {k: [min(r[k] for r in mine), max(r[k] for r in mine)] for k in ("wall_s", "nonpad_tokens_per_s")}
    return out


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run against the baseline run of the same round (paired)."""
    for run in runs:
        base = next((r for r in runs if r["variant"] == BASELINE and r["round"] == run["round"]
                     and r["returncode"] == 0), None)
        if run["returncode"] != 0 or base is None:
            continue
        for key in ("wall_s", "nonpad_tokens_per_s", "final_loss", "heldout_loss"):
            run[f"{key}_ratio_to_{BASELINE}"] = run[key] / base[key]


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """Per-run figures, ratios, medians, targets and checks from what the workers recorded (also
    for ``--render``, so that a change in how they are computed does not need a new measurement)."""
    runs = report["runs"]
    for run in runs:
        if run["returncode"] == 0:
            summarise(run)
    add_ratios(runs)
    report["settings"]["final_loss"] = FINAL_LOSS
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    report["summary"] = {v: med for v in variants if (med := medians(runs, v)) is not None}
    report["targets"] = targets(report["summary"], runs)
    report["consistency"] = consistency(runs)
    return report


def paired_ratios(runs: list[dict[str, Any]], variant: str, key: str) -> list[float]:
    """``key`` of each run of ``variant`` over the baseline run of the same round (same seed)."""
    return [r[f"{key}_ratio_to_{BASELINE}"] for r in runs if r["variant"] == variant
            and f"{key}_ratio_to_{BASELINE}" in r]


def targets(summary: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ours, base, bs1 = summary.get("ours"), summary.get(BASELINE), summary.get("hf_bs1_ga8")
    out: dict[str, Any] = {}
    if ours and base:
        out["ours non-padding tokens/s >= 1.5 x hf_bs8"] = {
            "value": ours["nonpad_tokens_per_s"], "limit": 1.5 * base["nonpad_tokens_per_s"],
            "ratio": ours["nonpad_tokens_per_s"] / base["nonpad_tokens_per_s"], "unit": "tokens/s",
            "met": ours["nonpad_tokens_per_s"] >= 1.5 * base["nonpad_tokens_per_s"]}
    if ours and bs1:
        out["ours non-padding tokens/s >= hf_bs1_ga8"] = {
            "value": ours["nonpad_tokens_per_s"], "limit": bs1["nonpad_tokens_per_s"],
            "ratio": ours["nonpad_tokens_per_s"] / bs1["nonpad_tokens_per_s"], "unit": "tokens/s",
            "met": ours["nonpad_tokens_per_s"] >= bs1["nonpad_tokens_per_s"]}
    if ours and base:
        # "Speed must not cost quality": a loss more than 5 % above the baseline's fails; a lower one
        # does not. The ratio is the median over the rounds of each round's ratio (same seed on
        # both sides), so one lucky or unlucky example order does not decide.
        for key, name in (("final_loss", "ours final loss at most 5 % above hf_bs8"),
                          ("heldout_loss", "(info) ours held-out loss at most 5 % above hf_bs8")):
            ratios = paired_ratios(runs, "ours", key)
            ratio = statistics.median(ratios)
            out[name] = {"value": ours[key], "limit": 1.05 * base[key], "ratio": ratio, "round_ratios": ratios,
                         "unit": "loss", "met": ratio <= 1.05, "informational": name.startswith("(info)")}
    return out


def consistency(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks that the variants did the same work: the failures are raised after the results are written."""
    ok = [r for r in runs if r["returncode"] == 0]
    # A variant with another batch size (e.g. "ours_packed+batch_size=64", for GPU utilisation) takes
    # other steps by design.
    steps = {r["variant"]: r["optimizer_steps"] for r in ok
             if r["micro_batch_size"] * r["gradient_accumulation_steps"] == EFFECTIVE_BATCH}
    problems = []
    if len(set(steps.values())) > 1:
        problems.append(f"optimizer steps differ between variants: {steps}")
    if len({r["examples_sha256"] for r in ok}) > 1:
        problems.append("the variants tokenized different examples")
    for r in ok:
        if r["batch_nonpad_tokens"] != r["nonpad_tokens"]:
            problems.append(f"{r['variant']} (round {r['round']}) fed {r['batch_nonpad_tokens']} non-padding tokens "
                            f"to the model, the data holds {r['nonpad_tokens']}")
        if len(r["step_losses"]) != r["optimizer_steps"]:
            problems.append(f"{r['variant']} recorded {len(r['step_losses'])} losses for {r['optimizer_steps']} steps")
    inits: dict[int, set[float]] = {}
    for r in ok:
        inits.setdefault(r["round"], set()).add(round(r["initial_trainable_sum"], 6))
    return {"optimizer_steps": steps, "same_examples": len({r["examples_sha256"] for r in ok}) <= 1,
            "same_initial_lora_weights": all(len(sums) <= 1 for sums in inits.values()), "problems": problems}


SHAPES = {"llama": "Llama", "qwen2": "Qwen2"}


def _flops(report: dict[str, Any]) -> str:
    peaks = sorted({r["peak_bf16_flops"] for r in report["runs"] if r.get("peak_bf16_flops")})
    return ", ".join(f"{p / 1e12:.1f} TFLOP/s" for p in peaks) or "unknown: pass --peak-tflops"


def markdown(report: dict[str, Any]) -> str:
    s, m, c = report["settings"], report["machine"], report["code"]
    model, lengths = s["model"], s["data"].get("lengths") or s["data"]["drawn_lengths"]
    changes = ", ".join(x.split()[-1] for x in c["uncommitted_changes"])
    devices = sorted({r["device_name"] for r in report["runs"] if r.get("device_name")})
    if s.get("precision", "fp32") == "fp32":
        precision = "fp32"
    else:
        precision = "bf16 weights, bf16 autocast (HF `bf16=True`, Lightning `precision='bf16-mixed'`), fp32 LoRA weights"
    if s.get("device", "cpu") == "cpu":
        precision += f", {s['threads']} torch thread{'s' if s['threads'] != 1 else ''}"
    else:
        precision += f", on {', '.join(devices) or 'a GPU'}"
    lines = [f"# Training throughput benchmark ({model['name']}{', ' + ', '.join(devices) if devices else ''})", ""]
    lines += [
        (f"Model: {SHAPES[model.get('arch', 'llama')]}-shaped, {model['parameters'] / 1e6:.1f}M parameters "
         f"(hidden {model['hidden_size']}, "
         f"{model['num_hidden_layers']} layers, intermediate {model['intermediate_size']}, "
         f"{model['num_attention_heads']} heads, {model['num_key_value_heads']} KV heads, vocabulary "
         f"{model['vocab_size']}), {precision}; LoRA r={LORA['r']}, "
         f"alpha={LORA['lora_alpha']}, dropout {LORA['lora_dropout']}, {', '.join(LORA['target_modules'])}; "
         f"AdamW lr {s['lr']} constant, weight decay 0, no clipping; seed {s['seed']}; 1 epoch."),
        "",
        (f"Data: {s['data']['examples']} synthetic instruction examples (template `{TEMPLATE}`, loss on the "
         f"response), tokenized lengths mean {lengths['mean']}, median {lengths['median']}, "
         f"p10-p90 {lengths['p10']}-{lengths['p90']}, range {lengths['min']}-{lengths['max']} (lognormal, "
         f"median {LENGTHS['median']}, sigma {LENGTHS['sigma']}, clipped to {LENGTHS['min']}..{LENGTHS['max']}); "
         f"{lengths['total']:,} non-padding tokens per epoch."),
        "",
        (f"Machine: {', '.join(devices) + ' GPU, ' if devices else ''}{m['cores']} cores ({m['cpu']}), load average {m['load']['start']} at the start, "
         f"{m['load'].get('end')} at the end. Command: `{report['command']}`."),
        "",
        (f"Code measured: lightning_lora from the {c['measured']} (HEAD `{c['git_head'][:10]}`"
         + (f", uncommitted changes: {changes}" if changes else "")
         + f"; sources sha256 `{c['lightning_lora_sha256'][:12]}`)."),
        "",
        (f"Medians over the runs of each variant (range in brackets when a variant ran more than once); "
         f"round r trains every variant with seed {s['seed']} + r (example order, LoRA init; the base and the data "
         f"stay), so losses vary between rounds; ratios are of the medians, against `{BASELINE}`:"),
        "",
        ("| variant | runs | wall (s) | x hf_bs8 | non-pad tokens/s | x hf_bs8 | tokens/s incl. padding "
         "| padding | rows/batch | final loss | x hf_bs8 | held-out loss | x hf_bs8 | optimizer steps |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = report["summary"].get(BASELINE)
    for variant in dict.fromkeys(r["variant"] for r in report["runs"]):
        mine = [r for r in report["runs"] if r["variant"] == variant]
        if not mine:
            continue
        med = report["summary"].get(variant)
        if med is None:
            lines.append(f"| {variant} | {len(mine)} | failed (rc {mine[0]['returncode']}) |" + " |" * 11)
            continue
        ok = [r for r in mine if r["returncode"] == 0]
        multi = len(ok) > 1

        def ratio(key: str, med: dict[str, Any] = med) -> str:
            return f"{med[key] / base[key]:.2f}" if base else "-"

        wall, tps = f"{med['wall_s']:.1f}", f"{med['nonpad_tokens_per_s']:.0f}"
        if multi:
            wall += " [{:.1f}-{:.1f}]".format(*med["range"]["wall_s"])
            tps += " [{:.0f}-{:.0f}]".format(*med["range"]["nonpad_tokens_per_s"])
        failed = "" if len(ok) == len(mine) else f" (+{len(mine) - len(ok)} failed)"
        lines.append(
            f"| {variant} | {len(ok)}{failed} | {wall} | {ratio('wall_s')} | {tps} | {ratio('nonpad_tokens_per_s')} | "
            f"{med['tokens_per_s']:.0f} | {100 * med['padding_fraction']:.1f} % | "
            f"{statistics.median(r['rows_per_batch'] for r in ok):.2f} | {med['final_loss']:.4f} | "
            f"{ratio('final_loss')} | {med['heldout_loss']:.4f} | {ratio('heldout_loss')} | {ok[0]['optimizer_steps']} |"
        )
    lines += [
        "",
        ("- wall: from the start of the first optimizer step to the end of the last (a callback on each side); "
         "model loading, tokenization and trainer setup are not included."),
        ("- non-pad tokens/s: the non-padding tokens of the data (every example once) / wall; padding: the share "
         "of padding in the batches actually fed to the model; rows/batch: rows of those batches (packing puts "
         "several examples in a row)."),
        (f"- final loss: {FINAL_LOSS} (HF: `log_history` with `logging_steps=1`; ours: a callback); every step's "
         "loss is the mean over the loss tokens of its 8 examples (ours with `token_weighted_loss` trains on the "
         "summed loss over the epoch's mean count per batch: the callback converts it back)."),
        (f"- held-out loss: after training (not timed), the token-weighted mean loss on the response tokens of "
         f"{HELDOUT} held-out examples drawn like the training ones, computed by the same code for every variant: "
         "unlike the final loss, it does not depend on which examples the last steps happened to hold."),
    ]
    gpu = {v: med for v, med in report["summary"].items() if "peak_memory_gib" in med}
    if gpu:
        lines += [
            "", "| variant | MFU | MFU, 6N convention | peak GPU memory (GiB) |", "|---|---:|---:|---:|",
            *(f"| {v} | {percent(med.get('mfu'))} | {percent(med.get('mfu_six_n'))} | {med['peak_memory_gib']:.2f} |"
              for v, med in gpu.items()),
            "",
            ("- MFU: model FLOPs of the epoch's real tokens (padding excluded) / wall / the GPU's dense bf16 peak "
             f"({_flops(report)}). LoRA's work: 4 N per token for the frozen linear layers (forward, and the "
             "backward's input gradients; no gradient of a frozen weight), 6 per LoRA parameter and token, and "
             "causal attention 6 L^2 d per example and layer. The 6N convention adds the frozen weights' "
             "gradients, which LoRA never computes; it is the number full fine-tuning reports quote."),
            ("- peak GPU memory: `torch.cuda.max_memory_allocated()` in the variant's process (model, activations, "
             "optimizer state)."),
        ]
    lines += ["", "## Targets", "", "| target | value | limit | ratio | met |", "|---|---:|---:|---:|---|"]
    for name, t in report["targets"].items():
        if t["unit"] == "loss":
            value, limit = f"{t['value']:.4f}", f"<= {t['limit']:.4f}"
        else:
            value, limit = f"{t['value']:.0f} tokens/s", f"{t['limit']:.0f} tokens/s"
        ratio = f"{t['ratio']:.2f}"
        if len(t.get("round_ratios") or ()) > 1:
            ratio += " (median of " + ", ".join(f"{r:.2f}" for r in t["round_ratios"]) + ")"
        lines.append(f"| {name} | {value} | {limit} | {ratio} | {'PASS' if t['met'] else '**FAIL**'} |")
    k = report["consistency"]
    problems = "" if not k["problems"] else "; **problems**: " + "; ".join(k["problems"])
    lines += [
        "",
        (f"Checks: optimizer steps {k['optimizer_steps']}; same tokenized examples on every side: "
         f"{'yes' if k['same_examples'] else 'NO'}; same initial LoRA weights: "
         f"{'yes' if k['same_initial_lora_weights'] else 'no'}{problems}."),
        "",
        "Versions: " + ", ".join(f"{name} {v}" for name, v in report["versions"].items()),
        "",
    ]
    if report.get("notes"):  # written by hand into the JSON, e.g. about a run stopped early
        lines += ["## Notes", "", *(f"- {note}" for note in report["notes"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Training throughput of LoRA: HF Trainer + PEFT against ours.")
    parser.add_argument("--small", action="store_true", help="a smaller model and fewer examples (under 5 minutes)")
    parser.add_argument("--gpu", action="store_true",
                        help="on the CUDA GPU: a Qwen2-0.5B-shaped model in bf16, 1024 examples, with MFU")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="fp32 (the CPU default) or bf16 weights with bf16 autocast (the --gpu default)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak for MFU (default: known for H100, H200, A100)")
    parser.add_argument("--repeats", "--repeat", type=int, default=1, help="runs of each variant (medians reported)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    parser.add_argument("--examples", type=int, help="training examples (a multiple of 8; default: 512, 320 --small)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-2; 1e-3 with --gpu)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", help="where the base, data and logs go (default: a temporary directory, removed)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the markdown from the existing results JSON (measures nothing)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and markdown go (default: %(default)s)")
    steps = parser.add_argument_group(
        "packed token-budget steps (--gpu-8b, --gpu-packed, --dry-run; train_steps.py, benchmarks/README.md)")
    steps.add_argument("--gpu-8b", action="store_true",
                       help="on the CUDA GPU: a Llama-3-8B-shaped model, HF Trainer + PEFT against ours, packed "
                            "16k-token steps, MFU (results train_throughput_gpu8b.*)")
    steps.add_argument("--gpu-packed", action="store_true",
                       help="the same machinery with the Qwen2-0.5B shape of --gpu (results train_throughput_gpu_packed.*)")
    steps.add_argument("--dry-run", action="store_true",
                       help="run --gpu-8b (or --gpu-packed) on the CPU with a tiny shape of the same family, all "
                            "sizes / 16 (results *_dryrun.*)")
    steps.add_argument("--warmup-steps", type=int, help="optimizer steps before the timed window (default 3)")
    steps.add_argument("--timed-steps", type=int, help="optimizer steps timed (default 8 --gpu-8b, 16 --gpu-packed)")
    steps.add_argument("--tokens-per-step", type=int,
                       help="real tokens per optimizer step, at least on average (default 16384): sets the accumulation")
    steps.add_argument("--micro-tokens", type=int,
                       help="InstructionDataModule max_tokens_per_batch of a micro-batch (default 4096 --gpu-8b, "
                            "16384 --gpu-packed)")
    steps.add_argument("--max-length", type=int, help="max_length, the packed rows' width (default 4096)")
    steps.add_argument("--accumulate", type=int, help="micro-batches per optimizer step (default: the fewest "
                                                       "that give every step --tokens-per-step)")
    steps.add_argument("--data-factor", type=float, default=3.0,
                       help="tokens of data drawn, as a multiple of the steps' tokens (default %(default)s)")
    steps.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on both sides")
    steps.add_argument("--variant-timeout", type=float, help="seconds each worker may run (default: no limit)")
    steps.add_argument("--retry-fallback", action="store_true",
                       help="rerun a crashed side once with safe settings (HF: no Liger; ours: sdpa, no compiled "
                            "blocks, no Liger), reported as such")
    steps.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "flex_attention", "eager"),
                       help="HF side's attn_implementation (default %(default)s)")
    steps.add_argument("--hf-liger", action=argparse.BooleanOptionalAction, default=True,
                       help="HF side: use_liger_kernel=True when liger_kernel imports and CUDA is there (default on)")
    steps.add_argument("--hf-torch-compile", action="store_true", help="HF side: TrainingArguments(torch_compile=True)")
    steps.add_argument("--attn", default="flex_attention", choices=("flex_attention", "sdpa", "eager", "default"),
                       help="ours: LoraFinetuneModule(attn_implementation=...); default: transformers' (default %(default)s)")
    steps.add_argument("--linear-ce", default="auto", choices=("auto", "liger", "chunked", "off"),
                       help="ours: LoraFinetuneModule(linear_cross_entropy=...) (default %(default)s)")
    steps.add_argument("--liger", default="auto", choices=("auto", "true", "false"),
                       help="ours: LoraFinetuneModule(liger_kernels=...) (default %(default)s)")
    steps.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=True,
                       help="ours: LoraFinetuneModule(compile_blocks=...) (default on)")
    args = parser.parse_args()
    if args.gpu_8b or args.gpu_packed or args.dry_run:
        if args.gpu or args.small or (args.gpu_8b and args.gpu_packed):
            parser.error("--gpu-8b, --gpu-packed, --gpu and --small exclude each other")
        import train_steps

        if args.variants == ",".join(VARIANTS):
            args.variants = None
        train_steps.run(args, parser)
        return
    if args.gpu and args.small:
        parser.error("--gpu and --small exclude each other")
    size_name = "gpu" if args.gpu else "small" if args.small else "full"
    stem = {"gpu": "train_throughput_gpu", "small": "train_throughput_small", "full": "train_throughput"}[size_name]
    if args.lr is None:
        args.lr = 1e-3 if args.gpu else 1e-2
    results = Path(args.results)
    if args.render:
        report = analyse(json.loads((results / f"{stem}.json").read_text()))
        (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (results / f"{stem}.md").write_text(markdown(report))
        print(markdown(report))
        print(f"wrote {results / (stem + '.json')} and {results / (stem + '.md')}")
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device; torch.cuda.is_available() is False")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(v for v in variants if v.split("+")[0] not in VARIANTS + EXTRA_VARIANTS
                     or ("+" in v and not v.startswith("ours")))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS + EXTRA_VARIANTS)}")
    size = SIZES[size_name]
    examples = args.examples or size["examples"]
    if examples % EFFECTIVE_BATCH:
        parser.error(f"--examples must be a multiple of {EFFECTIVE_BATCH}")
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="train_throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
                              "machine": machine(), "versions": versions()}
    try:
        code = work / "code"
        report["code"] = snapshot_code(None, code)
        pythonpath = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads),
               "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        device = "cuda" if args.gpu else "cpu"
        precision = args.precision or ("bf16" if args.gpu else "fp32")
        spec = {"size": size, "examples": examples, "seed": args.seed, "threads": args.threads, "lr": args.lr,
                "device": device, "precision": precision,
                "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None,
                "base": str(work / "base"), "data": str(work / "data.jsonl"),
                "heldout": str(work / "heldout.jsonl"), "work": str(work)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        print(f"building the {size['name']} base and {examples} examples in {work} ...", flush=True)
        prep = run_worker("prepare", [str(spec_path)], env, logs, "prepare")
        if prep["returncode"] != 0:
            raise SystemExit(f"preparing failed:\n{prep['stderr_tail']}")
        prepared = json.loads((logs / "prepare.stdout").read_text().strip().splitlines()[-1])
        config = json.loads((work / "base" / "config.json").read_text())
        report["settings"] = {
            "size": size_name, "threads": args.threads, "lr": args.lr, "seed": args.seed,
            "effective_batch": EFFECTIVE_BATCH, "epochs": 1, "device": device, "precision": precision,
            "lr_schedule": "constant",
            "weight_decay": 0.0, "max_grad_norm": None, "lora": LORA, "template": TEMPLATE,
            "final_loss": FINAL_LOSS,
            "model": {**{k: v for k, v in size.items() if k != "examples"}, "vocab_size": config["vocab_size"],
                      "parameters": prepared["parameters"]},
            "data": {"examples": examples, "length_distribution": LENGTHS,
                     "drawn_lengths": length_stats(prepared["drawn_lengths"])},
            "order": variants, "repeats": args.repeats, "prepare_wall_s": prep["process_wall_s"],
        }
        runs: list[dict[str, Any]] = []
        started = time.perf_counter()
        for round_ in range(args.repeats):
            for variant in variants:
                tag = f"{variant}-{round_}"
                out = work / f"{tag}.json"
                load = load_average()
                print(f"round {round_ + 1}/{args.repeats}: {variant} ...", end=" ", flush=True)
                # Each round trains with its own seed (both sides alike): the losses of one seed are
                # one draw of the example order, and a round's ratios are paired.
                run = run_worker("train", [variant, str(spec_path), str(out), str(args.seed + round_)], env, logs, tag)
                run.update(variant=variant, round=round_, load_before=load)
                if run["returncode"] == 0:
                    run.update(json.loads(out.read_text()))
                    summarise(run)
                    print(f"{run['wall_s']:.1f} s, {run['nonpad_tokens_per_s']:.0f} non-pad tokens/s, padding "
                          f"{100 * run['padding_fraction']:.1f} %, final loss {run['final_loss']:.4f}", flush=True)
                else:
                    print(f"FAILED (rc {run['returncode']}; log {logs / (tag + '.stderr')})", flush=True)
                runs.append(run)
                # What is measured so far survives a run that is stopped before the report.
                # (--render reads it once renamed to the results JSON).
                partial = {**report, "runs": runs}
                (results / f"{stem}.partial.json").write_text(json.dumps(partial, indent=1) + "\n")
        report["settings"]["measure_wall_s"] = round(time.perf_counter() - started, 1)
        lengths = [r.pop("lengths") for r in runs if "lengths" in r]
        if lengths:
            report["settings"]["data"]["lengths"] = length_stats(lengths[0])
        report["runs"] = runs
        analyse(report)
    finally:
        report["machine"]["load"]["end"] = load_average()
        failed = [r for r in report.get("runs", []) if r["returncode"] != 0]
        if not args.work and "runs" in report and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif failed or "runs" not in report:
            print(f"kept {work} (logs in {logs})", flush=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.partial.json").unlink(missing_ok=True)
    (results / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {results / (stem + '.json')} and {results / (stem + '.md')}")
    if report["consistency"]["problems"]:
        raise SystemExit("inconsistent runs: " + "; ".join(report["consistency"]["problems"]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        WORKERS[sys.argv[2]](*sys.argv[3:])
    else:
        main()
