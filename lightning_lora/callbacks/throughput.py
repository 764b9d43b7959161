"""TokenThroughput: training speed in tokens per second, with and without padding, and peak memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_lora.batching import count_tokens

__all__ = ["TokenThroughput"]


class TokenThroughput(L.Callback):
    """Log training throughput per device: ``throughput/tokens_per_s`` (every token of
    ``input_ids``, padding included), ``throughput/nonpad_tokens_per_s`` (real tokens only: the
    number to compare runs with different padding or packing by) and, on CUDA,
    ``throughput/peak_memory_gib`` (``torch.cuda.max_memory_allocated``).

    The rates are rank 0's own batches over rank 0's wall-clock time since the last log, so they
    are per device; every rank trains the same number of batches, so the job's rate is about
    ``world_size`` times as high. A batch's time runs from the end of the batch before (the start
    of the epoch for the first) to its own end, so it covers data loading, forward, backward and
    the optimizer step; validation does not count. Real tokens are counted by
    :func:`lightning_lora.batching.count_tokens` (the ``attention_mask``, or the position ids of a
    packed batch).

    The totals over the whole fit, of this device, stay readable after it: ``total_tokens``,
    ``total_nonpad_tokens`` and ``total_seconds``. Every checkpoint keeps them, and the counts since
    the last log, for every rank, so a run resumed with ``ckpt_path`` continues them and logs at the
    steps the uninterrupted run logs at (on another number of devices, rank ``r`` continues the
    earlier run's rank ``r``, or starts from zero where there was none).

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"TokenThroughput(log_every_n_steps={log_every_n_steps!r}) must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.total_tokens = 0
        self.total_nonpad_tokens = 0
        self.total_seconds = 0.0
        # Since the last log: tokens, real tokens, seconds.
        self._window = [0, 0, 0.0]
        self._clock: float | None = None
        self._logged_step = 0  # no log before the first optimizer step

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed run's checkpoint gives the counts back
            self.total_tokens, self.total_nonpad_tokens, self.total_seconds = 0, 0, 0.0
            self._window = [0, 0, 0.0]

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Each rank counts its own batches, and only rank 0's checkpoint is written: gather them
        # (a collective; every rank takes part in saving a checkpoint).
        mine = torch.tensor([self.total_tokens, self.total_nonpad_tokens, self.total_seconds, *self._window],
                            dtype=torch.float64, device=pl_module.device)
        ranks = trainer.strategy.all_gather(mine).reshape(-1, mine.numel()).cpu().tolist()
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"ranks": ranks}

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        ranks = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("ranks", [])
        if trainer.global_rank < len(ranks):
            tokens, nonpad, seconds, window_tokens, window_nonpad, window_seconds = ranks[trainer.global_rank]
            self.total_tokens, self.total_nonpad_tokens, self.total_seconds = int(tokens), int(nonpad), seconds
            self._window = [int(window_tokens), int(window_nonpad), window_seconds]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._logged_step = trainer.global_step  # a resumed run logs from its next step on
        # A run resumed mid-epoch starts without on_train_epoch_start: the clock starts here too.
        self._clock = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = time.perf_counter()  # the next batch's time starts after validation

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels are done: its time is real
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        tokens, nonpad = count_tokens(batch)
        self.total_tokens += tokens
        self.total_nonpad_tokens += nonpad
        self.total_seconds += seconds
        self._window = [self._window[0] + tokens, self._window[1] + nonpad, self._window[2] + seconds]
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step % every or step == self._logged_step:
            return  # not a logging step, or accumulating gradients after one that was logged
        self._logged_step = step
        tokens, nonpad, seconds = self._window
        self._window = [0, 0, 0.0]
        if not trainer.is_global_zero:
            return
        metrics = {"throughput/tokens_per_s": tokens / seconds, "throughput/nonpad_tokens_per_s": nonpad / seconds}
        if pl_module.device.type == "cuda":
            metrics["throughput/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)  # the step Lightning logs this batch's own metrics at
