"""The twin is for tests and the demo: product code never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def product_files() -> list[Path]:
    return [
        ROOT / "function_app.py",
        *sorted((ROOT / "handlers").rglob("*.py")),
        *sorted((ROOT / "shared").rglob("*.py")),
    ]


def test_product_code_never_imports_the_twin() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path.read_text()) if m.split(".")[0] == "twin")
        for path in product_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_every_import_form() -> None:
    source = "import twin.server\nfrom twin import kql\nimportlib.import_module('twin.apim')\n"
    assert imported_modules(source) == {"twin.server", "twin", "twin.apim"}
