"""A checkpoint is data, never code: every pickle we read goes through one restricted loader.

Hostile checkpoints are made from real ones: a real run's file is loaded (we wrote it), given one
entry whose unpickling would run code (it creates a marker file), and saved again with
``torch.save`` / ``pickle``. ``test_the_payloads_run_under_a_plain_load`` shows that each payload
does run under an ordinary load; every other test checks that, read by us, it never did, and that
the export either completes with its one-line report or fails in one line naming file, key and type.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pickle
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_lora.cli import export_main, verify_main
from lightning_lora.export.unpickle import load_torch_file

from test_export_errors import _error, single  # noqa: F401  (single is a fixture)

# Every kind of pickle we read, as written by real runs: fp32 and bf16, ZeRO 1/2/3 with and without
# exclude_frozen_parameters, QLoRA, and (made from a real run below) FSDP's full and sharded layouts.
SCANNED_RUNS = ["single-fp32", "single-bf16", "zero1-fp32", "zero1-bf16", "zero1-exclude-frozen", "zero2-fp32",
                "zero2-bf16", "zero2-exclude-frozen", "zero3-fp32", "zero3-bf16", "zero3-exclude-frozen",
                "qlora-llama-nf4", "qlora-llama-nf4-bf16-compute"]


class Call:
    """Pickles as the call ``func(*args)``: what a hostile entry in a checkpoint is."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _payloads(marker: Path) -> list[Call]:
    """Two ways to run code on load: a shell command (os.system) and Python (builtins.exec)."""
    return [Call(os.system, f"touch {marker}"), Call(builtins.exec, f"open({str(marker)!r}, 'w').close()")]


