"""NET-001 public network access, NET-002 no private network path."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.model import PrivateEndpointConnection, Severity, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import SERVICE_ID, compliant


def snap(**service_changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, service=replace(base.service, **service_changes))


def pe(name: str, status: str | None) -> PrivateEndpointConnection:
    return PrivateEndpointConnection(id=f"{SERVICE_ID}/privateEndpointConnections/{name}", name=name, status=status)


# -- NET-001 ------------------------------------------------------------------------------------


def test_public_access_compliant() -> None:
    assert evaluate_rule("NET-001", compliant()) == []


@pytest.mark.parametrize("value", ["Enabled", "enabled", "ENABLED"])
def test_public_access_enabled_beside_a_private_endpoint_is_high(value: str) -> None:
    [finding] = evaluate_rule("NET-001", snap(public_network_access=value))
    assert finding.rule_id == "NET-001"
    assert finding.resource_id == SERVICE_ID
    assert finding.evidence.path == "properties.publicNetworkAccess"
    assert finding.evidence.actual == value
    assert finding.evidence.expected == "Disabled"
    assert finding.severity is Severity.HIGH
    assert finding.remediable is True
    assert "approved private endpoint" in finding.message


def test_public_access_enabled_without_private_endpoint_is_medium() -> None:
    pending = (pe("pe1", "Pending"),)
    [finding] = evaluate_rule("NET-001", snap(public_network_access="Enabled", private_endpoints=pending))
    assert finding.severity is Severity.MEDIUM
    assert finding.evidence.actual == "Enabled"


def test_absent_public_access_is_azures_default_enabled() -> None:
    [finding] = evaluate_rule("NET-001", snap(public_network_access=None))
    assert finding.evidence.actual == "(not set: Azure default Enabled)"
    assert finding.evidence.expected == "Disabled"


@pytest.mark.parametrize("value", ["Disabled", "disabled", "DISABLED", "SomethingNew"])
def test_public_access_disabled_or_unknown_value(value: str) -> None:
    assert evaluate_rule("NET-001", snap(public_network_access=value, private_endpoints=())) == []


def test_internal_vnet_is_not_public() -> None:
    assert evaluate_rule("NET-001", snap(public_network_access="Enabled", virtual_network_type="Internal")) == []
    assert evaluate_rule("NET-001", snap(public_network_access="Enabled", virtual_network_type="internal")) == []


def test_external_vnet_is_still_public() -> None:
    found = evaluate_rule("NET-001", snap(public_network_access="Enabled", virtual_network_type="External"))
    assert [f.rule_id for f in found] == ["NET-001"]


@pytest.mark.parametrize("sku", ["Consumption", "consumption", "BasicV2"])
def test_public_access_skipped_where_no_private_endpoint_is_possible(sku: str) -> None:
    drifted = snap(public_network_access="Enabled", private_endpoints=(), sku_name=sku)
    assert evaluate_rule("NET-001", drifted) == []
    assert len(evaluate_rule("NET-001", drifted, {"skip_skus": ()})) == 1


# -- NET-002 ------------------------------------------------------------------------------------


def test_private_path_compliant() -> None:
    assert evaluate_rule("NET-002", compliant()) == []


@pytest.mark.parametrize("vnet", ["None", "none", None])
def test_no_vnet_and_no_private_endpoint(vnet: str | None) -> None:
    [finding] = evaluate_rule("NET-002", snap(virtual_network_type=vnet, private_endpoints=()))
    assert finding.rule_id == "NET-002"
    assert finding.resource_id == SERVICE_ID
    assert finding.remediable is False
    assert finding.severity is Severity.MEDIUM
    assert finding.evidence.path == "properties.virtualNetworkType, properties.privateEndpointConnections"
    assert finding.evidence.actual == f"virtualNetworkType {vnet or '(not set)'}; private endpoints: none"
    assert (
        finding.evidence.expected
        == "virtualNetworkType External or Internal, or an Approved private endpoint connection"
    )


def test_unapproved_private_endpoints_do_not_count() -> None:
    endpoints = (pe("pe1", "Pending"), pe("pe2", "Rejected"), pe("pe3", None))
    [finding] = evaluate_rule("NET-002", snap(private_endpoints=endpoints))
    assert finding.evidence.actual == (
        "virtualNetworkType None; private endpoints: pe1 (Pending), pe2 (Rejected), pe3 (no status)"
    )


@pytest.mark.parametrize("status", ["Approved", "approved", "APPROVED"])
def test_one_approved_private_endpoint_is_enough(status: str) -> None:
    assert evaluate_rule("NET-002", snap(private_endpoints=(pe("pe1", "Pending"), pe("pe2", status)))) == []


@pytest.mark.parametrize("vnet", ["External", "Internal", "internal"])
def test_vnet_injection_is_enough(vnet: str) -> None:
    assert evaluate_rule("NET-002", snap(virtual_network_type=vnet, private_endpoints=())) == []


@pytest.mark.parametrize("sku", ["Consumption", "BasicV2"])
def test_no_private_path_skipped_on_tiers_without_one(sku: str) -> None:
    drifted = snap(private_endpoints=(), sku_name=sku)
    assert evaluate_rule("NET-002", drifted) == []
    assert len(evaluate_rule("NET-002", drifted, {"skip_skus": ()})) == 1


def test_network_rule_metadata() -> None:
    net1, net2 = REGISTRY["NET-001"], REGISTRY["NET-002"]
    assert (net1.remediable, net2.remediable) == (True, False)
    assert net1.references.checkov == ("CKV_AZURE_174",)
    assert net2.references.checkov == ("CKV_AZURE_107",)
    assert net2.references.azure_policy == ("ef619a2c-cc4d-4d03-b2ba-8c94a834d85b",)
