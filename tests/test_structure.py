"""The package's import graph: no cycles, and the export path free of the Lightning side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lightning_lora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``lightning_lora`` module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name.startswith("lightning_lora")}


def _graph() -> dict[str, set[str]]:
    # Package __init__ files only re-export lazily; the edges that matter are between modules.
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    return {_module_name(p): {m for m in _imports(p) if not (PACKAGE / Path(*m.split(".")[1:]) / "__init__.py").is_file()}
            for p in files}


def test_no_import_cycles() -> None:
    graph = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in visiting:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [*path, nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles


def test_export_imports_nothing_from_the_lightning_side() -> None:
    lightning_side = {"lightning_lora.module", "lightning_lora.data", "lightning_lora.batching", "lightning_lora.callbacks",
                      "lightning_lora.lightning_cli", "lightning_lora.cli"}
    for module, imported in _graph().items():
        if module.startswith("lightning_lora.export"):
            assert not {m for m in imported if m.split(".")[:2] and ".".join(m.split(".")[:2]) in lightning_side}, (module, imported)
    # And importing the whole export path loads no Lightning at all.
    code = ("import sys, lightning_lora.export.pipeline, lightning_lora.export.verify; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