def _rewrite(path: Path, edit: Callable[[Any], None]) -> None:
    """Load one of our own files, let ``edit`` change it, and write it back as torch does."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    edit(state)
    torch.save(state, path)


def _pickle_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in (".pt", ".ckpt") or p.name == ".metadata"))


def _fsdp_checkpoint(run: Path, directory: Path, state_dict_type: str) -> Path:
    """A real run's checkpoint written by Lightning's FSDPStrategy (FSDP itself needs a GPU)."""
    from lightning.pytorch.strategies import FSDPStrategy

    checkpoint = torch.load(run / "ckpt", map_location="cpu", weights_only=False)
    FSDPStrategy(state_dict_type=state_dict_type).save_checkpoint(checkpoint, directory / f"fsdp-{state_dict_type}.ckpt")
    return directory / f"fsdp-{state_dict_type}.ckpt"


def _unread_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "left unread" in r.getMessage()]


def _read_all(files: list[Path]) -> None:
    from lightning_lora.export.unpickle import load_pickle

    for file in files:
        if file.name == ".metadata":
            with open(file, "rb") as stream:
                load_pickle(stream, file)
        else:
            load_torch_file(file)


@pytest.mark.parametrize("name", [*SCANNED_RUNS, "fsdp-full", "fsdp-sharded"])
def test_real_checkpoints_name_only_allowed_types(name: str, trained_runs, tmp_path: Path, caplog) -> None:
    """The allowlist holds every type that real checkpoints of each kind contain: reading them
    leaves nothing unread (a type missing from the list would be reported here)."""
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    if name.startswith("fsdp-"):
        root = _fsdp_checkpoint(trained_runs("single-bf16")[0], tmp_path, name.removeprefix("fsdp-"))
    else:
        root = trained_runs(name)[0] / "ckpt"
    files = _pickle_files(root)
    assert files
    _read_all(files)
    assert _unread_lines(caplog) == []


def test_a_type_outside_the_list_is_reported_not_imported(single, tmp_path: Path, caplog, monkeypatch) -> None:
    """The scan above can fail: a name outside the list (a module on sys.path whose import writes a
    marker) is reported by name, and the module is never imported."""
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    checkpoint, marker = tmp_path / "c.ckpt", tmp_path / "imported"
    shutil.copy(single[0], checkpoint)
    module = _importable_module(tmp_path, monkeypatch, "ll_test_hostile_module", marker)
    _rewrite(checkpoint, lambda state: state["hyper_parameters"].update(config=module.Config()))
    _forget(monkeypatch, "ll_test_hostile_module")
    data = load_torch_file(checkpoint, needed=[("state_dict",)])
    assert not marker.exists() and "ll_test_hostile_module" not in sys.modules
    assert data["state_dict"].keys() == torch.load(single[0], weights_only=False)["state_dict"].keys()
    (line,) = _unread_lines(caplog)
    assert "ll_test_hostile_module.Config at ['hyper_parameters']['config']" in line and "suspicious" not in line


def _importable_module(directory: Path, monkeypatch: pytest.MonkeyPatch, name: str, marker: Path) -> types.ModuleType:
    """A module ``name`` whose import writes ``marker``: in ``sys.modules`` while a test pickles its
    class, then only on ``sys.path`` (as a file), so that a loader that imported it would run it."""
    module = types.ModuleType(name)
    exec(f"class Config:\n    __module__ = {name!r}\n    lr = 0.1\n", module.__dict__)  # noqa: S102
    monkeypatch.setitem(sys.modules, name, module)
    (directory / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Config:\n    pass\n")
    monkeypatch.syspath_prepend(str(directory))
    return module


def _forget(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delitem(sys.modules, name)


# --- hostile checkpoints of every kind -------------------------------------------------------------


def _zero_files(checkpoint: Path) -> tuple[Path, Path]:
    """Rank 0's model states and rank 1's optimizer states of a ZeRO checkpoint directory."""
    tag_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    model = sorted(tag_dir.glob("*model_states.pt"))[0]
    optim = sorted(tag_dir.glob("*rank_1_*optim_states.pt"))[0]
    return model, optim


def _hostile(kind: str, trained_runs, tmp_path: Path, marker: Path, needed: bool) -> tuple[Path, Path, str, str]:
    """A copy of a real checkpoint of ``kind`` with payloads; returns (checkpoint, base, the file
    and the key holding the payload the export needs, or '' when all payloads are in unneeded places)."""
    call, other = _payloads(marker)
    if kind.startswith("fsdp"):
        run, base = trained_runs("single-fp32")
        checkpoint = _fsdp_checkpoint(run, tmp_path, "sharded")
        _rewrite(checkpoint / "meta.pt", lambda state: state.update(evil=call))
        metadata = checkpoint / ".metadata"
        with open(metadata, "rb") as stream:
            content = pickle.load(stream)  # noqa: S301 (our own file)
        content.callback_note = other
        if needed:
            content.planner_data[next(iter(content.planner_data))] = call
        with open(metadata, "wb") as stream:
            pickle.dump(content, stream)
        return checkpoint, base, ".metadata", "['planner_data']"
    if kind == "single":
        run, base = trained_runs("single-fp32")
        checkpoint = tmp_path / "hostile.ckpt"
        shutil.copy(run / "ckpt", checkpoint)

        def edit(state: dict) -> None:
            state["hyper_parameters"]["evil"] = call
            state["callbacks"]["Evil"] = {"state": other}
            if needed:
                state["state_dict"][next(iter(state["state_dict"]))] = call

        _rewrite(checkpoint, edit)
        return checkpoint, base, "hostile.ckpt", "['state_dict']"
    run, base = trained_runs(f"{kind}-fp32")
    checkpoint = tmp_path / "hostile.ckpt"
    shutil.copytree(run / "ckpt", checkpoint)
    model, optim = _zero_files(checkpoint)
    _rewrite(model, lambda state: state.update(evil=call))

    def edit_optim(state: dict) -> None:
        state["optimizer_state_dict"]["evil"] = other
        if needed:
            state["optimizer_state_dict"]["zero_stage"] = call

    _rewrite(optim, edit_optim)
    return checkpoint, base, optim.name, "['optimizer_state_dict']['zero_stage']"


KINDS = ["single", "zero1", "zero2", "zero3", "fsdp-sharded"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payloads_run_under_a_plain_load(kind: str, trained_runs, tmp_path: Path) -> None:
    """What the tests below guard against is real: each hostile file runs its payload when
    unpickled the ordinary way (``weights_only=False``, as the export did before)."""
    marker = tmp_path / "ran"
    checkpoint, _, _, _ = _hostile(kind, trained_runs, tmp_path, marker, needed=True)
    for file in _pickle_files(checkpoint):
        marker.unlink(missing_ok=True)
        with open(file, "rb") as stream:
            pickle.load(stream) if file.name == ".metadata" else torch.load(stream, weights_only=False)  # noqa: S301
        if marker.exists():
            return
    pytest.fail(f"no payload of {checkpoint} ran under a plain load")


@pytest.mark.parametrize("kind", KINDS)
def test_unneeded_foreign_objects_run_nothing_and_the_export_completes(kind: str, trained_runs, tmp_path: Path,
                                                                         caplog) -> None:
    """Payloads in values the export does not need (hyper-parameters, callback and optimizer
    state, extra metadata): the export completes, equal to the clean checkpoint's, and one line
    per file names each type left unread, flagged as suspicious."""
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    marker = tmp_path / "ran"
    checkpoint, base, _, _ = _hostile(kind, trained_runs, tmp_path, marker, needed=False)
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--base-model", str(base)]) == 0
    assert not marker.exists()
    lines = _unread_lines(caplog)
    assert lines and all("suspicious" in line for line in lines)
    named = " ".join(lines)
    assert "posix.system" in named or "nt.system" in named
    assert "builtins.exec" in named or "__builtin__.exec" in named  # torch.save writes protocol 2 names
    assert json.loads((tmp_path / "out" / "export.json").read_text())["verification"]["passed"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_needed_foreign_object_fails_in_one_line_naming_file_key_and_type(kind: str, trained_runs, tmp_path: Path,
                                                                             capsys) -> None:
    marker = tmp_path / "ran"
    checkpoint, base, file, key = _hostile(kind, trained_runs, tmp_path, marker, needed=True)
    message = _error(capsys, ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--base-model", str(base)])
    assert not marker.exists()
    assert file in message and key in message and "system" in message and "suspicious" in message, message
    assert not (tmp_path / "out").exists()


def test_verify_reads_the_checkpoint_through_the_same_loader(single, tmp_path: Path, capsys, caplog) -> None:
    """``verify --checkpoint`` rebuilds the trained model from a checkpoint: a hostile one runs nothing."""
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    checkpoint, base = single
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--base-model", str(base)]) == 0
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.ckpt"
    shutil.copy(checkpoint, hostile)
    _rewrite(hostile, lambda state: state["hyper_parameters"].update(evil=_payloads(marker)[0]))
    assert verify_main([str(tmp_path / "out"), "--base-model", str(base), "--checkpoint", str(hostile)]) == 0
    assert not marker.exists() and _unread_lines(caplog)


def test_a_users_class_in_hyper_parameters_exports_as_without_it(single, tmp_path: Path, monkeypatch, caplog) -> None:
    """The usual foreign object: the training script's own config dataclass, not importable where
    the export runs. The export needs none of it: it completes, byte for byte as without it."""
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    checkpoint, base = single
    module = types.ModuleType("train_script_of_a_user")
    monkeypatch.setitem(sys.modules, "train_script_of_a_user", module)
    exec("from dataclasses import dataclass\n@dataclass\nclass RunConfig:\n    lr: float = 0.1\n", module.__dict__)  # noqa: S102
    user = tmp_path / "user.ckpt"
    shutil.copy(checkpoint, user)
    _rewrite(user, lambda state: state["hyper_parameters"].update(run_config=module.RunConfig()))
    _forget(monkeypatch, "train_script_of_a_user")
    assert export_main(["--checkpoint", str(user), "--output", str(tmp_path / "user"), "--base-model", str(base)]) == 0
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "plain"), "--base-model", str(base)]) == 0
    hashes = [{name: entry["sha256"] for name, entry in json.loads((tmp_path / out / "export.json").read_text())["files"].items()}
              for out in ("user", "plain")]
    assert hashes[0] == hashes[1]
    (line,) = _unread_lines(caplog)
    assert "train_script_of_a_user.RunConfig at ['hyper_parameters']['run_config']" in line and "suspicious" not in line


def test_the_qlora_held_out_lookup_runs_nothing(trained_runs, tmp_path: Path, caplog) -> None:
    """The drift report rebuilds a 4-bit run's validation data from its checkpoint: a payload in the
    data module's hyper-parameters (which the lookup needs) skips the held-out loss with one line."""
    from lightning_lora.cli import _recorded_heldout

    caplog.set_level(logging.WARNING, logger="lightning_lora")
    run, _ = trained_runs("qlora-llama-nf4")
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.ckpt"
    shutil.copy(run / "ckpt", hostile)
    assert _recorded_heldout(str(hostile))  # the clean checkpoint's batches are rebuilt
    _rewrite(hostile, lambda state: state["datamodule_hyper_parameters"].update(evil=_payloads(marker)[1]))
    assert _recorded_heldout(str(hostile)) is None
    assert not marker.exists()
    (line,) = [r.getMessage() for r in caplog.records if "held-out loss not measured" in r.getMessage()]
    assert "['datamodule_hyper_parameters']['evil']" in line and ".exec" in line


