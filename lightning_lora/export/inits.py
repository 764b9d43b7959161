"""LoRA initialisations that rewrite the base weights, and the adapter that undoes the rewrite.

PiSSA, OLoRA, CorDA and LoRA-GA start training from ``W_res = W - s * B0 @ A0`` (``B0 @ A0`` a
rank-``r`` piece of ``W``) instead of ``W``; LoftQ replaces ``W`` by a quantized residual. The
trained model is ``W_res + s * B @ A``: merging the adapter into the original ``W`` would be wrong,
so the export takes ``W_res`` from the checkpoint. ``True``, ``False``, ``gaussian``, ``eva``,
``orthogonal`` and ``mica`` only initialise the adapter (checked against ``peft.tuners.lora.layer``).

An adapter that loads onto the *original* base is PEFT's documented conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``): ``s * B' @ A' = s * B @ A - s * B0 @ A0``
with ``A' = [A; A0]``, ``B' = [B, -B0]``, rank and alpha doubled. PEFT needs the initial adapter
for it; here ``s * B0 @ A0 = W - W_res`` is read off the two base weights on disk and factored
at its rank, which needs nothing the run did not leave behind.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CONVERTIBLE_INITS", "REWRITING_INITS", "conversion_problem", "converted_config", "residual_factors",
           "rewrites_base"]

# Prefixes of init_lora_weights values whose initialisation rewrites the base weight.
REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Those PEFT can convert back to an adapter on the original base (_convert_state_dict_for_initial_model).
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")


def _init(lora_config: dict[str, Any]) -> str:
    return str(lora_config.get("init_lora_weights", True)).lower()


def rewrites_base(lora_config: dict[str, Any]) -> bool:
    """Whether the run's LoRA initialisation changed the frozen base weights it trained on."""
    return _init(lora_config).startswith(REWRITING_INITS)


def conversion_problem(lora_config: dict[str, Any]) -> str | None:
    """Why no adapter can reproduce the trained model on the original base, or ``None`` if one can."""
    init = _init(lora_config)
    if not init.startswith(REWRITING_INITS):
        return None
    if not init.startswith(CONVERTIBLE_INITS):
        return (f"init_lora_weights={lora_config.get('init_lora_weights')!r} replaced the base by its quantized "
                "residual and PEFT documents no adapter for the original base")
    if lora_config.get("use_rslora") and (lora_config.get("rank_pattern") or lora_config.get("alpha_pattern")):
        return "PEFT cannot convert an rsLoRA adapter with rank_pattern or alpha_pattern back to the original base"
    if lora_config.get("use_dora"):
        return "a DoRA magnitude is relative to the base weight it trained on; no adapter reproduces it on the original base"
    return None


def converted_config(lora_config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of the converted adapter: PEFT's own changes (rank and alpha doubled,
    rsLoRA alpha times sqrt(2) so that its scale is kept, plain initialisation)."""
    config = dict(lora_config)
    config["init_lora_weights"] = True
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {name: 2 * value for name, value in config[key].items()}
    return config


@torch.no_grad()
def residual_factors(original: torch.Tensor, residual: torch.Tensor, rank: int, scale: float,
                     fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B0, A0)`` with ``scale * B0 @ A0 == original - residual`` (up to rounding), both fp32.

    The difference has rank ``rank`` by construction; a randomized range finder with a fixed seed
    recovers it exactly in a few passes (no full SVD of a large matrix), and the same inputs always
    give the same factors.
    """
    difference = (original.float() - residual.float()) / scale
    if fan_in_fan_out:  # Conv1D stores (in, out); the adapter's product is (out, in)
        difference = difference.T
    generator = torch.Generator(device=difference.device).manual_seed(0)
    probe = torch.randn(difference.shape[1], min(rank + 8, min(difference.shape)), generator=generator, device=difference.device)
    basis, _ = torch.linalg.qr(difference @ probe)
    basis, _ = torch.linalg.qr(difference @ (difference.T @ basis))  # one power iteration
    u, s, vh = torch.linalg.svd(basis.T @ difference, full_matrices=False)
    root = s[:rank].sqrt()
    b0 = (basis @ u[:, :rank]) * root
    a0 = root[:, None] * vh[:rank]
    return b0.contiguous(), a0.contiguous()
