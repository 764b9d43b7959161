"""Shared fixtures: tiny base models built from config (never downloaded), one per architecture."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Keep the 2-core CI machine responsive when several processes run; DeepSpeed must never look for a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``smoke`` marks the tests listed in :data:`SMOKE`; ``gpu`` tests need a CUDA device (without one
    they are reported as skipped, with the reason)."""
    for item in items:
        if is_smoke(item.nodeid):
            item.add_marker(pytest.mark.smoke)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: benchmarks/gpu_session.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The smoke tier (``pytest -m smoke``; scripts/compat.sh runs it against each dependency set): one test
# through every place where we rely on another package's internals. A test id without parameters
# takes all of its parameters. tests/test_compat.py checks that each entry names a collected test.
SMOKE = (
    # Two-process DeepSpeed fits with HFExport: ZeRO-2 and ZeRO-3, Llama and tied Qwen2.
    "tests/test_export.py::test_export_matches_an_independent_merge[zero2-shared-export]",
    "tests/test_export.py::test_export_matches_an_independent_merge[zero2-qwen2-tied]",
    "tests/test_export.py::test_export_matches_an_independent_merge[zero3-bf16]",
    "tests/test_export.py::test_export_matches_an_independent_merge[zero3-qwen2-tied-lm-head-trained]",
    # Model classes first imported inside deepspeed.zero.Init (transformers' kernels decorators).
    "tests/test_deepspeed_fit.py::test_model_classes_first_imported_inside_zero_init_build_and_run_after_it",
    "tests/test_model_classes.py::test_only_classes_created_inside_zero_init_are_restored_and_then_run",
    # The export command on a ZeRO-3 checkpoint (zero_to_fp32's internals) and on a sharded FSDP one
    # (torch.distributed.checkpoint's readers).
    "tests/test_export.py::test_callback_and_command_produce_the_same_export",
    "tests/test_export.py::test_fsdp_checkpoints_export_like_the_others[sharded]",
    # QLoRA fit and export (bitsandbytes' 4-bit layers, PEFT's k-bit preparation).
    "tests/test_qlora.py::test_callback_export_and_held_out_loss",
    # The restricted loader: every type real checkpoints hold is on its allowlist (ZeRO 1/2/3 with and
    # without frozen weights, QLoRA, FSDP's two layouts); zero_to_fp32 reads only through torch.load;
    # torch.distributed.checkpoint's reader takes our .metadata reader.
    *(f"tests/test_unpickle.py::test_real_checkpoints_name_only_allowed_types[{name}]" for name in (
        "zero1-bf16", "zero2-exclude-frozen", "zero3-bf16", "zero3-exclude-frozen", "qlora-llama-nf4", "fsdp-full",
        "fsdp-sharded")),
    "tests/test_unpickle.py::test_zero_to_fp32_reads_only_through_torch_load",
    "tests/test_unpickle.py::test_a_needed_foreign_object_fails_in_one_line_naming_file_key_and_type[fsdp-sharded]",
    # Every shipped preset parsed by LightningCLI (jsonargparse, the strategies' signatures).
    "tests/test_cli.py::test_every_shipped_yaml_parses",
    # Benchmarks through lm-evaluation-harness: its HFLM with our model, its task index and task
    # building with local data, its chat-template mode.
    "tests/test_benchmark.py::test_templates_change_the_prompt_as_they_say",
    "tests/test_benchmark.py::test_local_data_in_other_layouts_and_missing_data",
    # generate and evaluate on a trained model.
    "tests/test_inference.py::test_generate_command",
    "tests/test_inference.py::test_evaluate_equals_masked_cross_entropy_computed_here",
)


def is_smoke(nodeid: str) -> bool:
    return any(nodeid == entry or nodeid.startswith(f"{entry}[") for entry in SMOKE)


