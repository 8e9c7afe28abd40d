"""Read APIM policy XML safely and compose a policy chain the way the gateway does.

Only the standard library: `xml.etree.ElementTree` with two guards in front of it. A
document carrying a DTD or an entity declaration is refused before it reaches the parser
(entity expansion is how XML bombs work, and APIM policies never need one), and so is an
oversized one. Policy expressions (`@(...)`, `@{...}`) live inside attribute values and
text, so to the XML parser they are plain strings.

The snapshot must hold policies read in APIM's `xml` format (the management API default):
there expressions are XML-escaped. The `rawxml` format is not well-formed XML and is
refused here like any other unparseable document.

Chain semantics (APIM): scopes run global -> product -> API -> operation; in each section
a child scope's `<base />` stands for the parent's section at that position, and a section
without `<base />` (or a document without that section) drops the parent's section. A
scope with no policy document at all behaves as the default policy: `<base />` everywhere.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

SECTIONS: tuple[str, ...] = ("inbound", "backend", "outbound", "on-error")

# APIM caps a policy document at 256 KiB; anything far beyond that is not a real policy.
MAX_POLICY_CHARS = 1024 * 1024

_FORBIDDEN = ("<!DOCTYPE", "<!ENTITY")


class PolicyXmlError(ValueError):
    """The text is not a policy document this module will read (the reason says why)."""


@dataclass(frozen=True)
class PolicyDocument:
    """A parsed `<policies>` document."""

    root: ET.Element

    def section(self, name: str) -> ET.Element | None:
        """The section element (`inbound`, `backend`, `outbound`, `on-error`), or None if absent."""
        for child in self.root:
            if _tag(child) == name:
                return child
        return None

    def has_base(self, name: str) -> bool:
        """Whether the section exists and has `<base />` as one of its direct statements."""
        found = self.section(name)
        return found is not None and any(_tag(child) == "base" for child in found)


def parse_policy(xml: str) -> PolicyDocument:
    """Parse a policy document; raise PolicyXmlError for DTDs, entities, bad XML or a wrong root."""
    text = xml.lstrip("\ufeff")
    if len(text) > MAX_POLICY_CHARS:
        raise PolicyXmlError(f"document is {len(text)} characters, more than {MAX_POLICY_CHARS}")
    lowered = text.lower()
    for marker in _FORBIDDEN:
        if marker.lower() in lowered:
            raise PolicyXmlError(f"document contains {marker}: DTDs and entity declarations are refused")
    try:
        # Safe here: DTDs (hence entities) were refused above, and expat resolves no external ones.
        root = ET.fromstring(text)  # noqa: S314
    except ET.ParseError as exc:
        raise PolicyXmlError(f"not well-formed XML ({exc})") from None
    if _tag(root) != "policies":
        raise PolicyXmlError(f"root element is <{root.tag}>, expected <policies>")
    return PolicyDocument(root)


Statements = tuple[ET.Element, ...]


def effective_section(chain: Sequence[PolicyDocument | None], name: str) -> Statements:
    """The statements that run in section `name` for a chain ordered broadest scope first.

    `None` in the chain is a scope with no policy document (default policy: pure `<base />`).
    The first scope has no parent, so a `<base />` there contributes nothing.
    """
    statements: Statements = ()
    for document in chain:
        if document is None:
            continue
        section = document.section(name)
        if section is None:
            statements = ()
            continue
        composed: list[ET.Element] = []
        for child in section:
            if _tag(child) == "base":
                composed.extend(statements)
            else:
                composed.append(child)
        statements = tuple(composed)
    return statements


def find(statements: Iterable[ET.Element], names: Iterable[str]) -> list[ET.Element]:
    """Every element (at any depth, e.g. inside `<choose>`) whose tag is one of `names`."""
    wanted = {n.lower() for n in names}
    return [element for element in _walk(statements) if _tag(element) in wanted]


def _walk(statements: Iterable[ET.Element]) -> Iterator[ET.Element]:
    for statement in statements:
        yield from statement.iter()


def _tag(element: ET.Element) -> str:
    # Comments and processing instructions have a callable tag; they never match a name.
    return element.tag.lower() if isinstance(element.tag, str) else ""
