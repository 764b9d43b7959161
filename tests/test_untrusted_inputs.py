"""A checkpoint, base model or adapter from someone else is data, never code: custom code (``auto_map``)
runs only with ``--trust-remote-code``, pickled weights load only where torch loads them safely, a
recorded tokenizer writes tokenizer files only, and a path an artifact names for one of its own
parts (a ZeRO tag, an index's shard, FSDP's shard files, export.json's file list) never leads out
of it. Real trained checkpoints and real base models; every refusal is one line naming the input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_lora.cli import export_main, generate_main, verify_main

from test_export_errors import single, zero_copy  # noqa: F401  (fixtures)

_AUTO_MAP = {"AutoConfig": "configuration_marker.MarkerConfig",
             "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}


def _error(capsys: pytest.CaptureFixture[str], command, argv: list[str | Path], name: str = "export") -> str:
    """Run a command in-process: exit code 1 and exactly one error line, which is returned."""
    capsys.readouterr()
    code = command([str(a) for a in argv])
    err = capsys.readouterr().err
    prefix = f"lightning-lora {name}: error: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, f"exit code {code}; stderr:\n{err}"
    return lines[0][len(prefix):]


def _args(checkpoint: Path, output: Path, base: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output", str(output), "--base-model", str(base), *extra]


def _nothing_left(output: Path) -> None:
    assert not output.exists() and not list(output.parent.glob(f".{output.name}.*")), sorted(output.parent.iterdir())


# --- custom code ----------------------------------------------------------------------------------


def _custom_code_base(source: Path, directory: Path, marker: Path, model_type: str = "marker_llama") -> Path:
    """A copy of ``source`` (a Llama) whose config maps to code of its own, which writes ``marker``
    as soon as it is imported: the marker's existence says whether the code ran."""
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, architectures=["MarkerForCausalLM"], auto_map=_AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (directory / "configuration_marker.py").write_text(
        f"{write}from transformers import LlamaConfig\n\n\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n")
    (directory / "modeling_marker.py").write_text(
        f"{write}from transformers import LlamaForCausalLM\n\nfrom .configuration_marker import MarkerConfig\n\n\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
    return directory


def test_custom_code_base_is_refused_in_one_line_and_never_runs(capsys, single, tmp_path: Path) -> None:
    checkpoint, llama = single
    marker = tmp_path / "ran"
    base = _custom_code_base(llama, tmp_path / "custom", marker)
    message = _error(capsys, export_main, _args(checkpoint, tmp_path / "out", base))
    assert message.startswith(f"--base-model={str(base)!r} maps to custom code (config.json auto_map: "), message
    assert "modeling_marker.MarkerForCausalLM" in message and message.endswith("pass --trust-remote-code to run it")
    _nothing_left(tmp_path / "out")
    # generate loads a user's base too: refused the same way, before any loading.
    message = _error(capsys, generate_main, ["--model", base, "--prompt", "hi"], name="generate")
    assert f"--model={str(base)!r} maps to custom code" in message and "--trust-remote-code" in message, message
    assert not marker.exists(), "the base's own code ran without --trust-remote-code"


def test_auto_map_beside_a_built_in_model_type_is_refused_too(capsys, single, tmp_path: Path) -> None:
    """transformers has its own Llama and would ignore the auto_map without trust_remote_code, but the
    directory was written to run its code: whether it may is the user's call, so it is refused too."""
    checkpoint, llama = single
    marker = tmp_path / "ran"
    base = _custom_code_base(llama, tmp_path / "llama-with-auto-map", marker, model_type="llama")
    message = _error(capsys, export_main, _args(checkpoint, tmp_path / "out", base))
    assert f"--base-model={str(base)!r} maps to custom code" in message and "--trust-remote-code" in message, message
    _nothing_left(tmp_path / "out")
    assert not marker.exists()


def test_custom_code_runs_with_trust_remote_code(capsys, single, tmp_path: Path) -> None:
    """In a subprocess, its module cache in tmp_path: the custom code is imported there, not here."""
    checkpoint, llama = single
    marker = tmp_path / "ran"
    base = _custom_code_base(llama, tmp_path / "custom", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-m", "lightning_lora", "export", *_args(checkpoint, tmp_path / "out", base),
               "--trust-remote-code"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()
    merged = tmp_path / "out" / "merged"
    # The merged model ships its code beside it, as save_pretrained does.
    assert {"configuration_marker.py", "modeling_marker.py"} <= {p.name for p in merged.iterdir()}
    assert json.loads((tmp_path / "out" / "export.json").read_text())["verification"]["passed"] is True
    # Re-checking that export loads its merged model, whose config maps to the same code.
    message = _error(capsys, verify_main, [tmp_path / "out"], name="verify")
    assert f"DIR's merged model={str(merged)!r} maps to custom code" in message and "--trust-remote-code" in message
    command = [sys.executable, "-m", "lightning_lora", "verify", tmp_path / "out", "--base-model", base,
               "--trust-remote-code"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "files match export.json; verified" in result.stdout, result.stderr[-3000:]


def test_recorded_tokenizer_with_custom_code_is_refused(capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # the test's own file
    config = json.loads(state["lightning_lora"]["tokenizer"]["tokenizer_config.json"])
    config.update(tokenizer_class="MarkerTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_marker.MarkerTokenizer"]})
    state["lightning_lora"]["tokenizer"]["tokenizer_config.json"] = json.dumps(config)
    torch.save(state, tmp_path / "custom-tokenizer.ckpt")
    message = _error(capsys, export_main, _args(tmp_path / "custom-tokenizer.ckpt", tmp_path / "out", base))
    assert "tokenizer_config.json auto_map" in message and "--trust-remote-code" in message, message
    assert str(tmp_path / "custom-tokenizer.ckpt") in message
    _nothing_left(tmp_path / "out")


# --- pickled weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "safe"),
                         [("2.5.1+cu121", False), ("2.5.0", False), ("2.6.0", True), ("2.10.1", True)])
def test_torch_versions_that_load_pickles_safely(version: str, safe: bool) -> None:
    from lightning_lora.export.trust import pickle_loading_is_safe

    assert pickle_loading_is_safe(version) is safe  # 2.10 > 2.6: compared as versions, not as text


def _bin_adapter(checkpoint: Path, base: Path, tmp_path: Path) -> Path:
    """The run's exported adapter with its weights as adapter_model.bin (a pickle) only."""
    assert export_main(_args(checkpoint, tmp_path / "export", base, "--no-merge")) == 0
    adapter = tmp_path / "bin-adapter"
    shutil.copytree(tmp_path / "export" / "adapter", adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


def test_bin_adapter_is_refused_where_torch_cannot_load_it_safely(capsys, single, tmp_path: Path, monkeypatch) -> None:
    checkpoint, base = single
    adapter = _bin_adapter(checkpoint, base, tmp_path)
    assert export_main(_args(adapter, tmp_path / "out", base, "--no-merge")) == 0  # this torch (>= 2.6) loads it safely
    monkeypatch.setattr(torch, "__version__", "2.5.1")  # torch's restricted unpickler before the CVE-2025-32434 fix
    message = _error(capsys, export_main, _args(adapter, tmp_path / "out-old-torch", base))
    assert f"--checkpoint={str(adapter)!r}" in message and "adapter_model.bin" in message, message
    assert "torch 2.5.1" in message and "safetensors" in message and "torch >= 2.6" in message, message
    _nothing_left(tmp_path / "out-old-torch")


def test_base_with_only_pytorch_model_bin_is_one_clear_line(capsys, single, tmp_path: Path) -> None:
    checkpoint, llama = single
    base = tmp_path / "bin-base"
    shutil.copytree(llama, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    message = _error(capsys, export_main, _args(checkpoint, tmp_path / "out", base))
    assert f"--base-model={str(base)!r}" in message and "pytorch_model.bin" in message, message
    assert "convert them to safetensors" in message, message
    _nothing_left(tmp_path / "out")


# --- the tokenizer a checkpoint records -----------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "../escaped.txt", "merged/tokenizer.json", "model.safetensors"])
def test_recorded_tokenizer_may_name_only_tokenizer_files(name: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # the test's own file
    state["lightning_lora"]["tokenizer"][name] = '{"model_type": "something else entirely"}'
    hostile = tmp_path / "hostile.ckpt"
    torch.save(state, hostile)
    message = _error(capsys, export_main, _args(hostile, tmp_path / "out", base))
    assert f"--checkpoint={str(hostile)!r}" in message and "'lightning_lora' -> 'tokenizer'" in message, message
    assert repr(name) in message and "not a tokenizer file" in message, message
    _nothing_left(tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bloom"])
def test_the_tokenizer_allowlist_covers_what_save_pretrained_writes(arch: str, tiny_bases, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lightning_lora.export.tokens import tokenizer_files

    tokenizer = AutoTokenizer.from_pretrained(tiny_bases[arch])
    tokenizer.add_tokens(["<tool>"], special_tokens=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    assert set(tokenizer_files(tokenizer)) == {p.name for p in tmp_path.iterdir() if p.is_file()}


# --- paths inside a ZeRO checkpoint ---------------------------------------------------------------


def _outside_tag(checkpoint: Path, tmp_path: Path, how: str) -> tuple[list[str], str]:
    """Point the checkpoint at a tag directory outside it (a real, readable one); returns the extra
    arguments and the name that leads out."""
    tag = (checkpoint / "latest").read_text().strip()
    outside = tmp_path / "elsewhere"
    shutil.move(str(checkpoint / tag), outside)
    if how == "latest-dotdot":
        (checkpoint / "latest").write_text("../elsewhere")
        return [], "../elsewhere"
    if how == "tag-dotdot":
        return ["--tag", "../elsewhere"], "../elsewhere"
    (checkpoint / tag).symlink_to(outside, target_is_directory=True)  # latest still names the tag
    return [], tag


@pytest.mark.parametrize("how", ["latest-dotdot", "latest-symlink", "tag-dotdot"])
def test_zero_tag_outside_the_checkpoint_is_refused(how: str, capsys, zero_copy, tmp_path: Path) -> None:
    checkpoint, base = zero_copy
    extra, name = _outside_tag(checkpoint, tmp_path, how)
    message = _error(capsys, export_main, _args(checkpoint, tmp_path / "out", base, "--no-merge", *extra))
    subject = f"--tag={name!r}" if how == "tag-dotdot" else f"{str(checkpoint / 'latest')!r} names {name!r}"
    assert message.startswith(subject) and f"leads outside {str(checkpoint.resolve())!r}" in message, message
    _nothing_left(tmp_path / "out")


# --- paths inside a base model directory ----------------------------------------------------------


def _index_to(base: Path, shard: str, weights: Path) -> None:
    """Give the base an index whose every entry (the keys of ``weights``) names ``shard``."""
    with safe_open(weights, "pt") as handle:
        keys = list(handle.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["index-dotdot", "index-symlink", "single-symlink"])
def test_base_shard_outside_the_base_directory_is_refused(how: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, llama = single
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (tmp_path / "other").mkdir()
    weights = tmp_path / "other" / "model.safetensors"
    shutil.move(str(base / "model.safetensors"), weights)
    if how == "index-dotdot":
        name = "../other/model.safetensors"
        _index_to(base, name, weights)
    elif how == "index-symlink":
        name = "model-00001-of-00001.safetensors"
        (base / name).symlink_to(weights)
        _index_to(base, name, weights)
    else:
        name = "model.safetensors"
        (base / name).symlink_to(weights)
    where = f"--base-model={str(base)!r}" + (": model.safetensors.index.json" if how.startswith("index") else "")
    message = _error(capsys, export_main, _args(checkpoint, tmp_path / "out", base, "--no-merge"))
    assert message.startswith(f"{where} names {name!r}, which leads outside {str(base)!r}"), message
    _nothing_left(tmp_path / "out")


def test_hub_cache_snapshot_whose_files_link_to_blobs_is_accepted(single, tmp_path: Path) -> None:
    """A hub cache snapshot's files are links to ../../blobs/: parts of the same repository."""
    checkpoint, llama = single
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for number, file in enumerate(sorted(llama.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert export_main(_args(checkpoint, tmp_path / "out", snapshot)) == 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["verification"]["passed"] is True


# --- paths inside an FSDP checkpoint --------------------------------------------------------------


def test_fsdp_shard_file_outside_the_checkpoint_is_refused(capsys, single, tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    checkpoint, base = single
    sharded = tmp_path / "fsdp.ckpt"
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(torch.load(checkpoint, weights_only=False), sharded)
    (tmp_path / "outside").mkdir()
    shutil.move(str(sharded / "__0_0.distcp"), tmp_path / "outside" / "__0_0.distcp")
    with open(sharded / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # the test's own file, written just above
    for info in metadata.storage_data.values():
        info.relative_path = "../outside/__0_0.distcp"
    with open(sharded / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    message = _error(capsys, export_main, _args(sharded, tmp_path / "out", base, "--no-merge"))
    assert f"--checkpoint={str(sharded)!r}: .metadata names '../outside/__0_0.distcp'" in message, message
    assert "leads outside" in message
    _nothing_left(tmp_path / "out")


# --- export.json's file list ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["listed-dotdot", "linked-file"])
def test_verify_refuses_an_export_naming_files_outside_it(how: str, capsys, single, tmp_path: Path) -> None:
    checkpoint, base = single
    export = tmp_path / "export"
    assert export_main(_args(checkpoint, export, base, "--no-merge")) == 0
    secret = tmp_path / "secret.txt"
    if how == "listed-dotdot":
        secret.write_text("not part of the export")
        manifest = json.loads((export / "export.json").read_text())
        manifest["files"]["../secret.txt"] = {"sha256": "0" * 64, "size": secret.stat().st_size}
        (export / "export.json").write_text(json.dumps(manifest))
        name = "DIR={!r}: export.json names '../secret.txt'".format(str(export))
    else:  # the same bytes, but outside: the export's hashes would match
        weights = export / "adapter" / "adapter_model.safetensors"
        shutil.move(str(weights), secret)
        weights.symlink_to(secret)
        name = "DIR={!r}: export.json names 'adapter/adapter_model.safetensors'".format(str(export))  # now a link
    message = _error(capsys, verify_main, [export], name="verify")
    assert message.startswith(name) and f"leads outside {str(export)!r} (to {str(secret)!r})" in message, message
