"""KEY: APIM subscription keys — scope, the Key Vault key ledger, key age and key expiry.

Only active subscriptions matter here: APIM rejects the keys of a subscription in any other
state (suspended, submitted, rejected, cancelled, expired), so their keys grant nothing.

The key ledger (`Snapshot.key_ledger`) is the product's record of which key each client
holds: one Key Vault secret per APIM subscription, tagged with the subscription's ARM id and
the slot in use; its current version's creation time is the key's age. `Snapshot.key_hashes`
holds keyed hashes of APIM's current keys for subscriptions read with listSecrets, so a rule
can compare the vault copy with APIM without ever holding a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.model import ApimSubscription, Finding, KeyHashes, Severity, Snapshot, TrackedKey
from shared.rules import Param, References, Rule, rule

SUBSCRIPTIONS_DOC = "https://learn.microsoft.com/azure/api-management/api-management-subscriptions"
DUAL_ROTATION_DOC = "https://learn.microsoft.com/azure/key-vault/secrets/tutorial-rotation-dual"
BUILTIN_SID = "master"  # the built-in all-access subscription APIM creates with every instance
_APIM_SERVICE = "/providers/microsoft.apimanagement/service/"
_SLOTS = ("primary", "secondary")


# -- helpers shared by the family -------------------------------------------------------------


def _active(sub: ApimSubscription) -> bool:
    return sub.state.strip().lower() == "active"


def _scope_kind(scope: str) -> str:
    """Classify a subscription scope: "service", "all_apis", "api", "product" or "unknown".

    APIM returns the scope in several spellings, compared case-insensitively: "/apis",
    "/apis/", or the same under a full service ARM id ("{serviceId}/apis"); the built-in
    all-access subscription's scope is the service itself ("{serviceId}/" or "/").
    """
    text = scope.strip().lower()
    if not text:
        return "unknown"  # Azure did not say: no finding
    at = text.find(_APIM_SERVICE)
    if at >= 0:
        # Drop ".../service/{name}" so only the part under the service remains.
        rest = text[at + len(_APIM_SERVICE) :]
        text = rest[rest.find("/") :] if "/" in rest else ""
    parts = [p for p in text.split("/") if p]
    if not parts:
        return "service"
    if len(parts) > 2 and parts[0] == "workspaces":
        parts = parts[2:]  # a workspace's own scopes read like the service's
    if parts == ["apis"]:
        return "all_apis"
    if len(parts) == 2 and parts[0] in ("apis", "products"):
        return "api" if parts[0] == "apis" else "product"
    return "unknown"


def _is_builtin(sub: ApimSubscription) -> bool:
    # Only the built-in subscription can be scoped to the service itself: the API accepts
    # nothing but "/apis", "/apis/{id}" and "/products/{id}" for the others.
    return sub.sid.strip().lower() == BUILTIN_SID or _scope_kind(sub.scope) == "service"


def _label(sub: ApimSubscription) -> str:
    name = f"'{sub.display_name}' ({sub.sid})" if sub.display_name and sub.display_name != sub.sid else f"'{sub.sid}'"
    return name + (" — the built-in all-access subscription" if _is_builtin(sub) else "")


def _active_subscriptions(snapshot: Snapshot) -> dict[str, ApimSubscription]:
    """Active subscriptions by lower-cased ARM id."""
    return {s.id.strip().lower(): s for s in snapshot.subscriptions if _active(s)}


def _ledger(snapshot: Snapshot) -> dict[str, list[TrackedKey]]:
    """Tracked keys by lower-cased APIM subscription ARM id (tag apim-subscription-id)."""
    found: dict[str, list[TrackedKey]] = {}
    for key in snapshot.key_ledger:
        found.setdefault(key.subscription_id.strip().lower(), []).append(key)
    return found


def _utc(moment: datetime) -> datetime:
    # A naive time is taken as UTC rather than raising on a comparison with an aware one.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f} days"


# -- rules -------------------------------------------------------------------------------------


@rule(
    "KEY-001",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's subscriptions (a workspace subscription "
        "scoped to all APIs covers every API of the workspace); findings there name the workspace and are"
        " detect-only (the remediation acts on service-level resources only)."
    ),
    title="Subscription keys should not grant access to all APIs",
    severity=Severity.HIGH,
    rationale=(
        "A key scoped to all APIs (including the built-in all-access 'master' subscription) is a "
        "skeleton key: it opens every current and future API of the instance, including ones never "
        "meant for its holder. Scope keys to a product or a single API. Azure Policy's built-in only "
        "matches scopes ending in '/apis'; this rule also recognises '/apis/' and the built-in "
        "subscription's service-level scope. Remediation suspends the subscription (opt-in), only once "
        "gateway logs show its key unused for unused_days."
    ),
    references=References(
        azure_policy=("3aa03346-d8c5-4994-a5bc-7652c2a2aef1",),
        mcsb=("PA-7",),
        owasp_api=("API5:2023", "API8:2023"),
        docs=(SUBSCRIPTIONS_DOC,),
    ),
    params=[
        Param(
            "include_builtin",
            True,
            "Also flag the built-in all-access subscription; set false to accept it while still "
            "flagging every other all-APIs subscription.",
        ),
        Param(
            "unused_days",
            30,
            "Remediation suspends a subscription only when the gateway logs (ApiManagementGatewayLogs in a "
            "workspace the service sends GatewayLogs to) show its key unused for this many days, with logs "
            "arriving over the whole window.",
            minimum=1,
        ),
    ],
    remediable=True,
)
def all_apis_scope(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    include_builtin = bool(params["include_builtin"])
    findings = []
    for sub in snapshot.subscriptions:
        if not _active(sub) or _scope_kind(sub.scope) not in ("all_apis", "service"):
            continue
        if _is_builtin(sub) and not include_builtin:
            continue
        findings.append(
            rule.finding(
                snapshot,
                message=f"Active subscription {_label(sub)} has a key that opens every API of the "
                + ("workspace." if "/workspaces/" in sub.id.lower() else "instance."),
                path="properties.scope",
                actual=sub.scope,
                expected="/products/{productId} or /apis/{apiId}",
                resource_id=sub.id,
            )
        )
    return findings


@rule(
    "KEY-002",
    workspace_note=(
        "Not evaluated in workspaces: the key ledger and rotation track the service's subscriptions only,"
        " so a workspace key would always look untracked."
    ),
    title="Active subscription keys should be tracked in the Key Vault ledger",
    severity=Severity.MEDIUM,
    rationale=(
        "A key nobody tracks is never rotated and cannot be traced to who holds it. The product "
        "rotates keys through Key Vault (one secret per subscription, tagged apim-subscription-id); "
        "an active subscription without such a secret is outside rotation. Remediation (opt-in) "
        "onboards it: APIM's current primary key becomes the secret's first version, tagged with the "
        "subscription and slot. Silent when the ledger could not be read."
    ),
    references=References(
        mcsb=("IM-8", "DP-6"),
        owasp_api=("API2:2023",),
        docs=(SUBSCRIPTIONS_DOC, DUAL_ROTATION_DOC),
    ),
    params=[
        Param(
            "include_builtin",
            True,
            "Also require the built-in all-access subscription's keys to be tracked.",
        )
    ],
    remediable=True,
)
def untracked_key(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not snapshot.readable("key_ledger"):
        return []
    include_builtin = bool(params["include_builtin"])
    ledger = _ledger(snapshot)
    findings = []
    for sub in snapshot.subscriptions:
        if not _active(sub) or sub.id.strip().lower() in ledger:
            continue
        if _is_builtin(sub) and not include_builtin:
            continue
        findings.append(
            rule.finding(
                snapshot,
                message=(
                    f"Active subscription {_label(sub)} has no Key Vault secret tracking its key, "
                    "so the key is never rotated."
                ),
                path="keyVault.secrets[tags.apim-subscription-id]",
                actual=None,
                expected=f"a secret tagged apim-subscription-id={sub.id}",
                resource_id=sub.id,
            )
        )
    return findings


@rule(
    "KEY-003",
    workspace_note=("Not evaluated in workspaces: the key ledger tracks the service's subscriptions only."),
    title="Tracked subscription keys should be rotated within the maximum age",
    severity=Severity.MEDIUM,
    rationale=(
        "The longer a key lives, the longer a leaked copy works. A key's age is its Key Vault secret "
        "version's creation time (ARM has no 'last rotated' field). A secret past its Key Vault expiry "
        "is the same problem by the ledger's own deadline (rotation sets expiry = creation + max age), "
        "so it is the same rule and one finding per subscription, with the expiry as evidence when the "
        "age alone is within bounds. Remediation (opt-in) is a dual-key rotation: regenerate the key clients "
        "are not using, store it as the new version; the key in use stays valid until the next rotation."
    ),
    references=References(
        mcsb=("IM-8", "DP-6"),
        owasp_api=("API2:2023",),
        docs=(SUBSCRIPTIONS_DOC, DUAL_ROTATION_DOC),
    ),
    # A timedelta holds at most 999,999,999 days; a century is far beyond any rotation period.
    params=[Param("max_age_days", 90, "Rotate keys at least this often (days).", minimum=1, maximum=36500)],
    remediable=True,
)
def key_too_old(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    max_age = timedelta(days=float(params["max_age_days"]))
    read_at = _utc(snapshot.read_at)
    active = _active_subscriptions(snapshot)
    findings = []
    for sub_key, keys in _ledger(snapshot).items():
        sub = active.get(sub_key)
        if sub is None:
            continue
        # One finding per subscription: the oldest of its tracked secrets speaks for it.
        key = min(keys, key=lambda k: _utc(k.created))
        age = read_at - _utc(key.created)
        expires = _utc(key.expires) if key.expires is not None else None
        expired = expires is not None and expires < read_at
        if age > max_age:
            note = " and its Key Vault secret has expired" if expired else ""
            findings.append(
                rule.finding(
                    snapshot,
                    message=(
                        f"The key of active subscription {_label(sub)} (Key Vault secret '{key.secret_name}') "
                        f"was last rotated {_days(age)} ago{note}."
                    ),
                    path=f"keyVault.secrets['{key.secret_name}'].attributes.created",
                    actual=f"{key.created.isoformat()} (age {_days(age)})",
                    expected=f"age at most {params['max_age_days']} days",
                    resource_id=sub.id,
                )
            )
        elif expires is not None and expired:
            findings.append(
                rule.finding(
                    snapshot,
                    message=(
                        f"The Key Vault secret '{key.secret_name}' holding the key of active subscription "
                        f"{_label(sub)} expired on {expires.isoformat()}; the key is overdue for rotation."
                    ),
                    path=f"keyVault.secrets['{key.secret_name}'].attributes.exp",
                    actual=expires.isoformat(),
                    expected=f"after {snapshot.read_at.isoformat()}",
                    resource_id=sub.id,
                )
            )
    return findings


def _slot_check(key: TrackedKey, apim: KeyHashes) -> tuple[str, str, Severity | None] | None:
    """None when the vault copy equals APIM's key in the tagged slot; else (actual, why, severity)."""
    slot = key.slot.strip().lower()
    holds = [s for s in _SLOTS if getattr(apim, s) == key.value_hash]
    if slot in holds:
        return None
    tag = f"apim-key-slot={key.slot.strip() or '(empty)'}"
    if holds:
        # The value is a live key, so clients work, but the slot tag is wrong: the next rotation
        # would regenerate the key clients use. Medium: no outage yet, one at the next rotation.
        return (
            f"matches APIM's {holds[0]} key ({tag})",
            f"holds APIM's {holds[0]} key but is tagged {tag}: a mismatched slot tag, so the next rotation "
            "would regenerate the key clients use",
            Severity.MEDIUM,
        )
    return (
        f"matches neither APIM key ({tag})",
        "matches neither APIM key: a key was regenerated outside the product, so clients reading the "
        "vault hold a key APIM rejects (or a leaked key was replaced without updating the vault)",
        None,
    )


