"""Benchmark scores as the field reports them: multiple-choice benchmarks (MMLU and the like) through
lm-evaluation-harness, on a model that :func:`lightning_lora.inference.load_for_generation` loaded
(a merged directory, or a base plus adapters, each adapter scored in turn).

The harness does the prompting (its task files, few-shot examples, chat templates) and the scoring
(log-likelihood of each choice, ``acc`` and, where the task defines it, ``acc_norm``), so the
numbers compare with published ones. What this module adds:

- **Local data** (``data_dir``): MMLU read from MMLU's own layout (``test/<subject>_test.csv``,
  ``dev/<subject>_dev.csv`` for the few-shot examples, ``val/<subject>_val.csv``; no header:
  question, A, B, C, D, answer letter) or from ``<subject>/<split>*.parquet|jsonl|json`` rows with
  ``question``, ``choices`` and ``answer`` (a snapshot of ``cais/mmlu``). Every subject found is
  scored with the harness' MMLU prompt, those that are not among the harness' 57 too (a
  description built from the subject's name). Any other task reads ``<task>/<split>*.<ext>`` with
  the fields of its hub dataset; only the split it is scored on must be there. Nothing is
  downloaded then; a task with no local data (or not its scored split) fails naming the task and the path.
- **Templates**: none by default (the harness' plain prompt, as published numbers are measured);
  ``chat_template`` is the harness' own chat-template mode with the model's template; ``alpaca``,
  ``human_assistant`` and ``plain`` wrap the harness' whole prompt as one instruction of the run's
  training template (:mod:`lightning_lora.templates`).
- **Several processes** (``torchrun``): each rank scores its share of every task (the harness'
  data parallelism over ``torch.distributed``); the result is returned on rank 0 only.
- **The summary**: per task ``acc`` (and ``acc_norm``) with standard errors; per benchmark made of
  subjects (MMLU) the harness' size-weighted accuracy (the published MMLU number) and the macro
  average over its subjects; the macro average over the requested tasks; each question's choice.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["EXTRA", "TEMPLATE_NONE", "check_installed", "format_table", "mmlu_subjects", "run_benchmarks"]

EXTRA = "pip install 'lightning-lora[eval]'"
TEMPLATE_NONE = "none"
_LETTERS = "ABCD"
_SPLIT_FILES = ("parquet", "jsonl", "json", "csv")
_MMLU_SPLIT_DIRS = {"test": "test", "dev": "dev", "validation": "val"}


def check_installed() -> Any:
    """The lm_eval package, or one line naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (the task files' directory)
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise ImportError(f"benchmark tasks need lm-evaluation-harness ({err}): {EXTRA}") from None
    return lm_eval


# ---------------------------------------------------------------------------------------------- data


def _read_split(path: Path) -> list[dict[str, Any]]:
    """The rows of one local data file: CSV with a header, or what training data may be (parquet,
    JSON lines, a JSON list: :func:`lightning_lora.data.read_records`)."""
    from lightning_lora.data import read_records

    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    return read_records(path, key="--data-dir")


def _split_files(folder: Path) -> dict[str, Path]:
    """``{split: file}`` for the files of a folder named ``<split>.<ext>`` or ``<split>-<shard>.<ext>``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        split = re.split(r"[-.]", path.name, maxsplit=1)[0]
        if path.suffix[1:] in _SPLIT_FILES and split not in found:
            found[split] = path
    return found


def _mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    """Rows of an MMLU CSV file (no header: question, four choices, the answer's letter)."""
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if number == 1 and len(record) == 6 and record[5].strip().lower() == "answer":
                continue  # a header line, which MMLU's own files do not have but copies of them may
            if len(record) != 6 or record[5].strip() not in _LETTERS:
                raise ValueError(f"--data-dir: {str(path)!r} line {number} is not MMLU's 'question,A,B,C,D,answer "
                                 f"letter' ({len(record)} fields)")
            rows.append({"question": record[0], "subject": subject, "choices": record[1:5],
                         "answer": _LETTERS.index(record[5].strip())})
    return rows


def _mmlu_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A parquet/JSON row in the task's fields: ``answer`` as an index (a letter or digits are accepted)."""
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip() in _LETTERS:
        answer = _LETTERS.index(answer.strip())
    elif isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or not isinstance(row.get("choices"), list) or "question" not in row:
        raise ValueError(f"--data-dir: a row of {where} lacks question, choices (a list) and answer "
                         "(an index or letter)")
    return {**row, "answer": answer}


def mmlu_subjects(data_dir: Path) -> dict[str, dict[str, Callable[[], list[dict[str, Any]]]]]:
    """The MMLU subjects a local directory holds: ``{subject: {split: reader}}``, from MMLU's CSV
    layout and from ``<subject>/<split>*.<ext>`` folders (an ``all``/``auxiliary_train`` folder is not a subject)."""
    subjects: dict[str, dict[str, Callable[[], list[dict[str, Any]]]]] = {}
    for split, folder in _MMLU_SPLIT_DIRS.items():
        for path in sorted((data_dir / folder).glob(f"*_{folder}.csv")):
            subject = path.name[: -len(f"_{folder}.csv")]
            subjects.setdefault(subject, {})[split] = lambda path=path, subject=subject: _mmlu_csv(path, subject)
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []:
        if folder.name in (*_MMLU_SPLIT_DIRS.values(), "all", "auxiliary_train") or folder.name in subjects:
            continue
        files = _split_files(folder)
        if "test" in files:
            subjects[folder.name] = {
                split: lambda path=path: [_mmlu_row(row, str(path)) for row in _read_split(path)]
                for split, path in files.items()
            }
    return {subject: splits for subject, splits in subjects.items() if "test" in splits}


# --------------------------------------------------------------------------------------------- tasks


# The harness' MMLU variants we serve from local data: its folder, template file and task-name suffix.
_MMLU_VARIANTS = {"default": ("default", "_default_template_yaml", ""),
                  "continuation": ("continuation", "_continuation_template_yaml", "_continuation")}


def _harness_mmlu(variant: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The harness' MMLU prompt of a variant (its template file) and each of its subjects' settings."""
    import yaml

    lm_eval = check_installed()
    folder_name, template_file, _ = _MMLU_VARIANTS[variant]
    folder = Path(lm_eval.tasks.__file__).parent / "mmlu" / folder_name
    template = yaml.safe_load((folder / template_file).read_text(encoding="utf-8"))
    subjects = {}
    for path in folder.glob("mmlu_*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        subjects[config["dataset_name"]] = config
    return template, subjects


def _is_mmlu(name: str) -> bool:
    return name == "mmlu" or name.startswith("mmlu_")


def _mmlu_tasks(name: str, data_dir: Path) -> list[Any]:
    """MMLU from local files: ``mmlu``, a category (``mmlu_stem``) or a subject (``mmlu_anatomy``),
    and the same names of the harness' continuation variant (``mmlu_continuation``,
    ``mmlu_anatomy_continuation``: the choices' own text is scored instead of their letters)."""
    from lm_eval.api.task import ConfigurableTask

    variant = "continuation" if name.endswith("_continuation") else "default"
    suffix = _MMLU_VARIANTS[variant][2]
    stem = name[: len(name) - len(suffix)] if suffix else name
    template, known = _harness_mmlu(variant)
    local = mmlu_subjects(data_dir)
    subject = stem[len("mmlu_"):]
    if stem == "mmlu":
        wanted = sorted(local)
    elif subject in local or subject in known:
        wanted = [subject]
    else:  # a category: the local subjects the harness files under it
        tag = f"{stem}_tasks" if variant == "default" else f"{stem}_continuation"
        wanted = sorted(s for s in local if known.get(s, {}).get("tag") == tag)
    missing = [s for s in wanted if s not in local] or ([] if wanted else [subject or "<subject>"])
    if missing:
        csv_path = data_dir / "test" / f"{missing[0]}_test.csv"
        raise ValueError(f"--tasks: {name!r} has no local data: looked for {str(csv_path)!r} and "
                         f"{str(data_dir / missing[0])!r}/test.parquet|jsonl|json (--data-dir={str(data_dir)!r})")
    # A subject the harness does not know is described as it describes its own (abstract algebra's wording).
    model_description = known["abstract_algebra"]["description"]
    tasks = []
    for subject in wanted:
        readers = local[subject]
        config = {key: value for key, value in template.items() if key not in ("dataset_path", "metadata")}
        if "dev" not in readers:  # no few-shot examples of its own: they come from the test split
            config.pop("fewshot_split", None)
        description = known.get(subject, {}).get("description") or model_description.replace(
            "abstract algebra", subject.replace("_", " "))
        config.update(task=f"mmlu_{subject}{suffix}", task_alias=subject, description=description,
                      custom_dataset=lambda readers=readers, **_: _dataset_dict(readers))
        tasks.append(ConfigurableTask(config=config))
    return tasks


def _dataset_dict(readers: Mapping[str, Callable[[], list[dict[str, Any]]]]) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read()) for split, read in readers.items()})


