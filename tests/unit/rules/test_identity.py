"""ID-001 managed identity, ID-002 portal sign-up, ID-003 portal username/password sign-in."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.model import Portal, Severity, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import SERVICE_ID, compliant


def with_service(snapshot: Snapshot | None = None, **service_changes: Any) -> Snapshot:
    base = snapshot or compliant()
    return replace(base, service=replace(base.service, **service_changes))


def with_portal(**portal_changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, portal=replace(base.portal, **portal_changes))


# -- ID-001 -------------------------------------------------------------------------------------


def test_identity_compliant() -> None:
    assert evaluate_rule("ID-001", compliant()) == []


@pytest.mark.parametrize(("value", "actual"), [(None, "(not set)"), ("None", "None"), ("none", "none")])
def test_no_managed_identity(value: str | None, actual: str) -> None:
    [finding] = evaluate_rule("ID-001", with_service(identity_type=value))
    assert finding.rule_id == "ID-001"
    assert finding.resource_id == SERVICE_ID
    assert finding.evidence.path == "identity.type"
    assert finding.evidence.actual == actual
    assert finding.evidence.expected == "SystemAssigned and/or UserAssigned"
    assert finding.severity is Severity.MEDIUM
    assert finding.remediable is True


@pytest.mark.parametrize("value", ["SystemAssigned", "UserAssigned", "SystemAssigned, UserAssigned", "systemassigned"])
def test_any_managed_identity_is_enough(value: str) -> None:
    assert evaluate_rule("ID-001", with_service(identity_type=value)) == []


# -- ID-002 -------------------------------------------------------------------------------------


def test_signup_compliant() -> None:
    assert evaluate_rule("ID-002", compliant()) == []


def test_signup_enabled() -> None:
    [finding] = evaluate_rule("ID-002", with_portal(signup_enabled=True))
    assert finding.rule_id == "ID-002"
    assert finding.resource_id == f"{SERVICE_ID}/portalsettings/signup"
    assert finding.instance_id == SERVICE_ID
    assert finding.evidence.path == "properties.enabled"
    assert (finding.evidence.actual, finding.evidence.expected) == ("true", "false")
    assert finding.remediable is True


def test_signup_unknown_is_not_a_finding() -> None:
    assert evaluate_rule("ID-002", with_portal(signup_enabled=None)) == []
    unread = replace(with_portal(signup_enabled=True), unreadable=("portal: 500 InternalServerError",))
    assert evaluate_rule("ID-002", unread) == []


@pytest.mark.parametrize("sku", ["Consumption", "consumption"])
def test_signup_not_evaluated_without_developer_portal(sku: str) -> None:
    assert evaluate_rule("ID-002", with_service(with_portal(signup_enabled=True), sku_name=sku)) == []


# -- ID-003 -------------------------------------------------------------------------------------


def test_basic_auth_compliant() -> None:
    assert evaluate_rule("ID-003", compliant()) == []


def test_basic_auth_enabled_on_the_portal_config() -> None:
    config_id = f"{SERVICE_ID}/portalconfigs/default"
    snapshot = replace(compliant(), portal=Portal(basic_auth_enabled=True, portal_config_id=config_id))
    [finding] = evaluate_rule("ID-003", snapshot)
    assert finding.rule_id == "ID-003"
    assert finding.resource_id == config_id
    assert finding.evidence.path == "properties.enableBasicAuth"
    assert (finding.evidence.actual, finding.evidence.expected) == ("true", "false")
    assert finding.remediable is True


def test_basic_auth_enabled_without_config_id_names_the_default_config() -> None:
    [finding] = evaluate_rule("ID-003", with_portal(basic_auth_enabled=True, portal_config_id=None))
    assert finding.resource_id == f"{SERVICE_ID}/portalconfigs/default"


def test_basic_auth_unknown_is_not_a_finding() -> None:
    assert evaluate_rule("ID-003", with_portal(basic_auth_enabled=None)) == []
    unread = replace(with_portal(basic_auth_enabled=True), unreadable=("portal: 403 AuthorizationFailed",))
    assert evaluate_rule("ID-003", unread) == []


def test_basic_auth_not_evaluated_without_developer_portal() -> None:
    assert evaluate_rule("ID-003", with_service(with_portal(basic_auth_enabled=True), sku_name="Consumption")) == []


def test_identity_rule_metadata() -> None:
    assert REGISTRY["ID-003"].references.azure_policy == (
        "ffe25541-3853-4f4e-b71d-064422294b11",
        "1b0d74ac-4b43-4c39-a15f-594385adc38d",
    )
    assert all(REGISTRY[r].remediable for r in ("ID-001", "ID-002", "ID-003"))
