"""Callbacks, importable from YAML as ``lightning_lora.callbacks.NAME``."""

from lightning_lora.callbacks.benchmark import BenchmarkScores
from lightning_lora.callbacks.checkpoint import CompleteCheckpoint
from lightning_lora.callbacks.hf_export import HFExport
from lightning_lora.callbacks.preemption import Preempted, Preemption
from lightning_lora.callbacks.throughput import TokenThroughput

__all__ = ["BenchmarkScores", "CompleteCheckpoint", "HFExport", "Preempted", "Preemption", "TokenThroughput"]