@contextmanager
def _local_data(data_dir: Path) -> Iterator[None]:
    """While a task is built, its data comes from ``data_dir/<task>/<split>*.<ext>`` instead of the hub."""
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download

    def download(self: Any, dataset_kwargs: Any = None, **kwargs: Any) -> None:
        folder = data_dir / self.config.task
        files = _split_files(folder)
        scored = self.config.test_split or self.config.validation_split  # the split the harness scores
        if scored not in files:
            wanted = f"{scored}*" if files else "<split>"
            raise ValueError(f"--tasks: {self.config.task!r} has no local data: looked for "
                             f"{str(folder)!r}/{wanted}.parquet|jsonl|json|csv (--data-dir={str(data_dir)!r})")
        import datasets

        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(_read_split(path))
                                             for split, path in files.items()})
        _forget_missing_splits(self.config, set(files))

    ConfigurableTask.download = download
    try:
        yield
    finally:
        ConfigurableTask.download = original


def _forget_missing_splits(config: Any, present: set[str]) -> None:
    """A local copy may hold only the split that is scored: the task's other splits (its training and
    few-shot sources) that have no file are taken as absent, as for a task that defines none; the
    harness then takes few-shot examples from what is there."""
    for name in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if getattr(config, name, None) is not None and getattr(config, name) not in present:
            setattr(config, name, None)
    fewshot = getattr(config, "fewshot_config", None)  # where lm-eval 0.4.13 keeps the few-shot split too
    if getattr(fewshot, "split", None) not in (None, *present):
        fewshot.split = None


