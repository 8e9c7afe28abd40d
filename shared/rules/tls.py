"""TLS rules: legacy protocols and weak cipher suites left on in the gateway's customProperties.

APIM keeps these switches in `properties.customProperties` as strings ("True"/"False"; requests
send "false", responses return "False"), compared here case-insensitively. An ABSENT switch is
not "unknown": Azure documents its default, and a PATCH that omits a switch resets it to that
default, so the rules apply it:

- protocol switches and `Ciphers.TripleDes168`: True for services created on or before
  2018-04-01 (`createdAtUtc`), False after. No creation date: the default is unknown, no finding.
- the nine individually settable cipher suites: True (enabled) whatever the creation date.
A value that is neither true nor false is unknown: no finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from shared.model import Finding, Severity, Snapshot
from shared.rules import Param, References, Rule, rule

GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
PROTOCOLS_DOC = "https://learn.microsoft.com/azure/api-management/api-management-howto-manage-protocols-ciphers"
# "For all the settings except Http2 the default value is True if the service was created on or
# before April 1, 2018 and False otherwise" (ApiManagementServiceResource.customProperties).
LEGACY_CUTOFF = date(2018, 4, 1)

_PROTOCOL_LABELS = {"Tls10": "TLS 1.0", "Tls11": "TLS 1.1", "Ssl30": "SSL 3.0"}
CLIENT_PROTOCOL_KEYS = tuple(GW + "Security.Protocols." + p for p in _PROTOCOL_LABELS)
BACKEND_PROTOCOL_KEYS = tuple(GW + "Security.Backend.Protocols." + p for p in _PROTOCOL_LABELS)

TRIPLE_DES = "TripleDes168"  # TLS_RSA_WITH_3DES_EDE_CBC_SHA, for TLS 1.0, 1.1 and 1.2
# The suites Azure lets you switch off one by one; "The default value is true for them".
DEFAULT_ON_CIPHERS = (
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
)
# Every settable suite is CBC-mode or lacks forward secrecy (RSA key exchange); the GCM/ECDHE and
# TLS 1.3 suites Azure keeps for its own components cannot be disabled, so they are not listed.
WEAK_CIPHERS = (TRIPLE_DES, *DEFAULT_ON_CIPHERS)
# Tiers whose cipher configuration cannot be changed (Microsoft Learn, "Manage protocols and ciphers").
FIXED_CIPHER_SKUS = ("Consumption", "BasicV2", "StandardV2", "PremiumV2")

_TRUTH = {"true": True, "false": False}


def _switch(custom: Mapping[str, str], key: str) -> tuple[str, str | None]:
    """The key as Azure spelled it and its raw value (None when absent); keys match case-insensitively."""
    if key in custom:
        return key, custom[key]
    wanted = key.lower()
    for found, value in custom.items():
        if found.lower() == wanted:
            return found, value
    return key, None


def _created_on(snapshot: Snapshot) -> date | None:
    created = snapshot.service.created_at
    if not created:
        return None
    try:
        return date.fromisoformat(created.strip()[:10])
    except ValueError:
        return None


Default = tuple[bool | None, str]  # Azure's default for an absent switch (None: unknown), and why


def _dated_default(snapshot: Snapshot) -> Default:
    """Azure's default for a dated switch on this service; unknown without a creation date."""
    created = _created_on(snapshot)
    if created is None:
        return None, "creation date unknown"
    return created <= LEGACY_CUTOFF, f"service created {created.isoformat()}"


def _enabled(custom: Mapping[str, str], key: str, default: Default) -> tuple[str, str] | None:
    """(path, actual) when the switch is on, explicitly or by default; None when off or unknown."""
    path, raw = _switch(custom, key)
    if raw is not None:
        on = _TRUTH.get(raw.strip().lower())
        return (path, raw) if on else None
    value, why = default
    if value:
        return path, f"(not set: Azure default True, {why})"
    return None


def _sku_in(snapshot: Snapshot, skus: Sequence[str]) -> bool:
    return snapshot.service.sku_name.lower() in {s.lower() for s in skus}


def _protocol_findings(rule: Rule, snapshot: Snapshot, keys: Sequence[str], side: str) -> list[Finding]:
    custom = snapshot.service.custom_properties
    default = _dated_default(snapshot)
    findings = []
    for key in keys:
        hit = _enabled(custom, key, default)
        if hit is None:
            continue
        path, actual = hit
        label = _PROTOCOL_LABELS[key.rsplit(".", 1)[1]]
        findings.append(
            rule.finding(
                snapshot,
                message=f"APIM instance {snapshot.service.name} accepts {label} on the {side} side.",
                path=path,
                actual=actual,
                expected="False",
            )
        )
    return findings


