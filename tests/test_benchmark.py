"""Benchmarks through lm-evaluation-harness (``lightning-lora evaluate --tasks``, lightning_lora/benchmark.py).

The questions are the quickstart's own task families (its held-out rows) asked as four-choice
questions in MMLU's file layout: ``arithmetic`` (additions, sequences: the right number and three
near it) and ``letters`` (a word reversed, upper-cased or sorted: the instructed one and the
other two, and the word itself). The harness' MMLU continuation variant scores each choice's text.
The fine-tuned model is the quickstart config trained on its training rows asked the way that
variant asks (a model this small answers only in the format it was trained in). Checked
independently of the harness: the choices against log-likelihoods computed here with the model's
own forward pass, the prompts against what each template says.
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, built_once, fit_quickstart, shared_dir

from lightning_lora.benchmark import run_benchmarks
from lightning_lora.cli import evaluate_main
from lightning_lora.inference import load_for_generation
from lightning_lora.tiny import quickstart_rows

TASK = "mmlu_continuation"
QUESTIONS = 30  # a subject
FAMILIES = {
    "arithmetic": ("Add the two numbers.", "Continue the sequence with the next number."),
    "letters": ("Reverse the letters of the word.", "Write the word in upper case.",
                "Sort the letters of the word alphabetically."),
}


def _choices(row: dict[str, str]) -> list[str]:
    """The right answer first, then three wrong ones of the same kind."""
    if row["instruction"].startswith("Add"):
        a, b = map(int, row["input"].split(" + "))
        return [str(a + b), str(a + b + 10), str(abs(a - b)), str(a + b - 10)]
    if row["instruction"].startswith("Continue"):
        *_, before, last = (int(n) for n in row["input"].split(", "))
        step = last - before
        return [str(last + step), str(last + 2 * step), str(last), str(last - step)]
    word = row["input"]
    transforms = {"Reverse": word[::-1], "Write": word.upper(), "Sort": "".join(sorted(word))}
    right = transforms.pop(row["instruction"].split()[0])
    return [right, *transforms.values(), word]


def _questions(rows: list[dict[str, str]], instructions: tuple[str, ...], seed: int) -> list[list[str]]:
    """MMLU CSV rows (question, A, B, C, D, answer letter), the choices in a seeded order."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        choices = _choices(row) if row["instruction"] in instructions else []
        if len(set(choices)) < 4:
            continue  # not this subject, or a word whose forms coincide
        right = choices[0]
        rng.shuffle(choices)
        out.append([f"{row['instruction']}\n\n{row['input']}", *choices, "ABCD"[choices.index(right)]])
    return out