def test_hfexport_reading_a_checkpoint_file_runs_nothing(llama_base: Path, tmp_path: Path, caplog) -> None:
    """A callback of the run stored a payload in every checkpoint; HFExport's export of the last
    good checkpoint after a failure (read from disk, found through its recorded step) runs none."""
    import lightning as L

    from lightning_lora.callbacks import HFExport
    from test_callback import _fit

    marker = tmp_path / "ran"

    class StoresAPayload(L.Callback):
        def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
            checkpoint["evil"] = _payloads(marker)[0]

    caplog.set_level(logging.WARNING, logger="lightning_lora")
    export = HFExport(dirpath=str(tmp_path / "export"), export_on_exception=True)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _fit(tmp_path, llama_base, export, fail_at=5, extra_callbacks=[StoresAPayload()])
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["global_step"] == 4 and manifest["verification"]["passed"]
    assert not marker.exists()
    assert any("['evil']" in line for line in _unread_lines(caplog))


def test_zero_to_fp32_reads_only_through_torch_load() -> None:
    """The ZeRO consolidation gives DeepSpeed's zero_to_fp32 our loader as its ``torch.load``: that
    covers every file it reads only while it unpickles nothing any other way."""
    import inspect

    from deepspeed.utils import zero_to_fp32

    source = inspect.getsource(zero_to_fp32)
    assert "torch.load(" in source
    for other in ("pickle.", "np.load(", "numpy.load(", "torch.serialization", "_load_from_bytes"):
        assert other not in source, other


