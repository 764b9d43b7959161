"""The read step: everything an export or a verification starts from, checked to fit together.

A checkpoint (trained tensors, the frozen weights it holds, what the run recorded), the base
model's weight files (headers checked), the LoRA config, and PEFT's structure of the run on the
meta device. Nothing large is loaded here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import ExportError
from lightning_lora.export.checkpoint import TrainedCheckpoint, load_checkpoint, read_adapter_config
from lightning_lora.export.inits import rewrites_base
from lightning_lora.export.options import ExportOptions
from lightning_lora.export.quantized import QuantizedBase
from lightning_lora.export.structure import build_meta_peft_model, trained_by_model_key
from lightning_lora.export.tokens import check_tokenizer_files
from lightning_lora.export.trust import check_remote_code
from lightning_lora.export.weights import WeightFiles, read_config
from lightning_lora.tiny import resolve_model_path

__all__ = ["Sources", "base_files", "open_sources", "read_sources", "resolve_base"]


@dataclass
class Sources:
    """What an export reads, checked to fit together.

    Attributes:
        checkpoint: the run's checkpoint as read.
        base_name: the base model as given or recorded; ``base_path`` its directory.
        base: the base's weight files (headers checked).
        lora_config: the LoRA config the run trained with (overrides applied).
        peft_model: PEFT's model of the run on the meta device.
        trained: the trained tensors by PEFT-model key.
        frozen: the frozen weights the checkpoint holds (read lazily; may be empty).
        rewritten: frozen PEFT-model keys the export takes from the checkpoint, not the base.
        description: what the verification's reference is built from, in words.
        dequantized: the 4-bit weights (QLoRA) the export takes dequantized from the checkpoint
            (part of ``rewritten``; empty for ``merge_base="original"``).
        quantized: the checkpoint's frozen weights with the 4-bit ones readable as stored (for the
            drift measurement); ``None`` for a run without quantization.
    """

    checkpoint: TrainedCheckpoint
    base_name: str
    base_path: str
    base: WeightFiles
    lora_config: dict[str, Any]
    peft_model: Any
    trained: dict[str, torch.Tensor]
    frozen: Mapping[str, torch.Tensor]
    rewritten: set[str]
    description: str
    dequantized: set[str] = field(default_factory=set)
    quantized: QuantizedBase | None = None

    @property
    def vocab_size(self) -> int:
        return self.peft_model.base_model.model.get_input_embeddings().weight.shape[0]

    @property
    def grown(self) -> bool:
        return self.checkpoint.vocab_size is not None and self.checkpoint.vocab_size != self.base_vocab

    @property
    def base_vocab(self) -> int | None:
        return getattr(read_config(self.base_path, "--base-model").get_text_config(), "vocab_size", None)


def resolve_base(base_model: str | None, checkpoint: TrainedCheckpoint | None = None) -> tuple[str, str]:
    """(the base model as named, its directory): ``base_model``, or the one the checkpoint records."""
    name = base_model if base_model is not None else checkpoint.base_model if checkpoint is not None else None
    if name is None:
        source = checkpoint.source if checkpoint is not None else "the checkpoint"
        raise ExportError(f"{source!r} does not record its base model; pass --base-model")
    try:
        path = resolve_model_path(str(name))
    except ValueError as err:
        raise ExportError(f"--base-model={str(name)!r}: {err}") from err
    if not Path(path).is_dir():
        raise ExportError(f"--base-model={str(name)!r} is not a model directory (models are never downloaded here)")
    check_remote_code(path, "--base-model")  # before anything reads its config
    return str(name), path


def base_files(base_path: str, base_name: str) -> WeightFiles:
    """The base's weight files, every header checked; its architecture's key prefix from its config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = read_config(base_path, "--base-model")
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        prefix = model_class.base_model_prefix
    except (KeyError, AttributeError):
        prefix = ""
    files = WeightFiles(base_path, f"--base-model={base_name!r}", prefix)
    if not files:
        pickled = sorted(p.name for p in Path(base_path).glob("*.bin"))
        if pickled:  # read only as safetensors: a pickle could run code, and cannot be read one tensor at a time
            raise ExportError(f"--base-model={base_name!r} holds its weights only as pickles ({', '.join(pickled[:3])}), "
                              "which the export never loads: convert them to safetensors (from_pretrained then "
                              "save_pretrained, with torch >= 2.6, writes them)")
        raise ExportError(f"--base-model={base_name!r} holds no safetensors weights (model.safetensors or an index)")
    return files