@functools.cache
def _task_manager(defaults: bool) -> Any:
    """The harness' index of its task files (about 10 s to build: once a process); without
    ``defaults`` an empty one, for runs of our own local MMLU tasks only."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults)


def _build_tasks(names: Sequence[str], data_dir: Path | None) -> tuple[list[Any], dict[str, list[str]]]:
    """The harness tasks to run, and which leaf tasks each requested name stands for (filled in
    after the run for names the harness expands itself)."""
    tasks: list[Any] = []
    members: dict[str, list[str]] = {}
    for name in names:
        if data_dir is not None and _is_mmlu(name):
            built = _mmlu_tasks(name, data_dir)
            tasks += built
            members[name] = [task.config.task for task in built]
        elif data_dir is not None:
            with _local_data(data_dir):
                loaded = _task_manager(True).load([name])
            tasks += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
            members[name] = sorted(loaded["tasks"])
        else:
            tasks.append(name)
            members[name] = []
    return tasks, members


# ----------------------------------------------------------------------------------------- the model


def _harness_lm(model: Any, tokenizer: Any, batch_size: int, template: str) -> Any:
    """The harness' Hugging Face model class around our loaded model: our training templates as its
    chat format, and its data parallelism over ``torch.distributed`` when several processes run."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from lightning_lora.templates import render_alpaca

    class HarnessLM(HFLM):
        def __init__(self) -> None:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # HFLM's private _rank/_world_size (its rank/world_size properties read them), set as its
                # own Accelerate path sets them; given a loaded model it assumes one process.
                self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self) -> None:
            if self.world_size > 1:
                torch.distributed.barrier()

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if template == "chat_template":
                return super().apply_chat_template(chat_history, add_generation_prompt)
            # The task's description (the harness' system turn) and question, as one instruction.
            instruction = "\n\n".join(turn["content"].strip() for turn in chat_history)
            return render_alpaca(instruction, "", template, self.tokenizer)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            if template == "chat_template":
                return super().chat_template(chat_template)
            return f"lightning_lora template {template!r}"

    return HarnessLM()


