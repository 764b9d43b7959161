"""Read any finished LoRA run into one shape: trained tensors keyed like the PEFT model, the frozen
weights the checkpoint holds (read lazily), and what the run recorded about itself.

Sources: a DeepSpeed ZeRO directory, a sharded FSDP checkpoint directory, a Lightning ``.ckpt``
file (FSDP's full state dict included), or a PEFT adapter directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.fsdp import is_fsdp_checkpoint, read_fsdp_checkpoint
from lightning_lora.export.keys import normalize_keys, select_adapter
from lightning_lora.export.recorded import CHECKPOINT_KEY, CLIENT_NEEDED, LORA_HPARAMS
from lightning_lora.export.unpickle import ForeignObjectError, load_torch_file, require
from lightning_lora.export.zero import is_zero_checkpoint, read_model_states, read_zero_checkpoint, resolve_zero_tag

__all__ = [
    "CHECKPOINT_KEY",
    "Renamed",
    "TrainedCheckpoint",
    "config_to_dict",
    "frozen_rows",
    "load_checkpoint",
    "lora_config_from_dict",
    "read_adapter_config",
    "recorded_run",
    "recorded_step",
]


@dataclass
class TrainedCheckpoint:
    """What a finished run left: tensors named as in the PEFT model, and what is known about them.

    Attributes:
        tensors: by PEFT-model key (``base_model.model....lora_A.default.weight``); for an adapter
            directory, by PEFT's adapter-file key (``...lora_A.weight``), see ``adapter_format``.
            A Lightning ``.ckpt`` holds every parameter here (memory-mapped: untouched ones cost
            nothing); other sources hold only the trained ones.
        source: the path read.
        kind: ``"deepspeed"``, ``"fsdp"`` (sharded), ``"lightning"``, ``"adapter"`` or ``"memory"``.
        lora_config: the PEFT ``LoraConfig`` as a dict, if the checkpoint carries it.
        base_model: the base model the run trained on, if recorded.
        global_step: the optimizer step the checkpoint was taken at, if recorded.
        adapter_format: the keys are in PEFT's adapter-file layout.
        tag: the ZeRO tag read, if any.
        vocab_size: rows of the trained model's input embeddings, if recorded (larger than the
            base's when the run added tokens).
        tokenizer_files: the tokenizer the run trained with, as ``save_pretrained`` files, if recorded.
        frozen: frozen weights stored apart from ``tensors`` (ZeRO, sharded FSDP, a module in
            memory), by PEFT-model key, each read when it is accessed; ``None`` when the source
            keeps none apart. An initialisation that rewrote the base is read from here.
        adapter_name: the PEFT adapter the tensors belong to, renamed to ``default`` in ``tensors``.
        quantization: how the base was quantized during training (QLoRA), if it was; see
            :func:`~lightning_lora.export.quantized.quantization_record`.
    """

    tensors: dict[str, torch.Tensor]
    source: str
    kind: str
    lora_config: dict[str, Any] | None = None
    base_model: str | None = None
    global_step: int | None = None
    adapter_format: bool = False
    tag: str | None = None
    vocab_size: int | None = None
    tokenizer_files: dict[str, str] | None = None
    frozen: Mapping[str, torch.Tensor] | None = None
    adapter_name: str = "default"
    quantization: dict[str, Any] | None = None

    def frozen_tensors(self, trainable: set[str]) -> Mapping[str, torch.Tensor]:
        """Every frozen weight the checkpoint holds: ``tensors`` less the ``trainable`` keys, and ``frozen``."""
        inline = {key: value for key, value in self.tensors.items() if key not in trainable}
        if not self.frozen:
            return inline
        return _Chained(inline, self.frozen)


class _Chained(Mapping[str, torch.Tensor]):
    """Two mappings read as one (the first wins); values are fetched only on access."""

    def __init__(self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
        self.first, self.second = first, second

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.first[key] if key in self.first else self.second[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.first
        yield from (key for key in self.second if key not in self.first)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.first or key in self.second

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        return frozen_rows(self.first, key, indices) if key in self.first else frozen_rows(self.second, key, indices)


def frozen_rows(mapping: Mapping[str, torch.Tensor], key: str, indices: list[int]) -> torch.Tensor:
    """Rows ``indices`` of ``mapping[key]``, read without the rest when the mapping can (ZeRO-3)."""
    rows = getattr(mapping, "rows", None)
    return rows(key, indices) if rows is not None else mapping[key][indices]


class Renamed(Mapping[str, torch.Tensor]):
    """A lazy mapping read under other key names (``names``: new name -> the mapping's own)."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: dict[str, str]) -> None:
        self.source, self.names = source, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.names

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        return frozen_rows(self.source, self.names[key], indices)


def lora_config_from_dict(config: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` from its dict form, ignoring keys this PEFT version does not know."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{key: value for key, value in config.items() if key in known})


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a PEFT config (sets become sorted lists)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def read_adapter_config(path: str | Path, argument: str) -> dict[str, Any]:
    """An ``adapter_config.json`` (or the directory holding one) as a dict; one-line errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_config.json"
    if not path.is_file():
        raise ExportError(f"{argument}={str(path.parent if path.name == 'adapter_config.json' else path)!r}: no adapter_config.json there")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{argument}: {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ExportError(f"{argument}: {str(path)!r} is not a PEFT adapter config (a JSON object)")
    return config



def _metadata(client_state: dict[str, Any], source: Path) -> dict[str, Any]:
    """The LoRA config, base model and attribute prefix recorded in a Lightning checkpoint."""
    recorded = dict(client_state.get(CHECKPOINT_KEY) or {})
    if "peft_config" not in recorded:
        # A checkpoint of LoraFinetuneModule written before it recorded CHECKPOINT_KEY: its
        # hyperparameters name the LoRA settings and the base model.
        hparams = client_state.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            require(hparams, source, ("hyper_parameters",))
            hparams = {}
        if "model_name_or_path" in hparams and "r" in hparams:
            config = {key: hparams[key] for key in LORA_HPARAMS if key in hparams}
            require(config, source, ("hyper_parameters",))
            require(hparams["model_name_or_path"], source, ("hyper_parameters", "model_name_or_path"))
            recorded.setdefault("peft_config", {**config, "peft_type": "LORA", "task_type": "CAUSAL_LM"})
            recorded.setdefault("base_model", hparams["model_name_or_path"])
            recorded.setdefault("prefix", "model.")
    return recorded


def load_checkpoint(
    path: str | Path, prefix: str | None = None, tag: str | None = None, adapter_name: str | None = None
) -> TrainedCheckpoint:
    """Read a ZeRO directory, an FSDP directory, a Lightning ``.ckpt`` file or a PEFT adapter directory.

    Args:
        path: the checkpoint.
        prefix: the LightningModule attribute holding the PEFT model (e.g. ``"net."``); recorded
            or detected when ``None``.
        tag: the ZeRO tag to read instead of the one ``latest`` names.
        adapter_name: the PEFT adapter to export when the model held several (``--adapter-name``).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--checkpoint={str(path)!r} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path)
    frozen: Mapping[str, torch.Tensor] | None = None
    if tag is None and is_fsdp_checkpoint(path):
        tensors, frozen, client_state = read_fsdp_checkpoint(path)
        kind = "fsdp"
    elif tag is not None or (path.is_dir() and is_zero_checkpoint(path)):
        tag_dir = resolve_zero_tag(path, tag)
        tensors, frozen, client_state = read_zero_checkpoint(tag_dir)
        kind, tag = "deepspeed", tag_dir.name
    elif path.is_file():
        try:
            checkpoint = load_torch_file(path, needed=[("state_dict",), *CLIENT_NEEDED])
        except ForeignObjectError:
            raise
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise ExportError(f"--checkpoint={str(path)!r} is not a readable Lightning checkpoint: {err}") from err
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ExportError(f"--checkpoint={str(path)!r} holds no 'state_dict': not a Lightning checkpoint")
        tensors, client_state, kind = checkpoint["state_dict"], checkpoint, "lightning"
    else:
        raise ExportError(
            f"--checkpoint={str(path)!r} is neither a DeepSpeed ZeRO directory (with 'latest'), a sharded "
            "FSDP checkpoint (with .metadata), a Lightning .ckpt file, nor a PEFT adapter directory (with adapter_config.json)"
        )
    recorded = _metadata(client_state, path)
    prefix = prefix if prefix is not None else recorded.get("prefix")
    try:
        tensors = normalize_keys(tensors, prefix)
        chosen, tensors = select_adapter(tensors, adapter_name)
        if frozen:
            names = normalize_keys({key: key for key in frozen}, prefix)
            kept = select_adapter(names, chosen, strict=False)[1]  # other adapters' (frozen) tensors are left out
            frozen = Renamed(frozen, kept)
    except ValueError as err:
        raise ExportError(f"--checkpoint={str(path)!r}: {err}") from err
    return TrainedCheckpoint(
        tensors=tensors,
        source=str(path),
        kind=kind,
        lora_config=recorded.get("peft_config"),
        base_model=recorded.get("base_model"),
        global_step=client_state.get("global_step"),
        tag=tag,
        vocab_size=recorded.get("vocab_size"),
        tokenizer_files=recorded.get("tokenizer"),
        frozen=frozen or None,
        adapter_name=chosen,
        quantization=recorded.get("quantization"),
    )


def _load_adapter_dir(path: Path) -> TrainedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lightning_lora.export.trust import check_pickled_weights, check_remote_code

    config = read_adapter_config(path, "--checkpoint")
    check_remote_code(path, "--checkpoint")
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"--checkpoint={str(path)!r} is a {config['peft_type']} adapter; only LoRA is supported")
    weights = path / "adapter_model.safetensors"
    try:
        if weights.is_file():
            tensors = load_file(weights)
        elif (path / "adapter_model.bin").is_file():
            check_pickled_weights(path / "adapter_model.bin", "--checkpoint")
            tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ExportError(f"--checkpoint={str(path)!r} has adapter_config.json but no adapter_model.safetensors")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportError(f"--checkpoint={str(path)!r}: its adapter weights are not readable: {err}") from err
    return TrainedCheckpoint(
        tensors=tensors,
        source=str(path),
        kind="adapter",
        lora_config=config,
        base_model=config.get("base_model_name_or_path"),
        adapter_format=True,
    )


def recorded_step(path: str | Path) -> int | None:
    """The ``global_step`` a Lightning checkpoint (file, ZeRO or FSDP directory) records, or ``None``
    if it records none or cannot be read. Reads only the small metadata, memory-mapped."""
    path = Path(path)
    try:
        if path.is_dir() and is_fsdp_checkpoint(path):
            state = load_torch_file(path / "meta.pt", needed=[("global_step",)], report=False)
        elif path.is_dir():
            state = read_model_states(resolve_zero_tag(path), report=False)
        else:
            state = load_torch_file(path, needed=[("global_step",)], report=False)
    except Exception:  # an unreadable candidate is simply not the one that is looked for
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def recorded_run(path: Path) -> dict[str, Any] | None:
    """What a checkpoint records about its run (``peft_config``, ``base_model``, ...) without reading
    its tensors, or ``None`` if that cannot be read (the full read then says why)."""
    try:
        if path.is_dir() and (path / "adapter_config.json").is_file():
            config = read_adapter_config(path, "--checkpoint")
            return {"peft_config": config, "base_model": config.get("base_model_name_or_path")}
        if path.is_dir() and is_fsdp_checkpoint(path):
            state = load_torch_file(path / "meta.pt", needed=CLIENT_NEEDED, report=False)
        elif path.is_dir():
            state = read_model_states(resolve_zero_tag(path), report=False)
        else:
            state = load_torch_file(path, needed=CLIENT_NEEDED, report=False)
        return _metadata(state, path) if isinstance(state, dict) else None
    except Exception:  # a cheap look ahead only: the full read reports what is wrong
        return None