def read_sources(checkpoint: str | Path | TrainedCheckpoint, options: ExportOptions, base: WeightFiles | None = None) -> Sources:
    """Read the checkpoint and match it to the base model and the LoRA config."""
    if not isinstance(checkpoint, TrainedCheckpoint):
        checkpoint = load_checkpoint(checkpoint, prefix=options.prefix, tag=options.tag, adapter_name=options.adapter_name)
    if checkpoint.tokenizer_files is not None:
        check_tokenizer_files(checkpoint.tokenizer_files, checkpoint.source)
    config = options.lora_config if options.lora_config is not None else checkpoint.lora_config
    if config is None:
        raise ExportError(f"{checkpoint.source!r} does not record its LoRA config; pass --lora-config")
    if not isinstance(config, dict):
        config = read_adapter_config(config, "--lora-config")
    config = {**config, **({"r": options.r} if options.r is not None else {}),
              **({"lora_alpha": options.lora_alpha} if options.lora_alpha is not None else {})}
    base_name, base_path = resolve_base(options.base_model, checkpoint)
    base = base if base is not None else base_files(base_path, base_name)
    try:
        peft_model = build_meta_peft_model(base_path, config, checkpoint.vocab_size)
    except ValueError as err:  # a recorded vocabulary smaller than the base's, a config PEFT refuses
        raise ExportError(f"--base-model={base_name!r} and the LoRA config do not fit the run: {err}") from err
    trained = trained_by_model_key(peft_model, checkpoint, f"--base-model={base_name!r}")
    frozen = checkpoint.frozen_tensors(set(trained))
    quantized = QuantizedBase.read(frozen, checkpoint.quantization)
    if quantized is not None:
        quantized.orient(peft_model)
        frozen = quantized.view(options.merge_base)
    rewritten = _rewritten(peft_model, frozen, config, options.frozen_from_checkpoint, checkpoint.source)
    description = f"checkpoint {checkpoint.source!r} on --base-model {base_name!r}"
    dequantized: set[str] = set()
    if quantized is not None and options.merge_base == "dequantized":
        dequantized = set(quantized.weights)
        rewritten |= dequantized
        description += f", merged into its 4-bit ({', '.join(sorted(set(quantized.weights.values())))}) weights dequantized"
    return Sources(checkpoint, base_name, base_path, base, config, peft_model, trained, frozen, rewritten, description,
                   dequantized, quantized)


def _rewritten(peft_model: Any, frozen: Mapping[str, torch.Tensor], config: dict[str, Any], everything: bool, source: str) -> set[str]:
    """The frozen keys whose trained value is the checkpoint's: all with --frozen-from-checkpoint,
    the base weights of the LoRA layers when the initialisation rewrote them."""
    if everything:
        if not frozen:
            raise ExportError(f"--frozen-from-checkpoint: {source!r} holds no frozen weights")
        return set(frozen)
    if not rewrites_base(config):
        return set()
    from peft.tuners.lora import LoraLayer

    wanted = {f"{name}.base_layer.weight" for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    missing = sorted(wanted - set(frozen))
    if missing:
        raise ExportError(
            f"init_lora_weights={config.get('init_lora_weights')!r} rewrote the base weights during training, but "
            f"{source!r} does not hold them (e.g. {missing[:2]}): it was saved without frozen parameters "
            "(exclude_frozen_parameters=True, an adapter directory), so the trained model cannot be rebuilt. "
            "Train such an initialisation with frozen parameters in the checkpoint"
        )
    return wanted


def open_sources(manifest: dict[str, Any], export_dir: Path, base_model: str, checkpoint: str | Path | None) -> Sources:
    """The sources of a finished export, for ``lightning-lora verify``: the checkpoint it names (or
    ``checkpoint``), or, when that is gone, the exported adapter directory."""
    recorded = (manifest.get("source") or {}).get("checkpoint")
    candidate = checkpoint if checkpoint is not None else recorded
    options = ExportOptions(base_model=base_model, prefix=manifest.get("prefix"), tag=(manifest.get("source") or {}).get("tag"),
                            lora_config=manifest.get("lora_config"), adapter_name=manifest.get("adapter_name"),
                            merge_base=manifest.get("merge_base") or "dequantized")
    if candidate is not None and Path(candidate).exists():
        return read_sources(candidate, options)
    if checkpoint is not None:
        raise ExportError(f"--checkpoint={str(checkpoint)!r} does not exist")
    if manifest.get("merge_base") == "dequantized":
        raise ExportError(f"the checkpoint {recorded!r} is gone, and only it holds the 4-bit base this export merged into "
                          "(the adapter does not); pass --checkpoint")
    adapter = export_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"the checkpoint {recorded!r} is gone and {str(export_dir)!r} holds no adapter to verify against; pass --checkpoint")
    checkpoint = load_checkpoint(adapter)
    checkpoint.vocab_size = manifest.get("vocab_size")  # a run that added tokens: the base grows as in training
    sources = read_sources(checkpoint, ExportOptions(base_model=base_model))
    sources.description = f"the exported adapter on --base-model {base_model!r} (the checkpoint {recorded!r} is not there)"
    return sources
