"""Evaluate a documented subset of KQL over in-memory tables: the twin's Log Analytics query endpoint.

The twin answers ``POST /v1/workspaces/{id}/query`` by running the query text through :func:`run_query` over
seeded tables such as ``ApiManagementGatewayLogs``. Anything outside the subset below raises :class:`KqlError`
naming the unsupported part (and its character position); the evaluator never guesses or returns a partial result.

Supported subset
----------------
Query shape
    ``let name = <scalar expression>;`` statements (scalar only), then exactly one tabular expression: a table
    name followed by ``| operator`` pipes. ``//`` comments; a trailing ``;`` is allowed.
Tabular operators
    * ``where <bool predicate>``
    * ``project a, new = expr, expr`` (an unnamed expression is named ``Column1``, ``Column2``, ...)
    * ``project-away a, b``
    * ``extend new = expr, ...`` (later items see earlier ones; an existing column is replaced in place)
    * ``summarize [name =] agg(...), ... [by [name =] expr, ...]``; aggregations ``count()``, ``countif(pred)``,
      ``dcount(x)``, ``sum(x)``, ``avg(x)``, ``min(x)``, ``max(x)``, ``make_set(x[, max_size])``. Default names as
      in KQL: ``count_``, ``countif_``, ``dcount_x``, ``sum_x``, ``avg_x``, ``min_x``, ``max_x``, ``set_x``; a
      ``by bin(x, ...)`` column keeps the name ``x``. Groups come out in first-seen order. Without ``by``, an
      empty input still yields one row (counts and sums 0, make_set ``[]``, others null).
    * ``order by`` / ``sort by`` ``expr [asc|desc] [nulls first|nulls last], ...`` (default desc; nulls first
      when ascending, last when descending)
    * ``take N`` / ``limit N``, ``top N by expr [asc|desc] [nulls first|last]``, ``distinct a, b`` /
      ``distinct *``, ``count`` (one ``Count`` column of type long)
Scalar expressions
    * literals: ``'s'``, ``"s"`` (backslash escapes), ``@'verbatim'``, integers (long), reals, ``true``/``false``,
      ``datetime(2026-11-23T10:00:00Z)``, ``datetime(null)``, timespans ``1d 2h 30m 10s 100ms 1.5h``,
      ``timespan(1d)``, ``timespan(01:30:00)``, ``timespan(2.01:00:00)``
    * ``+ - * / %`` on numbers (integer division truncates; division by zero gives null), and datetime/timespan
      arithmetic; ``== != < <= > >=``; ``and``, ``or``, ``not(x)``; parentheses
    * string operators (case-insensitive unless suffixed ``_cs``): ``=~ !~ contains !contains contains_cs
      !contains_cs has !has has_cs !has_cs startswith !startswith startswith_cs !startswith_cs endswith
      !endswith endswith_cs !endswith_cs``; ``==``/``!=`` are case-sensitive. ``has`` matches whole terms
      (the match may not be flanked by letters or digits).
    * ``x in (a, b)``, ``!in``, ``in~``, ``!in~`` (case-insensitive); ``x between (lo .. hi)`` and ``!between``
      (inclusive; a datetime range may end with a timespan length: ``between (start .. 1h)``)
    * functions: ``ago``, ``now([offset])``, ``bin``/``floor`` (datetime, timespan, numeric), ``isnull``,
      ``isnotnull``, ``isempty``, ``isnotempty``, ``tolower``, ``toupper``, ``strlen``, ``tostring``, ``toint``,
      ``tolong``, ``todouble``/``toreal``, ``iff``/``iif``, ``coalesce``, ``startofday(dt[, days])``, ``not``,
      ``indexof(s, lookup)`` (the 0-based position of ``lookup``, -1 when absent; ordinal, case-sensitive),
      ``substring(s, start[, length])`` (a start past the end gives ``""``; a negative start counts as 0)
Semantics
    * null is ``None``. Comparisons, string operators and arithmetic with null give null, and ``where`` keeps
      only rows whose predicate is ``true``; ``and``/``or``/``not`` are three-valued. ``count()`` counts rows;
      ``dcount``, ``make_set``, ``min``, ``max``, ``avg`` and ``sum`` skip nulls.
    * string (and guid) cells are never null, as in Log Analytics: a missing or ``None`` cell reads as ``""``.
      ``isempty`` is true for null and ``""``; ``coalesce`` skips null and ``""``.
    * comparing or combining mismatched types (an int column with a string, ``contains`` on a number, ...) is
      an error, as in KQL: convert explicitly with ``tostring()``/``toint()``.
    * ``timespan`` restricts every source table to ``start <= time_column < end`` before the query runs.
    * Python values out: str, int, float, bool, tz-aware UTC datetime, timedelta, None, list/dict (dynamic).

Not supported (KqlError naming it)
    join, union, lookup, parse, mv-expand, make-series, render, evaluate, project-rename/-keep/-reorder, search,
    print, datatable, range, materialize, toscalar, tabular let and user-defined functions, regex
    (``matches regex``), ``has_any``/``has_all``/``hasprefix``/..., dynamic property access (``d.x``, ``d['x']``),
    every function and aggregation not listed above (``strcat``, ``extract``, ``arg_max``, ``percentile``, ...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["Column", "KqlError", "QueryResult", "Table", "run_query"]


class KqlError(ValueError):
    """The query is invalid, or uses KQL outside the supported subset."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Log Analytics type name: string, datetime, long, int, real, bool, dynamic, guid, timespan


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[Column, ...]
    rows: tuple[tuple[object, ...], ...]


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: tuple[dict[str, object], ...]  # keyed by column name; datetimes tz-aware


Row = dict[str, object]
Schema = dict[str, str]  # column name -> type, in column order
Fn = Callable[[Row], object]

_TYPES = frozenset({"string", "datetime", "long", "int", "real", "bool", "dynamic", "guid", "timespan"})
_NUMERIC = frozenset({"int", "long", "real"})
_STRINGY = frozenset({"string", "guid"})
_EPOCH = datetime(1, 1, 1, tzinfo=UTC)  # KQL datetimes count ticks from here; bin() aligns to it
_MICRO = timedelta(microseconds=1)

# ---------------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _Tok:
    kind: str  # ident | num | str | span | date | op | eof
    text: str
    pos: int
    value: object = None


