"""Settings are read in exactly one place: shared/settings.py.

Read with tokens, not ASTs: see tests/importscan.py (CPython 3.11.7's AST constructor
recursion-depth bug failed such scans inside a long pytest run).
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

from tests.importscan import imported_modules

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [
    ROOT / "function_app.py",
    *sorted((ROOT / "handlers").rglob("*.py")),
    *sorted((ROOT / "shared").rglob("*.py")),
]
_READERS = {"environ", "getenv", "environb"}


def reads_environment(source: str) -> list[int]:
    """Lines with `<x>.environ` / `.getenv` / `.environb`, or `from os import environ|getenv`."""
    lines: set[int] = set()
    previous: tokenize.TokenInfo | None = None
    from_os = False
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME:
            if token.string in _READERS and (
                (previous is not None and previous.string == ".") or (from_os and token.string != "environb")
            ):
                lines.add(token.start[0])
            if previous is not None and previous.string == "from" and token.string == "os":
                from_os = True
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            from_os = False
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token
    return sorted(lines)


def test_only_settings_module_reads_the_environment() -> None:
    offenders = {}
    for path in PRODUCT:
        if path == ROOT / "shared" / "settings.py":
            continue
        found = reads_environment(path.read_text())
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_the_check_would_catch_a_reader() -> None:
    assert reads_environment("import os\nx = os.environ.get('A')\ny = os.getenv('B')") == [2, 3]
    assert reads_environment("from os import (\n    getenv,\n)\n# os.environ in a comment\n") == [2]
    assert reads_environment("s = 'os.environ in a string'\n") == []


def test_shared_never_imports_azure_functions() -> None:
    for path in sorted((ROOT / "shared").rglob("*.py")):
        names = imported_modules(path.read_text())
        assert not any(n == "azure.functions" or n.startswith("azure.functions.") for n in names), path