def test_an_fsdp_entry_stored_as_pickled_bytes_is_refused(trained_runs, tmp_path: Path, capsys) -> None:
    """torch.distributed.checkpoint unpickles an entry that its metadata declares as bytes with
    ``weights_only=False``: a module's tensor declared so would run code under torch's own planner.
    The export reads tensors only, and names the entry."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    run, base = trained_runs("single-fp32")
    checkpoint = _fsdp_checkpoint(run, tmp_path, "sharded")
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save(_payloads(marker)[0], payload)
    (checkpoint / "__9_0.distcp").write_bytes(payload.getvalue())
    with open(checkpoint / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)  # noqa: S301 (our own file)
    flat = next(key for key, path in metadata.planner_data.items() if path[0] == "model" and ".lora_A." in str(path[-1]))
    metadata.state_dict_metadata[flat] = BytesStorageMetadata()
    metadata.storage_data = {index: info for index, info in metadata.storage_data.items() if index.fqn != flat}
    metadata.storage_data[MetadataIndex(flat)] = _StorageInfo("__9_0.distcp", 0, len(payload.getvalue()))
    with open(checkpoint / ".metadata", "wb") as stream:
        pickle.dump(metadata, stream)

    _load_state_dict({}, storage_reader=FileSystemReader(checkpoint), planner=_EmptyStateDictLoadPlanner(keys={flat}),
                     no_dist=True)
    assert marker.exists()  # torch's own reading runs it
    marker.unlink()
    message = _error(capsys, ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--base-model", str(base)])
    assert not marker.exists()
    assert flat in message and "pickled bytes" in message, message


def test_hyper_parameters_are_needed_only_where_the_export_reads_them(single, tmp_path: Path, capsys, caplog) -> None:
    """A checkpoint of LoraFinetuneModule that predates its own record: its LoRA settings are read
    from hyper_parameters, so a foreign object there stops the export, named; with the record, the
    same object is left unread and the export completes."""
    checkpoint, base = single
    marker = tmp_path / "ran"
    with_record, without_record = tmp_path / "with.ckpt", tmp_path / "without.ckpt"
    for path in (with_record, without_record):
        shutil.copy(checkpoint, path)

        def edit(state: dict, path: Path = path) -> None:
            state["hyper_parameters"]["r"] = _payloads(marker)[0]
            if path == without_record:
                del state["lightning_lora"]

        _rewrite(path, edit)
    assert export_main(["--checkpoint", str(with_record), "--output", str(tmp_path / "out"), "--base-model", str(base)]) == 0
    message = _error(capsys, ["--checkpoint", str(without_record), "--output", str(tmp_path / "out2"), "--base-model",
                              str(base)])
    assert "['hyper_parameters']['r']" in message and "without.ckpt" in message and "suspicious" in message, message
    assert not marker.exists()


# --- what a file may do with the names it is allowed -----------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def test_a_file_cannot_change_an_allowed_class(tmp_path: Path) -> None:
    """BUILD on a class itself would set its attributes for the whole process (``PosixPath._str``:
    every path the export opens): refused, the class unchanged."""
    from pathlib import PosixPath

    from lightning_lora.export.unpickle import load_pickle

    before = dict(vars(PosixPath))
    build_on_class = b"\x80\x02" + _global("pathlib", "PosixPath") + b"N}" + _text("_str") + _text("/tmp/x") + b"s\x86b."
    with pytest.raises(pickle.UnpicklingError, match="sets attributes of pathlib.PosixPath"):
        load_pickle(io.BytesIO(build_on_class), tmp_path / ".metadata")
    assert dict(vars(PosixPath)) == before and str(tmp_path / "a") != "/tmp/x"
    # Nor may it shadow a method of an allowed object: an OrderedDict's `get` set from the file.
    shadow = b"\x80\x02" + _global("collections", "OrderedDict") + b")R}" + _text("get") + b"Nsb."
    with pytest.raises(pickle.UnpicklingError, match="sets 'get'"):
        load_pickle(io.BytesIO(shadow), tmp_path / ".metadata")


@pytest.mark.parametrize("opcode", [b"R", b"\x81"], ids=["reduce", "newobj"])
def test_a_file_calls_only_what_is_allowed_to_be_called(opcode: bytes, tmp_path: Path) -> None:
    """``torch.Tensor(8, 8)`` would be uninitialised memory; a dtype is a value. Neither is called."""
    from lightning_lora.export.unpickle import load_pickle

    for module, name in (("torch", "Tensor"), ("torch", "float32")):
        call = b"\x80\x02" + _global(module, name) + b"K\x08K\x08\x86" + opcode + b"."
        with pytest.raises(pickle.UnpicklingError, match="not allowed to be"):
            load_pickle(io.BytesIO(call), tmp_path / ".metadata")


def _torchscript_archive(path: Path, marker: Path) -> None:
    """A TorchScript archive whose loading runs code: its __setstate__ writes into ``marker`` (an
    existing one-byte file: ``0`` becomes ``A``). TorchScript compiles from source, so the module
    is written to a file with the marker's path in it."""
    import importlib.util

    source = path.parent / "torchscript_payload.py"
    source.write_text(
        "import torch\n\n\nclass Writes(torch.nn.Module):\n"
        "    def __init__(self) -> None:\n        super().__init__()\n        self.x = 1\n\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        return x\n\n"
        "    @torch.jit.export\n    def __getstate__(self) -> int:\n        return self.x\n\n"
        "    @torch.jit.export\n    def __setstate__(self, state: int) -> None:\n        self.x = state\n"
        "        self.training = False\n"
        f"        written = torch.from_file({str(marker)!r}, True, 1, dtype=torch.uint8)\n"
        "        written.fill_(65)\n        self.x = int(written[0])\n")  # used, or TorchScript drops the write
    spec = importlib.util.spec_from_file_location("torchscript_payload", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.jit.save(torch.jit.script(module.Writes()), str(path))


def _hide_from_zipfile(path: Path) -> None:
    """Give the archive a second central directory, the one Python's zipfile reads, in which the
    TorchScript records are renamed; torch's reader follows the end record to the first one."""
    import struct

    data = path.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    signature, _, _, _, total, size, offset, _ = struct.unpack("<IHHHHIIH", data[end:end + 22])
    directory = data[offset:offset + size]
    disguised = directory.replace(b"/constants.pkl", b"/constantz.pkl").replace(b"/code/", b"/codf/")
    path.write_bytes(data[:offset] + directory + disguised + struct.pack("<IHHHHIIH", signature, 0, 0, total, total,
                                                                           size, offset, 0))


@pytest.mark.parametrize("disguised", [False, True], ids=["plain", "hidden-from-zipfile"])
def test_a_torchscript_archive_is_refused_and_runs_nothing(disguised: bool, tmp_path: Path) -> None:
    """torch.load hands a TorchScript archive to torch.jit.load, which runs its code; the loader asks
    torch's own zip reader, which a second central directory cannot fool."""
    archive, marker = tmp_path / "model.ckpt", tmp_path / "ran"
    marker.write_bytes(b"0")
    _torchscript_archive(archive, marker)
    marker.write_bytes(b"0")
    torch.jit.load(str(archive))
    assert marker.read_bytes() == b"A"  # loading it the ordinary way runs its code
    marker.write_bytes(b"0")
    if disguised:
        _hide_from_zipfile(archive)
        assert torch.serialization._is_torchscript_zip(torch._C.PyTorchFileReader(str(archive)))
    with pytest.raises(pickle.UnpicklingError, match="TorchScript"):
        load_torch_file(archive)
    assert marker.read_bytes() == b"0"


def test_the_held_out_lookup_uses_no_recorded_tokenizer_with_custom_code(trained_runs, tmp_path: Path, caplog) -> None:
    """The data settings a 4-bit checkpoint records name a tokenizer: one that maps to custom code
    is not loaded (the held-out loss is skipped with one line), nor is a path that is not here."""
    from lightning_lora.cli import _recorded_heldout

    caplog.set_level(logging.WARNING, logger="lightning_lora")
    run, base = trained_runs("qlora-llama-nf4")
    custom = tmp_path / "tokenizer"
    shutil.copytree(base, custom)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    for tokenizer in (str(custom), "someone/a-hub-id"):
        hostile = tmp_path / "hostile.ckpt"
        shutil.copy(run / "ckpt", hostile)
        _rewrite(hostile, lambda state, value=tokenizer: state["datamodule_hyper_parameters"].update(tokenizer=value))
        assert _recorded_heldout(str(hostile)) is None
    lines = [r.getMessage() for r in caplog.records if "held-out loss not measured" in r.getMessage()]
    assert "maps to custom code" in lines[0] and "is not a local path" in lines[1], lines


def test_a_state_dict_of_parameters_exports_as_one_of_tensors(single, tmp_path: Path) -> None:
    """An awkward but harmless checkpoint: its state dict holds ``nn.Parameter`` objects (a dict
    built from ``named_parameters()``), which torch pickles with its Parameter rebuilder."""
    checkpoint, base = single
    params = tmp_path / "params.ckpt"
    shutil.copy(checkpoint, params)
    _rewrite(params, lambda state: state.update(
        state_dict={key: torch.nn.Parameter(value, requires_grad=False) for key, value in state["state_dict"].items()}))
    hashes = []
    for source, out in ((params, "params"), (checkpoint, "plain")):
        assert export_main(["--checkpoint", str(source), "--output", str(tmp_path / out), "--base-model", str(base)]) == 0
        files = json.loads((tmp_path / out / "export.json").read_text())["files"]
        hashes.append({name: entry["sha256"] for name, entry in files.items()})
    assert hashes[0] == hashes[1]
