"""KEY rules: subscription scope, the Key Vault ledger, key age, vault/APIM agreement, expiry."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from shared.model import ApimSubscription, Finding, KeyHashes, Severity, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import NOW, SERVICE_ID, compliant, hashes, sub_id, subscription, tracked

KEY_RULES = ("KEY-001", "KEY-002", "KEY-003", "KEY-004", "KEY-005")


def only(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, findings
    return findings[0]


def with_subs(*subs: ApimSubscription, **changes: Any) -> Snapshot:
    """The compliant snapshot with these subscriptions (ledger and hashes still for orders-mobile)."""
    return compliant(subscriptions=tuple(subs), **changes)


def test_compliant_snapshot_has_no_key_findings() -> None:
    for rule_id in KEY_RULES:
        assert evaluate_rule(rule_id, compliant()) == [], rule_id


def test_registry_metadata() -> None:
    assert REGISTRY["KEY-001"].severity is Severity.HIGH
    assert REGISTRY["KEY-004"].severity is Severity.HIGH
    # KEY-002/003/004 are fixed by key rotation, which arrives with its own issue.
    assert [r for r in KEY_RULES if REGISTRY[r].remediable] == ["KEY-001", "KEY-002", "KEY-003", "KEY-004"]
    assert REGISTRY["KEY-001"].references.azure_policy == ("3aa03346-d8c5-4994-a5bc-7652c2a2aef1",)
    assert REGISTRY["KEY-001"].defaults() == {"include_builtin": True, "unused_days": 30}
    assert REGISTRY["KEY-003"].defaults() == {"max_age_days": 90}
    assert REGISTRY["KEY-005"].defaults() == {"ignore_builtin": True}


# -- KEY-001 all-APIs scope -------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [
        "/apis",
        "/apis/",
        "/APIS",
        "/Apis/",
        " /apis ",
        f"{SERVICE_ID}/apis",
        f"{SERVICE_ID}/apis/",
        f"{SERVICE_ID.upper()}/APIS",
        f"{SERVICE_ID}/workspaces/team-a/apis",
    ],
)
def test_key001_all_apis_spellings(scope: str) -> None:
    snap = with_subs(subscription("orders-mobile"), subscription("wide", scope=scope))
    f = only(evaluate_rule("KEY-001", snap))
    assert (f.rule_id, f.resource_id, f.instance_id) == ("KEY-001", sub_id("wide"), SERVICE_ID)
    assert f.severity is Severity.HIGH
    assert f.remediable
    assert (f.evidence.path, f.evidence.actual) == ("properties.scope", scope)
    assert f.evidence.expected == "/products/{productId} or /apis/{apiId}"
    assert "built-in" not in f.message


@pytest.mark.parametrize("scope", [f"{SERVICE_ID}/", "/", SERVICE_ID, f"{SERVICE_ID.lower()}/"])
def test_key001_builtin_master_scope_is_flagged_by_default(scope: str) -> None:
    master = subscription("master", display_name="Built-in all-access subscription", scope=scope)
    f = only(evaluate_rule("KEY-001", with_subs(master)))
    assert f.resource_id == sub_id("master")
    assert f.evidence.actual == scope
    assert "built-in all-access" in f.message


def test_key001_builtin_can_be_accepted_while_others_still_flag() -> None:
    snap = with_subs(
        subscription("master", scope=f"{SERVICE_ID}/"),
        subscription("wide", scope="/apis"),
        # A service-level scope marks the built-in one even if its name differs.
        subscription("renamed-builtin", scope="/"),
    )
    assert {f.resource_id for f in evaluate_rule("KEY-001", snap)} == {
        sub_id("master"),
        sub_id("wide"),
        sub_id("renamed-builtin"),
    }
    f = only(evaluate_rule("KEY-001", snap, {"include_builtin": False}))
    assert f.resource_id == sub_id("wide")


@pytest.mark.parametrize(
    "scope",
    [
        "/apis/orders",
        "/APIS/orders/",
        f"{SERVICE_ID}/apis/orders",
        "/apis/apis",  # an API whose id is "apis" is one API, not all of them
        "/products/mobile",
        f"{SERVICE_ID}/products/starter",
        "",  # not returned: unknown, not drift
        "/something/else",
    ],
)
def test_key001_narrow_or_unknown_scopes_pass(scope: str) -> None:
    assert evaluate_rule("KEY-001", with_subs(subscription("narrow", scope=scope))) == []


@pytest.mark.parametrize("state", ["suspended", "cancelled", "submitted", "rejected", "expired", "Suspended"])
def test_key001_inactive_subscriptions_ignored(state: str) -> None:
    snap = with_subs(subscription("wide", scope="/apis", state=state), subscription("master", scope="/", state=state))
    assert evaluate_rule("KEY-001", snap) == []


def test_key001_state_case_insensitive() -> None:
    f = only(evaluate_rule("KEY-001", with_subs(subscription("wide", scope="/apis", state="Active"))))
    assert f.resource_id == sub_id("wide")


def test_key001_many_subscriptions_one_finding_per_offender() -> None:
    subs = [subscription(f"s{i:04d}", scope="/apis" if i % 100 == 0 else f"/apis/api-{i}") for i in range(2500)]
    findings = evaluate_rule("KEY-001", with_subs(*subs))
    assert sorted(f.resource_id for f in findings) == [sub_id(f"s{i:04d}") for i in range(0, 2500, 100)]


# -- KEY-002 untracked keys ---------------------------------------------------------------------


def test_key002_untracked_active_subscription() -> None:
    snap = with_subs(subscription("orders-mobile"), subscription("partner-x"))
    f = only(evaluate_rule("KEY-002", snap))
    assert (f.rule_id, f.resource_id) == ("KEY-002", sub_id("partner-x"))
    assert f.remediable
    assert f.evidence.actual == "(not set)"
    assert f.evidence.expected == f"a secret tagged apim-subscription-id={sub_id('partner-x')}"
    assert "partner-x" in f.message


def test_key002_ledger_match_is_case_insensitive() -> None:
    key = replace(tracked("orders-mobile"), subscription_id=sub_id("orders-mobile").upper())
    assert evaluate_rule("KEY-002", compliant(key_ledger=(key,))) == []


def test_key002_silent_when_ledger_unreadable() -> None:
    snap = compliant(key_ledger=(), unreadable=("key_ledger: 403 Forbidden",))
    assert evaluate_rule("KEY-002", snap) == []
    # Another part being unreadable does not silence it.
    snap = compliant(key_ledger=(), unreadable=("diagnostic_settings: 403 AuthorizationFailed",))
    assert only(evaluate_rule("KEY-002", snap)).resource_id == sub_id("orders-mobile")


def test_key002_inactive_ignored_and_builtin_param() -> None:
    snap = with_subs(
        subscription("orders-mobile"),
        subscription("old", state="cancelled"),
        subscription("master", scope=f"{SERVICE_ID}/"),
    )
    assert only(evaluate_rule("KEY-002", snap)).resource_id == sub_id("master")
    assert evaluate_rule("KEY-002", snap, {"include_builtin": False}) == []


def test_key002_many_subscriptions() -> None:
    subs = [subscription(f"s{i:04d}") for i in range(2500)]
    ledger = tuple(tracked(f"s{i:04d}") for i in range(2500) if i % 250)
    findings = evaluate_rule("KEY-002", with_subs(*subs, key_ledger=ledger))
    assert sorted(f.resource_id for f in findings) == [sub_id(f"s{i:04d}") for i in range(0, 2500, 250)]


# -- KEY-003 key age -----------------------------------------------------------------------------


def test_key003_old_key() -> None:
    snap = compliant(key_ledger=(tracked("orders-mobile", age_days=120),))
    f = only(evaluate_rule("KEY-003", snap))
    assert (f.rule_id, f.resource_id) == ("KEY-003", sub_id("orders-mobile"))
    assert f.remediable
    assert f.evidence.path == "keyVault.secrets['apim-good--orders-mobile'].attributes.created"
    created = (NOW - timedelta(days=120)).isoformat()
    assert f.evidence.actual == f"{created} (age 120.0 days)"
    assert f.evidence.expected == "age at most 90 days"
    # The factory's expiry is created + 90 days, so this one has expired too: one finding says both.
    assert "expired" in f.message


def test_key003_boundary_exactly_max_age_passes() -> None:
    snap = compliant(key_ledger=(replace(tracked("orders-mobile", age_days=90), expires=None),))
    assert evaluate_rule("KEY-003", snap) == []
    snap = compliant(key_ledger=(replace(tracked("orders-mobile", age_days=90.001), expires=None),))
    assert only(evaluate_rule("KEY-003", snap)).resource_id == sub_id("orders-mobile")


def test_key003_param_changes_threshold() -> None:
    snap = compliant(key_ledger=(tracked("orders-mobile", age_days=45),))
    assert evaluate_rule("KEY-003", snap) == []
    f = only(evaluate_rule("KEY-003", snap, {"max_age_days": 30}))
    assert f.evidence.expected == "age at most 30 days"


def test_key003_expired_secret_within_age() -> None:
    key = replace(tracked("orders-mobile", age_days=20), expires=NOW - timedelta(days=1))
    f = only(evaluate_rule("KEY-003", compliant(key_ledger=(key,))))
    assert f.resource_id == sub_id("orders-mobile")
    assert f.evidence.path == "keyVault.secrets['apim-good--orders-mobile'].attributes.exp"
    assert f.evidence.actual == (NOW - timedelta(days=1)).isoformat()
    assert f.evidence.expected == f"after {NOW.isoformat()}"


def test_key003_no_expiry_is_not_expired() -> None:
    key = replace(tracked("orders-mobile", age_days=20), expires=None)
    assert evaluate_rule("KEY-003", compliant(key_ledger=(key,))) == []


def test_key003_only_active_subscriptions() -> None:
    snap = compliant(
        subscriptions=(subscription("orders-mobile", state="suspended"),),
        key_ledger=(tracked("orders-mobile", age_days=400),),
    )
    assert evaluate_rule("KEY-003", snap) == []
    # A ledger entry for a subscription that no longer exists is not this rule's business.
    snap = compliant(key_ledger=(tracked("orders-mobile"), tracked("gone", age_days=400)))
    assert evaluate_rule("KEY-003", snap) == []


def test_key003_one_finding_per_subscription_oldest_key_speaks() -> None:
    older = replace(tracked("orders-mobile", age_days=200), secret_name="dup-old")
    newer = replace(tracked("orders-mobile", age_days=100), secret_name="dup-new")
    f = only(evaluate_rule("KEY-003", compliant(key_ledger=(newer, older))))
    assert "dup-old" in f.evidence.path


def test_key003_naive_datetimes_do_not_raise() -> None:
    key = replace(tracked("orders-mobile", age_days=120), expires=None)
    key = replace(key, created=key.created.replace(tzinfo=None))
    assert only(evaluate_rule("KEY-003", compliant(key_ledger=(key,)))).resource_id == sub_id("orders-mobile")


def test_key003_many_subscriptions() -> None:
    subs = [subscription(f"s{i:04d}") for i in range(2500)]
    ledger = tuple(tracked(f"s{i:04d}", age_days=100 if i % 500 == 0 else 5) for i in range(2500))
    findings = evaluate_rule("KEY-003", with_subs(*subs, key_ledger=ledger))
    assert sorted(f.resource_id for f in findings) == [sub_id(f"s{i:04d}") for i in range(0, 2500, 500)]


# -- KEY-004 vault copy vs APIM -----------------------------------------------------------------


def test_key004_regenerated_out_of_band() -> None:
    apim = replace(hashes("orders-mobile"), primary="new-primary")
    f = only(evaluate_rule("KEY-004", compliant(key_hashes=(apim,))))
    assert (f.rule_id, f.resource_id) == ("KEY-004", sub_id("orders-mobile"))
    assert f.severity is Severity.HIGH
    assert f.remediable
    assert f.evidence.path == "keyVault.secrets['apim-good--orders-mobile'].value"
    assert f.evidence.actual == "matches neither APIM key (apim-key-slot=primary)"
    assert f.evidence.expected == "matches APIM's primary key"
    assert "regenerated outside" in f.message
    for secret_ish in ("hash-orders-mobile", "new-primary"):
        assert secret_ish not in f.message
        assert secret_ish not in f.evidence.actual


def test_key004_slot_mismatch() -> None:
    # The vault holds APIM's secondary key but is tagged primary.
    key = tracked("orders-mobile", "primary", value_hash="hash-orders-mobile-secondary")
    f = only(evaluate_rule("KEY-004", compliant(key_ledger=(key,))))
    assert f.resource_id == sub_id("orders-mobile")
    assert f.severity is Severity.MEDIUM
    assert f.evidence.actual == "matches APIM's secondary key (apim-key-slot=primary)"
    assert f.evidence.expected == "matches APIM's primary key"
    assert "mismatched slot tag" in f.message


def test_key004_secondary_slot_and_case() -> None:
    key = tracked("orders-mobile", "Secondary", value_hash="hash-orders-mobile-secondary")
    assert evaluate_rule("KEY-004", compliant(key_ledger=(key,))) == []
    key = tracked("orders-mobile", "SECONDARY", value_hash="hash-orders-mobile-primary")
    f = only(evaluate_rule("KEY-004", compliant(key_ledger=(key,))))
    assert f.evidence.actual == "matches APIM's primary key (apim-key-slot=SECONDARY)"
    assert f.evidence.expected == "matches APIM's secondary key"


def test_key004_missing_or_bad_slot_tag() -> None:
    key = replace(tracked("orders-mobile"), slot="")
    f = only(evaluate_rule("KEY-004", compliant(key_ledger=(key,))))
    assert f.severity is Severity.MEDIUM
    assert f.evidence.actual == "matches APIM's primary key (apim-key-slot=(empty))"
    assert f.evidence.expected == "matches the APIM key named by apim-key-slot (primary|secondary)"


def test_key004_no_hashes_or_no_value_hash_means_no_finding() -> None:
    assert evaluate_rule("KEY-004", compliant(key_hashes=())) == []
    other = hashes("someone-else")
    assert evaluate_rule("KEY-004", compliant(key_hashes=(other,))) == []
    key = replace(tracked("orders-mobile"), value_hash=None)
    apim = KeyHashes(subscription_id=sub_id("orders-mobile"), primary="x", secondary="y")
    assert evaluate_rule("KEY-004", compliant(key_ledger=(key,), key_hashes=(apim,))) == []


def test_key004_ids_match_case_insensitively_and_inactive_ignored() -> None:
    apim = replace(hashes("orders-mobile"), subscription_id=sub_id("orders-mobile").upper())
    assert evaluate_rule("KEY-004", compliant(key_hashes=(apim,))) == []
    apim = KeyHashes(subscription_id=sub_id("orders-mobile").upper(), primary="x", secondary="y")
    assert only(evaluate_rule("KEY-004", compliant(key_hashes=(apim,)))).resource_id == sub_id("orders-mobile")
    snap = compliant(subscriptions=(subscription("orders-mobile", state="suspended"),), key_hashes=(apim,))
    assert evaluate_rule("KEY-004", snap) == []


def test_key004_many_subscriptions() -> None:
    subs = [subscription(f"s{i:04d}") for i in range(2500)]
    ledger = tuple(tracked(f"s{i:04d}") for i in range(2500))
    apim = tuple(
        replace(hashes(f"s{i:04d}"), primary="rotated-elsewhere") if i % 625 == 0 else hashes(f"s{i:04d}")
        for i in range(2500)
    )
    findings = evaluate_rule("KEY-004", with_subs(*subs, key_ledger=ledger, key_hashes=apim))
    assert sorted(f.resource_id for f in findings) == [sub_id(f"s{i:04d}") for i in range(0, 2500, 625)]


# -- KEY-005 expiration date --------------------------------------------------------------------


def test_key005_no_expiration_date() -> None:
    snap = with_subs(subscription("orders-mobile"), subscription("forever", expiration_date=None))
    f = only(evaluate_rule("KEY-005", snap))
    assert (f.rule_id, f.resource_id) == ("KEY-005", sub_id("forever"))
    assert f.severity is Severity.LOW
    assert not f.remediable
    assert (f.evidence.path, f.evidence.actual, f.evidence.expected) == (
        "properties.expirationDate",
        "(not set)",
        "a date",
    )


def test_key005_past_expiration_still_active() -> None:
    past = NOW - timedelta(days=3)
    f = only(evaluate_rule("KEY-005", with_subs(subscription("lapsed", expiration_date=past))))
    assert f.resource_id == sub_id("lapsed")
    assert f.severity is Severity.MEDIUM
    assert f.evidence.path == "properties.state"
    assert f.evidence.actual == f"active (expirationDate {past.isoformat()})"
    assert "does not enforce" in f.message


def test_key005_builtin_and_inactive() -> None:
    snap = with_subs(
        subscription("master", scope=f"{SERVICE_ID}/", expiration_date=None),
        subscription("done", state="cancelled", expiration_date=None),
        subscription("lapsed", state="expired", expiration_date=NOW - timedelta(days=1)),
    )
    assert evaluate_rule("KEY-005", snap) == []
    f = only(evaluate_rule("KEY-005", snap, {"ignore_builtin": False}))
    assert f.resource_id == sub_id("master")


def test_key005_many_subscriptions() -> None:
    later = NOW + timedelta(days=30)
    subs = [subscription(f"s{i:04d}", expiration_date=None if i % 500 == 7 else later) for i in range(2500)]
    findings = evaluate_rule("KEY-005", with_subs(*subs))
    assert sorted(f.resource_id for f in findings) == [sub_id(f"s{i:04d}") for i in range(7, 2500, 500)]