@pytest.fixture
def lightning_log(caplog: pytest.LogCaptureFixture):
    """``rank_zero_info`` logs to ``lightning.pytorch.utilities.rank_zero``; ``lightning.pytorch`` may not propagate."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory all pytest-xdist workers of this session share (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextmanager
def built_once(directory: Path) -> Iterator[bool]:
    """Under a lock shared by the xdist workers: yields whether ``directory`` still has to be built.
    A build that raises leaves no ``.done`` mark, so the next worker that needs it tries again."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    done = directory.with_name(f"{directory.name}.done")
    with open(directory.with_name(f"{directory.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        needed = not done.exists()
        if needed and directory.exists():
            shutil.rmtree(directory)  # what a failed build left
        yield needed
        done.touch()


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny Llama, Qwen2 (tied embeddings), GPT-2 (Conv1D) and Bloom bases with a tokenizer,
    built once per session and shared by the xdist workers (trained runs record their base's path)."""
    from lightning_lora.tiny import ARCHITECTURES, build_tiny_base

    root = shared_dir(tmp_path_factory) / "bases"
    with built_once(root) as needed:
        if needed:
            for arch in ARCHITECTURES:
                build_tiny_base(root / arch, arch=arch)
    return {arch: root / arch for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_base(tiny_bases: dict[str, Path]) -> Path:
    return tiny_bases["llama"]


def fit_quickstart(root: Path, tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> None:
    """Train the shipped quickstart config in ``root`` (with CLI ``overrides``): its export is
    ``root/runs/quickstart/export/{adapter,merged}``, its data ``root/data/quickstart/``."""
    from lightning_lora.cli import main

    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copytree(REPO / "data", root / "data")
    with pytest.MonkeyPatch.context() as patch:
        # The config writes under runs/ and reads data/, relative to the working directory; its
        # builtin:tiny-llama is built into the session's cache (a session fixture runs before _isolated_cache).
        patch.setenv("LIGHTNING_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "builtin-cache"))
        patch.chdir(root)
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", *overrides])


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped quickstart trained as shipped (10 epochs, about 20 s on 2 CPU cores), once per
    session, shared by the xdist workers (see :func:`fit_quickstart`)."""
    root = shared_dir(tmp_path_factory) / "quickstart"
    with built_once(root) as needed:
        if needed:
            fit_quickstart(root, tmp_path_factory)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``builtin:`` models are built into a per-session cache, not the user's home."""
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "builtin-cache"))


SCRIPT = REPO / "tests" / "scripts" / "train_run.py"

# Initialisations that rewrite the base: (run name, init_lora_weights, extra arguments). CorDA and
# LoRA-GA need calibration data, which a user's own module prepares as PEFT documents.
_REWRITING = [("pissa", "pissa", []), ("pissa-niter", "pissa_niter_4", []), ("olora", "olora", []),
              ("corda", "corda", ["--user-module", "--export"]), ("lora-ga", "lora_ga", ["--user-module", "--export"])]

# name -> (architecture, train_run.py arguments). ``--record`` runs are also resumed by test_deepspeed_fit.py.
RUNS: dict[str, tuple[str, list[str]]] = {
    "single-fp32": ("llama", ["--strategy", "single"]),
    "single-bf16": ("llama", ["--strategy", "single", "--precision", "bf16-mixed"]),
    "ddp-fp32": ("llama", ["--strategy", "ddp", "--devices", "2"]),
    "ddp-bf16": ("llama", ["--strategy", "ddp", "--devices", "2", "--precision", "bf16-mixed"]),
    "zero1-fp32": ("llama", ["--strategy", "deepspeed", "--stage", "1", "--devices", "2"]),
    "zero1-bf16": ("llama", ["--strategy", "deepspeed", "--stage", "1", "--devices", "2", "--precision", "bf16-mixed"]),
    "zero2-fp32": ("llama", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--record"]),
    "zero2-bf16": ("llama", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--precision", "bf16-mixed"]),
    "zero1-exclude-frozen": ("llama", ["--strategy", "deepspeed", "--stage", "1", "--devices", "2", "--exclude-frozen"]),
    "zero2-exclude-frozen": ("llama", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--precision", "bf16-mixed",
                                       "--exclude-frozen"]),
    "zero3-fp32": ("llama", ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--record"]),
    # --late-arch: configure_model first imports another architecture inside deepspeed.zero.Init, and a
    # new model of it runs after fit (test_deepspeed_fit.py), under our module and under a user's.
    "zero3-bf16": ("llama", ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--precision", "bf16-mixed", "--export",
                             "--late-arch", "mistral"]),
    "zero3-user-module": ("llama", ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--user-module", "--export",
                                    "--late-arch", "mistral"]),
    "zero3-3proc": ("llama", ["--strategy", "deepspeed", "--stage", "3", "--devices", "3"]),
    "zero3-exclude-frozen": ("llama", ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--precision", "bf16-mixed", "--exclude-frozen", "--record"]),
    "gpt2-conv1d": ("gpt2", ["--targets", "c_attn,c_proj"]),
    "bloom-qkv": ("bloom", ["--targets", "query_key_value"]),
    "qwen2-tied": ("qwen2", ["--targets", "q_proj,v_proj"]),
    "qwen2-tied-lm-head-trained": ("qwen2", ["--targets", "q_proj,v_proj", "--modules-to-save", "lm_head"]),
    "all-linear": ("llama", ["--targets", "all-linear"]),
    "rslora": ("llama", ["--rslora", "--r", "8", "--alpha", "4"]),
    "dora": ("llama", ["--dora"]),
    "modules-to-save-lm-head": ("llama", ["--modules-to-save", "lm_head"]),
    "user-module-net": ("llama", ["--user-module", "--export"]),
    "llama-added-tokens": ("llama", ["--added-tokens", "<tool>,<call>,<end_call>", "--export"]),
    "qwen2-tied-added-tokens": ("qwen2", ["--added-tokens", "<tool>,<call>,<end_call>", "--export"]),
    "zero3-qwen2-tied-lm-head-trained": (
        "qwen2", ["--strategy", "deepspeed", "--stage", "3", "--devices", "2", "--modules-to-save", "lm_head", "--export"]
    ),
    "zero2-qwen2-tied": ("qwen2", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--targets", "q_proj,v_proj",
                                   "--export"]),
    # HFExport with both ranks sharing the merge and the verification of many small shards.
    "zero2-shared-export": ("llama", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--export",
                                      "--export-shard-size", "100KB"]),
    # LoRA on either side of tied embeddings, lora_bias, an adapter not called "default".
    "qwen2-tied-lora-lm-head": ("qwen2", ["--targets", "q_proj,v_proj,lm_head"]),
    "qwen2-tied-lora-embeddings": ("qwen2", ["--targets", "q_proj,embed_tokens"]),
    "qwen2-lora-bias": ("qwen2", ["--targets", "q_proj,v_proj", "--lora-bias", "--user-module", "--export"]),
    "adapter-name": ("llama", ["--user-module", "--adapter-name", "math", "--export"]),
    # Initialisations: one that only initialises the adapter, and those that rewrite the base
    # (tests/test_rewriting_inits.py), each on a .ckpt file and under ZeRO-2.
    "orthogonal": ("llama", ["--init", "orthogonal"]),
    **{name: ("llama", ["--init", init, *extra]) for name, init, extra in _REWRITING},
    **{f"zero2-{name}": ("llama", ["--strategy", "deepspeed", "--stage", "2", "--devices", "2", "--init", init, *extra])
       for name, init, extra in _REWRITING},
    "pissa-rslora-rank-pattern": (
        "llama", ["--init", "pissa", "--user-module", "--export", "--rslora", "--rank-pattern", '{"v_proj": 2}']
    ),
}
# Runs whose base weights were rewritten by their initialisation: compared with the trained model,
# not with a merge into the original base.
REWRITTEN_BASE = {name for name, (_, args) in RUNS.items() if any(i in args for i in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga"))}

# QLoRA runs (tests/test_qlora.py), on a 4-bit base with an fp32 compute dtype unless named: kept apart
# from RUNS, whose exports are compared with a merge into the original base. They train past the end
# of the first epoch, so that validation (eval mode) runs between training steps.
QLORA_RUNS: dict[str, tuple[str, list[str]]] = {
    **{f"qlora-{arch}-{kind}": (arch, ["--quantization", kind, "--targets", "q_proj,v_proj", "--steps", "16",
                                       *(["--export"] if kind == "nf4" else [])])
       for arch in ("llama", "qwen2") for kind in ("nf4", "fp4")},
    # GPT-2's Conv1D layers (weights stored (in, out); square attention c_proj) become 4-bit (out, in) layers.
    "qlora-gpt2-nf4": ("gpt2", ["--quantization", "nf4", "--targets", "c_attn,c_proj", "--steps", "16"]),
    "qlora-llama-nf4-bf16-compute": ("llama", ["--quantization", "nf4", "--dtype", "bf16"]),
    "qlora-ddp": ("llama", ["--quantization", "nf4", "--strategy", "ddp", "--devices", "2", "--steps", "9", "--export",
                            "--merge-base", "original"]),
}


def run_train_script(name: str, base: Path, out: Path, args: list[str]) -> None:
    """Run ``train_run.py`` in a subprocess (Lightning re-launches it for each extra rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(base), "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, f"training run {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, tiny_bases: dict[str, Path]):
    """Train each run on first use (one subprocess each) and return ``(run_dir, base_dir)``; a run is
    trained once per session, whichever xdist worker needs it first, and read by all."""
    root = shared_dir(tmp_path_factory) / "runs"

    def get(name: str) -> tuple[Path, Path]:
        arch, args = RUNS[name] if name in RUNS else QLORA_RUNS[name]
        out = root / name
        with built_once(out) as needed:
            if needed:
                out.mkdir(parents=True)
                run_train_script(name, tiny_bases[arch], out, args)
        return out, tiny_bases[arch]

    return get


def assert_frozen_weights_are_the_base(params: dict[str, torch.Tensor], base: Path) -> None:
    """Every non-LoRA parameter the engine computes with equals the base on disk (in the working dtype)."""
    disk = load_file(base / "model.safetensors")
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in params.items() if ".lora_" not in k}
    assert set(frozen) == set(disk)
    differ = [k for k, v in frozen.items() if not torch.equal(v, disk[k].to(v.dtype))]
    assert not differ, f"frozen weights differ from the base on disk: {differ}"


def assert_module_holds_the_master_weights(start: dict) -> None:
    """The LoRA tensors the model computes with are the fp32 master weights (cast to the working dtype)."""
    params, trainable = start["params"], start["trainable"]
    assert set(trainable) == {k for k in params if ".lora_" in k}
    for key, master in trainable.items():
        assert torch.equal(params[key], master.to(params[key].dtype)), key
