"""The language-model loss without the full logits: the head and the cross-entropy, chunk by chunk.

A causal LM's plain loss computes the logits of every position (tokens x vocabulary: 16k tokens of
a 128k vocabulary are 8 GiB in fp32, more than a LoRA step's other activations) and keeps them for
the backward pass. :func:`linear_cross_entropy` computes them only at the positions that have a
target (a masked prompt has none), a chunk of rows at a time, and computes each chunk's gradients
while the chunk is there (the loss is the last operation, so the gradient of its input is known
in the forward pass), the way Liger's and Apple's fused linear cross-entropy kernels do. What is
kept for the backward pass is the gradient of the hidden states (and of the head, when it trains),
not the logits. The arithmetic is the plain path's: logits in the compute dtype, softmax and
log-sum-exp in fp32, the same reduction.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["chunk_rows", "linear_cross_entropy"]

# Logit elements per chunk: 2^27 (512 MiB of fp32 logits); about 1,000 rows of a 128k vocabulary.
_CHUNK_ELEMENTS = 2**27


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a head of ``vocab_size`` outputs."""
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    divisor: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, reduction="sum") / divisor``, chunked.

    Args:
        hidden: ``(n, hidden_size)``, the final hidden states of the positions that have a target.
        weight: the head's ``(vocab_size, hidden_size)`` weight (it gets a gradient if it requires one).
        targets: ``(n,)`` token ids.
        divisor: what the summed loss is divided by (Hugging Face's ``num_items_in_batch``);
            ``None`` is ``n``, the mean.
        bias: the head's bias, if it has one.
        chunk_size: rows per chunk; default :func:`chunk_rows`.

    Under autocast the logits are computed in the autocast dtype, like the head's own forward.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if divisor is None:
        divisor = float(targets.numel())
    divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
    chunk = chunk_size or chunk_rows(weight.shape[0])
    cast_bias = bias.to(dtype) if bias is not None else None
    return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), cast_bias, targets, divisor, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients it needs; backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, divisor: torch.Tensor, chunk: int) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
                if bias is not None and ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                rows = hidden[start : start + chunk]
                target = targets[start : start + chunk]
                logits = rows @ weight.T
                if bias is not None:
                    logits = logits + bias
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                # d(loss)/d(logits) = (softmax - one_hot) / divisor, in place of the logits.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
                grad /= divisor
                if grad_weight is not None:
                    grad_weight += grad.T @ rows.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None
