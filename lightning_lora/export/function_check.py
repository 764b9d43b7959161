"""The function check: probes run through the trained and the merged model, one decoder block at a time.

Both models live on the meta device; only what is running is loaded (see
:class:`~lightning_lora.export.reference.Materializer`): one decoder block of each, the embeddings
while they embed, the head while it scores. The steps:

1. *Inputs of every block.* Each model's own forward runs with its decoder blocks replaced by
   stubs that record what they are called with (hidden states, masks, rotary embeddings, ALiBi:
   whatever that architecture passes) and stop after the last one. The merged model computes its
   masks and positions from its own ``config.json``, so a changed field shows up below.
2. *Blocks.* For each block, the merged block and the PEFT-wrapped trained block (PEFT's forward,
   base weights + adapter, fp32) both get the *reference* hidden states, so errors do not compound
   and a failure names the first block that diverges.
3. *Logits.* Each model's forward runs again with stubs, the last one returning the reference's
   final hidden states, so each model's own final norm and head (soft-capping and all) score them.
   Logits must agree within the tolerance, and so must the argmax at every position, except where
   the reference's two best logits are closer than the tolerance.

Tolerances (see :func:`tolerance`) follow from what the export may change: every merged weight is
rounded once to the export dtype (relative error at most ``u = 2**-p`` for ``p`` significand bits),
and the fp32 sums of the two sides run in another order (relative error about ``2**-24 * sqrt(d)``
for sums of ``d`` terms). A block's output moves by such a relative error of what the block adds
to its input, times the few matrix products it chains; :data:`SAFETY` covers that count and the
spread of maxima over positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_lora.export.reference import Materializer

__all__ = ["FunctionReport", "Side", "check_function", "tolerance"]

SAFETY = 16.0
_EPS32 = 2.0**-24
_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def tolerance(dtype: torch.dtype, hidden_size: int, scale: float) -> float:
    """The largest difference allowed between merged and reference outputs of magnitude ``scale``."""
    unit = 2.0 ** -_BITS[dtype]
    return SAFETY * (unit + _EPS32 * math.sqrt(hidden_size)) * max(scale, 1e-6)


class _Stop(Exception):
    """Raised by the last stub: the rest of the forward pass is not needed."""


@dataclass
class Side:
    """One model of the comparison, on the meta device, with the loader of its tensors."""

    name: str
    model: torch.nn.Module
    value: Callable[[str], torch.Tensor | None]
    device: torch.device
    blocks: torch.nn.ModuleList = field(init=False)
    block_path: str = field(init=False)
    loader: Materializer = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()  # no dropout: both sides must be deterministic functions
        self.block_path, self.blocks = _decoder_blocks(self.model)
        self.loader = Materializer(self.model, self.value, self.device)
        self._hooks = [unit.register_forward_pre_hook(self._load_unit) for unit in _outside_units(self.model, self.blocks)]

    def _load_unit(self, module: torch.nn.Module, args: Any) -> None:
        self.loader.load(module)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.loader.release()


def _decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks: the one holding the most parameters."""
    best, size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > size:
                best, size = (name, module), count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks")
    return best