# ------------------------------------------------------------------------------------------- the run


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    data_dir: str | Path | None = None,
    template: str = TEMPLATE_NONE,
    batch_size: int = 8,
    limit: int | None = None,
    runs: Mapping[str, tuple[str | None, bool]] | None = None,
    samples: bool = False,
) -> dict[str, Any] | None:
    """Score ``model`` on harness tasks; returns the report (see the module docstring), or ``None``
    on ranks other than 0 of a multi-process run.

    Args:
        model, tokenizer: as :func:`lightning_lora.inference.load_for_generation` returns them.
        tasks: harness task or group names (``mmlu``, ``arc_easy``, ``mmlu_anatomy``, ...).
        num_fewshot: few-shot examples per question (default: each task's own, 0 for MMLU).
        data_dir: local data (see the module docstring); ``None`` lets the harness download.
        template: ``none`` (the harness' prompt), ``chat_template`` or a training template name.
        limit: score only the first ``limit`` questions of each task (a quick look, not a result).
        runs: ``{label: (adapter, disable_adapters)}``, each scored in turn; default: the model as loaded.
        samples: add each question's prompt, choices and log-likelihoods to the report.
    """
    import torch

    from lightning_lora.inference import _adapter_context, _check_template

    lm_eval = check_installed()
    names = [name.strip() for name in tasks if name.strip()]
    if not names:
        raise ValueError(f"--tasks={','.join(tasks)!r} names no task")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot={num_fewshot!r} must be >= 0")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit!r} must be >= 1")
    if template != TEMPLATE_NONE:
        _check_template(template, tokenizer)
    folder = None if data_dir is None else Path(data_dir)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--data-dir={str(data_dir)!r} is not a directory")
    lm = _harness_lm(model, tokenizer, batch_size, template)
    report: dict[str, Any] = {"runs": {}}
    for label, (adapter, disable) in (runs or {"model": (None, False)}).items():
        built, members = _build_tasks(names, folder)
        with _adapter_context(model, adapter, disable), torch.no_grad():
            result = lm_eval.simple_evaluate(
                model=lm, tasks=built, task_manager=_task_manager(any(isinstance(t, str) for t in built)),
                num_fewshot=num_fewshot, limit=limit, log_samples=True,
                apply_chat_template=template != TEMPLATE_NONE, fewshot_as_multiturn=template == "chat_template",
                verbosity="ERROR",
            )
        if result is None:  # a rank other than 0: the harness gathered everything on rank 0
            continue
        report["runs"][label] = _summarize(result, names, members, samples)
        report["settings"] = _settings(result, model, num_fewshot, template, folder, limit)
    return report if report["runs"] else None


def _subtasks(name: str, groups: Mapping[str, list[str]]) -> list[str]:
    """The leaf tasks under a harness group, through its subgroups."""
    leaves = []
    for child in groups.get(name, []):
        leaves += _subtasks(child, groups) if child in groups else [child]
    return leaves


def _summarize(result: dict[str, Any], names: list[str], members: dict[str, list[str]],
               samples: bool) -> dict[str, Any]:
    scores, counts = result["results"], result["n-samples"]
    groups = {key: list(value) for key, value in (result.get("group_subtasks") or {}).items()}
    tasks: dict[str, dict[str, Any]] = {}
    for task, metrics in scores.items():
        if task not in counts:
            continue  # a group's line: recomputed below from its subjects
        entry: dict[str, Any] = {"questions": counts[task]["effective"]}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                entry[metric] = metrics[f"{metric},none"]
                stderr = metrics.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
        tasks[task] = entry
    summary: dict[str, Any] = {"tasks": tasks, "benchmarks": {}}
    for name in names:
        leaves = members[name] or (_subtasks(name, groups) if name in groups else [name])
        if len(leaves) > 1 or name not in tasks:
            aggregate = _aggregate([tasks[leaf] for leaf in leaves if leaf in tasks])
            summary["benchmarks"][name] = {**aggregate, "tasks": leaves}
    top = [summary["benchmarks"].get(name) or tasks.get(name) for name in names]
    accs = [entry["acc"] for entry in top if entry and entry.get("acc") is not None]
    summary["macro_average"] = {"acc": sum(accs) / len(accs) if accs else None, "over": names}
    summary["answers"] = {task: _answers(rows) for task, rows in result.get("samples", {}).items()}
    if samples:
        summary["samples"] = {task: [_sample(row) for row in rows] for task, rows in result.get("samples", {}).items()}
    return summary