@rule(
    "TLS-001",
    title="Client-side TLS 1.0, TLS 1.1 or SSL 3.0 enabled",
    severity=Severity.HIGH,
    rationale=(
        "Clients can negotiate SSL 3.0 (POODLE), TLS 1.0 or TLS 1.1 with the gateway; a downgrade "
        "exposes API keys and tokens in transit, and PCI DSS forbids these versions. HIGH: this is the "
        "internet-facing side and every caller is affected. One finding per enabled protocol. A switch "
        "absent from customProperties takes Azure's default: True for services created on or before "
        "2018-04-01, else False (no creation date: unknown, no finding). Azure is retiring TLS 1.0/1.1 "
        "in APIM (breaking change of 31 October 2025); the switch is still drift while it reads True. "
        "Remediation sets the switch to False, sending the whole customProperties map (omitted switches "
        "reset to defaults)."
    ),
    references=References(
        mcsb=("DP-3",),
        owasp_api=("API8:2023",),
        checkov=("CKV_AZURE_173",),
        docs=(PROTOCOLS_DOC, "https://learn.microsoft.com/azure/api-management/breaking-changes/overview"),
    ),
    remediable=True,
)
def client_legacy_protocols(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    return _protocol_findings(rule, snapshot, CLIENT_PROTOCOL_KEYS, "client")


@rule(
    "TLS-002",
    title="Backend TLS 1.0, TLS 1.1 or SSL 3.0 enabled",
    severity=Severity.MEDIUM,
    rationale=(
        "The gateway may speak SSL 3.0, TLS 1.0 or TLS 1.1 to backends, so a backend (or anyone able to "
        "sit between the gateway and it) can pull the connection down to a broken protocol. MEDIUM, not "
        "HIGH: the gateway offers its best version first and backend paths are usually private or "
        "Azure-internal, but credentials APIM adds for the backend travel on that link. One finding per "
        "enabled protocol; absent switches take Azure's creation-date default as in TLS-001."
    ),
    references=References(
        mcsb=("DP-3",),
        owasp_api=("API8:2023",),
        checkov=("CKV_AZURE_173",),
        docs=(PROTOCOLS_DOC,),
    ),
    remediable=True,
)
def backend_legacy_protocols(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    return _protocol_findings(rule, snapshot, BACKEND_PROTOCOL_KEYS, "backend")


@rule(
    "TLS-003",
    title="Weak TLS cipher suite enabled",
    severity=Severity.MEDIUM,
    rationale=(
        "3DES (TripleDes168, Sweet32) and the CBC-mode or non-forward-secret suites Azure lets you "
        "disable remain enabled, weakening every TLS session that negotiates them. MEDIUM: modern "
        "clients pick the strong GCM/ECDHE suites first, so exposure needs an old or hostile peer. "
        "One finding per enabled weak suite. Absent switches: TripleDes168 takes the creation-date "
        "default (as TLS-001); the nine individually settable suites default to enabled, so a fresh "
        "instance is flagged until they are set to False. Tiers whose cipher configuration cannot be "
        "changed are not evaluated (parameter skip_skus)."
    ),
    references=References(mcsb=("DP-3",), owasp_api=("API8:2023",), docs=(PROTOCOLS_DOC,)),
    params=[
        Param(
            "weak_ciphers",
            WEAK_CIPHERS,
            "Cipher names (the suffix of Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Ciphers.<name>) "
            "that must be disabled.",
        ),
        Param("skip_skus", FIXED_CIPHER_SKUS, "SKUs whose cipher configuration cannot be changed: not evaluated."),
    ],
    remediable=True,
)
def weak_ciphers(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if _sku_in(snapshot, params["skip_skus"]):
        return []
    custom = snapshot.service.custom_properties
    dated = _dated_default(snapshot)
    default_on = {c.lower() for c in DEFAULT_ON_CIPHERS}
    findings = []
    for name in params["weak_ciphers"]:
        default: Default
        if name.lower() == TRIPLE_DES.lower():
            default = dated
        elif name.lower() in default_on:
            default = (True, "settable cipher suites default to enabled")
        else:
            default = (None, "no documented default")  # not a suite Azure documents as settable
        hit = _enabled(custom, GW + "Security.Ciphers." + name, default)
        if hit is None:
            continue
        path, actual = hit
        findings.append(
            rule.finding(
                snapshot,
                message=f"APIM instance {snapshot.service.name} has the weak cipher {name} enabled.",
                path=path,
                actual=actual,
                expected="False",
            )
        )
    return findings
