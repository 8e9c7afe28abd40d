"""Identity rules: the instance's own Azure identity, and who can get into its developer portal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.model import Finding, Severity, Snapshot
from shared.rules import References, Rule, rule

_DOCS = "https://learn.microsoft.com/azure/api-management/"
OWASP_MITIGATIONS = _DOCS + "mitigate-owasp-api-threats"


def _has_developer_portal(snapshot: Snapshot) -> bool:
    # The Consumption tier has no developer portal: its portal settings mean nothing.
    return snapshot.service.sku_name.lower() != "consumption"


@rule(
    "ID-001",
    title="No managed identity",
    severity=Severity.MEDIUM,
    rationale=(
        "Without a managed identity APIM cannot read Key Vault named values and certificates, "
        "authenticate to backends with Entra tokens, or back up to storage without an account key, so "
        "secrets end up stored in APIM itself. MEDIUM: it forces weaker practice rather than exposing "
        "anything by itself; this product's own backups need it. ARM omits the identity block when there "
        "is none, so an absent identity type (as well as 'None') is reported. Remediation enables the "
        "system-assigned identity."
    ),
    references=References(
        mcsb=("IM-3",),
        docs=(
            "https://learn.microsoft.com/security/benchmark/azure/baselines/api-management-security-baseline",
            _DOCS + "authentication-managed-identity-policy",
        ),
    ),
    remediable=True,
)
def no_managed_identity(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    kind = snapshot.service.identity_type
    if kind is not None and kind.strip().lower() not in ("", "none"):
        return []
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} has no managed identity.",
            path="identity.type",
            actual=kind,
            expected="SystemAssigned and/or UserAssigned",
        )
    ]


@rule(
    "ID-002",
    title="Developer portal self sign-up enabled",
    severity=Severity.MEDIUM,
    rationale=(
        "With sign-up enabled anyone on the internet can create a developer account and, for products "
        "that do not require approval, obtain subscription keys for their APIs. MEDIUM: the blast radius "
        "depends on which products auto-approve. Portal settings that were not read, or an 'enabled' "
        "Azure did not return, give no finding. The Consumption tier has no developer portal and is not "
        "evaluated."
    ),
    references=References(
        mcsb=("IM-1",),
        owasp_api=("API2:2023",),
        docs=(_DOCS + "secure-developer-portal-access", OWASP_MITIGATIONS),
    ),
    remediable=True,
)
def portal_signup(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _has_developer_portal(snapshot) or not snapshot.readable("portal"):
        return []
    if snapshot.portal.signup_enabled is not True:
        return []
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} lets anyone sign up to its developer portal.",
            path="properties.enabled",
            actual=True,
            expected=False,
            resource_id=f"{snapshot.service.id}/portalsettings/signup",
        )
    ]


@rule(
    "ID-003",
    title="Developer portal username/password sign-in enabled",
    severity=Severity.MEDIUM,
    rationale=(
        "Username/password (basic) accounts in the developer portal sit outside Entra ID: no MFA, no "
        "conditional access, no central offboarding, and they are open to credential stuffing. MEDIUM: "
        "the portal hands out subscription keys, but an attacker still needs a working password. Azure "
        "Policy audits it (ffe25541) and its Modify policy (1b0d74ac) sets portalconfigs enableBasicAuth "
        "to false, which is also this rule's remediation. Azure Policy treats an absent enableBasicAuth "
        "as enabled; here a value Azure did not return (or portal settings not read) gives no finding, "
        "because the snapshot cannot tell 'absent' from 'not read from an older portalconfig'. The "
        "Consumption tier has no developer portal and is not evaluated."
    ),
    references=References(
        azure_policy=("ffe25541-3853-4f4e-b71d-064422294b11", "1b0d74ac-4b43-4c39-a15f-594385adc38d"),
        mcsb=("IM-1",),
        owasp_api=("API2:2023",),
        docs=(_DOCS + "developer-portal-basic-authentication", OWASP_MITIGATIONS),
    ),
    remediable=True,
)
def portal_basic_auth(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _has_developer_portal(snapshot) or not snapshot.readable("portal"):
        return []
    portal = snapshot.portal
    if portal.basic_auth_enabled is not True:
        return []
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} allows username/password sign-in to its developer portal.",
            path="properties.enableBasicAuth",
            actual=True,
            expected=False,
            resource_id=portal.portal_config_id or f"{snapshot.service.id}/portalconfigs/default",
        )
    ]