def _expected_slot(key: TrackedKey) -> str:
    slot = key.slot.strip().lower()
    if slot in _SLOTS:
        return f"matches APIM's {slot} key"
    return "matches the APIM key named by apim-key-slot (primary|secondary)"


@rule(
    "KEY-004",
    workspace_note=("Not evaluated in workspaces: the key ledger tracks the service's subscriptions only."),
    title="The Key Vault copy of a subscription key should match APIM",
    severity=Severity.HIGH,
    rationale=(
        "When a key is regenerated outside the product, the Key Vault copy clients read is no longer "
        "accepted by APIM (an outage), or a leaked key was replaced but the vault not updated. Compared "
        "by keyed hashes, never values; silent for subscriptions whose keys were not read (listSecrets) "
        "or whose secret value could not be read. A copy that matches the other slot is a mislabelled "
        "slot tag (medium): it works today but the next rotation would cut clients off. Remediation "
        "(opt-in) restores service first (stores the key APIM holds in the tagged slot), then rotates; a "
        "mislabelled tag is refused, since rotating would regenerate the key clients use."
    ),
    references=References(
        mcsb=("IM-8", "DP-6"),
        owasp_api=("API2:2023",),
        docs=(SUBSCRIPTIONS_DOC, DUAL_ROTATION_DOC),
    ),
    remediable=True,
)
def vault_copy_mismatch(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    active = _active_subscriptions(snapshot)
    apim_hashes = {h.subscription_id.strip().lower(): h for h in snapshot.key_hashes}
    findings = []
    for key in snapshot.key_ledger:
        sub_key = key.subscription_id.strip().lower()
        sub = active.get(sub_key)
        apim = apim_hashes.get(sub_key)
        if sub is None or apim is None or not key.value_hash:
            continue
        problem = _slot_check(key, apim)
        if problem is None:
            continue
        actual, why, severity = problem
        found = rule.finding(
            snapshot,
            message=f"Key Vault secret '{key.secret_name}' for active subscription {_label(sub)} {why}.",
            path=f"keyVault.secrets['{key.secret_name}'].value",
            actual=actual,
            expected=_expected_slot(key),
            resource_id=sub.id,
            severity=severity,
        )
        findings.append(found)
    return findings


@rule(
    "KEY-005",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's subscriptions; findings there name the "
        "workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Active subscriptions should have an expiration date",
    severity=Severity.LOW,
    rationale=(
        "An expiration date records when access is due for review; without one a key lives forever by "
        "default. APIM does not enforce the date (it is for audit only; state governs access), so a "
        "subscription still active past its expiration date is reported too, at medium severity: access "
        "that was meant to end still works. No remediation: choosing when someone's access ends, or "
        "suspending it, is a business decision. The built-in all-access subscription is skipped by "
        "default: it belongs to the instance, not to a consumer, and KEY-001 covers it."
    ),
    references=References(
        mcsb=("PA-4",),
        owasp_api=("API2:2023",),
        docs=(SUBSCRIPTIONS_DOC,),
    ),
    params=[Param("ignore_builtin", True, "Skip the built-in all-access subscription.")],
    remediable=False,
)
def no_expiry(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    ignore_builtin = bool(params["ignore_builtin"])
    read_at = _utc(snapshot.read_at)
    findings = []
    for sub in snapshot.subscriptions:
        if not _active(sub) or (ignore_builtin and _is_builtin(sub)):
            continue
        if sub.expiration_date is None:
            findings.append(
                rule.finding(
                    snapshot,
                    message=f"Active subscription {_label(sub)} has no expiration date.",
                    path="properties.expirationDate",
                    actual=None,
                    expected="a date",
                    resource_id=sub.id,
                )
            )
        elif _utc(sub.expiration_date) < read_at:
            found = rule.finding(
                snapshot,
                message=(
                    f"Subscription {_label(sub)} passed its expiration date "
                    f"{sub.expiration_date.isoformat()} but is still active: APIM does not enforce the date."
                ),
                path="properties.state",
                actual=f"active (expirationDate {sub.expiration_date.isoformat()})",
                expected="suspended, cancelled or expired after the expiration date",
                resource_id=sub.id,
                severity=Severity.MEDIUM,
            )
            findings.append(found)
    return findings
