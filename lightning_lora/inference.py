"""Use a fine-tuned model: generate answers from a merged directory or from a base model plus one or
more PEFT adapters (scoring held-out data is :mod:`lightning_lora.evaluation`).

Prompts are rendered and tokenised by the code the data module trains with (``split_prompt_response``,
``encode_example``), so the model is asked in exactly the format it learned.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from lightning_lora.dtypes import parse_dtype
from lightning_lora.model_classes import restore_class_decorators

__all__ = [
    "active_adapter",
    "adapter_names",
    "generate",
    "load_for_generation",
    "read_prompts",
    "render_prompt",
    "unload",
]



def _model_path(model: str | Path) -> str:
    """Resolve ``--model`` (a directory, ``builtin:...`` or a hub id) and fail early, by name, on a wrong one."""
    from lightning_lora.tiny import BUILTIN_PREFIX, resolve_model_path

    name = str(model)
    if name.startswith(BUILTIN_PREFIX):
        try:
            return resolve_model_path(name)
        except ValueError as err:
            raise ValueError(f"--model={name!r}: {err}") from None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "adapter_config.json").is_file():
            raise ValueError(f"--model={name!r} is an adapter directory: pass its base model as --model and it as --adapter")
        raise ValueError(f"--model={name!r} has no config.json: not a Hugging Face model directory")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"--model={name!r} is not a directory")
    return name  # a hub id such as "org/name": transformers resolves it


def _adapter_dirs(adapters: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, Path]:
    """Name each adapter: ``NAME=DIR``, a mapping's key, or else the directory's own name."""
    pairs: list[tuple[str, str]] = []
    if isinstance(adapters, Mapping):
        pairs = [(str(name), str(path)) for name, path in adapters.items()]
    else:
        for spec in map(str, adapters):
            if "=" in spec and not Path(spec).exists():
                name, path = spec.split("=", 1)
            else:
                name, path = Path(spec).name, spec
            pairs.append((name, path))
    named: dict[str, Path] = {}
    for name, path in pairs:
        if not (Path(path) / "adapter_config.json").is_file():
            reason = "has no adapter_config.json" if Path(path).is_dir() else "is not a directory"
            raise ValueError(f"--adapter={path!r} {reason}")
        if not name:
            raise ValueError(f"--adapter={path!r} has an empty name: write NAME=DIR")
        if name in named:
            raise ValueError(
                f"--adapter={str(named[name])!r} and --adapter={path!r} are both named {name!r}: "
                "name them apart as NAME=DIR"
            )
        named[name] = Path(path)
    return named


def _check_code(model_path: str, adapters: Mapping[str, Path], trust: bool) -> None:
    """Refuse, before loading anything, a model or adapter that would run its own code (unless
    ``trust``) or whose weights are pickles this torch cannot load safely."""
    from lightning_lora.export.trust import check_pickled_weights, check_remote_code

    for argument, directory in [("--model", Path(model_path)), *(("--adapter", path) for path in adapters.values())]:
        if not directory.is_dir():
            continue  # a hub id: transformers refuses its custom code itself (trust_remote_code is passed on)
        check_remote_code(directory, argument, trust)
        pickled = sorted(directory.glob("*.bin"))
        if pickled and not any(directory.glob("*.safetensors")):
            check_pickled_weights(pickled[0], argument)


def _load_tokenizer(model_path: str, adapters: Mapping[str, Path], trust: bool = False) -> Any:
    """The tokenizer the adapters were trained with if they ship one (added tokens), else the model's."""
    from transformers import AutoTokenizer

    shipped = {name: path for name, path in adapters.items() if (path / "tokenizer_config.json").is_file()}
    tokenizers = {}
    for name, path in shipped.items():
        try:
            tokenizers[name] = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise ValueError(f"--adapter={str(path)!r} ships a tokenizer that cannot be loaded: {err}") from err
    vocabularies = {name: tokenizer.get_vocab() for name, tokenizer in tokenizers.items()}
    if len({tuple(sorted(v.items())) for v in vocabularies.values()}) > 1:
        sizes = {str(shipped[name]): len(vocab) for name, vocab in vocabularies.items()}
        raise ValueError(f"the --adapter directories ship different tokenizers {sizes}: load them in separate runs")
    tokenizer = next(iter(tokenizers.values()), None)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the data module does; padding is masked anyway
    return tokenizer


