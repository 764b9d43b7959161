"""The tested version envelope: which versions are outside it, the one warning, ``lightning-lora env``,
the command listing, and the envelope's agreement with the recorded compatibility runs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

from lightning_lora import cli, versions
from lightning_lora.cli import main
from lightning_lora.versions import TESTED

COMMANDS = ("fit", "validate", "test", "predict", "export", "verify", "generate", "evaluate", "env")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

# A fixed envelope, so that the expected messages do not change when TESTED is refreshed.
ENVELOPE = {
    "torch": ("2.4.0", "2.13.0"),
    "lightning": ("2.5.5", "2.6.6"),
    "peft": ("0.15.0", "0.21.2"),
    "transformers": ("4.56.0", "5.25.0"),
    "deepspeed": ("0.16.0", "0.19.8"),
    "kernels": ("0.19.1", "0.19.1"),
    "safetensors": ("0.4.3", "0.8.0"),
}
INSTALLED = {
    "torch": "2.13.0+cpu",        # the latest end with a local label: inside
    "lightning": "2.7.0.dev0",    # a dev build of the next version: outside
    "peft": "0.14.0",             # below the oldest end: outside
    "transformers": "5.26.0",     # above the latest end: outside
    "deepspeed": "0.16",          # the oldest end, written short: inside
    "kernels": None,              # not installed: never warned about
    "safetensors": "0.8.0.post1",  # a packaging fix of the latest end: inside
}


def _message(name: str, version: str) -> str:
    oldest, latest = ENVELOPE[name]
    return (f"{name} {version} is outside the tested range {oldest} - {latest} of lightning-lora "
            "(it may work; report problems with the output of 'lightning-lora env')")


@pytest.fixture
def envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versions, "TESTED", ENVELOPE)
    monkeypatch.setattr(versions, "installed_versions", lambda: dict(INSTALLED))
    monkeypatch.setattr(versions, "_warned", False)
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


OUTSIDE = ("lightning", "peft", "transformers")
EXPECTED = [_message("lightning", "2.7.0.dev0"), _message("peft", "0.14.0"), _message("transformers", "5.26.0")]


def test_one_message_per_package_outside_the_range(envelope: None) -> None:
    assert versions.outside_tested_range() == EXPECTED


def test_the_fallback_comparison_agrees_without_packaging(envelope: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "packaging.version", None)  # makes its import fail
    assert versions.outside_tested_range() == EXPECTED


def test_installed_versions_covers_every_tested_package() -> None:
    installed = versions.installed_versions()
    assert set(installed) == set(TESTED)
    assert installed["torch"] is not None and installed["torch"].startswith(("2.", "3."))


def test_warning_once_per_process_and_only_on_rank_zero(envelope: None, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    versions.warn_outside_tested_range()
    versions.warn_outside_tested_range()
    assert [record.getMessage() for record in caplog.records] == EXPECTED  # one line each, once
    assert all("\n" not in message for message in EXPECTED)

    caplog.clear()
    monkeypatch.setattr(versions, "_warned", False)
    monkeypatch.setenv("RANK", "1")
    versions.warn_outside_tested_range()
    assert caplog.records == []

    # Lightning's order: LOCAL_RANK counts when RANK is not set.
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")
    versions.warn_outside_tested_range()
    assert caplog.records == []


def test_warning_never_raises(envelope: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, str | None]:
        raise RuntimeError("broken metadata")

    monkeypatch.setattr(versions, "installed_versions", broken)
    versions.warn_outside_tested_range()


def test_commands_and_callback_warn(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    calls = []
    monkeypatch.setattr(cli, "warn_outside_tested_range", lambda: calls.append("cli"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", str(tmp_path / "missing")])
    assert exit_info.value.code == 1 and calls == ["cli"]

    import lightning_lora.lightning_cli as lightning_cli

    monkeypatch.setattr(lightning_cli, "warn_outside_tested_range", lambda: calls.append("lightning_cli"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--help"])  # still LightningCLI's own help
    assert exit_info.value.code == 0 and "--trainer" in capsys.readouterr().out
    assert calls == ["cli", "cli", "lightning_cli"]

    import lightning_lora.callbacks.hf_export as hf_export

    monkeypatch.setattr(hf_export, "warn_outside_tested_range", lambda: calls.append("HFExport"))
    callback = hf_export.HFExport(dirpath=str(tmp_path / "export"))
    callback.setup(SimpleNamespace(is_global_zero=False), None, "fit")  # type: ignore[arg-type]
    callback.setup(SimpleNamespace(is_global_zero=True), None, "fit")  # type: ignore[arg-type]
    assert calls[3:] == ["HFExport"]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``lightning-lora ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_env_command_prints_every_package(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "env")
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    for name in TESTED:
        assert any(line.split()[0] == name and "(tested " in line for line in lines), (name, out)
    assert [line.split()[0] for line in lines[-3:]] == ["python", "platform", "cuda"]

    code, out, err = _run(capsys, "env", "--json")
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert set(report["packages"]) == set(TESTED)
    assert {entry["status"] for entry in report["packages"].values()} <= {"ok", "OUTSIDE", "not installed"}


def test_env_report_marks_a_package_outside_and_an_absent_one(envelope: None) -> None:
    packages = versions.environment_report()["packages"]
    assert {name: entry["status"] for name, entry in packages.items()} == {
        name: ("not installed" if INSTALLED[name] is None else
               "OUTSIDE" if name in OUTSIDE else "ok") for name in ENVELOPE}
    text = versions.format_environment_report(versions.environment_report())
    assert "not installed" in text and "OUTSIDE" in text


@pytest.mark.parametrize(("args", "code", "stream"), [((), 2, "stderr"), (("--help",), 0, "stdout"), (("-h",), 0, "stdout"),
                                                      (("frobnicate",), 2, "stderr")])
def test_every_command_is_listed(args: tuple[str, ...], code: int, stream: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    exit_code, out, err = _run(capsys, *args)
    assert exit_code == code, out + err
    text = {"stdout": out, "stderr": err}[stream]
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS), text
    if args == ("frobnicate",):
        assert text.splitlines()[0] == "lightning-lora: error: unknown command 'frobnicate'"


def test_the_listing_imports_neither_lightning_nor_torch() -> None:
    code = ("import sys\nfrom lightning_lora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch', 'transformers')), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stderr.strip() == "[]", result.stderr[-2000:]


def test_envelope_ends_are_the_recorded_compatibility_runs() -> None:
    # Written by scripts/compat.sh; missing means the envelope in lightning_lora/versions.py is untested.
    recorded = {}
    for name in ("oldest", "latest"):
        path = REPO / "compat" / "results" / f"{name}.json"
        assert path.is_file(), f"{path.relative_to(REPO)} is missing: run scripts/compat.sh {name} and commit its result"
        recorded[name] = json.loads(path.read_text())
        assert recorded[name]["passed"] is True, f"{path.relative_to(REPO)}: the {name} set did not pass"
    oldest, latest = recorded["oldest"]["versions"], recorded["latest"]["versions"]
    missing = sorted(set(TESTED) - set(latest))
    assert not missing, f"the latest set did not install {missing}: their range is untested"
    for name in TESTED:
        # A package absent from the oldest set (kernels, pulled in only by newer transformers) is
        # tested from the latest set's version on.
        expected = (oldest.get(name, latest[name]), latest[name])
        assert TESTED[name] == expected, f"versions.TESTED[{name!r}] is {TESTED[name]}, the compat runs recorded {expected}"
