"""Every private name of another package that the code imports is listed in ``lightning_lora.internals``,
and every listed name is still used: the list stays honest in both directions."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

from lightning_lora.internals import PRIVATE_IMPORTS

PACKAGE = REPO / "lightning_lora"
OWN = "lightning_lora"


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in dotted.split("."))


def _foreign(module: str) -> bool:
    root = module.split(".")[0]
    return root not in (OWN, "__future__")


def _bindings(tree: ast.AST) -> dict[str, str]:
    """Each name an import binds (anywhere in the file) -> the dotted path it stands for."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # ``import a.b`` binds ``a``
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return {name: path for name, path in bound.items() if _foreign(path)}


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """``a.b._c`` -> ("a", ["b", "_c"]); None when the chain is not rooted at a plain name."""
    attrs = []
    value: ast.expr = node
    while isinstance(value, ast.Attribute):
        attrs.append(value.attr)
        value = value.value
    return (value.id, attrs[::-1]) if isinstance(value, ast.Name) else None


def private_names(path: Path) -> dict[str, int]:
    """The private foreign names ``path`` uses -> the first line using each."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bound = _bindings(tree)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        found[name] = min(line, found.get(name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _foreign(alias.name) and _private(alias.name):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _foreign(node.module):
            for alias in node.names:
                if _private(f"{node.module}.{alias.name}"):
                    add(f"{node.module}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain, once
            chain = _chain(node)
            if chain and chain[0] in bound and _private(".".join(chain[1])):
                add(".".join([bound[chain[0]], *chain[1]]), node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and isinstance(node.args[0], (ast.Name, ast.Attribute))):
            chain = _chain(node.args[0]) if isinstance(node.args[0], ast.Attribute) else (node.args[0].id, [])
            if chain and chain[0] in bound:
                add(".".join([bound[chain[0]], *chain[1], node.args[1].value]), node.lineno)
    return found


def scan(package: Path) -> dict[str, list[str]]:
    """Every private foreign name used under ``package`` -> the ``file:line`` places using it."""
    places: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for name, line in private_names(path).items():
            places.setdefault(name, []).append(f"{path.relative_to(package.parent)}:{line}")
    return places


def test_private_imports_are_exactly_the_listed_ones() -> None:
    used = scan(PACKAGE)
    unlisted = {name: where for name, where in used.items() if name not in PRIVATE_IMPORTS}
    stale = sorted(set(PRIVATE_IMPORTS) - set(used))
    problems = [f"{', '.join(where)}: {name} is private; add it to PRIVATE_IMPORTS in lightning_lora/internals.py "
                "with why it is needed (or use a public name)" for name, where in sorted(unlisted.items())]
    problems += [f"{name} is listed in PRIVATE_IMPORTS but no longer used: remove it" for name in stale]
    assert not problems, "\n".join(problems)


def test_every_listed_name_says_why() -> None:
    for name, why in PRIVATE_IMPORTS.items():
        assert _private(name) and len(why.split()) >= 5 and why.rstrip().endswith("."), name


def test_the_scan_finds_every_form(tmp_path: Path) -> None:
    # The scan itself can fail: each form of a private name is found, and public or own names are not.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(
        "from __future__ import annotations\n"
        "import torch\n"
        "import numpy as np\n"
        "import torch._dynamo\n"                                  # line 4
        "from torch.distributed import _functional_collectives\n"  # line 5
        "from torch._C import _get_tracing_state as g\n"           # line 6
        "from transformers import AutoModel\n"
        "from lightning_lora._private import thing\n"            # own package: not listed
        "from . import _sibling\n"                               # relative, own package: not listed
        "def f(x):\n"
        "    torch.serialization._get_safe_globals()\n"          # line 11
        "    np._core.multiarray.dot\n"                          # line 12
        "    AutoModel._model_mapping[x]\n"                      # line 13
        "    getattr(torch.nn, '_reduction')\n"                  # line 14
        "    x._parameters, torch.__version__, torch.nn.Linear\n"  # instance attribute, dunder, public
    )
    assert scan(package) == {
        "torch._dynamo": ["pkg/mod.py:4"],
        "torch.distributed._functional_collectives": ["pkg/mod.py:5"],
        "torch._C._get_tracing_state": ["pkg/mod.py:6"],
        "torch.serialization._get_safe_globals": ["pkg/mod.py:11"],
        "numpy._core.multiarray.dot": ["pkg/mod.py:12"],
        "transformers.AutoModel._model_mapping": ["pkg/mod.py:13"],
        "torch.nn._reduction": ["pkg/mod.py:14"],
    }
