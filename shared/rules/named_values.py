"""SEC: APIM named values — secrets belong in Key Vault, and Key Vault references must refresh.

A named value is plain (its value is returned to anyone who can read the instance), secret
(encrypted by APIM, returned only by listValue) or a Key Vault reference (APIM reads the
secret with its managed identity and refreshes it within about four hours).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from shared.model import Finding, NamedValue, Severity, Snapshot
from shared.rules import Param, References, Rule, rule

NAMED_VALUES_DOC = "https://learn.microsoft.com/azure/api-management/api-management-howto-properties"
DEFAULT_SECRET_NAME_PATTERNS = ("key", "secret", "password", "passwd", "pwd", "token", "connectionstring", "credential")
_SEPARATORS = re.compile(r"[\s._-]+")


def _squash(text: str) -> str:
    """Lower-case without separators, so "Connection-String" matches "connectionstring"."""
    return _SEPARATORS.sub("", text.lower())


def _secret_like(nv: NamedValue, patterns: Iterable[str]) -> str | None:
    """The first pattern found in the named value's name or display name, if any."""
    names = (_squash(nv.name), _squash(nv.display_name or ""))
    for pattern in patterns:
        squashed = _squash(str(pattern))
        if squashed and any(squashed in name for name in names):
            return str(pattern)
    return None


def _label(nv: NamedValue) -> str:
    shown = nv.display_name or nv.name
    return f"'{shown}'" if shown == nv.name else f"'{shown}' ({nv.name})"


@rule(
    "SEC-001",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's named values; findings there name the "
        "workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Secret named values should be Key Vault references",
    severity=Severity.MEDIUM,
    rationale=(
        "A secret kept in APIM has no rotation, no expiry and no access log of its own, and anyone who "
        "may call listValue reads it. A Key Vault reference gives per-secret access control, audit and "
        "rotation that APIM picks up by itself. Remediation moves the value into Key Vault and switches "
        "the named value to a reference; it needs the instance's managed identity (ID-001) first. "
        "Beyond Azure Policy's built-in, a plain (non-secret) named value whose name looks like a secret "
        "is reported at low severity without remediation: if it is one, its value is readable by every "
        "reader of the instance, but a name is only a hint, and the product cannot tell a key from a "
        "header name. Set secret_name_patterns to [] to turn the hint off."
    ),
    references=References(
        azure_policy=("f1cc7827-022c-473e-836e-5a51cae0b249",),
        mcsb=("IM-8", "DP-6"),
        owasp_api=("API8:2023",),
        docs=(NAMED_VALUES_DOC,),
    ),
    params=[
        Param(
            "secret_name_patterns",
            DEFAULT_SECRET_NAME_PATTERNS,
            "Case-insensitive substrings (separators - _ . and spaces ignored) that make a plain named "
            "value's name or display name look like a secret; [] turns the hint off.",
        )
    ],
    remediable=True,
)
def secret_not_in_key_vault(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    patterns = tuple(params["secret_name_patterns"] or ())
    findings = []
    for nv in snapshot.named_values:
        if (nv.key_vault_secret_id or "").strip():
            continue
        if nv.secret:
            findings.append(
                rule.finding(
                    snapshot,
                    message=f"Secret named value {_label(nv)} is stored in APIM instead of referencing Key Vault.",
                    path="properties.keyVault.secretIdentifier",
                    actual=None,
                    expected="a Key Vault secret identifier",
                    resource_id=nv.id,
                )
            )
            continue
        hint = _secret_like(nv, patterns)
        if hint is None:
            continue
        # Only a person can tell whether the value is a secret: nothing to apply automatically.
        found = rule.finding(
            snapshot,
            message=(
                f"Named value {_label(nv)} is plain text but its name contains '{hint}': if it holds a secret, "
                "every reader of the instance can read it; make it a Key Vault reference (or exempt it)."
            ),
            path="properties.secret",
            actual=f"false (name contains '{hint}')",
            expected="a Key Vault reference for secret values",
            resource_id=nv.id,
            severity=Severity.LOW,
            remediable=False,
        )
        findings.append(found)
    return findings


@rule(
    "SEC-002",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's named values; findings there name the "
        "workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Key Vault named values should refresh successfully",
    severity=Severity.HIGH,
    rationale=(
        "When APIM cannot refresh a Key Vault reference (typically its identity lost access, or the "
        "secret was disabled or deleted), policies keep using a stale value, or none if the first "
        "fetch failed: rotated credentials stop working or a revoked one keeps working. No remediation: "
        "the cause (identity, access policy or RBAC, firewall, secret state) needs a person; a refresh "
        "without fixing it fails again."
    ),
    references=References(
        mcsb=("IM-8", "DP-6"),
        owasp_api=("API8:2023",),
        docs=(NAMED_VALUES_DOC,),
    ),
    remediable=False,
)
def key_vault_refresh_failed(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    findings = []
    for nv in snapshot.named_values:
        code = (nv.key_vault_last_status_code or "").strip()
        if not code or code.lower() == "success":
            continue  # no status: not a Key Vault reference, or never reported
        when = f" at {nv.key_vault_last_status_time.isoformat()}" if nv.key_vault_last_status_time else ""
        detail = f": {nv.key_vault_last_status_message.strip()[:200]}" if nv.key_vault_last_status_message else ""
        findings.append(
            rule.finding(
                snapshot,
                message=f"Named value {_label(nv)} failed to refresh from Key Vault{when} ({code}){detail}.",
                path="properties.keyVault.lastStatus.code",
                actual=code,
                expected="Success",
                resource_id=nv.id,
            )
        )
    return findings
