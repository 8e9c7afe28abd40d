"""Which modules a Python source imports, read with `tokenize` instead of `ast`.

Tests run this over many files inside a long pytest process; building ASTs there once failed
with CPython 3.11.7's "AST constructor recursion depth mismatch" (a bug in the AST
constructor's recursion accounting, gh-106905), so this never builds one. Tokens are enough:
the import statement forms are few. Seen: `import a.b [as x], c`, `from a.b import x` (at
any indentation, so imports inside functions count), and `import_module("a.b")` /
`__import__("a.b")` with a string literal. Relative imports (`from . import x`) are skipped.
"""

from __future__ import annotations

import io
import tokenize

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
_DYNAMIC = {"import_module", "__import__"}


def _statements(source: str) -> list[list[tokenize.TokenInfo]]:
    statements: list[list[tokenize.TokenInfo]] = [[]]
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in _SKIP:
            continue
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or (token.type == tokenize.OP and token.string == ";"):
            statements.append([])
        elif (
            token.type == tokenize.OP
            and token.string == ":"
            and statements[-1][:1]
            and statements[-1][0].string
            in (
                "if",
                "else",
                "try",
                "except",
                "finally",
                "with",
                "for",
                "while",
                "elif",
                "def",
                "async",
                "class",
            )
        ):
            # `if x: import y` on one line: what follows the colon is a statement of its own
            statements.append([])
        else:
            statements[-1].append(token)
    return [s for s in statements if s]


def _dotted(tokens: list[tokenize.TokenInfo], start: int) -> tuple[str, int]:
    parts: list[str] = []
    i = start
    while i < len(tokens) and (tokens[i].type == tokenize.NAME or tokens[i].string == "."):
        if tokens[i].type == tokenize.NAME and tokens[i].string in ("import", "as"):
            break
        parts.append(tokens[i].string)
        i += 1
    return "".join(parts), i


def imported_modules(source: str) -> set[str]:
    found: set[str] = set()
    for statement in _statements(source):
        words = [t.string for t in statement]
        if words[0] == "import":
            i = 1
            while i < len(statement):
                name, i = _dotted(statement, i)
                if name:
                    found.add(name)
                while i < len(statement) and statement[i].string != ",":
                    i += 1  # skip `as alias`
                i += 1
        elif words[0] == "from" and len(words) > 1 and words[1] != ".":
            name, _ = _dotted(statement, 1)
            if name and not name.startswith("."):
                found.add(name)
        for i, token in enumerate(statement[:-2]):
            if (
                token.type == tokenize.NAME
                and token.string in _DYNAMIC
                and statement[i + 1].string == "("
                and statement[i + 2].type == tokenize.STRING
            ):
                found.add(statement[i + 2].string.lstrip("rRuU").strip("'\""))
    return found