def _aggregate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A benchmark of subjects: the size-weighted accuracy (the harness' group number, and the
    published MMLU figure) with its pooled standard error, and the macro average over subjects."""
    scored = [e for e in entries if e.get("acc") is not None]
    if not scored:
        return {"acc": None, "subjects": 0}
    n = sum(e["questions"] for e in scored)
    acc = sum(e["acc"] * e["questions"] for e in scored) / n
    stderrs = [e.get("acc_stderr") for e in scored]
    pooled = None
    if all(s is not None for s in stderrs) and n > len(scored):
        # The harness' pooled_sample_stderr: the subjects' sample variances pooled, over the total count.
        variance = sum((e["questions"] - 1) * s**2 * e["questions"] for e, s in zip(scored, stderrs))
        variance /= n - len(scored)
        pooled = math.sqrt(variance / n)
    macro = sum(e["acc"] for e in scored) / len(scored)
    macro_stderr = None
    if all(s is not None for s in stderrs):  # independent subjects: the mean's variance is the sum's / k^2
        macro_stderr = math.sqrt(sum(s**2 for s in stderrs)) / len(scored)
    return {"acc": acc, "acc_stderr": pooled, "macro_acc": macro, "macro_acc_stderr": macro_stderr,
            "questions": n, "subjects": len(scored)}


def _answers(rows: list[dict[str, Any]]) -> list[int]:
    """Each question's choice (the highest log-likelihood), in question order."""
    ordered = sorted(rows, key=lambda row: row["doc_id"])
    return [max(range(len(row["filtered_resps"])), key=lambda i: row["filtered_resps"][i][0]) for row in ordered]


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    return {"doc_id": row["doc_id"], "target": row["target"], "context": row["arguments"][0][0],
            "continuations": [argument[1] for argument in row["arguments"]],
            "loglikelihoods": [resp[0] for resp in row["filtered_resps"]]}


def _settings(result: dict[str, Any], model: Any, num_fewshot: int | None, template: str, data_dir: Path | None,
              limit: int | None) -> dict[str, Any]:
    from lightning_lora.versions import installed_versions

    versions = {name: version for name, version in installed_versions().items() if version}
    return {
        "num_fewshot": {task: shots for task, shots in (result.get("n-shot") or {}).items()},
        "num_fewshot_requested": num_fewshot, "template": template,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "data_dir": None if data_dir is None else str(data_dir), "limit": limit,
        "versions": versions,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a short table: a block per run, a line per requested task or benchmark, its subjects indented."""
    lines = []
    settings = report["settings"]
    for label, run in report["runs"].items():
        lines.append(f"{label}  (template {settings['template']}, dtype {settings['dtype']}"
                     + (f", first {settings['limit']} questions a task" if settings["limit"] else "") + ")")
        lines.append(f"  {'task':<32}{'acc':>8}{'± stderr':>10}{'acc_norm':>10}{'n':>7}")
        listed = set()
        for name in run["macro_average"]["over"]:
            bench = run["benchmarks"].get(name)
            if bench is not None:
                lines.append(_row(f"{name} ({bench['subjects']} subjects)", bench))
                lines += [_row(f"  {leaf}", run["tasks"][leaf]) for leaf in bench["tasks"] if leaf in run["tasks"]]
                lines.append(_row("  macro average of subjects", {"acc": bench.get("macro_acc"),
                                                                  "acc_stderr": bench.get("macro_acc_stderr")}))
                listed.update(bench["tasks"])
            elif name in run["tasks"]:
                lines.append(_row(name, run["tasks"][name]))
        if len(run["macro_average"]["over"]) > 1:
            lines.append(_row("macro average", run["macro_average"]))
    return "\n".join(lines)


def _row(name: str, entry: Mapping[str, Any]) -> str:
    def number(value: Any, width: int) -> str:
        return f"{value:>{width}.4f}" if isinstance(value, float) else f"{'-':>{width}}"

    count = entry.get("questions")
    return (f"  {name:<32}{number(entry.get('acc'), 8)}{number(entry.get('acc_stderr'), 10)}"
            f"{number(entry.get('acc_norm'), 10)}{count if count is not None else '':>7}")
