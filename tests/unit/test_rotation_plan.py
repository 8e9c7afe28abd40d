"""The pure parts of key rotation: what to do from the vault copy and APIM's keys, secret
names within Key Vault's rules, rotation ids, and keys that never print."""

from __future__ import annotations

import re

import pytest

from shared.rotation import (
    MAX_SECRET_NAME,
    Action,
    Key,
    SubscriptionKeys,
    VaultCopy,
    ledger_secret_name,
    operation_id,
    plan_rotation,
    subscription_parts,
)

SERVICE = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ApiManagement/service/apim"
SUB = f"{SERVICE}/subscriptions/orders"
KEYS = SubscriptionKeys(Key("p-key"), Key("s-key"))


def copy(value: str | None, slot: str = "primary") -> VaultCopy:
    tags = {"apim-subscription-id": SUB, "apim-key-slot": slot}
    return VaultCopy("apim-orders", "v1", tags, Key(value) if value is not None else None)


def kinds(plan: object) -> list[tuple[str, str]]:
    return [(s.kind, s.slot) for s in plan.steps]  # type: ignore[attr-defined]


def test_untracked_is_onboarded_with_the_primary_key() -> None:
    for action in Action:
        plan = plan_rotation(action, "apim-orders", None, KEYS)
        assert plan is not None
        assert not isinstance(plan, str)
        assert (plan.kind, kinds(plan)) == ("onboard", [("store", "primary")])


def test_onboarding_a_tracked_subscription_does_nothing() -> None:
    assert plan_rotation(Action.ONBOARD, "apim-orders", copy("p-key"), KEYS) is None


@pytest.mark.parametrize(
    ("slot", "value", "target"), [("primary", "p-key", "secondary"), ("secondary", "s-key", "primary")]
)
def test_rotation_regenerates_the_slot_not_in_use_then_stores_it(slot: str, value: str, target: str) -> None:
    plan = plan_rotation(Action.ROTATE, "apim-orders", copy(value, slot), KEYS)
    assert not isinstance(plan, str)
    assert plan is not None
    assert (plan.kind, kinds(plan)) == ("rotate", [("regenerate", target), ("store", target)])
    assert plan.writes == 2


def test_out_of_step_is_restored_first_then_rotated() -> None:
    plan = plan_rotation(Action.ROTATE, "apim-orders", copy("stale-copy"), KEYS)
    assert not isinstance(plan, str)
    assert plan is not None
    assert kinds(plan) == [("store", "primary"), ("regenerate", "secondary"), ("store", "secondary")]


def test_revoke_rotates_then_regenerates_the_old_slot_after_the_grace_period() -> None:
    plan = plan_rotation(Action.REVOKE, "apim-orders", copy("p-key"), KEYS)
    assert not isinstance(plan, str)
    assert plan is not None
    assert kinds(plan) == [("regenerate", "secondary"), ("store", "secondary"), ("wait", "primary"),
                           ("regenerate", "primary")]  # fmt: skip


def test_a_mislabelled_copy_is_refused_with_the_reason() -> None:
    reason = plan_rotation(Action.ROTATE, "apim-orders", copy("s-key", "primary"), KEYS)
    assert isinstance(reason, str)
    assert "APIM's secondary key but is tagged apim-key-slot=primary" in reason
    assert "would regenerate the secondary key clients use" in reason


@pytest.mark.parametrize(
    ("given", "why"),
    [(copy(None), "disabled or unreadable"), (copy("p-key", "tertiary"), "must be primary or secondary")],
)
def test_unusable_copies_are_refused(given: VaultCopy, why: str) -> None:
    reason = plan_rotation(Action.ROTATE, "apim-orders", given, KEYS)
    assert isinstance(reason, str)
    assert why in reason


def test_secret_names_follow_key_vault_rules_and_never_collide() -> None:
    long_sid = "x" * 300
    names = {
        ledger_secret_name("apim", "orders.v2/éé", SUB),
        ledger_secret_name("apim", "orders-v2--", SUB + "2"),
        ledger_secret_name("apim", long_sid, f"{SERVICE}/subscriptions/{long_sid}"),
        ledger_secret_name("apim", long_sid + "y", f"{SERVICE}/subscriptions/{long_sid}y"),
    }
    assert len(names) == 4
    for name in names:
        assert re.fullmatch(r"[0-9A-Za-z-]{1,127}", name), name
        assert len(name) <= MAX_SECRET_NAME
    assert ledger_secret_name("apim", "orders", SUB) == ledger_secret_name("apim", "orders", SUB.upper())


def test_subscription_ids_and_rotation_ids() -> None:
    assert subscription_parts(SUB) == (SERVICE, "orders")
    with pytest.raises(Exception, match="not an APIM subscription id"):
        subscription_parts(f"{SERVICE}/apis/orders")
    assert operation_id("rotate", SUB, "v1") == operation_id("rotate", SUB.lower(), "v1")
    assert operation_id("rotate", SUB, "v1") != operation_id("rotate", SUB, "v2")


def test_keys_never_print() -> None:
    key = Key("CANARY-very-secret")
    assert "CANARY" not in repr(key) + str(key) + repr(KEYS) + f"{key}" + repr(copy("CANARY-x"))
    assert key.fingerprint() != "CANARY-very-secret"[:16]
    assert key.same(Key("CANARY-very-secret"))
    assert not key.same(Key("other"))