def _outside_units(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """The largest modules outside the decoder blocks (embeddings, final norm, head, ...): each is
    loaded whole when it runs. Modules that contain the blocks hold only these."""
    units: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        if module is blocks:
            return
        if not any(sub is blocks for sub in module.modules()):
            if any(True for _ in module.parameters()):
                units.append(module)
            return
        if any(p is not None for p in module._parameters.values()):
            units.append(module)  # parameters of a module around the blocks (rare): loaded when it runs
        for child in module.children():
            visit(child)

    visit(model)
    return units


@dataclass
class _Calls:
    """What each decoder block was called with."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _call_block(block: torch.nn.Module, calls: _Calls, index: int, hidden: torch.Tensor) -> Any:
    """Block ``index`` on ``hidden``, with everything else it was called with in ``calls``."""
    args, kwargs = _with_hidden(calls.args[index], calls.kwargs[index], hidden)
    return block(*args, **kwargs)


@contextmanager
def _blocks_loaded(*pairs: tuple[Side, torch.nn.Module]) -> Iterator[None]:
    """Each side's block loaded for the duration, released (storage kept for the next) after."""
    for side, block in pairs:
        side.loader.load(block)
    try:
        yield
    finally:
        for side, block in pairs:
            side.loader.release(block)


@torch.no_grad()
def _run_with_stubs(side: Side, stub: Callable[..., Any], **inputs: Any) -> Any:
    """The side's forward with every block's forward replaced by ``stub(index, *args, **kwargs)``."""
    for index, block in enumerate(side.blocks):
        block.forward = functools.partial(stub, index)
    try:
        return side.model(**inputs, use_cache=False)
    except _Stop:
        return None
    finally:
        for block in side.blocks:
            del block.forward
        side.loader.release()


def _capture(side: Side, **inputs: torch.Tensor) -> _Calls:
    """What each of the side's blocks is called with for ``inputs`` (``input_ids``, an ``attention_mask``)."""
    calls = _Calls()
    last = len(side.blocks) - 1

    def record(index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.args.append(args)
        calls.kwargs.append(kwargs)
        if index == last:
            raise _Stop
        return _hidden(args, kwargs)

    _run_with_stubs(side, record, **{name: value.to(side.device) for name, value in inputs.items()})
    return calls


def _logits(side: Side, final: torch.Tensor, structure: Any) -> torch.Tensor:
    """The side's own head (final norm, output layer, ...) on ``final``, the last block's output."""
    last = len(side.blocks) - 1

    def replay(index: int, *args: Any, **kwargs: Any) -> Any:
        hidden = final if index == last else _hidden(args, kwargs)
        return (hidden, *structure[1:]) if isinstance(structure, tuple) else hidden

    zeros = torch.zeros(final.shape, dtype=final.dtype, device=final.device)
    return _run_with_stubs(side, replay, inputs_embeds=zeros).logits.float()


@dataclass
class FunctionReport:
    """Per block and for the logits: the largest difference, its tolerance, and what failed."""

    probes: int = 0
    tokens: int = 0
    blocks: list[dict[str, Any]] = field(default_factory=list)
    logits: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        worst = max(self.blocks, key=lambda b: b["max_abs_diff"] / max(b["tolerance"], 1e-30), default=None)
        blocks = sum(1 for b in self.blocks if b["block"].startswith("block"))
        return {"probes": self.probes, "tokens": self.tokens, "blocks_checked": blocks,
                "worst_block": worst, "logits": self.logits, "problems": self.problems}


def _compare(report: FunctionReport, what: str, merged: torch.Tensor, reference: torch.Tensor, scale: float,
             dtype: torch.dtype, hidden: int) -> bool:
    diff = (merged.float() - reference.float()).abs().max().item() if merged.shape == reference.shape else math.inf
    allowed = tolerance(dtype, hidden, scale)
    report.blocks.append({"block": what, "max_abs_diff": diff, "tolerance": allowed, "scale": scale})
    if not diff <= allowed:
        report.problems.append(
            f"{what}: merged and trained outputs differ by {diff:.3g} (tolerance {allowed:.3g} for "
            f"{str(dtype).removeprefix('torch.')}, output scale {scale:.3g}); this is the first that diverges"
        )
        return False
    return True


@torch.no_grad()
def check_function(reference: Side, merged: Side, probes: torch.Tensor, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None) -> FunctionReport:
    """Run ``probes`` through both sides block by block and compare; see the module docstring."""
    report = FunctionReport(probes=probes.shape[0], tokens=probes.numel())
    ref_calls, merged_calls = _capture(reference, input_ids=probes), _capture(merged, input_ids=probes)
    hidden = _hidden(ref_calls.args[0], ref_calls.kwargs[0])
    size = hidden.shape[-1]
    embedded = _hidden(merged_calls.args[0], merged_calls.kwargs[0])
    if not _compare(report, "embeddings", embedded, hidden, hidden.abs().max().item(), dtype, size):
        return report
    structure: Any = None
    count = len(reference.blocks)
    for index in range(count):
        ref_block, merged_block = reference.blocks[index], merged.blocks[index]
        with _blocks_loaded((reference, ref_block), (merged, merged_block)):
            out = _call_block(ref_block, ref_calls, index, hidden)
            out_merged = _call_block(merged_block, merged_calls, index, hidden)
        structure = out
        update = (_first(out) - hidden).abs().max().item()
        if not _compare(report, f"block {index} ({merged.block_path}.{index})", _first(out_merged), _first(out), update, dtype, size):
            return report
        hidden = _first(out)
        if progress is not None:
            progress(index + 1, count)
    reference.loader.release()  # the blocks' kept buffers, before the heads are loaded
    merged.loader.release()
    ref_logits = _logits(reference, hidden, structure)
    merged_logits = _logits(merged, hidden, structure)
    _compare_logits(report, merged_logits, ref_logits, dtype, size)
    return report


def _compare_logits(report: FunctionReport, merged: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, hidden: int) -> None:
    scale = reference.abs().max().item()
    allowed = tolerance(dtype, hidden, scale)
    diff = (merged - reference).abs().max().item() if merged.shape == reference.shape else math.inf
    top2 = reference.topk(2, dim=-1).values
    close = (top2[..., 0] - top2[..., 1]) <= allowed
    disagree = merged.argmax(-1) != reference.argmax(-1) if merged.shape == reference.shape else torch.ones_like(close)
    report.logits = {"max_abs_diff": diff, "tolerance": allowed, "scale": scale,
                     "argmax_agreement": 1.0 - disagree.float().mean().item(),
                     "argmax_disagreements_allowed": int((disagree & close).sum().item())}
    if not diff <= allowed:
        report.problems.append(f"logits: merged and trained differ by {diff:.3g} (tolerance {allowed:.3g}, logit scale {scale:.3g})")
    bad = int((disagree & ~close).sum().item())
    if bad:
        report.problems.append(f"logits: the argmax differs at {bad} position(s) where the trained model's two best logits "
                               f"are more than the tolerance {allowed:.3g} apart")
