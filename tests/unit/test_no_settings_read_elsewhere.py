"""Settings are read in exactly one place: shared/settings.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [
    ROOT / "function_app.py",
    *sorted((ROOT / "handlers").rglob("*.py")),
    *sorted((ROOT / "shared").rglob("*.py")),
]


def reads_environment(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb"}:
            lines.append(node.lineno)
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in {"environ", "getenv"} for alias in node.names)
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_settings_module_reads_the_environment() -> None:
    offenders = {}
    for path in PRODUCT:
        if path == ROOT / "shared" / "settings.py":
            continue
        found = reads_environment(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_the_check_would_catch_a_reader() -> None:
    assert reads_environment(ast.parse("import os\nx = os.environ.get('A')\ny = os.getenv('B')")) == [2, 3]


def test_shared_never_imports_azure_functions() -> None:
    for path in sorted((ROOT / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "azure.functions" or n.startswith("azure.functions.") for n in names), path
