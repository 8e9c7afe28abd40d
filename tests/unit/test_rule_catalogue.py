"""The catalogue as a whole: every rule is complete, the compliant snapshot passes them all,
and docs/rules.md is what the registry generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.model import Severity
from shared.report import render_rules_markdown
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import compliant

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "NET-001", "NET-002", "TLS-001", "TLS-002", "TLS-003", "MGMT-001", "MGMT-002", "MGMT-003", "MGMT-004",
    "ID-001", "ID-002", "ID-003", "KEY-001", "KEY-002", "KEY-003", "KEY-004", "KEY-005", "SEC-001", "SEC-002",
    "API-001", "API-002", "API-003", "API-004", "API-005", "API-006", "LOG-001", "LOG-002", "LOG-003",
}  # fmt: skip


def test_the_issue_catalogue_is_registered() -> None:
    assert set(REGISTRY) >= REQUIRED


@pytest.mark.parametrize("rule_id", sorted(REGISTRY))
def test_rule_is_complete(rule_id: str) -> None:
    rule = REGISTRY[rule_id]
    assert re.fullmatch(r"[A-Z]+-\d{3}", rule.id)
    assert rule.title
    assert len(rule.rationale) > 40, "a rationale says why an operator should care"
    assert isinstance(rule.severity, Severity)
    refs = rule.references
    assert refs.azure_policy or refs.mcsb or refs.owasp_api or refs.checkov or refs.docs, "no reference"
    names = [p.name for p in rule.params]
    assert len(names) == len(set(names))
    assert all(p.description for p in rule.params)


@pytest.mark.parametrize("rule_id", sorted(REGISTRY))
def test_compliant_snapshot_passes_every_rule(rule_id: str) -> None:
    assert evaluate_rule(rule_id, compliant()) == []


def test_docs_rules_md_is_current() -> None:
    assert (ROOT / "docs" / "rules.md").read_text() == render_rules_markdown(), (
        "docs/rules.md is stale: regenerate it with `.venv/bin/apim-remediator rules --format markdown > docs/rules.md`"
    )


def test_a_rule_is_remediable_exactly_when_a_remediation_is_registered() -> None:
    from shared.actions import REMEDIATIONS

    declared = {rule_id for rule_id, rule in REGISTRY.items() if rule.remediable}
    assert declared == set(REMEDIATIONS)
