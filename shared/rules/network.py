"""Network rules: how reachable the instance is from the internet, and whether it has a private path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.model import Finding, PrivateEndpointConnection, Severity, Snapshot
from shared.rules import Param, References, Rule, rule

PRIVATE_ENDPOINT_DOC = "https://learn.microsoft.com/azure/api-management/private-endpoint"
VNET_DOC = "https://learn.microsoft.com/azure/api-management/virtual-network-concepts"
# Tiers that can take neither an inbound private endpoint nor VNet injection/integration
# (Microsoft Learn "applies to" lists of the two pages above).
NO_PRIVATE_PATH_SKUS = ("Consumption", "BasicV2")


def _sku_in(snapshot: Snapshot, skus: Sequence[str]) -> bool:
    return snapshot.service.sku_name.lower() in {s.lower() for s in skus}


def _approved(endpoints: Sequence[PrivateEndpointConnection]) -> list[PrivateEndpointConnection]:
    return [pe for pe in endpoints if (pe.status or "").lower() == "approved"]


def _vnet_mode(snapshot: Snapshot) -> str | None:
    """'external' or 'internal' when the instance is in a VNet; None otherwise ("None" or absent)."""
    mode = (snapshot.service.virtual_network_type or "").strip().lower()
    return mode if mode and mode != "none" else None


@rule(
    "NET-001",
    title="Public network access enabled",
    severity=Severity.MEDIUM,
    rationale=(
        "publicNetworkAccess Enabled lets anyone on the internet reach the gateway, bypassing the private "
        "endpoints meant to be the only way in. An ABSENT property is treated as Enabled: Azure documents "
        "'Enabled' as the default and serves public traffic until it is set to Disabled (Checkov "
        "CKV_AZURE_174 fails a missing attribute the same way). MEDIUM by default because a public gateway "
        "is the normal shape for public APIs (exempt those instances); raised to HIGH when the instance "
        "already has an Approved private endpoint, since public access beside a private path is almost "
        "always drift. Not evaluated: instances in an Internal VNet (endpoints reachable only inside the "
        "VNet) and tiers that cannot take a private endpoint (parameter skip_skus), because public access "
        "can only be disabled once a private endpoint exists. Remediation sets Disabled and must refuse "
        "(raise an incident) when no Approved private endpoint exists: it would cut every client off."
    ),
    references=References(
        mcsb=("NS-2",),
        owasp_api=("API8:2023",),
        checkov=("CKV_AZURE_174",),
        docs=(PRIVATE_ENDPOINT_DOC, VNET_DOC),
    ),
    params=[
        Param("skip_skus", NO_PRIVATE_PATH_SKUS, "SKUs that cannot take an inbound private endpoint: not evaluated."),
        Param(
            "acknowledge_gateway_only",
            False,
            "Remediation only: true lets the fix disable public access when the way in is a private endpoint, "
            "which carries only the gateway (the developer portal and management endpoint become unreachable).",
        ),
    ],
    remediable=True,
)
def public_network_access(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    service = snapshot.service
    if _sku_in(snapshot, params["skip_skus"]) or _vnet_mode(snapshot) == "internal":
        return []
    value = service.public_network_access
    if value is None:
        actual = "(not set: Azure default Enabled)"
    elif value.strip().lower() == "enabled":
        actual = value
    else:
        return []  # Disabled, or a value we cannot interpret
    private = _approved(service.private_endpoints)
    message = f"APIM instance {service.name} accepts traffic from the public internet"
    message += " although it has an approved private endpoint." if private else "."
    return [
        rule.finding(
            snapshot,
            message=message,
            path="properties.publicNetworkAccess",
            actual=actual,
            expected="Disabled",
            severity=Severity.HIGH if private else None,
        )
    ]


@rule(
    "NET-002",
    title="No VNet integration and no approved private endpoint",
    severity=Severity.MEDIUM,
    rationale=(
        "With virtualNetworkType None (or absent) and no Approved private endpoint connection, every "
        "client reaches the gateway over the internet and the gateway reaches backends only through "
        "public endpoints: there is no network boundary to put in front of, or behind, the APIs. MEDIUM: "
        "a defence-in-depth gap rather than an open door. Pending, Rejected or Disconnected private "
        "endpoint connections do not count. Not remediable automatically: VNet injection and private "
        "endpoints need network design (subnets, DNS, NSGs) only an operator can decide. Tiers that "
        "support neither are not evaluated (parameter skip_skus); Azure Policy's equivalent audits only "
        "Developer and Premium by default."
    ),
    references=References(
        azure_policy=("ef619a2c-cc4d-4d03-b2ba-8c94a834d85b",),
        mcsb=("NS-1", "NS-2"),
        owasp_api=("API8:2023",),
        checkov=("CKV_AZURE_107",),
        docs=(VNET_DOC, PRIVATE_ENDPOINT_DOC),
    ),
    params=[
        Param(
            "skip_skus",
            NO_PRIVATE_PATH_SKUS,
            "SKUs that support neither VNet injection/integration nor private endpoints: not evaluated.",
        ),
    ],
    remediable=False,
)
def no_private_network_path(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    service = snapshot.service
    if _sku_in(snapshot, params["skip_skus"]) or _vnet_mode(snapshot) or _approved(service.private_endpoints):
        return []
    others = ", ".join(f"{pe.name} ({pe.status or 'no status'})" for pe in service.private_endpoints) or "none"
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {service.name} has no VNet integration and no approved private endpoint.",
            path="properties.virtualNetworkType, properties.privateEndpointConnections",
            actual=f"virtualNetworkType {service.virtual_network_type or '(not set)'}; private endpoints: {others}",
            expected="virtualNetworkType External or Internal, or an Approved private endpoint connection",
        )
    ]