def _write_mmlu(folder: Path) -> Path:
    """The quickstart's held-out rows as MMLU's test split (QUESTIONS a subject), 5 training rows a
    subject as its dev split."""
    for split, rows in (("test", quickstart_rows("test")), ("dev", quickstart_rows("train")[:60])):
        (folder / split).mkdir(parents=True)
        for subject, instructions in FAMILIES.items():
            questions = _questions(rows, instructions, seed=len(subject))
            with open(folder / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(questions[:5] if split == "dev" else questions[:QUESTIONS])
    return folder


@pytest.fixture(scope="session")
def mmlu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shared_dir(tmp_path_factory) / "benchmark-mmlu"
    with built_once(folder) as needed:
        if needed:
            _write_mmlu(folder)
    return folder


@pytest.fixture(scope="session")
def trained_on_questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart config trained on its training rows as the continuation variant asks them
    ("<description>\\n\\nQuestion: <instruction>\\n\\n<input>\\nAnswer: <output>"); its export
    is ``runs/quickstart/export/{adapter,merged}`` under the returned directory."""
    root = shared_dir(tmp_path_factory) / "benchmark-trained"
    with built_once(root) as needed:
        if needed:
            root.mkdir()
            texts = []
            for split in ("train", "test"):
                rows = [{"text": f"The following are questions (with answers) about {subject}.\n\nQuestion: "
                                 f"{row['instruction']}\n\n{row['input']}\nAnswer: {row['output']}"}
                        for row in quickstart_rows(split) for subject, kinds in FAMILIES.items()
                        if row["instruction"] in kinds]
                texts.append(root / f"{split}.jsonl")
                texts[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
            fit_quickstart(root, tmp_path_factory, f"--data.data_path={texts[0]}", f"--data.val_data_path={texts[1]}")
    return root


def _evaluate(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = evaluate_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_fine_tuned_quickstart_beats_chance_and_its_base_and_merged_equals_base_plus_adapter(
    trained_on_questions: Path, mmlu_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = trained_on_questions / "runs/quickstart/export"
    common = ["--tasks", TASK, "--data-dir", str(mmlu_dir), "--device", "cpu"]
    reports = {}
    for name, model in (("merged", ["--model", str(export / "merged")]),
                        ("adapter", ["--model", "builtin:tiny-llama", "--adapter", f"quickstart={export / 'adapter'}"]),
                        ("base", ["--model", "builtin:tiny-llama"])):
        code, out, err = _evaluate([*model, *common, "--output", str(tmp_path / f"{name}.json")], capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert f"{TASK} (2 subjects)" in out and "mmlu_arithmetic_continuation" in out  # the terminal table
    (merged,), (adapter,), (base,) = (list(reports[n]["runs"].values()) for n in ("merged", "adapter", "base"))
    assert list(reports["adapter"]["runs"]) == ["adapter 'quickstart'"]
    summary = {name: list(r["runs"].values())[0]["benchmarks"][TASK] for name, r in reports.items()}
    shown = ("acc", "acc_stderr", "macro_acc", "questions")
    print(json.dumps({name: {k: s[k] for k in shown} for name, s in summary.items()}))
    # Every question of the held-out families, each subject scored, the summary's arithmetic.
    assert summary["merged"]["subjects"] == 2 and summary["merged"]["questions"] == 2 * QUESTIONS
    tasks = merged["tasks"]
    subjects = [tasks[f"mmlu_{s}_continuation"] for s in FAMILIES]
    weighted = sum(t["acc"] * t["questions"] for t in subjects) / sum(t["questions"] for t in subjects)
    assert summary["merged"]["acc"] == pytest.approx(weighted)
    assert summary["merged"]["macro_acc"] == pytest.approx(sum(t["acc"] for t in subjects) / 2)
    # The merged directory and the base + adapter are one model: the same choice for every question.
    assert merged["answers"] == adapter["answers"]
    # Fine-tuning shows: well above chance (1/4) and above the untrained base.
    assert summary["merged"]["acc"] > 0.25 + 3 * summary["merged"]["acc_stderr"]
    assert summary["merged"]["acc"] > summary["base"]["acc"] + 0.2
    assert reports["merged"]["settings"]["template"] == "none"
    assert reports["merged"]["settings"]["num_fewshot"] == {f"mmlu_{s}_continuation": 0 for s in FAMILIES}


def _log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) by the model's own forward pass: the continuation's tokens are
    those that ``context + continuation`` has beyond the context's own, a space that ends the
    context counted with the continuation (where a BPE tokenizer puts it: " 78" is one token)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    assert whole[: len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_the_harness_choice_is_the_argmax_of_log_likelihoods_computed_here(trained_on_questions: Path,
                                                                            mmlu_dir: Path) -> None:
    model, tokenizer = load_for_generation(trained_on_questions / "runs/quickstart/export/merged", device="cpu")
    report = run_benchmarks(model, tokenizer, ["mmlu_letters_continuation"], data_dir=mmlu_dir,
                            template="human_assistant", limit=6, samples=True)
    run = report["runs"]["model"]
    samples = run["samples"]["mmlu_letters_continuation"]
    assert len(samples) == 6
    for sample, answer in zip(sorted(samples, key=lambda s: s["doc_id"]), run["answers"]["mmlu_letters_continuation"]):
        ours = [_log_likelihood(model, tokenizer, sample["context"], c) for c in sample["continuations"]]
        assert max(range(4), key=ours.__getitem__) == answer
        assert ours == pytest.approx(sample["loglikelihoods"], abs=1e-3)


def test_templates_change_the_prompt_as_they_say(llama_base: Path, mmlu_dir: Path) -> None:
    model, tokenizer = load_for_generation(llama_base, device="cpu")
    contexts = {}
    for template in ("none", "human_assistant", "alpaca", "chat_template"):
        report = run_benchmarks(model, tokenizer, ["mmlu_arithmetic"], data_dir=mmlu_dir, template=template, limit=1,
                                samples=True)
        sample = report["runs"]["model"]["samples"]["mmlu_arithmetic"][0]
        contexts[template] = sample["context"]
        # MMLU's own variant asks for the letter; a chat format asks for it right after its own turn marker.
        assert sample["continuations"] == ([" A", " B", " C", " D"] if template == "none" else ["A", "B", "C", "D"])
    description = "The following are multiple choice questions (with answers) about arithmetic."
    with open(mmlu_dir / "test" / "arithmetic_test.csv", newline="") as handle:
        first = next(csv.reader(handle))
    question = f"{first[0]}\nA. {first[1]}\nB. {first[2]}\nC. {first[3]}\nD. {first[4]}\nAnswer:"
    assert contexts["none"] == f"{description}\n\n{question}"
    # Our training templates take the description and question as one instruction.
    assert contexts["human_assistant"] == f"Human: {description}\n\n{question}\n\nAssistant: "
    assert contexts["alpaca"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{description}\n\n{question}\n\n### Response:\n")
    # The model's chat template: the description as the system turn, the question as the user's.
    assert contexts["chat_template"] == tokenizer.apply_chat_template(
        [{"role": "system", "content": f"{description}\n\n"}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)


def test_local_data_in_other_layouts_and_missing_data(llama_base: Path, mmlu_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The same questions as JSON lines (question, choices, answer: a cais/mmlu snapshot's fields).
    other = tmp_path / "jsonl"
    for split in ("test", "dev"):
        with open(mmlu_dir / split / f"arithmetic_{split}.csv", newline="") as handle:
            rows = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in csv.reader(handle)]
        (other / "arithmetic").mkdir(parents=True, exist_ok=True)
        (other / "arithmetic" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = []
    for folder, device in ((mmlu_dir, "cpu"), (other, "auto")):  # auto: Accelerate places it (here: the CPU)
        model, tokenizer = load_for_generation(llama_base, device=device)
        answers.append(run_benchmarks(model, tokenizer, ["mmlu_arithmetic"], data_dir=folder, num_fewshot=2, limit=8)
                       ["runs"]["model"]["answers"]["mmlu_arithmetic"])
    assert answers[0] == answers[1] and len(answers[0]) == 8
    # A task the harness defines (ARC) from a local copy in its dataset's fields: the rows scored are
    # the file's, asked as ARC asks, each choice the argmax of log-likelihoods computed here.
    questions = [json.loads(line) for line in (other / "arithmetic" / "test.jsonl").read_text().splitlines()]
    arc = [{"id": str(i), "question": q["question"], "answerKey": "ABCD"[q["answer"]],
            "choices": {"text": q["choices"], "label": list("ABCD")}} for i, q in enumerate(questions)]
    (tmp_path / "arc" / "arc_easy").mkdir(parents=True)
    (tmp_path / "arc" / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc[:4]))
    run = run_benchmarks(model, tokenizer, ["arc_easy"], data_dir=tmp_path / "arc", samples=True)["runs"]["model"]
    samples = sorted(run["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    assert run["tasks"]["arc_easy"]["questions"] == len(samples) == 4
    for sample, row, answer in zip(samples, arc, run["answers"]["arc_easy"]):
        assert sample["context"] == f"Question: {row['question']}\nAnswer:" and sample["target"] == "ABCD".index(
            row["answerKey"])
        ours = [_log_likelihood(model, tokenizer, sample["context"], c) for c in sample["continuations"]]
        assert sample["continuations"] == [f" {choice}" for choice in row["choices"]["text"]]
        assert max(range(4), key=ours.__getitem__) == answer
    capsys.readouterr()  # what the harness logged so far
    # A task with no local data, or none of the split it is scored on, fails in one line naming the
    # task and where it looked.
    (tmp_path / "arc-train" / "arc_easy").mkdir(parents=True)
    (tmp_path / "arc-train" / "arc_easy" / "train.jsonl").write_text(json.dumps(arc[0]) + "\n")
    for task, folder, looked in (
        ("arc_easy", mmlu_dir, f"'{mmlu_dir / 'arc_easy'}'/<split>.parquet|jsonl|json|csv"),
        ("arc_easy", tmp_path / "arc-train", f"'{tmp_path / 'arc-train' / 'arc_easy'}'/test*.parquet|jsonl|json|csv"),
        ("mmlu_anatomy", mmlu_dir, f"'{mmlu_dir / 'test' / 'anatomy_test.csv'}'"),
    ):
        code, out, err = _evaluate(["--model", str(llama_base), "--tasks", task, "--data-dir", str(folder),
                                    "--device", "cpu"], capsys)
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        assert err.startswith(f"lightning-lora evaluate: error: --tasks: {task!r} has no local data: "
                              f"looked for {looked}")


def test_mmlu_files_as_copies_of_them_come(tmp_path: Path) -> None:
    from lightning_lora.benchmark import mmlu_subjects

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text('question,A,B,C,D,answer\n"Two\nlines?",a,b,c,d,C\n')
    (tmp_path / "anatomy2").mkdir()  # a cais/mmlu parquet snapshot's naming; answers as digits in strings
    (tmp_path / "anatomy2" / "test-00000-of-00001.jsonl").write_text(
        json.dumps({"question": "Two\nlines?", "choices": ["a", "b", "c", "d"], "answer": "2"}) + "\n")
    (tmp_path / "all").mkdir()  # cais/mmlu's every-subject folder: not a subject
    (tmp_path / "all" / "test.jsonl").write_text("")
    subjects = mmlu_subjects(tmp_path)
    assert sorted(subjects) == ["anatomy", "anatomy2"]
    assert subjects["anatomy"]["test"]() == [{"question": "Two\nlines?", "subject": "anatomy",
                                              "choices": ["a", "b", "c", "d"], "answer": 2}]
    assert subjects["anatomy2"]["test"]()[0]["answer"] == 2
    (tmp_path / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"anatomy_test.csv' line 1 is not MMLU's 'question,A,B,C,D,answer letter'"):
        subjects = mmlu_subjects(tmp_path)["anatomy"]["test"]()


def test_without_the_eval_extra_one_line_names_it(llama_base: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-evaluation-harness imports
    code, out, err = _evaluate(["--model", str(llama_base), "--tasks", "mmlu", "--device", "cpu"], capsys)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("lightning-lora evaluate: error: benchmark tasks need lm-evaluation-harness")
    assert err.endswith(": pip install 'lightning-lora[eval]'\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_share_the_questions_and_rank_0_prints_one_result(
    trained_on_questions: Path, mmlu_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merged = str(trained_on_questions / "runs/quickstart/export/merged")
    common = ["--model", merged, "--tasks", TASK, "--data-dir", str(mmlu_dir), "--template", "human_assistant",
              "--device", "cpu"]
    code, _, err = _evaluate([*common, "--output", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "lightning_lora", "evaluate", *common, "--output", str(tmp_path / "two.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"{TASK} (2 subjects)") == 1  # one table, from rank 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["runs"]["model"] for n in ("one", "two"))
    assert two["answers"] == one["answers"]  # every question scored once, by one of the ranks
    for task, scores in one["tasks"].items():  # the standard errors summed in another order
        assert two["tasks"][task] == pytest.approx(scores, rel=1e-12), task


def test_a_run_ends_with_its_benchmark_scores_beside_its_export(llama_base: Path, mmlu_dir: Path,
                                                                 tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_lora import InstructionDataModule, LoraFinetuneModule
    from lightning_lora.callbacks import BenchmarkScores, HFExport

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in quickstart_rows("train")[:16]))

    def fit(callbacks: list) -> None:
        trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                            logger=CSVLogger(tmp_path, name="logs", version=0), default_root_dir=tmp_path)
        module = LoraFinetuneModule(str(llama_base), target_modules=["q_proj", "v_proj"])
        datamodule = InstructionDataModule(str(data), tokenizer=str(llama_base), batch_size=4, max_length=64,
                                           template="human_assistant")
        trainer.fit(module, datamodule=datamodule)

    settings = {"tasks": "mmlu_arithmetic", "data_dir": str(mmlu_dir), "limit": 8}
    with pytest.raises(ValueError, match="BenchmarkScores scores what HFExport exports: list an HFExport callback "
                                         "before it"):
        fit([BenchmarkScores(**settings), HFExport(dirpath=str(tmp_path / "early"))])  # refused before training
    assert not (tmp_path / "early").exists()
    fit([HFExport(dirpath=str(tmp_path / "export")), BenchmarkScores(**settings)])
    report = json.loads((tmp_path / "export" / "benchmarks.json").read_text())
    # What the exported merged directory scores when loaded on its own.
    model, tokenizer = load_for_generation(tmp_path / "export" / "merged", device="cpu")
    alone = run_benchmarks(model, tokenizer, ["mmlu_arithmetic"], data_dir=mmlu_dir, limit=8)
    assert report["runs"]["model"]["answers"] == alone["runs"]["model"]["answers"]
    assert report["runs"]["model"]["tasks"] == alone["runs"]["model"]["tasks"]
    assert report["settings"]["model"] == str(tmp_path / "export" / "merged") and report["settings"]["global_step"] == 2
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "benchmark/mmlu_arithmetic/acc" in logged.splitlines()[0]
