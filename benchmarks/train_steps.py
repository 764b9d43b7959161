"""LoRA training throughput over a fixed number of packed token-budget steps: HF ``Trainer`` + PEFT against ours.

``train_throughput.py --gpu-8b`` (a Llama-3-8B shape), ``--gpu-packed`` (Qwen2-0.5B's shape) and
``--dry-run`` (a tiny shape of the same family, on the CPU) run this module. Each optimizer step is
``accumulate`` micro-batches that ``InstructionDataModule(max_length, packing=True,
max_tokens_per_batch=<micro-batch budget>)`` builds, enough of them for ``--tokens-per-step`` real
tokens per step on average. Both sides build the same random bf16 base on the device from a
``config.json`` and a fixed seed (no weights on disk), start from the same LoRA weights, and train
on the same micro-batches in the same order: ours through Lightning (``accumulate_grad_batches``),
HF's as a dataset whose items are our micro-batches (``per_device_train_batch_size=1``,
``gradient_accumulation_steps``, ``DataCollatorWithFlattening``, sequential sampler). A digest of
the examples of every step, taken from the tensors each side feeds its model, proves it. The first
``--warmup-steps`` steps (compilation, autotuning) are timed apart from the ``--timed-steps`` after
them. See benchmarks/README.md.

It also holds what every mode of ``train_throughput.py`` shares: the synthetic instruction data,
the LoRA initialisation, the FLOPs formula and the GPUs' peaks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_IMPORTED = time.perf_counter()  # a worker's setup time counts from here (before torch is imported)
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEMPLATE = "human_assistant"
# Dense bf16 peak of the GPUs MFU is reported for (tensor cores, no sparsity), FLOP/s, by a substring
# of torch.cuda.get_device_name(); the first match wins. Others: pass --peak-tflops.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("A100", 312e12))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_STEPS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": PROJECTIONS}
BASE_SEED = 1234  # the random base's weights; --seed draws the batches and the LoRA init
# Tokens of an example (prompt + response + EOS, BOS included), lognormal, clipped; --dry-run divides
# every figure by DRY_SCALE (median 64, clipped to 16..256).
LENGTHS_STEPS = {"median": 1024, "sigma": 0.8, "min": 64, "max": 4096}
DRY_SCALE = 16
FINAL_STEPS = 3  # "loss after the steps": the mean of the last 3 steps' losses (the same tokens on both sides)
LOSS_TOLERANCE = 0.02

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"arch": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
                  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "initializer_range": 0.02},
    "qwen2-0.5b": {"arch": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "initializer_range": 0.02},
    "tiny-llama": {"arch": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 176,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 500000.0,
                   "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "initializer_range": 0.02},
    "tiny-qwen2": {"arch": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 176,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1e6,
                   "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "initializer_range": 0.02},
}
MODES: dict[str, dict[str, Any]] = {
    # 4096-token micro-batches (one packed row each) with gradient accumulation: without activation
    # checkpointing an 8B step of 16k tokens would hold ~140 GB of activations on the HF side.
    "gpu-8b": {"shape": "llama3-8b", "dry_shape": "tiny-llama", "stem": "train_throughput_gpu8b",
               "max_length": 4096, "micro_tokens": 4096, "tokens_per_step": 16384, "warmup_steps": 3,
               "timed_steps": 8, "mfu_target": 0.40, "speed_target": 1.3},
    # 0.5B: a 16k-token micro-batch (four packed rows) fits easily; targets MFU only.
    "gpu-packed": {"shape": "qwen2-0.5b", "dry_shape": "tiny-qwen2", "stem": "train_throughput_gpu_packed",
                   "max_length": 4096, "micro_tokens": 16384, "tokens_per_step": 16384, "warmup_steps": 3,
                   "timed_steps": 16, "mfu_target": 0.20, "speed_target": None},
}
VARIANTS_STEPS = ("hf", "ours")


# --------------------------------------------------------------------------------------------
# Shared by every mode.
# --------------------------------------------------------------------------------------------

def _word_counts(tokenizer: Any, words: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Tokens of each word at the start of a text and after a space (byte-level BPE: additive)."""
    first = {w: len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words}
    later = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    return first, later


def _words(rng: random.Random, budget: int, vocab: list[str], first: dict[str, int], later: dict[str, int]) -> str:
    """Random words whose tokenized length (as a text on its own) is about ``budget`` (at least one word)."""
    out: list[str] = []
    used = 0
    while not out or used < budget:
        word = rng.choice(vocab)
        cost = (later if out else first)[word]
        if out and used + cost > budget and budget - used < cost / 2:
            break
        out.append(word)
        used += cost
    return " ".join(out)


def instruction_rows(tokenizer: Any, lengths: dict[str, float], rng: random.Random, count: int | None = None,
                     total_tokens: int | None = None) -> tuple[list[dict[str, str]], list[int]]:
    """Alpaca rows of random words whose tokenized length (prompt in ``TEMPLATE`` + response + EOS)
    follows ``lengths`` (lognormal, clipped): ``count`` rows, or rows until ``total_tokens`` were drawn.
    The prompt takes 20-60 % of each example. Returns the rows and the drawn lengths."""
    from lightning_lora.templates import render_alpaca
    from lightning_lora.tiny import _WORDS

    vocab = list(_WORDS) + [str(i) for i in range(10)]
    first, later = _word_counts(tokenizer, vocab)
    overhead = len(tokenizer(render_alpaca("", "", TEMPLATE, tokenizer))["input_ids"])  # template and BOS
    rows: list[dict[str, str]] = []
    drawn: list[int] = []
    while (len(rows) < count) if count is not None else (sum(drawn) < (total_tokens or 0)):
        total = min(lengths["max"], max(lengths["min"], round(rng.lognormvariate(math.log(lengths["median"]),
                                                                                   lengths["sigma"]))))
        drawn.append(total)
        prompt_budget = round(total * rng.uniform(0.2, 0.6))
        words_budget = max(1, prompt_budget - overhead)
        instruction_budget = max(1, round(words_budget * rng.uniform(0.3, 1.0)))
        instruction = _words(rng, instruction_budget, vocab, first, later)
        input_text = (_words(rng, words_budget - instruction_budget, vocab, first, later)
                      if words_budget - instruction_budget >= 4 else "")
        prompt_tokens = len(tokenizer(render_alpaca(instruction, input_text, TEMPLATE, tokenizer))["input_ids"])
        output = _words(rng, max(1, total - prompt_tokens - 1), vocab, first, later)  # - 1: the EOS
        rows.append({"instruction": instruction, "input": input_text, "output": output})
    return rows, drawn


