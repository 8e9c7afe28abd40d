"""The twin is for tests and the demo: product code never imports it."""

from __future__ import annotations

from pathlib import Path

# Tokens, not ASTs: building ASTs for every product file inside the long pytest process once
# failed with CPython 3.11.7's "AST constructor recursion depth mismatch" (gh-106905).
from tests.importscan import imported_modules

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_check_builds_no_ast() -> None:
    # Immune by construction: the scanner never calls the AST constructor.
    import ast
    from unittest import mock

    with mock.patch.object(ast, "parse", side_effect=AssertionError("ast.parse called")):
        assert imported_modules("from twin import apim\n__import__('twin.kql')\n") == {"twin", "twin.kql"}