def load_for_generation(
    model: str | Path,
    adapters: Sequence[str | Path] | Mapping[str, str | Path] = (),
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a model, and optionally adapters onto it, ready to generate or be evaluated.

    Args:
        model: a merged model directory, a base model directory, ``builtin:tiny-llama`` or a hub id.
        adapters: PEFT adapter directories to load onto ``model``, as ``DIR`` or ``NAME=DIR`` strings or
            a ``{name: dir}`` mapping; a name defaults to the directory's name. The first one is active.
        dtype: ``auto`` (the checkpoint's), ``fp32``, ``bf16`` or ``fp16``.
        device: where to run; default ``cuda`` when available, else ``cpu``; ``auto`` spreads the
            model over every GPU of this machine (Accelerate's ``device_map="auto"``: a model too
            large for one GPU, in one process).
        trust_remote_code: run the custom code (``auto_map``) the model, an adapter or a tokenizer
            maps to; without it such a directory is refused.

    Returns:
        ``(model, tokenizer)``: a ``PeftModel`` holding every adapter when adapters were given, else the
        plain Hugging Face model; both in eval mode. The tokenizer is an adapter's when it ships one
        (a run that added tokens), and then the base is grown to its length first, as the export does.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype, "--dtype") or "auto"
    model_path = _model_path(model)
    named = _adapter_dirs(adapters)
    _check_code(model_path, named, trust_remote_code)
    try:
        tokenizer = _load_tokenizer(model_path, named, trust_remote_code)
        restore_class_decorators()  # a training in this process may have created its classes in deepspeed.zero.Init
        net = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                   device_map="auto" if device == "auto" else None)
    except OSError as err:  # transformers' message names the file, not the argument
        raise OSError(f"--model={str(model)!r} cannot be loaded: {err}") from err
    if named:
        from peft import PeftModel

        from lightning_lora.export.tokens import resize_vocab

        if len(tokenizer) > net.get_input_embeddings().weight.shape[0]:
            resize_vocab(net, len(tokenizer))  # mean-initialised rows, like the export's merged model
        (first, first_dir), *others = named.items()
        net = PeftModel.from_pretrained(net, str(first_dir), adapter_name=first)
        for name, path in others:
            net.load_adapter(str(path), adapter_name=name)
        net.set_adapter(first)
    if device == "auto":
        return net.eval(), tokenizer  # placed by from_pretrained
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(device).eval(), tokenizer


def adapter_names(model: Any) -> list[str]:
    """Names of the adapters loaded on ``model`` (none for a plain or merged model)."""
    return list(getattr(model, "peft_config", {}) or {})


def unload(model: Any) -> Any:
    """The base model under ``model``, without any adapter (PEFT's ``unload``; a plain model as is).

    The LoRA layers are taken out in place, so ``model`` itself is spent: use the returned model.
    """
    return model.unload() if adapter_names(model) else model


def _adapter_context(model: Any, adapter: str | None, disable_adapters: bool) -> AbstractContextManager[Any]:
    """Activate ``adapter`` (or disable all adapters) for the block it guards."""
    names = adapter_names(model)
    if adapter is not None:
        if not names:
            raise ValueError(f"--adapter-name={adapter!r} names an adapter, but no --adapter was loaded")
        if adapter not in names:
            raise ValueError(f"--adapter-name={adapter!r} is not one of {names}")
        if disable_adapters:
            raise ValueError(f"--adapter-name={adapter!r} and --no-adapter contradict each other: pass one")
        model.set_adapter(adapter)
    if disable_adapters and names:
        return model.disable_adapter()
    return nullcontext()


def active_adapter(model: Any, disable_adapters: bool = False) -> str | None:
    """The adapter that generates, or ``None`` for the base / merged model."""
    return None if disable_adapters or not adapter_names(model) else model.active_adapter


def _check_template(template: str, tokenizer: Any) -> None:
    from lightning_lora.templates import TEMPLATES

    if template not in TEMPLATES:
        raise ValueError(f"--template={template!r} is not one of {list(TEMPLATES)}")
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--template='chat_template' but the model's tokenizer has no chat template")


