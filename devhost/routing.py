"""HTTP trigger route templates, matched the way ASP.NET Core routing (the host's) does.

Supported: literal segments (case-insensitive), `{name}`, `{name?}` (last segment only),
`{name:constraint}` for int, long, bool, guid, alpha, double, float, decimal, and catch-alls
`{*rest}` / `{**rest}` (last segment, match zero or more segments). Precedence, per
segment from the left: literal, then a constrained parameter, then a parameter, then a
catch-all; equal routes keep the order the app registered them. Complex segments such as
`file.{ext}` and other constraints are refused when the app loads, not silently misrouted.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from devhost.config import ConfigError

T = TypeVar("T")
PARAMETER = re.compile(r"^\{(\*{1,2})?([A-Za-z_][A-Za-z0-9_]*)(\?)?(?::([a-z]+))?\}$")


def _is_guid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() == text and text.lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


CONSTRAINTS: dict[str, Callable[[str], bool]] = {
    "int": lambda s: re.fullmatch(r"-?\d+", s) is not None and -(2**31) <= int(s) < 2**31,
    "long": lambda s: re.fullmatch(r"-?\d+", s) is not None and -(2**63) <= int(s) < 2**63,
    "bool": lambda s: s.lower() in ("true", "false"),
    "guid": _is_guid,
    "alpha": lambda s: re.fullmatch(r"[A-Za-z]+", s) is not None,
    "double": _is_number,
    "float": _is_number,
    "decimal": _is_number,
}

# Segment ranks: lower wins.
LITERAL, CONSTRAINED, PARAMETER_RANK, CATCH_ALL = 0, 1, 2, 4


@dataclass(frozen=True)
class Segment:
    literal: str | None = None
    name: str | None = None
    constraint: str | None = None
    optional: bool = False
    catch_all: bool = False

    @property
    def rank(self) -> int:
        if self.literal is not None:
            return LITERAL
        if self.catch_all:
            return CATCH_ALL - (1 if self.constraint else 0)
        return CONSTRAINED if self.constraint else PARAMETER_RANK

    def accepts(self, value: str) -> bool:
        if self.literal is not None:
            return value.lower() == self.literal.lower()
        return self.constraint is None or CONSTRAINTS[self.constraint](value)


@dataclass(frozen=True)
class RouteTemplate:
    template: str
    segments: tuple[Segment, ...]

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        text = template.strip().strip("/")
        parts = text.split("/") if text else []
        segments: list[Segment] = []
        names: set[str] = set()
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if not part:
                raise ConfigError(f"route {template!r}: empty segment")
            if "{" not in part and "}" not in part:
                segments.append(Segment(literal=part))
                continue
            match = PARAMETER.match(part)
            if not match:
                raise ConfigError(f"route {template!r}: segment {part!r} is not supported by devhost")
            stars, name, optional, constraint = match.groups()
            if constraint is not None and constraint not in CONSTRAINTS:
                raise ConfigError(f"route {template!r}: constraint {constraint!r} is not supported by devhost")
            if (stars or optional) and not last:
                raise ConfigError(f"route {template!r}: {part!r} may only be the last segment")
            if name.lower() in names:
                raise ConfigError(f"route {template!r}: parameter {name!r} appears twice")
            names.add(name.lower())
            segments.append(Segment(name=name, constraint=constraint, optional=bool(optional), catch_all=bool(stars)))
        return cls(template, tuple(segments))

    @property
    def precedence(self) -> tuple[int, ...]:
        return tuple(s.rank for s in self.segments)

    def match(self, path_segments: Sequence[str]) -> dict[str, str] | None:
        values: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.catch_all:
                rest = "/".join(path_segments[index:])
                if rest:
                    if not segment.accepts(rest):
                        return None
                    values[segment.name or ""] = rest
                return values
            if index >= len(path_segments):
                return values if segment.optional and index == len(path_segments) else None
            value = path_segments[index]
            if not segment.accepts(value):
                return None
            if segment.name is not None:
                values[segment.name] = value
        return values if len(path_segments) == len(self.segments) else None


def split_path(path: str) -> list[str]:
    stripped = path.strip("/")
    return stripped.split("/") if stripped else []


def ordered(routes: Sequence[tuple[RouteTemplate, T]]) -> list[tuple[RouteTemplate, T]]:
    """Routes in matching order: by precedence, registration order among equals (stable sort)."""
    # Segment by segment; a route that ends earlier sorts before a longer one sharing its ranks.
    return sorted(routes, key=lambda pair: (*pair[0].precedence, -1))