def _sync() -> None:
    """Wait for the GPU's queued work, so that a clock read after it times work done."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _init_lora(model: Any, seed: int) -> None:
    """Draw the LoRA matrices from one CPU generator, the same on every side: PEFT's own init draws
    from the generator of the device the model is built on, and Lightning builds it on the GPU while
    the HF recipe builds it on the CPU. A like PEFT's default (kaiming uniform, a = sqrt(5): bound
    1 / sqrt(fan_in)), B = 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # the same order on both sides
            if not param.requires_grad:
                continue
            if ".lora_A." in name:
                bound = 1 / math.sqrt(param.shape[1])
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
            elif ".lora_B." in name:
                param.zero_()
            else:
                raise SystemExit(f"unexpected trainable parameter {name}")


def _trainable_sum(model: Any) -> float:
    """A fingerprint of the initial trainable (LoRA) weights: equal on every side means equal starts."""
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def examples_digest(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> str:
    """sha256 of a set of examples, each as (input_ids, labels after the first): order and layout
    (padded, packed rows, one flattened row) do not change it; the tokens and the loss targets do."""
    digest = hashlib.sha256()
    for text in sorted(json.dumps([list(ids), list(labels)]) for ids, labels in pairs):
        digest.update(text.encode())
    return digest.hexdigest()


def model_flops(config: dict[str, Any], lora: dict[str, Any], lengths: Sequence[int]) -> dict[str, float]:
    """Model FLOPs of training on examples of ``lengths`` (padding excluded), from the config alone.

    One formula for every mode and side: a kernel may replace modules, so modules are never counted.
    N, the frozen linear parameters: per layer q, k, v, o (from the heads, KV heads and head dim),
    gate, up and down (from the intermediate size), plus the LM head (hidden x vocabulary; embeddings
    excluded). LoRA's parameters: r x (in + out) per targeted projection and layer. Per token, 4 N
    for the frozen layers (2 N forward, 2 N for the input gradients of the backward; LoRA computes
    no frozen weight's gradient) and 6 per LoRA parameter; causal attention 6 L^2 d per example of
    length L and layer (2 L^2 d forward: half of QK^T and of PV each 2 L^2 d, twice that backward;
    d = heads x head dim): packed examples attend only within themselves. ``flops_six_n`` counts
    the frozen weights' gradients too (6 N per token), the convention of full fine-tuning reports.
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    frozen = layers * sum(i * o for i, o in shapes.values()) + hidden * config["vocab_size"]
    lora_params = layers * sum(lora["r"] * (i + o) for name, (i, o) in shapes.items() if name in lora["target_modules"])
    tokens = sum(lengths)
    attention = 6 * heads * head_dim * layers * sum(n * n for n in lengths)
    return {"frozen_linear_parameters": frozen, "lora_parameters": lora_params, "tokens": tokens,
            "attention_flops": attention, "flops": 4 * frozen * tokens + 6 * lora_params * tokens + attention,
            "flops_six_n": 6 * (frozen + lora_params) * tokens + attention}


# --------------------------------------------------------------------------------------------
# Workers (fresh processes): prepare the base directory, the data and the plan; train one side.
# --------------------------------------------------------------------------------------------

def build_random_base(path: str, dtype: Any, attn_implementation: str | None, device: Any, seed: int) -> Any:
    """The base model of ``path/config.json`` with random weights, built directly on ``device``: the
    same seed and code give the same weights in every process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)  # every device's generator
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # No cache in training: with one, transformers does not look for packed sequences in the
    # position ids, and the examples of a flattened row would attend to each other.
    model.config.use_cache = False
    return model


def _base_fingerprint(model: Any) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.sum(dtype=torch.float64) for p in model.parameters()))