def render_prompt(row: str | Mapping[str, Any], template: str, tokenizer: Any, raw: bool = False) -> str:
    """The prompt the model sees for a text (an instruction) or a data row, in the training ``template``.

    Alpaca rows need no ``output``; a ``messages`` row that ends with the assistant's answer is asked
    the turns before it (as in evaluation), otherwise the whole conversation; a ``text`` row is
    continued as it is. ``raw`` passes a text through untouched.
    """
    from lightning_lora.data import detect_format, split_prompt_response
    from lightning_lora.templates import render_messages

    _check_template(template, tokenizer)
    if isinstance(row, str):
        return row if raw else split_prompt_response({"instruction": row, "output": ""}, "alpaca", template, tokenizer)[0]
    fmt = detect_format(row)
    if fmt == "messages" and (not row["messages"] or row["messages"][-1].get("role") != "assistant"):
        return render_messages(row["messages"], template, tokenizer)
    if fmt == "alpaca":
        row = {**row, "output": row.get("output") or ""}
    prompt, response = split_prompt_response(row, fmt, template, tokenizer)
    return prompt if fmt != "text" else response


def read_prompts(path: str | Path, template: str, tokenizer: Any, raw: bool = False) -> list[str]:
    """Prompts from a ``.txt`` file (one instruction per line) or a data file in a training format."""
    from lightning_lora.data import read_records

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise ValueError(f"--prompts={str(path)!r} does not exist")
    if path.suffix.lower() == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [render_prompt(line, template, tokenizer, raw) for line in lines]
    if raw:
        raise ValueError(f"--raw applies to --prompt and .txt prompt files, not to the rows of --prompts={str(path)!r}")
    rows = read_records(path, key="--prompts")
    prompts = []
    for index, row in enumerate(rows):
        try:
            prompts.append(render_prompt(row, template, tokenizer))
        except (ValueError, KeyError) as err:
            raise ValueError(f"row {index} of --prompts={str(path)!r}: {err}") from None
    return prompts


def _prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids of a prompt, with the special prefix exactly as in training (``encode_example``)."""
    from lightning_lora.data import encode_example

    return encode_example(prompt, "", tokenizer, max_length=2**31, train_on_prompt=True, add_eos=False)[0]["input_ids"]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS (trained on) and the generation config's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def _generation_config(
    model: Any, tokenizer: Any, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
) -> Any:
    """Decoding as the arguments say: greedy, or temperature + top-p sampling (no top-k, no penalty)."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens!r} must be >= 1")
    settings: dict[str, Any] = {"do_sample": do_sample, "num_beams": 1, "repetition_penalty": 1.0}
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"--temperature={temperature!r} must be > 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"--top-p={top_p!r} must be in (0, 1]")
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"--batch-size={size!r} must be >= 1")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _generate_ids(model: Any, tokenizer: Any, prompts: Sequence[list[int]], config: Any, batch_size: int) -> list[str]:
    """Generate for token-id prompts, left-padded in batches; decode up to the first EOS."""
    device = next(model.parameters()).device
    stop = set(config.eos_token_id)
    texts = []
    for chunk in _batches(prompts, batch_size):
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stop), len(row))
            # Special tokens are kept: added tokens (a tool call's <call>) are part of the answer.
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=False))
    return texts


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    adapter: str | None = None,
    disable_adapters: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """Complete each rendered prompt (see :func:`render_prompt`); returns the generated texts.

    Greedy by default; ``do_sample`` samples with ``temperature`` and ``top_p`` (seeded by ``seed``:
    the same prompts, batch size and device give the same texts). Generation stops at the
    tokenizer's EOS or any EOS id of the model's generation config. ``adapter`` activates one of the
    loaded adapters (it stays active afterwards); ``disable_adapters`` generates with the base model.
    """
    config = _generation_config(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    with _adapter_context(model, adapter, disable_adapters):
        if seed is not None:
            torch.manual_seed(seed)
        return _generate_ids(model, tokenizer, [_prompt_ids(p, tokenizer) for p in prompts], config, batch_size)
