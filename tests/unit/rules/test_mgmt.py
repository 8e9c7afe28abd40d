"""MGMT-001 direct management API, MGMT-002 Git, MGMT-003 minimum API version, MGMT-004 stv1."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.model import AccessSetting, Severity, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import SERVICE_ID, compliant

TENANT_ID = f"{SERVICE_ID}/tenant/access"
GIT_ID = f"{SERVICE_ID}/tenant/gitAccess"


def snap(**service_changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, service=replace(base.service, **service_changes))


def access(resource_id: str, enabled: bool | None) -> AccessSetting:
    return AccessSetting(id=resource_id, enabled=enabled, etag='"e"')


def with_access(part: str, setting: AccessSetting | None, unreadable: tuple[str, ...] = ()) -> Snapshot:
    base = replace(compliant(), unreadable=unreadable)
    if part == "tenant_access":
        return replace(base, tenant_access=setting)
    return replace(base, git_access=setting)


ACCESS_RULES = [("MGMT-001", "tenant_access", TENANT_ID), ("MGMT-002", "git_access", GIT_ID)]


# -- MGMT-001 / MGMT-002 ------------------------------------------------------------------------


@pytest.mark.parametrize(("rule_id", "part", "resource_id"), ACCESS_RULES)
def test_access_disabled_is_compliant(rule_id: str, part: str, resource_id: str) -> None:
    assert evaluate_rule(rule_id, compliant()) == []


@pytest.mark.parametrize(("rule_id", "part", "resource_id"), ACCESS_RULES)
def test_access_enabled_is_a_finding_on_the_setting(rule_id: str, part: str, resource_id: str) -> None:
    [finding] = evaluate_rule(rule_id, with_access(part, access(resource_id, True)))
    assert finding.rule_id == rule_id
    assert finding.resource_id == resource_id
    assert finding.instance_id == SERVICE_ID
    assert finding.evidence.path == "properties.enabled"
    assert (finding.evidence.actual, finding.evidence.expected) == ("true", "false")
    assert finding.severity is Severity.HIGH
    assert finding.remediable is True


@pytest.mark.parametrize(("rule_id", "part", "resource_id"), ACCESS_RULES)
def test_access_unknown_is_not_a_finding(rule_id: str, part: str, resource_id: str) -> None:
    assert evaluate_rule(rule_id, with_access(part, None)) == []
    assert evaluate_rule(rule_id, with_access(part, access(resource_id, None))) == []
    unread = with_access(part, access(resource_id, True), (f"{part}: 403 AuthorizationFailed",))
    assert evaluate_rule(rule_id, unread) == []


def test_each_access_rule_reads_only_its_own_setting() -> None:
    tenant_on = replace(compliant(), tenant_access=access(TENANT_ID, True))
    git_on = replace(compliant(), git_access=access(GIT_ID, True))
    assert evaluate_rule("MGMT-002", tenant_on) == []
    assert evaluate_rule("MGMT-001", git_on) == []


# -- MGMT-003 -----------------------------------------------------------------------------------


def test_min_api_version_compliant() -> None:
    assert evaluate_rule("MGMT-003", compliant()) == []


@pytest.mark.parametrize("value", [None, "", "  "])
def test_min_api_version_unset(value: str | None) -> None:
    [finding] = evaluate_rule("MGMT-003", snap(min_api_version=value))
    assert finding.rule_id == "MGMT-003"
    assert finding.resource_id == SERVICE_ID
    assert finding.evidence.path == "properties.apiVersionConstraint.minApiVersion"
    assert finding.evidence.actual == "(not set)"
    assert finding.evidence.expected == ">= 2019-12-01"
    assert finding.severity is Severity.LOW
    assert finding.remediable is True
    assert "no minimum" in finding.message


@pytest.mark.parametrize("value", ["2019-01-01", "2018-06-01-preview", "2019-11-30"])
def test_min_api_version_too_old(value: str) -> None:
    [finding] = evaluate_rule("MGMT-003", snap(min_api_version=value))
    assert finding.evidence.actual == value
    assert finding.evidence.expected == ">= 2019-12-01"


@pytest.mark.parametrize("value", ["2019-12-01", "2019-12-01-preview", "2019-12-01-PREVIEW", "2024-05-01"])
def test_min_api_version_new_enough(value: str) -> None:
    assert evaluate_rule("MGMT-003", snap(min_api_version=value)) == []


def test_min_api_version_unparseable_is_not_a_finding() -> None:
    assert evaluate_rule("MGMT-003", snap(min_api_version="latest")) == []


def test_min_api_version_floor_is_a_parameter() -> None:
    [finding] = evaluate_rule("MGMT-003", compliant(), {"min_api_version": "2022-08-01"})
    assert (finding.evidence.actual, finding.evidence.expected) == ("2021-08-01", ">= 2022-08-01")
    assert evaluate_rule("MGMT-003", compliant(), {"min_api_version": "2021-08-01-preview"}) == []


def test_min_api_version_bad_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="min_api_version"):
        evaluate_rule("MGMT-003", compliant(), {"min_api_version": "Dec 2019"})


def test_min_api_version_skips_consumption() -> None:
    drifted = snap(min_api_version=None, sku_name="Consumption")
    assert evaluate_rule("MGMT-003", drifted) == []
    assert len(evaluate_rule("MGMT-003", drifted, {"skip_skus": ()})) == 1


# -- MGMT-004 -----------------------------------------------------------------------------------


def test_platform_compliant() -> None:
    assert evaluate_rule("MGMT-004", compliant()) == []


@pytest.mark.parametrize("value", ["stv1", "STV1", "Stv1"])
def test_stv1_is_a_finding(value: str) -> None:
    [finding] = evaluate_rule("MGMT-004", snap(platform_version=value))
    assert finding.rule_id == "MGMT-004"
    assert finding.resource_id == SERVICE_ID
    assert finding.evidence.path == "properties.platformVersion"
    assert (finding.evidence.actual, finding.evidence.expected) == (value, "stv2")
    assert finding.remediable is False


@pytest.mark.parametrize("value", ["stv2", "stv2.1", None])
def test_other_platforms_are_not_findings(value: str | None) -> None:
    assert evaluate_rule("MGMT-004", snap(platform_version=value)) == []


def test_consumption_mtv1_is_not_a_finding() -> None:
    assert evaluate_rule("MGMT-004", snap(sku_name="Consumption", platform_version="mtv1")) == []


def test_mgmt_rule_metadata() -> None:
    assert REGISTRY["MGMT-001"].references.azure_policy[0] == "b741306c-968e-4b67-b916-5675e5c709f4"
    assert REGISTRY["MGMT-003"].references.azure_policy == ("549814b6-3212-4203-bdc8-1548d342fb67",)
    assert REGISTRY["MGMT-004"].references.azure_policy == ("1dc2fc00-2245-4143-99f4-874c937f13ef",)
    assert REGISTRY["MGMT-003"].defaults() == {"min_api_version": "2019-12-01", "skip_skus": ("Consumption",)}