_HYPHENATED = frozenset(
    {"project-away", "project-rename", "project-keep", "project-reorder", "mv-expand", "mv-apply", "make-series"}
    | {"parse-where", "parse-kv", "top-nested", "top-hitters", "make-graph", "graph-match"}
)
_PUNCT_RE = re.compile(r"\.\.|[=!<>]=|[=!]~|[<>=+\-*/%(),;|\[\]{}:.]")
_NUM_RE = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLOCK_RE = re.compile(r"(-)?(?:(\d+)\.)?(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,7}))?)?")
_SPAN_RE = re.compile(r"(-)?(\d+(?:\.\d+)?)([a-z]+)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_UNITS: dict[str, timedelta] = {
    **dict.fromkeys(("d", "day", "days"), timedelta(days=1)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), timedelta(hours=1)),
    **dict.fromkeys(("m", "min", "minute", "minutes"), timedelta(minutes=1)),
    **dict.fromkeys(("s", "sec", "second", "seconds"), timedelta(seconds=1)),
    **dict.fromkeys(("ms", "milli", "millis", "millisecond", "milliseconds"), timedelta(milliseconds=1)),
    **dict.fromkeys(("microsecond", "microseconds"), _MICRO),
}


def _span(number: str, unit: str, pos: int) -> timedelta:
    if unit not in _UNITS:
        raise KqlError(f"invalid timespan literal '{number}{unit}' at position {pos}")
    return _UNITS[unit] * (int(number) if number.isdigit() else float(number))


def _parse_timespan(raw: str, pos: int) -> timedelta | None:
    if raw == "null":
        return None
    if m := _CLOCK_RE.fullmatch(raw):
        sign, days, hours, minutes, seconds, frac = m.groups()
        micros = int((frac or "0").ljust(7, "0")[:6])
        span = timedelta(
            days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=int(seconds or 0), microseconds=micros
        )
        return -span if sign else span
    if m := _SPAN_RE.fullmatch(raw):
        span = _span(m.group(2), m.group(3), pos)
        return -span if m.group(1) else span
    raise KqlError(f"invalid timespan literal '{raw}' at position {pos}")


def _parse_datetime(raw: str, pos: int) -> datetime | None:
    if raw == "null":
        return None
    text = raw[:10] + "T" + raw[11:] if len(raw) > 10 and raw[10] == " " else raw
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    text = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise KqlError(f"invalid datetime literal '{raw}' at position {pos}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _read_string(q: str, start: int) -> tuple[str, int]:
    verbatim = q[start] == "@"
    i = start + 1 if verbatim else start
    quote, j, out = q[i], i + 1, []
    while j < len(q) and q[j] != "\n":
        ch = q[j]
        if ch == quote:
            if verbatim and q[j + 1 : j + 2] == quote:
                out.append(quote)
                j += 2
                continue
            return "".join(out), j + 1
        if ch == "\\" and not verbatim and j + 1 < len(q):
            out.append(_ESCAPES.get(q[j + 1], q[j + 1]))
            j += 2
            continue
        out.append(ch)
        j += 1
    raise KqlError(f"unterminated string literal at position {start}")


def _read_word(q: str, i: int) -> tuple[str, int]:
    m = _WORD_RE.match(q, i)
    if m is None:
        raise KqlError(f"unexpected character {q[i : i + 1]!r} at position {i}")
    word, end = m.group(), m.end()
    while q[end : end + 1] == "-" and (nxt := _WORD_RE.match(q, end + 1)) and f"{word}-{nxt.group()}" in _HYPHENATED:
        word, end = f"{word}-{nxt.group()}", nxt.end()
    if word == "in" and q[end : end + 1] == "~":
        word, end = "in~", end + 1
    return word, end


def _tokenize(q: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(q)
    while i < n:
        c = q[i]
        if c.isspace():
            i += 1
        elif q.startswith("//", i):
            newline = q.find("\n", i)
            i = n if newline < 0 else newline
        elif c in "'\"" or (c == "@" and q[i + 1 : i + 2] in ("'", '"')):
            value, end = _read_string(q, i)
            toks.append(_Tok("str", q[i:end], i, value))
            i = end
        elif c in "0123456789":
            m = _NUM_RE.match(q, i)
            text = m.group() if m else c
            unit = _WORD_RE.match(q, i + len(text))
            if unit:
                toks.append(_Tok("span", q[i : unit.end()], i, _span(text, unit.group(), i)))
                i = unit.end()
            else:
                toks.append(_Tok("num", text, i, int(text) if text.isdigit() else float(text)))
                i += len(text)
        elif (c.isascii() and (c.isalpha() or c == "_")) or (c == "!" and q[i + 1 : i + 2].isalpha()):
            word, end = _read_word(q, i + 1 if c == "!" else i)
            word = "!" + word if c == "!" else word
            paren = end
            while paren < n and q[paren].isspace():
                paren += 1
            if word in ("datetime", "timespan") and q[paren : paren + 1] == "(":
                close = q.find(")", paren)
                if close < 0:
                    raise KqlError(f"unterminated {word}(...) literal at position {i}")
                raw = q[paren + 1 : close].strip()
                if word == "datetime":
                    toks.append(_Tok("date", q[i : close + 1], i, _parse_datetime(raw, i)))
                else:
                    toks.append(_Tok("span", q[i : close + 1], i, _parse_timespan(raw, i)))
                i = close + 1
            else:
                toks.append(_Tok("ident", word, i))
                i = end
        else:
            op = _PUNCT_RE.match(q, i)
            if op is None:
                raise KqlError(f"unexpected character {c!r} at position {i}")
            toks.append(_Tok("op", op.group(), i))
            i = op.end()
    toks.append(_Tok("eof", "", n))
    return toks


# ---------------------------------------------------------------------------------------------------- syntax


@dataclass(frozen=True)
class _Expr:
    pos: int


@dataclass(frozen=True)
class _Lit(_Expr):
    value: object
    type: str


@dataclass(frozen=True)
class _Name(_Expr):
    name: str


@dataclass(frozen=True)
class _Call(_Expr):
    name: str
    args: tuple[_Expr, ...]


@dataclass(frozen=True)
class _Unary(_Expr):
    op: str
    operand: _Expr


@dataclass(frozen=True)
class _Binary(_Expr):
    op: str
    left: _Expr
    right: _Expr


@dataclass(frozen=True)
class _In(_Expr):
    op: str
    left: _Expr
    items: tuple[_Expr, ...]


@dataclass(frozen=True)
class _Between(_Expr):
    negated: bool
    left: _Expr
    low: _Expr
    high: _Expr


@dataclass(frozen=True)
class _Assign:
    name: str | None
    expr: _Expr


@dataclass(frozen=True)
class _SortKey:
    expr: _Expr
    desc: bool
    nulls_first: bool


@dataclass(frozen=True)
class _Op:
    kind: str  # where | project | project-away | extend | summarize | order | take | top | distinct | count
    pos: int
    items: tuple[_Assign, ...] = ()
    by: tuple[_Assign, ...] = ()
    keys: tuple[_SortKey, ...] = ()
    names: tuple[_Name, ...] = ()
    expr: _Expr | None = None


@dataclass(frozen=True)
class _Query:
    lets: tuple[tuple[str, _Expr], ...]
    table: _Name
    ops: tuple[_Op, ...]


def _has(hay: str, term: str) -> bool:
    """KQL ``has``: ``term`` occurs in ``hay`` without letters or digits running on at either edge."""
    if not term:
        return False
    start = hay.find(term)
    while start >= 0:
        end = start + len(term)
        left_ok = start == 0 or not term[0].isalnum() or not hay[start - 1].isalnum()
        right_ok = end == len(hay) or not term[-1].isalnum() or not hay[end].isalnum()
        if left_ok and right_ok:
            return True
        start = hay.find(term, start + 1)
    return False


_STR_OPS: dict[str, Callable[[str, str], bool]] = {
    "=~": lambda a, b: a.lower() == b.lower(),
    "contains": lambda a, b: b.lower() in a.lower(),
    "contains_cs": lambda a, b: b in a,
    "has": lambda a, b: _has(a.lower(), b.lower()),
    "has_cs": _has,
    "startswith": lambda a, b: a.lower().startswith(b.lower()),
    "startswith_cs": lambda a, b: a.startswith(b),
    "endswith": lambda a, b: a.lower().endswith(b.lower()),
    "endswith_cs": lambda a, b: a.endswith(b),
}
_STR_OP_NAMES = frozenset(_STR_OPS) | {"!~"} | {"!" + k for k in _STR_OPS if k != "=~"}
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_SCALAR_FUNCS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("isnull", "isnotnull", "isempty", "isnotempty", "tolower", "toupper", "strlen"), (1, 1)),
    **dict.fromkeys(("tostring", "toint", "tolong", "todouble", "toreal", "ago", "not"), (1, 1)),
    "now": (0, 1),
    "bin": (2, 2),
    "floor": (2, 2),
    "iff": (3, 3),
    "iif": (3, 3),
    "coalesce": (1, 64),
    "startofday": (1, 2),
    "indexof": (2, 2),
    "substring": (2, 3),
}
_AGG_FUNCS: dict[str, tuple[int, int]] = {
    "count": (0, 0),
    "countif": (1, 1),
    "dcount": (1, 2),
    "make_set": (1, 2),
    **dict.fromkeys(("sum", "avg", "min", "max"), (1, 1)),
}
_AGG_PREFIX = {"make_set": "set"}
_UNSUPPORTED_BINOPS = frozenset(
    {"matches", "has_any", "has_all", "hasprefix", "hassuffix", "!hasprefix", "!hassuffix", "hasprefix_cs"}
    | {"hassuffix_cs", "like", "notlike", "contains_any", "notcontains", "notcontainscs", "notbetween"}
)
_TABULAR_OPERATORS = frozenset({"union", "search", "find", "print", "evaluate", "datatable", "range", "externaldata"})
_TABULAR_FUNCS = frozenset({"materialize", "toscalar", "view", "database", "cluster", "workspace", "app"})


