"""BenchmarkScores: a run ends with its benchmark numbers. After ``HFExport`` wrote the export, the
exported model (the merged one, or the base plus the adapter when there is no merged model) is
scored on lm-evaluation-harness tasks (:func:`lightning_lora.benchmark.run_benchmarks`) and the
report is written beside ``export.json`` as ``benchmarks.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.callbacks.hf_export import HFExport

__all__ = ["BenchmarkScores", "REPORT"]

REPORT = "benchmarks.json"


class BenchmarkScores(L.Callback):
    """Score the model ``HFExport`` exported on benchmark tasks when fit ends; list it after ``HFExport``.

    Every rank takes part (each scores its share of the questions, as ``torchrun ... evaluate
    --tasks`` does) on its own device, so the exported model is loaded once a rank beside the
    trained one; rank 0 writes ``<export dir>/benchmarks.json`` and logs each task's accuracy
    (``benchmark/<task>/acc``). Checked at fit start: the harness is installed and an ``HFExport``
    comes first, so that a long run cannot end without its numbers for a reason known at step 0.

    Args:
        tasks: harness tasks or groups (``["mmlu"]``, or ``"mmlu,arc_easy"``).
        num_fewshot, data_dir, template, limit, batch_size: as ``lightning-lora evaluate --tasks``.
    """

    def __init__(self, tasks: list[str] | str, num_fewshot: int | None = None, data_dir: str | None = None,
                 template: str = "none", limit: int | None = None, batch_size: int = 8) -> None:
        self.tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
        if not [task for task in self.tasks if task.strip()]:
            raise ValueError(f"BenchmarkScores: tasks={tasks!r} names no task")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"BenchmarkScores: data_dir={data_dir!r} is not a directory")
        self.settings = {"num_fewshot": num_fewshot, "data_dir": data_dir, "template": template, "limit": limit,
                         "batch_size": batch_size}
        self.report: dict[str, Any] | None = None

    def _export(self, trainer: L.Trainer) -> HFExport:
        callbacks = list(trainer.callbacks)
        exports = [i for i, callback in enumerate(callbacks) if isinstance(callback, HFExport)]
        if not exports or exports[0] > callbacks.index(self):
            raise ValueError("BenchmarkScores scores what HFExport exports: list an HFExport callback before it")
        return callbacks[exports[0]]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_lora.benchmark import check_installed

        check_installed()
        self._export(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_lora.benchmark import format_table, run_benchmarks
        from lightning_lora.export.hf import write_json_atomically
        from lightning_lora.inference import load_for_generation

        folder = self._export(trainer).dirpath
        trainer.strategy.barrier()  # rank 0 may still be writing the export
        scored = folder / "merged"
        if scored.is_dir():
            model, tokenizer = load_for_generation(scored, device=str(pl_module.device))
        else:  # no merged model (export.json says why): the base plus the adapter
            scored = folder / "adapter"
            base = json.loads((folder / "export.json").read_text(encoding="utf-8"))["base_model_path"]
            model, tokenizer = load_for_generation(base, {"adapter": scored}, device=str(pl_module.device))
        self.report = run_benchmarks(model, tokenizer, self.tasks, **self.settings)
        del model
        if not trainer.is_global_zero or self.report is None:
            return
        self.report["settings"].update(model=str(scored), global_step=trainer.global_step)
        write_json_atomically(folder / REPORT, self.report)
        rank_zero_info(f"BenchmarkScores: wrote {folder / REPORT}\n{format_table(self.report)}")
        (run,) = self.report["runs"].values()
        metrics = {f"benchmark/{name}/acc": entry["acc"]
                   for name, entry in {**run["tasks"], **run["benchmarks"]}.items() if entry.get("acc") is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
