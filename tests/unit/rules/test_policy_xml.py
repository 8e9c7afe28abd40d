"""The policy XML reader: safe parsing, sections, `<base />` composition along a chain."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

import pytest

from shared.rules._policy_xml import MAX_POLICY_CHARS, PolicyXmlError, effective_section, find, parse_policy
from tests.factories import API_POLICY, GLOBAL_POLICY

EXPRESSIONS = """<?xml version="1.0" encoding="utf-8"?>
<policies>
  <inbound>
    <base />
    <!-- a comment is not a statement -->
    <set-variable name="caller"
      value="@(context.Request.Headers.GetValueOrDefault(&quot;X-Caller&quot;, &quot;&quot;))" />
    <choose>
      <when condition="@(context.Variables.GetValueOrDefault&lt;string&gt;(&quot;caller&quot;) != &quot;&quot;)">
        <validate-jwt header-name="Authorization" />
      </when>
    </choose>
    <set-body>@{ var n = 1; return n &lt; 2 ? "a" : "b"; }</set-body>
  </inbound>
  <backend><base /></backend>
  <outbound><base /></outbound>
  <on-error><base /></on-error>
</policies>"""

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<policies><inbound>&lol2;</inbound></policies>"""


def tags(statements: Iterable[ET.Element]) -> list[str]:
    return [str(s.tag) for s in statements]


def test_parses_policy_expressions_in_attributes_and_text() -> None:
    document = parse_policy(EXPRESSIONS)
    inbound = document.section("inbound")
    assert inbound is not None
    assert tags(tuple(inbound)) == ["base", "set-variable", "choose", "set-body"]
    assert document.has_base("inbound")
    variable = find(tuple(inbound), ["set-variable"])[0]
    assert variable.get("value") == '@(context.Request.Headers.GetValueOrDefault("X-Caller", ""))'
    assert [e.tag for e in find(tuple(inbound), ["validate-jwt"])] == ["validate-jwt"]


def test_parses_with_byte_order_mark() -> None:
    assert parse_policy("\ufeff" + API_POLICY).has_base("outbound")


@pytest.mark.parametrize(
    "xml",
    [BOMB, BOMB.replace("DOCTYPE", "doctype"), '<policies><!ENTITY x "y"><inbound /></policies>'],
    ids=["billion-laughs", "lower-case-doctype", "bare-entity"],
)
def test_refuses_dtd_and_entities(xml: str) -> None:
    with pytest.raises(PolicyXmlError, match="refused"):
        parse_policy(xml)


def test_refuses_external_entity_reference_without_dtd() -> None:
    with pytest.raises(PolicyXmlError, match="not well-formed"):
        parse_policy("<policies><inbound>&xxe;</inbound></policies>")


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        ("<policies><inbound>", "not well-formed"),
        ('<policies><inbound><set-variable value="@(a == "b")" /></inbound></policies>', "not well-formed"),
        ("<policy><inbound /></policy>", "expected <policies>"),
        ("", "not well-formed"),
    ],
    ids=["truncated", "rawxml-quotes", "wrong-root", "empty"],
)
def test_refuses_malformed(xml: str, reason: str) -> None:
    with pytest.raises(PolicyXmlError, match=reason):
        parse_policy(xml)


def test_refuses_oversized_document() -> None:
    with pytest.raises(PolicyXmlError, match="more than"):
        parse_policy("<policies>" + " " * MAX_POLICY_CHARS + "</policies>")


def test_missing_section_and_section_without_base() -> None:
    document = parse_policy("<policies><inbound><rate-limit calls='1' renewal-period='1' /></inbound></policies>")
    assert document.section("backend") is None
    assert not document.has_base("backend")
    assert not document.has_base("inbound")


def test_base_nested_in_choose_does_not_count_as_base() -> None:
    # <base /> is only meaningful as a direct statement of a section.
    document = parse_policy(
        "<policies><inbound><choose><when condition='true'><base /></when></choose></inbound></policies>"
    )
    assert not document.has_base("inbound")


def test_chain_inserts_parent_at_base() -> None:
    parent = parse_policy(GLOBAL_POLICY)
    child = parse_policy("<policies><inbound><set-header name='a' /><base /><cors /></inbound></policies>")
    assert tags(effective_section([parent, child], "inbound")) == ["set-header", "rate-limit-by-key", "cors"]


def test_chain_without_base_drops_parent() -> None:
    parent = parse_policy(GLOBAL_POLICY)
    child = parse_policy("<policies><inbound><cors /></inbound></policies>")
    assert tags(effective_section([parent, child], "inbound")) == ["cors"]
    assert effective_section([parent, child], "backend") == ()  # section missing -> parent dropped


def test_scope_without_document_passes_parent_through() -> None:
    parent = parse_policy(GLOBAL_POLICY)
    product = parse_policy("<policies><inbound><base /><quota calls='5' renewal-period='60' /></inbound></policies>")
    assert tags(effective_section([parent, None, None], "inbound")) == ["rate-limit-by-key"]
    assert tags(effective_section([parent, product, None], "inbound")) == ["rate-limit-by-key", "quota"]
    assert effective_section([None, None], "inbound") == ()


def test_base_at_the_first_scope_contributes_nothing() -> None:
    assert tags(effective_section([parse_policy(API_POLICY)], "inbound")) == []