def _describe(tok: _Tok) -> str:
    return "end of query" if tok.kind == "eof" else f"'{tok.text}'"


def _unexpected(tok: _Tok, wanted: str) -> KqlError:
    return KqlError(f"expected {wanted} but found {_describe(tok)} at position {tok.pos}")


class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def at(self, *texts: str) -> bool:
        tok = self.toks[self.i]
        return tok.kind in ("ident", "op") and tok.text in texts

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        if not self.at(text):
            raise _unexpected(self.peek(), f"'{text}'")
        return self.next()

    def ident(self, wanted: str) -> _Tok:
        tok = self.next()
        if tok.kind != "ident":
            raise _unexpected(tok, wanted)
        return tok

    # --- statements and tabular operators

    def query(self) -> _Query:
        lets: list[tuple[str, _Expr]] = []
        while self.at("let"):
            lets.append(self.let())
        for word in ("set", "declare", "alias", "pattern", "restrict"):
            if self.at(word):
                raise KqlError(f"unsupported KQL statement '{word}' at position {self.peek().pos}")
        source = self.ident("a table name")
        if source.text in _TABULAR_OPERATORS:
            raise KqlError(f"unsupported KQL operator '{source.text}' at position {source.pos}")
        if source.text in _TABULAR_FUNCS:
            raise KqlError(f"unsupported KQL function '{source.text}' at position {source.pos}")
        ops: list[_Op] = []
        while self.accept("|"):
            ops.append(self.operator())
        while self.accept(";"):
            pass
        if self.peek().kind != "eof":
            tok = self.peek()
            if tok.kind == "ident" and tok.text == "let":
                raise KqlError(f"let statements must come before the tabular expression (position {tok.pos})")
            if self.toks[self.i - 1].text == ";":
                raise KqlError(f"only one tabular expression statement is supported (position {tok.pos})")
            raise _unexpected(tok, "'|' or end of query")
        return _Query(tuple(lets), _Name(source.pos, source.text), tuple(ops))

    def let(self) -> tuple[str, _Expr]:
        let = self.next()
        name = self.ident("a name after 'let'")
        self.expect("=")
        first = self.peek()
        if first.kind == "ident" and first.text in _TABULAR_FUNCS | _TABULAR_OPERATORS:
            what = "function" if first.text in _TABULAR_FUNCS else "operator"
            raise KqlError(f"unsupported KQL {what} '{first.text}' at position {first.pos}")
        j = self.i
        while self.toks[j].kind != "eof" and self.toks[j].text != ";":
            if self.toks[j].kind == "op" and self.toks[j].text in ("|", "{"):
                raise KqlError(
                    f"unsupported tabular let or function definition 'let {name.text}' at position {let.pos}; "
                    "only scalar let statements are supported"
                )
            j += 1
        expr = self.expr()
        self.expect(";")
        return name.text, expr

    def operator(self) -> _Op:
        tok = self.ident("an operator after '|'")
        kind, pos = tok.text, tok.pos
        if kind == "where":
            return _Op(kind, pos, expr=self.expr())
        if kind in ("project", "extend"):
            return _Op(kind, pos, items=self.assigns())
        if kind == "project-away":
            return _Op(kind, pos, names=self.names())
        if kind == "distinct":
            return _Op(kind, pos) if self.accept("*") else _Op(kind, pos, names=self.names())
        if kind == "summarize":
            aggs = () if self.at("by") else self.assigns()
            return _Op(kind, pos, items=aggs, by=self.assigns() if self.accept("by") else ())
        if kind in ("order", "sort"):
            self.expect("by")
            keys = [self.sort_key()]
            while self.accept(","):
                keys.append(self.sort_key())
            return _Op("order", pos, keys=tuple(keys))
        if kind in ("take", "limit"):
            return _Op("take", pos, expr=self.expr())
        if kind == "top":
            count = self.expr()
            self.expect("by")
            return _Op(kind, pos, expr=count, keys=(self.sort_key(),))
        if kind == "count":
            return _Op(kind, pos)
        raise KqlError(f"unsupported KQL operator '{kind}' at position {pos}")

    def assigns(self) -> tuple[_Assign, ...]:
        items: list[_Assign] = []
        while True:
            tok = self.peek()
            if tok.kind == "ident" and self.toks[self.i + 1].text == "=" and self.toks[self.i + 1].kind == "op":
                self.i += 2
                items.append(_Assign(tok.text, self.expr()))
            else:
                items.append(_Assign(None, self.expr()))
            if not self.accept(","):
                return tuple(items)

    def names(self) -> tuple[_Name, ...]:
        names: list[_Name] = []
        while True:
            tok = self.ident("a column name")
            names.append(_Name(tok.pos, tok.text))
            if not self.accept(","):
                return tuple(names)

    def sort_key(self) -> _SortKey:
        expr = self.expr()
        desc = not self.accept("asc")
        if desc:
            self.accept("desc")
        nulls_first = not desc
        if self.accept("nulls"):
            word = self.ident("'first' or 'last' after 'nulls'")
            if word.text not in ("first", "last"):
                raise _unexpected(word, "'first' or 'last' after 'nulls'")
            nulls_first = word.text == "first"
        return _SortKey(expr, desc, nulls_first)

    # --- scalar expressions, loosest binding first

    def expr(self) -> _Expr:
        left = self.conjunction()
        while self.at("or"):
            pos = self.next().pos
            left = _Binary(pos, "or", left, self.conjunction())
        return left

    def conjunction(self) -> _Expr:
        left = self.comparison()
        while self.at("and"):
            pos = self.next().pos
            left = _Binary(pos, "and", left, self.comparison())
        return left

    def comparison(self) -> _Expr:
        left = self.additive()
        tok = self.peek()
        if tok.kind not in ("op", "ident"):
            return left
        op = tok.text
        if (tok.kind == "op" and op in _CMP) or op in _STR_OP_NAMES:
            self.next()
            return _Binary(tok.pos, op, left, self.additive())
        if op in ("in", "!in", "in~", "!in~"):
            self.next()
            self.expect("(")
            items = [self.additive()]
            while self.accept(","):
                items.append(self.additive())
            if self.at("|"):
                raise KqlError(f"unsupported tabular subquery in '{op}' at position {tok.pos}")
            self.expect(")")
            return _In(tok.pos, op, left, tuple(items))
        if op in ("between", "!between"):
            self.next()
            self.expect("(")
            low = self.additive()
            self.expect("..")
            high = self.additive()
            self.expect(")")
            return _Between(tok.pos, op == "!between", left, low, high)
        if op in _UNSUPPORTED_BINOPS:
            name = "matches regex" if op == "matches" else op
            raise KqlError(f"unsupported KQL operator '{name}' at position {tok.pos}")
        return left

    def additive(self) -> _Expr:
        left = self.multiplicative()
        while self.at("+", "-"):
            tok = self.next()
            left = _Binary(tok.pos, tok.text, left, self.multiplicative())
        return left

    def multiplicative(self) -> _Expr:
        left = self.unary()
        while self.at("*", "/", "%"):
            tok = self.next()
            left = _Binary(tok.pos, tok.text, left, self.unary())
        return left

    def unary(self) -> _Expr:
        if self.at("-", "+"):
            tok = self.next()
            return _Unary(tok.pos, tok.text, self.unary())
        expr = self.primary()
        if self.at(".", "["):
            tok = self.peek()
            raise KqlError(f"unsupported dynamic property access '{tok.text}' at position {tok.pos}")
        return expr

    def primary(self) -> _Expr:
        tok = self.next()
        if tok.kind == "num":
            return _Lit(tok.pos, tok.value, "long" if isinstance(tok.value, int) else "real")
        if tok.kind in ("str", "span", "date"):
            return _Lit(tok.pos, tok.value, {"str": "string", "span": "timespan", "date": "datetime"}[tok.kind])
        if tok.kind == "op" and tok.text == "(":
            inner = self.expr()
            if self.at("|"):
                raise KqlError(f"unsupported tabular subquery at position {tok.pos}")
            self.expect(")")
            return inner
        if tok.kind != "ident":
            raise _unexpected(tok, "an expression")
        if tok.text in ("true", "false", "True", "False", "TRUE", "FALSE"):
            return _Lit(tok.pos, tok.text.lower() == "true", "bool")
        if tok.text.startswith("!"):
            raise KqlError(f"unexpected '{tok.text}' at position {tok.pos}; negate with not(...)")
        if not self.at("("):
            return _Name(tok.pos, tok.text)
        if tok.text not in _SCALAR_FUNCS and tok.text not in _AGG_FUNCS:
            raise KqlError(f"unsupported KQL function '{tok.text}' at position {tok.pos}")
        self.next()
        args: list[_Expr] = []
        if not self.accept(")"):
            args.append(self.expr())
            while self.accept(","):
                args.append(self.expr())
            self.expect(")")
        low, high = {**_SCALAR_FUNCS, **_AGG_FUNCS}[tok.text]
        if not low <= len(args) <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise KqlError(f"{tok.text}() takes {want} argument(s), got {len(args)} at position {tok.pos}")
        return _Call(tok.pos, tok.text, tuple(args))


