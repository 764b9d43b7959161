"""The compatibility results (scripts/compat.sh): every set passed within the smoke tier's budget, the
README's "Tested with" table is generated from them, and the smoke tier names tests that exist."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import REPO, SMOKE

SMOKE_BUDGET_SECONDS = 240  # the smoke tier's pytest wall time on 2 cores


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _tested_with():
    return _script("tested_with", REPO / "scripts" / "tested_with.py")


@pytest.mark.parametrize("set_name", ["oldest", "locked", "latest"])
def test_each_set_passed_the_smoke_tier_within_its_budget(set_name: str) -> None:
    result = _tested_with().load_results()[set_name]
    assert result["set"] == set_name
    assert result["passed"], f"compat/results/{set_name}.json: {result['summary']}"
    assert result["pytest_seconds"] <= SMOKE_BUDGET_SECONDS, result["pytest_seconds"]


def test_readme_table_is_generated_from_the_results() -> None:
    tested_with = _tested_with()
    text = (REPO / "README.md").read_text()
    assert tested_with.rewrite(text, tested_with.render(tested_with.load_results())) == text, (
        "README's Tested with table differs from compat/results: run python scripts/tested_with.py")


def test_the_lock_is_the_locked_set() -> None:
    """The committed `locked` result was run on the committed lock (same versions of every pin)."""
    locked = _tested_with().load_results()["locked"]["versions"]
    # The lock read as CI's freeze check reads it (names normalised; pip, setuptools, wheel left out).
    pins = _script("check_lock", REPO / ".ci" / "check_lock.py").pins(
        (REPO / "requirements.lock").read_text().splitlines())
    differ = {name: (version, locked.get(name)) for name, version in pins.items() if locked.get(name) != version}
    assert not differ, f"requirements.lock changed since the locked compat run (lock, run): {differ}"


def test_every_smoke_entry_names_a_test_function() -> None:
    for entry in SMOKE:
        path, name = entry.split("::")
        function = name.split("[", 1)[0]
        tree = ast.parse((REPO / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert function in names, f"SMOKE names {entry}, which {path} does not define"