def _probe_flex_attention() -> str | None:
    """None if a compiled flex attention runs forward and backward here (on the CPU), else why not."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q = torch.randn(1, 2, 32, 16, requires_grad=True)
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 32, 32, device="cpu")
        torch.compile(flex_attention)(q, q, q, block_mask=mask).sum().backward()
    except Exception as err:  # noqa: BLE001 (any failure means: not usable here)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _data_module(spec: dict[str, Any], kwargs: dict[str, Any], cls: Any = None) -> Any:
    if cls is None:
        from lightning_lora.data import InstructionDataModule as cls
    dm = cls(spec["data"], tokenizer=spec["base"], **kwargs)
    dm.setup("fit")
    return dm


def worker_prepare(spec_path: str) -> None:
    """Write the base directory (config.json + tokenizer, no weights), the data and ``plan.json``:
    the micro-batches of every step, as our data module's batch sampler makes them."""
    spec = json.loads(Path(spec_path).read_text())
    from transformers import AutoTokenizer

    from lightning_lora.data import InstructionDataModule
    from lightning_lora.tiny import build_tokenizer, tiny_config

    shape = dict(SHAPES[spec["shape"]])
    arch, vocab = shape.pop("arch"), shape.pop("vocab_size")
    base = Path(spec["base"])
    build_tokenizer().save_pretrained(base)
    config = tiny_config(arch, vocab, **shape)
    config.save_pretrained(base)
    saved = json.loads((base / "config.json").read_text())
    theta = (saved.get("rope_parameters") or {}).get("rope_theta", saved.get("rope_theta"))
    if theta != shape["rope_theta"]:
        raise SystemExit(f"config.json has rope theta {theta}, not {shape['rope_theta']}")
    tokenizer = AutoTokenizer.from_pretrained(base)  # as the data module loads it
    if len(tokenizer) > vocab:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, the model embeds {vocab}")
    rng = random.Random(f"train-steps-{spec['seed']}")
    rows, drawn = instruction_rows(tokenizer, spec["lengths"], rng, total_tokens=spec["data_tokens"])
    with open(spec["data"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)

    notes: list[str] = []
    kwargs = {"template": TEMPLATE, "val_split": 0.0, "seed": spec["seed"], "max_length": spec["max_length"],
              "packing": True, "max_tokens_per_batch": spec["micro_tokens"], "group_by_length": False}
    try:
        InstructionDataModule(spec["data"], tokenizer=str(base), **kwargs)
    except ValueError as err:
        if "group_by_length" not in str(err):
            raise
        kwargs["group_by_length"] = True
        notes.append("InstructionDataModule at this revision needs group_by_length=True for max_tokens_per_batch "
                     "(random token-budget batches not there yet): micro-batches are length-grouped")
        print(notes[-1], flush=True)
    dm = _data_module(spec, kwargs)
    examples = dm.train_examples
    batches = [list(b) for b in dm.train_dataloader().batch_sampler]
    fills = [sum(len(examples[i]["input_ids"]) for i in b) for b in batches]
    steps = spec["warmup_steps"] + spec["timed_steps"]
    accumulate = spec["accumulate"] or _least_accumulation(fills, steps, spec["tokens_per_step"])
    if len(batches) < steps * accumulate:
        raise SystemExit(f"the data gives {len(batches)} micro-batches, {steps} steps x {accumulate} need more: "
                         "raise --data-factor")
    micro = batches[:steps * accumulate]
    micro_digests = [examples_digest((examples[i]["input_ids"], examples[i]["labels"][1:]) for i in b) for b in micro]
    plan_steps = []
    for s in range(steps):
        members = [i for b in micro[s * accumulate:(s + 1) * accumulate] for i in b]
        plan_steps.append({
            "examples": len(members), "lengths": [len(examples[i]["input_ids"]) for i in members],
            "loss_tokens": sum(sum(label != -100 for label in examples[i]["labels"][1:]) for i in members),
            "digest": hashlib.sha256("".join(micro_digests[s * accumulate:(s + 1) * accumulate]).encode()).hexdigest(),
        })
    probes: dict[str, str | None] = {}
    if spec["device"] != "cuda" and "flex_attention" in (spec["hf"]["attn"], spec["ours"]["attn_implementation"]):
        probes["flex_attention"] = _probe_flex_attention()
        if probes["flex_attention"]:
            notes.append(f"flex_attention is not usable on this CPU ({probes['flex_attention']}): sdpa instead")
            print(notes[-1], flush=True)
    plan = {"data_module": kwargs, "accumulate": accumulate, "micro_batches": micro, "micro_digests": micro_digests,
            "steps": plan_steps, "epoch_micro_batches": len(batches), "micro_batch_tokens": length_stats(fills),
            "examples": len(examples), "examples_sha256": examples_digest(
                (e["input_ids"], e["labels"][1:]) for e in examples),
            "example_lengths": length_stats([len(e["input_ids"]) for e in examples]), "drawn_lengths": length_stats(drawn),
            "probes": probes, "notes": notes}
    Path(spec["plan"]).write_text(json.dumps(plan) + "\n")
    print(json.dumps({"examples": len(examples), "accumulate": accumulate, "micro_batches": len(batches)}))


class _Fed:
    """What one side fed its model, micro-batch by micro-batch, read from the batch tensors."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self.tokens: list[int] = []
        self.positions: list[int] = []

    def add(self, batch: dict[str, Any]) -> None:
        ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        pairs = []
        for row in range(ids.shape[0]):
            pos, row_ids, row_labels = positions[row].tolist(), ids[row].tolist(), labels[row].tolist()
            starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
            # Each example's position ids restart at 0; padding is a run of 1-token "sequences".
            pairs += [(row_ids[a:b], row_labels[a + 1:b]) for a, b in itertools.pairwise(starts) if b - a >= 2]
        self.digests.append(examples_digest(pairs))
        self.tokens.append(sum(len(p[0]) for p in pairs))
        self.positions.append(ids.numel())

    def record(self, accumulate: int, steps: int) -> dict[str, Any]:
        n = accumulate * steps  # Lightning fetches a batch ahead: the rest were never trained on
        return {"step_digests": [hashlib.sha256("".join(self.digests[s * accumulate:(s + 1) * accumulate]).encode())
                                 .hexdigest() for s in range(steps)],
                "fed_tokens": sum(self.tokens[:n]), "fed_positions": sum(self.positions[:n]),
                "micro_batches_fed": len(self.digests)}


class _Clock:
    """Wall times of the run: start of the first step, end of the warm-up steps, end of the last."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.begin = self.first = self.warm = self.end = None

    def step_started(self) -> None:
        if self.first is None:
            _sync()
            self.first = time.perf_counter()
            print(f"first step starts {self.first - self.begin:.1f} s after the worker's start", flush=True)
            if self.warmup == 0:
                self.warm = self.first

    def step_done(self, done: int) -> None:
        """``done`` optimizer steps are finished (synchronises only at the window's two ends)."""
        if done == self.warmup and self.warm is None:
            _sync()
            self.warm = time.perf_counter()
            print(f"warm-up: {self.warmup} steps in {self.warm - self.first:.1f} s", flush=True)
        if done == self.steps and self.end is None:
            _sync()
            self.end = time.perf_counter()
            print(f"timed: {self.steps - self.warmup} steps in {self.end - self.warm:.2f} s", flush=True)

    def record(self) -> dict[str, Any]:
        return {"setup_s": self.first - self.begin, "warmup_s": self.warm - self.first,
                "timed_s": self.end - self.warm}


def worker_train(variant: str, spec_path: str, out_path: str) -> None:
    """Train one side for the plan's steps and write what was measured to ``out_path``."""
    spec = json.loads(Path(spec_path).read_text())
    plan = json.loads(Path(spec["plan"]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the spec says cuda, torch.cuda.is_available() is False")
    clock = _Clock(spec["warmup_steps"], spec["warmup_steps"] + spec["timed_steps"])
    clock.begin = _IMPORTED
    train = _train_hf if variant == "hf" else _train_ours
    result: dict[str, Any] = {"variant": variant, "torch_threads": torch.get_num_threads()}
    result.update(train(spec, plan, clock))
    result.update(clock.record())
    if torch.cuda.is_available():
        result["device_name"] = torch.cuda.get_device_name()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    Path(out_path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def _fallbacks(spec: dict[str, Any], plan: dict[str, Any]) -> tuple[str, str, list[str]]:
    """The attention of each side after the plan's probes, and the notes to record."""
    notes = list(plan["notes"])
    unusable = bool(plan["probes"].get("flex_attention"))
    hf_attn = "sdpa" if unusable and spec["hf"]["attn"] == "flex_attention" else spec["hf"]["attn"]
    ours_attn = spec["ours"]["attn_implementation"]
    ours_attn = "sdpa" if unusable and ours_attn == "flex_attention" else ours_attn
    return hf_attn, ours_attn, notes


def _train_hf(spec: dict[str, Any], plan: dict[str, Any], clock: _Clock) -> dict[str, Any]:
    import importlib.util

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    cuda = spec["device"] == "cuda"
    accumulate, steps = plan["accumulate"], len(plan["steps"])
    attn, _, notes = _fallbacks(spec, plan)
    liger = spec["hf"]["liger"] and cuda and importlib.util.find_spec("liger_kernel") is not None
    if spec["hf"]["liger"] and not liger:
        notes.append("HF: use_liger_kernel=False (" + ("liger_kernel does not import" if cuda else "no CUDA") + ")")
        print(notes[-1], flush=True)
    optim = "adamw_torch_fused" if cuda else "adamw_torch"
    if not cuda:
        notes.append("HF: optim='adamw_torch' (fused AdamW only on CUDA here)")
        print(notes[-1], flush=True)
    bf16 = spec["precision"] == "bf16"
    dm = _data_module(spec, plan["data_module"])
    started = time.perf_counter()
    model = build_random_base(spec["base"], torch.bfloat16 if bf16 else torch.float32, attn, spec["device"], BASE_SEED)
    _sync()
    build_s = time.perf_counter() - started
    print(f"base built in {build_s:.1f} s", flush=True)
    fingerprint = _base_fingerprint(model)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA_STEPS))
    _init_lora(model, spec["seed"])
    init = _trainable_sum(model)
    examples = dm.train_examples
    items = [[examples[i] for i in micro] for micro in plan["micro_batches"]]
    flatten, fed = DataCollatorWithFlattening(), _Fed()

    def collate(features: list[list[dict[str, Any]]]) -> dict[str, Any]:
        (item,) = features  # one item: one micro-batch of examples, flattened into one row
        batch = flatten(item)
        fed.add(batch)
        return batch

    class Recorder(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_started()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_done(state.global_step)

    class OrderedTrainer(Trainer):
        """Micro-batches in the plan's order; each micro-batch's loss kept without a sync."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.micro_losses: list[Any] = []

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().compute_loss(model, inputs, *args, **kwargs)
            self.micro_losses.append((out[0] if isinstance(out, tuple) else out).detach())
            return out

    settings = {
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": accumulate, "max_steps": steps,
        "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "optim": optim, "max_grad_norm": 0.0, "bf16": bf16, "fp16": False, "use_liger_kernel": liger,
        "gradient_checkpointing": spec["grad_checkpointing"], "torch_compile": spec["hf"]["torch_compile"],
        "logging_strategy": "steps", "logging_steps": steps, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "use_cpu": not cuda, "seed": spec["seed"], "data_seed": spec["seed"],
        "dataloader_num_workers": 0, "dataloader_pin_memory": cuda, "disable_tqdm": True,
        "remove_unused_columns": False, "use_cache": False,
    }
    if spec["grad_checkpointing"]:
        settings["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    settings = {k: v for k, v in settings.items() if k in fields}
    args = TrainingArguments(output_dir=str(Path(spec["work"]) / "hf"), **settings)
    trainer = OrderedTrainer(model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[Recorder()])
    trainer.train()
    micro = [float(x) for x in trainer.micro_losses]
    # With the loss kwargs, each micro-batch's loss is its summed token loss over the step's count
    # (num_items_in_batch); otherwise its mean, which the Trainer divides by the accumulation.
    summed = bool(trainer.model_accepts_loss_kwargs)
    losses = [sum(micro[s * accumulate:(s + 1) * accumulate]) / (1 if summed else accumulate) for s in range(steps)]
    return {"attn_implementation": attn, "settings": {**settings, "attn_implementation": attn,
            "collator": "DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)",
            "sampler": "SequentialSampler over the plan's micro-batches", "model.config.use_cache": False,
            "loss_normalised_over_step_tokens": summed, "lora": LORA_STEPS},
            "notes": notes, "model_build_s": build_s, "base_fingerprint": fingerprint, "initial_trainable_sum": init,
            "optimizer_steps": trainer.state.global_step, "step_losses": losses, "micro_losses": micro,
            **fed.record(accumulate, steps)}


def _train_ours(spec: dict[str, Any], plan: dict[str, Any], clock: _Clock) -> dict[str, Any]:
    import inspect

    import lightning as L
    import torch
    from typing_extensions import override

    from lightning_lora.data import InstructionDataModule
    from lightning_lora.dtypes import parse_dtype
    from lightning_lora.module import LoraFinetuneModule

    cuda = spec["device"] == "cuda"
    accumulate, steps = plan["accumulate"], len(plan["steps"])
    _, attn, notes = _fallbacks(spec, plan)
    fed, built = _Fed(), {}
    # Under accumulation Lightning averages the micro-batches' losses; HF takes the mean over the
    # step's loss tokens. Each micro-batch gets the step's count / accumulate as num_items_in_batch
    # (the data module's token_weighted_loss mechanism), so that ours optimises the same objective.
    items = [step["loss_tokens"] / accumulate for step in plan["steps"]]

    class PlannedData(InstructionDataModule):
        """The data module as it is, recording what each training batch holds."""

        @override
        def collate_train(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
            batch = super().collate_train(examples)
            step = len(fed.digests) // accumulate
            fed.add(batch)
            if accumulate > 1 and step < len(items):
                batch["num_items_in_batch"] = torch.tensor(items[step])
            return batch

    class RandomBaseModule(LoraFinetuneModule):
        """Ours, with the base built from config.json with random weights on the device."""

        @override
        def _load_base_model(self) -> torch.nn.Module:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            started = time.perf_counter()
            model = build_random_base(self.model_name_or_path, parse_dtype(self.dtype_name, "model.dtype") or torch.float32,
                                      getattr(self, "attn_implementation", None), device, BASE_SEED)
            _sync()
            built.update(model_build_s=time.perf_counter() - started, base_fingerprint=_base_fingerprint(model))
            print(f"base built in {built['model_build_s']:.1f} s", flush=True)
            return model

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[Any] = []
            self.init = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            _init_lora(pl_module, spec["seed"])
            self.init = _trainable_sum(pl_module)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            clock.step_started()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # The loss divided by accumulate_grad_batches; kept on the device (no sync).
            self.losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
            clock.step_done(trainer.global_step)

    wanted = {"attn_implementation": attn, "linear_cross_entropy": spec["ours"]["linear_cross_entropy"],
              "liger_kernels": spec["ours"]["liger_kernels"], "compile_blocks": spec["ours"]["compile_blocks"]}
    accepted = inspect.signature(LoraFinetuneModule).parameters
    flags = {k: v for k, v in wanted.items() if k in accepted}
    if len(flags) < len(wanted):
        notes.append(f"ours: LoraFinetuneModule at this revision has no {sorted(set(wanted) - set(flags))}: not passed")
        print(notes[-1], flush=True)
    bf16 = spec["precision"] == "bf16"
    lr = spec["lr"]
    module = RandomBaseModule(
        spec["base"], **LORA_STEPS, dtype="bf16" if bf16 else "fp32", lr_schedule="constant", warmup_steps=0,
        gradient_checkpointing=spec["grad_checkpointing"], **flags,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if cuda else None),
    )
    dm = PlannedData(spec["data"], tokenizer=spec["base"], **plan["data_module"])
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if bf16 else "32-true",
        max_steps=steps, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=dm)
    micro = [float(x) for x in recorder.losses]
    losses = [sum(micro[s * accumulate:(s + 1) * accumulate]) for s in range(steps)]
    kernels = getattr(module, "kernels", None)
    return {"attn_implementation": attn, "settings": {
                **flags, "requested": wanted, "dtype": "bf16" if bf16 else "fp32",
                "precision": "bf16-mixed" if bf16 else "32-true", "accumulate_grad_batches": accumulate,
                "gradient_checkpointing": spec["grad_checkpointing"],
                "optimizer": f"torch.optim.AdamW(lr={lr}, weight_decay=0, fused={cuda})", "lora": LORA_STEPS,
                "num_items_in_batch": "step loss tokens / accumulate" if accumulate > 1 else None},
            "kernels": json.loads(json.dumps(kernels, default=str)) if kernels is not None else None,
            "notes": notes, **built, "initial_trainable_sum": recorder.init, "optimizer_steps": trainer.global_step,
            "step_losses": losses, "micro_losses": micro, **fed.record(accumulate, steps)}


WORKERS = {"prepare": worker_prepare, "train": worker_train}


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lightning-lora", "torch", "transformers", "peft", "lightning", "accelerate", "tokenizers",
                 "liger-kernel", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def length_stats(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, median, p10, p90, min, max and total of ``values`` (lengths, tokens per step)."""
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"count": len(ordered), "mean": round(statistics.fmean(ordered), 1), "median": pct(0.5),
            "p10": pct(0.1), "p90": pct(0.9), "min": ordered[0], "max": ordered[-1], "total": sum(ordered)}


def _run_worker(name: str, args: list[str], env: dict[str, str], logs: Path, tag: str,
                timeout: float | None) -> dict[str, Any]:
    """One worker in a fresh process (and session, so that a timeout or a stop ends its compile
    workers too); stdout and stderr to ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", name, *args]
    started = time.perf_counter()
    with (logs / f"{tag}.stdout").open("w") as out, (logs / f"{tag}.stderr").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        stopped = False
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = 124
        except (SystemExit, KeyboardInterrupt):  # the driver was stopped: record where the worker was
            returncode, stopped = 143, True
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    run = {"returncode": returncode, "process_wall_s": round(time.perf_counter() - started, 2), "stopped": stopped}
    if returncode != 0:
        run["stderr_tail"] = (logs / f"{tag}.stderr").read_text(errors="replace")[-3000:]
        run["stdout_tail"] = (logs / f"{tag}.stdout").read_text(errors="replace")[-1000:]
    return run


def run(args: Any, parser: Any) -> None:
    """``train_throughput.py --gpu-8b | --gpu-packed [--dry-run]``: prepare, train each variant, report."""
    from export_memory import load_average, machine, snapshot_code

    mode = MODES["gpu-packed" if args.gpu_packed else "gpu-8b"]
    stem = mode["stem"] + ("_dryrun" if args.dry_run else "")
    results = Path(args.results)
    if args.render:
        write_report(json.loads((results / f"{stem}.json").read_text()), results, stem)
        return
    scale = DRY_SCALE if args.dry_run else 1
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu-8b/--gpu-packed need a CUDA device (--dry-run runs the same code on the CPU)")
    variants = [v for v in args.variants.split(",") if v] if args.variants else list(VARIANTS_STEPS)
    if any(v not in VARIANTS_STEPS for v in variants):
        parser.error(f"--variants: choose from {list(VARIANTS_STEPS)}")
    lengths = {**LENGTHS_STEPS}
    if scale > 1:
        lengths = {"median": LENGTHS_STEPS["median"] // scale, "sigma": LENGTHS_STEPS["sigma"],
                   "min": max(16, LENGTHS_STEPS["min"] // scale), "max": LENGTHS_STEPS["max"] // scale}
    warmup = mode["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    timed = args.timed_steps or mode["timed_steps"]
    tokens_per_step = args.tokens_per_step or mode["tokens_per_step"] // scale
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="train_steps-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    spec = {
        "mode": "gpu-packed" if args.gpu_packed else "gpu-8b", "dry_run": args.dry_run,
        "shape": mode["dry_shape"] if args.dry_run else mode["shape"], "lengths": lengths,
        "max_length": args.max_length or mode["max_length"] // scale,
        "micro_tokens": args.micro_tokens or mode["micro_tokens"] // scale, "tokens_per_step": tokens_per_step,
        "accumulate": args.accumulate, "warmup_steps": warmup, "timed_steps": timed,
        "data_tokens": round(args.data_factor * (warmup + timed) * tokens_per_step),
        "seed": args.seed, "lr": args.lr or 1e-3, "precision": args.precision or "bf16",
        "device": "cpu" if args.dry_run else "cuda", "threads": args.threads, "grad_checkpointing": args.grad_checkpointing,
        "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None,
        "hf": {"attn": args.hf_attn, "liger": args.hf_liger, "torch_compile": args.hf_torch_compile},
        "ours": {"attn_implementation": None if args.attn == "default" else args.attn,
                 "linear_cross_entropy": args.linear_ce, "liger_kernels": _bool_or_auto(args.liger),
                 "compile_blocks": args.compile_blocks},
        "base": str(work / "base"), "data": str(work / "data.jsonl"), "plan": str(work / "plan.json"), "work": str(work),
    }
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
                              "machine": machine(), "versions": versions(), "spec": spec, "runs": []}
    # A stop (the session's timeout) ends the current worker and still writes what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = work / "code"
        report["code"] = snapshot_code(None, code)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        if args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
        (work / "spec.json").write_text(json.dumps(spec, indent=2))
        print(f"preparing the {spec['shape']} base directory, data and plan in {work} ...", flush=True)
        prep = _run_worker("prepare", [str(work / "spec.json")], env, logs, "prepare", args.variant_timeout)
        report["prepare"] = prep
        if prep["stopped"]:
            raise SystemExit(143)
        if prep["returncode"] != 0:
            raise SystemExit(f"preparing failed:\n{prep['stderr_tail']}")
        report["plan"] = json.loads(Path(spec["plan"]).read_text())
        report["config"] = json.loads((work / "base" / "config.json").read_text())
        print((logs / "prepare.stdout").read_text().strip().splitlines()[-1], flush=True)
        for variant in variants:
            result = _train_variant(variant, spec, work, env, logs, args.variant_timeout)
            report["runs"].append(result)
            if result["stopped"]:
                raise SystemExit(143)
            write_report(report, results, stem, quiet=True)
            # A crash (not a timeout or a stop) is retried once with the settings least likely to
            # fail, so that the one GPU session still measures something; the report says so.
            if result["returncode"] not in (0, 124, -9, 137, 143) and args.retry_fallback:
                fallback = FALLBACKS[variant]
                retry = {**spec, variant if variant == "hf" else "ours": {
                    **spec[variant if variant == "hf" else "ours"], **fallback}}
                report["runs"].append(_train_variant(variant, retry, work, env, logs, args.variant_timeout,
                                                     tag=f"{variant}-fallback", fallback=fallback))
                write_report(report, results, stem, quiet=True)
    finally:
        report["machine"]["load"]["end"] = load_average()
        if "plan" in report:
            write_report(report, results, stem)
        failed = [r for r in report["runs"] if r["returncode"] != 0]
        if not args.work and not failed and len(report["runs"]) == len(variants):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (logs in {logs})", flush=True)
    if report["consistency"]["problems"]:
        raise SystemExit("inconsistent runs: " + "; ".join(report["consistency"]["problems"]))


# What a crashed variant is retried with (--retry-fallback): no Liger on the HF side; no compiled
# blocks, sdpa and no Liger on ours.
FALLBACKS = {"hf": {"liger": False}, "ours": {"compile_blocks": False, "attn_implementation": "sdpa",
                                              "liger_kernels": False}}


def _train_variant(variant: str, spec: dict[str, Any], work: Path, env: dict[str, str], logs: Path,
                   timeout: float | None, tag: str | None = None, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one side's worker on ``spec``; its record (with the worker's results when it succeeded)."""
    from export_memory import load_average

    tag = tag or variant
    print(f"{tag} ...", end=" ", flush=True)
    spec_path = work / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    load = load_average()
    out = work / f"{tag}.json"
    result = _run_worker("train", [variant, str(spec_path), str(out)], env, logs, tag, timeout)
    result.update(variant=variant, tag=tag, load_before=load, fallback=fallback)
    if result["returncode"] == 0:
        result.update(json.loads(out.read_text()))
        print(f"done in {result['process_wall_s']:.0f} s (warm-up {result['warmup_s']:.1f} s, timed "
              f"{result['timed_s']:.2f} s)", flush=True)
    else:
        print(f"FAILED (rc {result['returncode']}; log {logs / (tag + '.stderr')})", flush=True)
    return result


def _bool_or_auto(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


# --------------------------------------------------------------------------------------------
# Analysis and the markdown report.
# --------------------------------------------------------------------------------------------

def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """Per-run figures over the timed window, targets and checks (also for ``--render``)."""
    plan, spec, config = report["plan"], report["spec"], report["config"]
    warmup = spec["warmup_steps"]
    for step in plan["steps"]:
        step.update(model_flops(config, LORA_STEPS, step["lengths"]))
    timed = plan["steps"][warmup:]
    tokens, flops = sum(s["tokens"] for s in timed), sum(s["flops"] for s in timed)
    report["window"] = {"steps": len(timed), "tokens": tokens, "flops": flops,
                        "flops_six_n": sum(s["flops_six_n"] for s in timed),
                        "tokens_per_step": length_stats([s["tokens"] for s in plan["steps"]])}
    report["summary"] = {}
    for run in report["runs"]:
        if run["returncode"] != 0:
            continue
        peak = spec["peak_flops"] or next((f for key, f in PEAK_BF16 if key in run.get("device_name", "")), None)
        final = run["step_losses"][-FINAL_STEPS:]
        run.update(nonpad_tokens_per_s=tokens / run["timed_s"], peak_bf16_flops=peak,
                   mfu=flops / run["timed_s"] / peak if peak else None,
                   mfu_six_n=report["window"]["flops_six_n"] / run["timed_s"] / peak if peak else None,
                   final_loss=statistics.fmean(final), padding_fraction=1 - run["fed_tokens"] / run["fed_positions"])
        report["summary"][run["variant"]] = {k: run.get(k) for k in (
            "nonpad_tokens_per_s", "mfu", "mfu_six_n", "peak_memory_gib", "final_loss", "timed_s", "warmup_s",
            "setup_s", "model_build_s", "process_wall_s", "padding_fraction")}
    report["targets"] = _targets(report)
    report["consistency"] = _consistency(report)
    return report


def _least_accumulation(fills: list[int], steps: int, tokens_per_step: int) -> int:
    """The fewest micro-batches per optimizer step that give every one of the first ``steps`` steps at
    least ``tokens_per_step`` real tokens (micro-batches taken in order; ``fills``: their tokens)."""
    accumulate = max(1, math.ceil(tokens_per_step / statistics.fmean(fills)))
    while (steps + 1) * accumulate <= len(fills):
        if min(sum(fills[s * accumulate:(s + 1) * accumulate]) for s in range(steps)) >= tokens_per_step:
            return accumulate
        accumulate += 1
    return accumulate  # the data runs out first: the caller says to raise --data-factor


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    mode = MODES[report["spec"]["mode"]]
    hf, ours = report["summary"].get("hf"), report["summary"].get("ours")
    out: dict[str, Any] = {}
    mean_tokens, wanted = report["window"]["tokens_per_step"]["mean"], report["spec"]["tokens_per_step"]
    least = report["window"]["tokens_per_step"]["min"]
    out[f"non-padding tokens of every optimizer step >= {wanted}"] = {
        "value": f"{least} (mean {mean_tokens:.0f})", "met": least >= wanted}
    if ours and ours.get("mfu") is not None:
        out[f"ours MFU >= {mode['mfu_target']:.0%}"] = {"value": percent(ours["mfu"]),
                                                        "met": ours["mfu"] >= mode["mfu_target"]}
    if ours and hf:
        ratio = ours["nonpad_tokens_per_s"] / hf["nonpad_tokens_per_s"]
        speed = mode["speed_target"]
        name = f"ours tokens/s >= {speed} x HF" if speed else "(info) ours tokens/s / HF's"
        out[name] = {"value": f"{ratio:.2f} x", "met": ratio >= (speed or 0)}
        if hf.get("peak_memory_gib") is not None:
            out["ours peak GPU memory <= HF's"] = {
                "value": f"{ours['peak_memory_gib']:.1f} / {hf['peak_memory_gib']:.1f} GiB",
                "met": ours["peak_memory_gib"] <= hf["peak_memory_gib"]}
        loss = ours["final_loss"] / hf["final_loss"]
        out[f"ours loss after the steps within {LOSS_TOLERANCE:.0%} of HF's"] = {
            "value": f"{loss:.4f} x", "met": abs(loss - 1) <= LOSS_TOLERANCE}
    return out


def _consistency(report: dict[str, Any]) -> dict[str, Any]:
    """Checks that both sides did the same work; the failures are raised after the results are written."""
    plan = report["plan"]
    ok = [r for r in report["runs"] if r["returncode"] == 0]
    expected = [s["digest"] for s in plan["steps"]]
    problems = []
    for r in ok:
        if r["step_digests"] != expected:
            bad = [i for i, (a, b) in enumerate(zip(r["step_digests"], expected)) if a != b]
            problems.append(f"{r['variant']} fed other examples than the plan's at steps {bad}")
        if r["optimizer_steps"] != len(expected) or len(r["step_losses"]) != len(expected):
            problems.append(f"{r['variant']}: {r['optimizer_steps']} optimizer steps, {len(r['step_losses'])} losses, "
                            f"plan {len(expected)}")
        if r["fed_tokens"] != sum(s["tokens"] for s in plan["steps"]):
            problems.append(f"{r['variant']} fed {r['fed_tokens']} real tokens, the plan holds "
                            f"{sum(s['tokens'] for s in plan['steps'])}")
    same = {}
    for key in ("base_fingerprint", "initial_trainable_sum"):
        values = {r["variant"]: r.get(key) for r in ok if r.get(key) is not None}
        same[key] = all(math.isclose(v, next(iter(values.values())), rel_tol=1e-6, abs_tol=1e-6) for v in values.values())
        if not same[key]:
            problems.append(f"{key} differs: {values}")
    hf, ours = next((r for r in ok if r["variant"] == "hf"), None), next((r for r in ok if r["variant"] == "ours"), None)
    step_ratios = [o / h for o, h in zip(ours["step_losses"], hf["step_losses"])] if hf and ours else []
    return {"same_tokens_per_step": bool(ok) and all(r["step_digests"] == expected for r in ok),
            "same_base": same["base_fingerprint"], "same_initial_lora_weights": same["initial_trainable_sum"],
            "step_loss_ratios": step_ratios, "problems": problems}


def write_report(report: dict[str, Any], results: Path, stem: str, quiet: bool = False) -> None:
    analyse(report)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (results / f"{stem}.md").write_text(markdown(report))
    if not quiet:
        print(markdown(report))
        print(f"wrote {results / (stem + '.json')} and {results / (stem + '.md')}", flush=True)


def _last_line(text: str | None) -> str:
    return ((text or "").strip().splitlines() or [""])[-1][:300].replace("`", "'")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown(report: dict[str, Any]) -> str:
    spec, plan, config, window = report["spec"], report["plan"], report["config"], report["window"]
    ok = {r["variant"]: r for r in report["runs"] if r["returncode"] == 0}
    devices = sorted({r["device_name"] for r in ok.values() if r.get("device_name")}) or ["CPU"]
    title = "CPU dry run" if spec["dry_run"] else ", ".join(devices)
    c, m = report.get("code", {}), report["machine"]
    lengths = plan["example_lengths"]
    dm = plan["data_module"]
    lines = [
        f"# Training throughput over packed token-budget steps ({spec['shape']}, {title})", "",
        *(["**A CPU dry run of the GPU benchmark's code path on a tiny shape: its speed figures mean nothing.**", ""]
          if spec["dry_run"] else []),
        (f"Model: {spec['shape']} shape ({config['model_type']}: hidden {config['hidden_size']}, "
         f"{config['num_hidden_layers']} layers, intermediate {config['intermediate_size']}, "
         f"{config['num_attention_heads']} heads, {config['num_key_value_heads']} KV heads, vocabulary "
         f"{config['vocab_size']}, rope theta {(config.get('rope_parameters') or {}).get('rope_theta', config.get('rope_theta'))}, "
         f"tied head: {config.get('tie_word_embeddings')}), random weights (seed {BASE_SEED}, initializer range "
         f"{config['initializer_range']}) built on the device in each process, {spec['precision']} weights"
         f"{' with bf16 autocast and fp32 LoRA weights' if spec['precision'] == 'bf16' else ''}; LoRA r={LORA_STEPS['r']}, "
         f"alpha {LORA_STEPS['lora_alpha']}, dropout {LORA_STEPS['lora_dropout']} on {', '.join(PROJECTIONS)}; "
         f"AdamW lr {spec['lr']} constant, weight decay 0, no clipping; LoRA init and batches seed {spec['seed']}."),
        "",
        (f"Data: {plan['examples']} synthetic instruction examples (template `{TEMPLATE}`, loss on the response), "
         f"lognormal lengths (median {spec['lengths']['median']}, sigma {spec['lengths']['sigma']}, clipped to "
         f"{spec['lengths']['min']}..{spec['lengths']['max']}): mean {lengths['mean']}, p10-p90 "
         f"{lengths['p10']}-{lengths['p90']}. Micro-batches: `InstructionDataModule(max_length={dm['max_length']}, "
         f"packing=True, max_tokens_per_batch={dm['max_tokens_per_batch']}, group_by_length={dm['group_by_length']})`, "
         f"{plan['micro_batch_tokens']['mean']:.0f} real tokens on average; {plan['accumulate']} per optimizer step "
         f"(gradient accumulation on both sides{', activation checkpointing on both' if spec['grad_checkpointing'] else ', no activation checkpointing'}): "
         f"{window['tokens_per_step']['mean']:.0f} real tokens per step on average (min {window['tokens_per_step']['min']}, "
         f"max {window['tokens_per_step']['max']})."),
        "",
        (f"Steps: {spec['warmup_steps']} warm-up (compilation, autotuning; timed apart) + {spec['timed_steps']} timed, "
         f"{window['tokens']:,} real tokens and {window['flops']:.3g} FLOP (LoRA convention) in the timed window."),
        "",
        f"Machine: {', '.join(devices)}, {m['cores']} cores ({m['cpu']}). Command: `{report['command']}`.",
        "",
        (f"Code measured: lightning_lora from the {c.get('measured')} (HEAD `{(c.get('git_head') or '-')[:10]}`; "
         f"sources sha256 `{(c.get('lightning_lora_sha256') or '-')[:12]}`)."),
        "",
        ("| variant | non-pad tokens/s | x HF | MFU | MFU, 6N | peak GPU memory (GiB) | loss after the steps | x HF "
         "| timed (s) | warm-up (s) | setup (s) | process (s) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hf = report["summary"].get("hf")
    for run in report["runs"]:
        label = run.get("tag") or run["variant"]
        if run["returncode"] != 0:
            state = "stopped" if run.get("stopped") else "timed out" if run["returncode"] == 124 else "failed"
            lines.append(f"| {label} | {state} (rc {run['returncode']}) |" + " |" * 10)
            continue
        speed = f"{run['nonpad_tokens_per_s'] / hf['nonpad_tokens_per_s']:.2f}" if hf else "-"
        loss = f"{run['final_loss'] / hf['final_loss']:.4f}" if hf else "-"
        mem = "-" if run.get("peak_memory_gib") is None else f"{run['peak_memory_gib']:.1f}"
        lines.append(f"| {label} | {run['nonpad_tokens_per_s']:.0f} | {speed} | {percent(run['mfu'])} | "
                     f"{percent(run['mfu_six_n'])} | {mem} | {run['final_loss']:.4f} | {loss} | {run['timed_s']:.2f} | "
                     f"{run['warmup_s']:.1f} | {run['setup_s']:.1f} | {run['process_wall_s']:.0f} |")
    peaks = sorted({r["peak_bf16_flops"] for r in ok.values() if r.get("peak_bf16_flops")})
    peaks_text = ", ".join(f"{p / 1e12:.1f} TFLOP/s" for p in peaks) or "none on a CPU"
    failures = [r for r in report["runs"] if r["returncode"] != 0]
    lines += [f"- {r.get('tag') or r['variant']} did not finish (rc {r['returncode']}"
              + ("; timed out" if r["returncode"] == 124 else "; stopped" if r.get("stopped") else "")
              + f"): last output `{_last_line(r.get('stdout_tail'))}`, last error line `{_last_line(r.get('stderr_tail'))}`"
              for r in failures]
    lines += [
        "",
        (f"- non-pad tokens/s: the real tokens of the {window['steps']} timed steps / the timed wall (from the end of "
         "the last warm-up step to the end of the last step, the device synchronised at both ends only); padding "
         "excluded (ours pads packed rows to a multiple of 8, HF's flattened rows have none)."),
        (f"- MFU: model FLOPs of those tokens / timed wall / dense bf16 peak ({peaks_text}). "
         "FLOPs from the config, the same formula for both sides: 4 N per token for the frozen linear layers "
         "(q, k, v, o, gate, up, down and the LM head; forward and input gradients), 6 per LoRA parameter and "
         "token, causal attention 6 L^2 d per example and layer. 6N adds the frozen weights' gradients."),
        (f"- loss after the steps: the mean of the last {FINAL_STEPS} steps' training losses; each step's loss is the mean "
         "over its loss tokens (the same tokens on both sides). Peak GPU memory: `torch.cuda.max_memory_allocated()`."),
        ("- warm-up: the first steps' wall (compilation, autotuning); setup: process start to the first step "
         "(imports, tokenization, model build, trainer setup; `process` is the whole worker)."),
        "",
        "| step | examples | real tokens | HF loss | ours loss | ours / HF |", "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, step in enumerate(plan["steps"]):
        losses = [f"{ok[v]['step_losses'][i]:.4f}" if v in ok and i < len(ok[v]["step_losses"]) else "-" for v in ("hf", "ours")]
        ratio = report["consistency"]["step_loss_ratios"]
        lines.append(f"| {i + 1}{' (warm-up)' if i < spec['warmup_steps'] else ''} | {step['examples']} | {step['tokens']} "
                     f"| {losses[0]} | {losses[1]} | {f'{ratio[i]:.4f}' if i < len(ratio) else '-'} |")
    lines += ["", "## Settings", ""]
    for variant, run in ok.items():
        settings = ", ".join(f"`{k}={v}`" for k, v in run["settings"].items() if k not in ("lora", "requested"))
        retried = f" (**retried after a crash with {run['fallback']}**)" if run.get("fallback") else ""
        lines.append(f"- **{variant}**{retried}: {settings}.")
        if run.get("kernels") is not None:
            lines.append(f"  Kernels active (`module.kernels`): `{json.dumps(run['kernels'])}`.")
    notes = sorted({n for r in ok.values() for n in r.get("notes", [])} | set(plan["notes"]))
    if notes:
        lines += ["", "Fallbacks and notes:", "", *(f"- {n}" for n in notes)]
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {name} | {t['value']} | {'PASS' if t['met'] else '**FAIL**'} |")
    k = report["consistency"]
    lines += [
        "",
        (f"Checks: the same examples in every step on both sides (a digest per step from the tensors fed to the "
         f"model, against the plan): {'yes' if k['same_tokens_per_step'] else '**NO**'}; the same base weights: "
         f"{'yes' if k['same_base'] else '**no**'}; the same initial LoRA weights: "
         f"{'yes' if k['same_initial_lora_weights'] else '**no**'}"
         + ("; **problems**: " + "; ".join(k["problems"]) if k["problems"] else "") + "."),
        "",
        "Versions: " + ", ".join(f"{name} {v}" for name, v in report["versions"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        WORKERS[sys.argv[2]](*sys.argv[3:])