# ---------------------------------------------------------------------------------------------------- values


def _fmt_datetime(v: datetime) -> str:
    fraction = f".{v.microsecond:06d}0" if v.microsecond else ""
    return v.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _fmt_timespan(v: timedelta) -> str:
    sign, v = ("-", -v) if v < timedelta(0) else ("", v)
    hours, rest = divmod(v.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{seconds:02d}" + (f".{v.microseconds:06d}0" if v.microseconds else "")
    return f"{sign}{v.days}.{text}" if v.days else sign + text


def _to_string(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(v, datetime):
        return _fmt_datetime(v)
    if isinstance(v, timedelta):
        return _fmt_timespan(v)
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _to_real(v: object) -> float | None:
    if isinstance(v, bool | int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    if isinstance(v, timedelta):
        return float(v // _MICRO * 10)
    return None


def _to_int(v: object, bits: int) -> int | None:
    if isinstance(v, bool | int) or (isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v)):
        n = int(v)
    elif isinstance(v, datetime):
        n = (v - _EPOCH) // _MICRO * 10
    else:
        real = _to_real(v)
        if real is None or not math.isfinite(real):
            return None
        n = int(real)
    return n if -(2 ** (bits - 1)) <= n < 2 ** (bits - 1) else None


def _key(v: object) -> object:
    """A hashable stand-in for grouping and distinct (dynamic values are unhashable)."""
    return ("dynamic", json.dumps(v, sort_keys=True, default=str)) if isinstance(v, dict | list) else v


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def _arith(op: str, a: Any, b: Any, integral: bool) -> object:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if isinstance(b, timedelta):
        return a / b if b else None
    if b == 0:
        if integral or op == "%" or isinstance(a, timedelta):
            return None
        return math.nan if a == 0 else math.copysign(math.inf, a)
    if op == "/":
        return _trunc_div(a, b) if integral else a / b
    return a - b * _trunc_div(a, b) if integral else math.fmod(a, b)


_ARITH_TYPES = {
    ("+", "datetime", "timespan"): "datetime",
    ("+", "timespan", "datetime"): "datetime",
    ("+", "timespan", "timespan"): "timespan",
    ("-", "datetime", "datetime"): "timespan",
    ("-", "datetime", "timespan"): "datetime",
    ("-", "timespan", "timespan"): "timespan",
    ("/", "timespan", "timespan"): "real",
}


def _promote(types: list[str]) -> str:
    return "real" if "real" in types else "long" if "long" in types else "int"


def _arith_type(op: str, a: str, b: str, pos: int) -> str:
    if a in _NUMERIC and b in _NUMERIC:
        return _promote([a, b])
    if (op, a, b) in _ARITH_TYPES:
        return _ARITH_TYPES[op, a, b]
    if (op in ("*", "/") and a == "timespan" and b in _NUMERIC) or (op == "*" and a in _NUMERIC and b == "timespan"):
        return "timespan"
    raise KqlError(f"operator '{op}' is not defined for {a} and {b} at position {pos}")


def _comparable(a: str, b: str) -> bool:
    if a in _NUMERIC and b in _NUMERIC:
        return True
    if a in _STRINGY and b in _STRINGY:
        return True
    return a == b and a != "dynamic"


def _check_comparable(op: str, a: str, b: str, pos: int) -> None:
    if not _comparable(a, b):
        raise KqlError(f"cannot compare {a} with {b} using '{op}' at position {pos}; convert one side explicitly")


def _lift(f: Callable[[Any, Any], object], lf: Fn, rf: Fn) -> Fn:
    """Apply ``f`` to both operands; null in, null out."""

    def fn(row: Row) -> object:
        a, b = lf(row), rf(row)
        return None if a is None or b is None else f(a, b)

    return fn


def _negate(v: Any) -> object:
    return None if v is None else -v


def _bin(v: Any, size: Any) -> object:
    if v is None or size is None or size <= size * 0:
        return None
    if isinstance(v, datetime):
        return _EPOCH + (v - _EPOCH) // size * size
    if isinstance(v, float) or isinstance(size, float):
        return float(math.floor(v / size) * size)
    return v // size * size


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _C:
    """A compiled scalar expression: its static type and its per-row evaluator."""

    type: str
    fn: Fn


def _const(type_: str, value: object) -> _C:
    return _C(type_, lambda _row: value)


def _fresh_column(used: Container[str]) -> str:
    n = 1
    while f"Column{n}" in used:
        n += 1
    return f"Column{n}"


def _unique(name: str, used: Container[str]) -> str:
    if name not in used:
        return name
    n = 1
    while f"{name}{n}" in used:
        n += 1
    return f"{name}{n}"


def _sort_rows(rows: list[Row], keys: list[tuple[Fn, _SortKey]]) -> list[Row]:
    out = list(rows)
    for fn, key in reversed(keys):  # stable sorts, least significant key first
        null_rank = 0 if key.nulls_first != key.desc else 2

        def sort_key(row: Row, fn: Fn = fn, null_rank: int = null_rank) -> tuple[Any, ...]:
            v = fn(row)
            return (null_rank,) if v is None else (1, v)

        out.sort(key=sort_key, reverse=key.desc)
    return out


AggFn = Callable[[list[Row]], object]


class _Evaluator:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.lets: dict[str, _C] = {}

    # --- scalar expressions

    def compile(self, e: _Expr, schema: Schema) -> _C:
        if isinstance(e, _Lit):
            return _const(e.type, e.value)
        if isinstance(e, _Name):
            if e.name in schema:
                name = e.name
                return _C(schema[name], lambda row: row[name])
            if e.name in self.lets:
                return self.lets[e.name]
            raise KqlError(f"unknown column '{e.name}' at position {e.pos}")
        if isinstance(e, _Unary):
            inner = self.compile(e.operand, schema)
            if inner.type not in _NUMERIC | {"timespan"}:
                raise KqlError(f"unary '{e.op}' needs a number or timespan, got {inner.type} at position {e.pos}")
            f = inner.fn
            return inner if e.op == "+" else _C(inner.type, lambda row: _negate(f(row)))
        if isinstance(e, _Binary):
            return self.binary(e, schema)
        if isinstance(e, _In):
            return self.in_list(e, schema)
        if isinstance(e, _Between):
            return self.between(e, schema)
        if isinstance(e, _Call):
            return self.call(e, schema)
        raise KqlError(f"unsupported expression at position {e.pos}")

    def const_int(self, e: _Expr, what: str) -> int:
        c = self.compile(e, {})
        value = c.fn({})
        if c.type not in ("int", "long") or not isinstance(value, int) or value < 0:
            raise KqlError(f"{what} must be a non-negative integer constant at position {e.pos}")
        return value

    def binary(self, e: _Binary, schema: Schema) -> _C:
        left, right = self.compile(e.left, schema), self.compile(e.right, schema)
        lf, rf, op = left.fn, right.fn, e.op
        if op in ("and", "or"):
            for side, node in ((left, e.left), (right, e.right)):
                if side.type != "bool":
                    raise KqlError(f"'{op}' needs bool operands, got {side.type} at position {node.pos}")
            stop = op == "or"  # the operand value that decides the result on its own

            def logic(row: Row) -> object:
                a = lf(row)
                if a is stop:
                    return stop
                b = rf(row)
                if b is stop:
                    return stop
                return None if a is None or b is None else not stop

            return _C("bool", logic)
        if op in _STR_OP_NAMES:
            for side in (left, right):
                if side.type not in _STRINGY:
                    raise KqlError(
                        f"operator '{op}' needs string operands, got {side.type} at position {e.pos}; "
                        "convert with tostring()"
                    )
            base, negated = ("=~", True) if op == "!~" else (op.lstrip("!"), op.startswith("!"))
            test = _STR_OPS[base]
            return _C("bool", _lift(lambda a, b: test(a, b) != negated, lf, rf))
        if op in _CMP:
            _check_comparable(op, left.type, right.type, e.pos)
            return _C("bool", _lift(_CMP[op], lf, rf))
        result = _arith_type(op, left.type, right.type, e.pos)
        integral = result in ("int", "long")
        return _C(result, _lift(lambda a, b: _arith(op, a, b, integral), lf, rf))

    def in_list(self, e: _In, schema: Schema) -> _C:
        left = self.compile(e.left, schema)
        items = [self.compile(item, schema) for item in e.items]
        fold = e.op.endswith("~")
        for item, node in zip(items, e.items, strict=True):
            if fold and (left.type not in _STRINGY or item.type not in _STRINGY):
                raise KqlError(f"'{e.op}' needs string values, got {left.type} and {item.type} at position {node.pos}")
            _check_comparable(e.op, left.type, item.type, node.pos)
        lf, fns, negated = left.fn, [item.fn for item in items], e.op.startswith("!")

        def fn(row: Row) -> object:
            v = lf(row)
            if v is None:
                return None
            values = [f(row) for f in fns]
            if isinstance(v, str) and fold:
                return any(isinstance(x, str) and x.lower() == v.lower() for x in values) != negated
            return (v in values) != negated

        return _C("bool", fn)

    def between(self, e: _Between, schema: Schema) -> _C:
        left, low, high = (self.compile(x, schema) for x in (e.left, e.low, e.high))
        length = left.type == "datetime" and high.type == "timespan"
        _check_comparable("between", left.type, low.type, e.low.pos)
        if not length:
            _check_comparable("between", left.type, high.type, e.high.pos)
        lf, lof, hif, negated = left.fn, low.fn, high.fn, e.negated

        def fn(row: Row) -> object:
            v: Any = lf(row)
            lo: Any = lof(row)
            hi: Any = hif(row)
            if v is None or lo is None or hi is None:
                return None
            return (lo <= v <= (lo + hi if length else hi)) != negated

        return _C("bool", fn)

    def call(self, e: _Call, schema: Schema) -> _C:
        name = e.name
        if name in _AGG_FUNCS:
            raise KqlError(f"aggregation '{name}()' is only allowed in summarize (position {e.pos})")
        args = [self.compile(a, schema) for a in e.args]
        types = [a.type for a in args]
        fns = [a.fn for a in args]

        def need(index: int, allowed: Container[str], wanted: str) -> Fn:
            if types[index] not in allowed:
                raise KqlError(f"{name}() needs {wanted}, got {types[index]} at position {e.args[index].pos}")
            return fns[index]

        if name in ("isnull", "isnotnull", "isempty", "isnotempty"):
            f, empty = fns[0], ((None,) if name in ("isnull", "isnotnull") else (None, ""))
            negated = "not" in name
            return _C("bool", lambda row: (f(row) in empty) != negated)
        if name in ("tolower", "toupper", "strlen"):
            f = need(0, _STRINGY, "a string")
            if name == "strlen":
                return _C("long", lambda row: len(str(f(row))))
            return _C("string", lambda row: str(f(row)).lower() if name == "tolower" else str(f(row)).upper())
        if name in ("tostring", "toint", "tolong", "todouble", "toreal"):
            f = fns[0]
            if name == "tostring":
                return _C("string", lambda row: _to_string(f(row)))
            if name in ("todouble", "toreal"):
                return _C("real", lambda row: _to_real(f(row)))
            bits = 32 if name == "toint" else 64
            return _C("int" if bits == 32 else "long", lambda row: _to_int(f(row), bits))
        if name == "not":
            f = need(0, {"bool"}, "a bool")
            return _C("bool", lambda row: None if (v := f(row)) is None else not v)
        if name in ("now", "ago"):
            offset = need(0, {"timespan"}, "a timespan") if args else None
            now, sign = self.now, (-1 if name == "ago" else 1)
            if offset is None:
                return _const("datetime", now)
            return _C("datetime", lambda row: _lift(lambda t, v: t + sign * v, lambda _: now, offset)(row))
        if name in ("bin", "floor"):
            if types[0] in ("datetime", "timespan"):
                need(1, {"timespan"}, "a timespan bin size")
                result = types[0]
            else:
                need(0, _NUMERIC | {"datetime", "timespan"}, "a number, datetime or timespan")
                need(1, _NUMERIC, "a numeric bin size")
                result = _promote(["long", *types])
            return _C(result, _lift(_bin, fns[0], fns[1]))
        if name == "startofday":
            f = need(0, {"datetime"}, "a datetime")
            days = need(1, {"int", "long"}, "a whole number of days") if len(args) > 1 else _const("long", 0).fn

            def startofday(row: Row) -> object:
                v, n = f(row), days(row)
                if not isinstance(v, datetime) or not isinstance(n, int):
                    return None
                return v.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=n)

            return _C("datetime", startofday)
        if name == "indexof":
            source, lookup = need(0, _STRINGY, "a string"), need(1, _STRINGY, "a string lookup")

            def indexof(row: Row) -> object:
                v, look = source(row), lookup(row)
                return None if v is None or look is None else str(v).find(str(look))

            return _C("long", indexof)
        if name == "substring":
            source = need(0, _STRINGY, "a string")
            start = need(1, {"int", "long"}, "a whole-number start")
            length = need(2, {"int", "long"}, "a whole-number length") if len(args) > 2 else None

            def substring(row: Row) -> object:
                v, first = source(row), start(row)
                if v is None or not isinstance(first, int):
                    return None
                text, first = str(v), max(first, 0)
                if length is None:
                    return text[first:]
                count = length(row)
                return None if not isinstance(count, int) else text[first : first + max(count, 0)]

            return _C("string", substring)
        if name in ("iff", "iif"):
            cond = need(0, {"bool"}, "a bool condition")
            then, other = fns[1], fns[2]
            return _C(self.unify(name, types[1:], e.pos), lambda row: then(row) if cond(row) is True else other(row))
        # coalesce: the first value that is neither null nor an empty string
        result = self.unify(name, types, e.pos)

        def coalesce(row: Row) -> object:
            for f in fns:
                v = f(row)
                if v is not None and v != "":
                    return v
            return "" if result in _STRINGY else None

        return _C(result, coalesce)

    @staticmethod
    def unify(name: str, types: list[str], pos: int) -> str:
        if all(t in _NUMERIC for t in types):
            return _promote(types)
        if len(set(types)) == 1:
            return types[0]
        raise KqlError(f"{name}() arguments must share one type, got {', '.join(types)} at position {pos}")

    # --- tabular operators

    def apply(self, op: _Op, schema: Schema, rows: list[Row]) -> tuple[Schema, list[Row]]:
        if op.kind == "where" and op.expr is not None:
            pred = self.compile(op.expr, schema)
            if pred.type != "bool":
                raise KqlError(f"where needs a bool predicate, got {pred.type} at position {op.expr.pos}")
            return schema, [row for row in rows if pred.fn(row) is True]
        if op.kind == "project":
            out: Schema = {}
            fns: list[tuple[str, Fn]] = []
            for item in op.items:
                c = self.compile(item.expr, schema)
                name = self.item_name(item, out)
                if name in out:
                    raise KqlError(f"duplicate column name '{name}' in project at position {item.expr.pos}")
                out[name] = c.type
                fns.append((name, c.fn))
            return out, [{name: f(row) for name, f in fns} for row in rows]
        if op.kind == "extend":
            schema, rows = dict(schema), [dict(row) for row in rows]
            for item in op.items:
                c = self.compile(item.expr, schema)
                name = self.item_name(item, schema)
                schema[name] = c.type
                for row in rows:
                    row[name] = c.fn(row)
            return schema, rows
        if op.kind == "project-away":
            drop = {self.column(n, schema) for n in op.names}
            return {k: t for k, t in schema.items() if k not in drop}, [
                {k: v for k, v in row.items() if k not in drop} for row in rows
            ]
        if op.kind == "distinct":
            cols = [self.column(n, schema) for n in op.names] or list(schema)
            seen: dict[tuple[object, ...], Row] = {}
            for row in rows:
                seen.setdefault(tuple(_key(row[c]) for c in cols), {c: row[c] for c in cols})
            return {c: schema[c] for c in cols}, list(seen.values())
        if op.kind == "summarize":
            return self.summarize(op, schema, rows)
        if op.kind in ("order", "top"):
            keys: list[tuple[Fn, _SortKey]] = []
            for key in op.keys:
                c = self.compile(key.expr, schema)
                if c.type == "dynamic":
                    raise KqlError(f"cannot sort by a dynamic value at position {key.expr.pos}")
                keys.append((c.fn, key))
            ordered = _sort_rows(rows, keys)
            return schema, ordered[: self.const_int(op.expr, "top count")] if op.expr is not None else ordered
        if op.kind == "take" and op.expr is not None:
            return schema, rows[: self.const_int(op.expr, "take count")]
        if op.kind == "count":
            return {"Count": "long"}, [{"Count": len(rows)}]
        raise KqlError(f"unsupported KQL operator '{op.kind}' at position {op.pos}")

    @staticmethod
    def column(name: _Name, schema: Schema) -> str:
        if name.name not in schema:
            raise KqlError(f"unknown column '{name.name}' at position {name.pos}")
        return name.name

    @staticmethod
    def item_name(item: _Assign, used: Container[str]) -> str:
        if item.name is not None:
            return item.name
        if isinstance(item.expr, _Name):
            return item.expr.name
        return _fresh_column(used)

    def summarize(self, op: _Op, schema: Schema, rows: list[Row]) -> tuple[Schema, list[Row]]:
        out: Schema = {}
        keys: list[tuple[str, Fn]] = []
        for item in op.by:
            c = self.compile(item.expr, schema)
            expr = item.expr
            if isinstance(expr, _Call) and expr.name in ("bin", "floor") and isinstance(expr.args[0], _Name):
                expr = expr.args[0]
            name = self.item_name(_Assign(item.name, expr), out)
            if name in out:
                raise KqlError(f"duplicate column name '{name}' in summarize at position {item.expr.pos}")
            out[name] = c.type
            keys.append((name, c.fn))
        aggs: list[tuple[str, AggFn]] = []
        for item in op.items:
            default, type_, agg = self.aggregation(item.expr, schema)
            name = item.name if item.name is not None else _unique(default, out)
            if name in out:
                raise KqlError(f"duplicate column name '{name}' in summarize at position {item.expr.pos}")
            out[name] = type_
            aggs.append((name, agg))
        groups: dict[tuple[object, ...], tuple[list[object], list[Row]]] = {}
        for row in rows:
            values = [f(row) for _, f in keys]
            groups.setdefault(tuple(_key(v) for v in values), (values, []))[1].append(row)
        if not keys and not groups:
            groups[()] = ([], [])
        result: list[Row] = []
        for values, members in groups.values():
            result.append(
                {**dict(zip([k for k, _ in keys], values, strict=True)), **{n: agg(members) for n, agg in aggs}}
            )
        return out, result

    def aggregation(self, e: _Expr, schema: Schema) -> tuple[str, str, AggFn]:
        if not isinstance(e, _Call) or e.name not in _AGG_FUNCS:
            raise KqlError(
                f"summarize needs one aggregation call per column, such as count() or max(x), at position {e.pos}"
            )
        name = e.name
        arg = e.args[0] if e.args else None
        suffix = arg.name if isinstance(arg, _Name) and name != "countif" else ""
        default = f"{_AGG_PREFIX.get(name, name)}_{suffix}"
        if arg is None:
            return default, "long", len
        c = self.compile(arg, schema)
        f = c.fn

        def present(rows: list[Row]) -> list[Any]:
            return [v for row in rows if (v := f(row)) is not None]

        if name == "countif":
            if c.type != "bool":
                raise KqlError(f"countif() needs a bool predicate, got {c.type} at position {arg.pos}")
            return default, "long", lambda rows: sum(1 for row in rows if f(row) is True)
        if name in ("dcount", "make_set"):
            limit = self.const_int(e.args[1], f"{name}() size") if len(e.args) > 1 else None
            if name == "dcount":
                return default, "long", lambda rows: len({_key(v) for v in present(rows)})

            def make_set(rows: list[Row]) -> object:
                unique: dict[object, object] = {}
                for v in present(rows):
                    unique.setdefault(_key(v), v)
                return list(unique.values())[:limit]

            return default, "dynamic", make_set
        if name in ("min", "max"):
            if c.type == "dynamic":
                raise KqlError(f"{name}() cannot order dynamic values at position {arg.pos}")
            pick = min if name == "min" else max
            return default, c.type, lambda rows: pick(vals) if (vals := present(rows)) else None
        if c.type not in _NUMERIC and (name == "avg" or c.type != "timespan"):
            raise KqlError(f"{name}() needs a numeric value, got {c.type} at position {arg.pos}")
        if name == "avg":
            return default, "real", lambda rows: math.fsum(vals) / len(vals) if (vals := present(rows)) else None
        zero: Any = timedelta(0) if c.type == "timespan" else 0.0 if c.type == "real" else 0
        return default, "long" if c.type == "int" else c.type, lambda rows: sum(present(rows), zero)


# ---------------------------------------------------------------------------------------------------- entry point


def _utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise KqlError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


def _cell(table: str, column: str, type_: str, v: object) -> object:
    if v is None:
        return "" if type_ in _STRINGY else None
    valid = {
        "string": isinstance(v, str),
        "guid": isinstance(v, str),
        "datetime": isinstance(v, datetime) and v.tzinfo is not None,
        "long": isinstance(v, int) and not isinstance(v, bool),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "real": isinstance(v, int | float) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "timespan": isinstance(v, timedelta),
        "dynamic": True,
    }[type_]
    if not valid:
        raise KqlError(f"table '{table}' column '{column}' is {type_} but holds {type(v).__name__} {v!r}")
    if isinstance(v, datetime):
        return v.astimezone(UTC)
    return float(v) if type_ == "real" and isinstance(v, int) else v


def _load(
    name: str, table: Table, timespan: tuple[datetime, datetime] | None, time_column: str
) -> tuple[Schema, list[Row]]:
    schema: Schema = {}
    for col in table.columns:
        if col.type not in _TYPES:
            raise KqlError(f"table '{name}' column '{col.name}' has unsupported type '{col.type}'")
        schema[col.name] = col.type
    rows = [{c: _cell(name, c, t, raw.get(c)) for c, t in schema.items()} for raw in table.rows]
    if timespan is None:
        return schema, rows
    if schema.get(time_column) != "datetime":
        raise KqlError(f"cannot apply the timespan: table '{name}' has no datetime column '{time_column}'")
    start, end = timespan
    return schema, [r for r in rows if isinstance(t := r[time_column], datetime) and start <= t < end]


def run_query(
    query: str,
    tables: Mapping[str, Table],
    *,
    now: datetime,
    timespan: tuple[datetime, datetime] | None = None,
    time_column: str = "TimeGenerated",
) -> QueryResult:
    """Evaluate ``query`` over ``tables`` at clock ``now``; ``timespan`` pre-filters sources on ``time_column``."""
    evaluator = _Evaluator(_utc(now, "now"))
    span = None
    if timespan is not None:
        span = (_utc(timespan[0], "timespan start"), _utc(timespan[1], "timespan end"))
        if span[0] > span[1]:
            raise KqlError("timespan start is after its end")
    parsed = _Parser(_tokenize(query)).query()
    for name, expr in parsed.lets:
        if isinstance(expr, _Name) and expr.name in tables:
            raise KqlError(f"unsupported tabular let '{name}' at position {expr.pos}; only scalar let is supported")
        c = evaluator.compile(expr, {})
        evaluator.lets[name] = _const(c.type, c.fn({}))
    source = parsed.table
    if source.name not in tables:
        # Log Analytics' own words (SEM0100) follow, so a client can tell a table that does not
        # exist yet (no row ever arrived) from a broken query.
        raise KqlError(
            f"unknown table '{source.name}' at position {source.pos}: "
            f"Failed to resolve table or column expression named '{source.name}'"
        )
    schema, rows = _load(source.name, tables[source.name], span, time_column)
    for op in parsed.ops:
        schema, rows = evaluator.apply(op, schema, rows)
    return QueryResult(
        tuple(Column(name, type_) for name, type_ in schema.items()),
        tuple(tuple(row[name] for name in schema) for row in rows),
    )
