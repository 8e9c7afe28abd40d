"""The pure parts of gateway token renewal: the plan, the ledger secret's name and the event's
gateway. The renewal itself runs against the twin (tests/integration/test_rotation_gateways.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from handlers.rotate_gateways import _gateway_of
from handlers.rotate_keys import RotationRequest
from shared.errors import PermanentError
from shared.gateway_rotation import (
    GatewayPlan,
    GatewayStep,
    TokenCopy,
    gateway_parts,
    gateway_secret_name,
    plan_renewal,
)
from shared.rotation import Key

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SVC = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/apim"
WEEK = timedelta(days=7)


def copy(slot: str, days_left: float, value: str | None = "GatewayKey gw&1&sig") -> TokenCopy:
    tags = {"apim-gateway-id": f"{SVC}/gateways/gw", "apim-gateway-key-slot": slot}
    return TokenCopy("s", "v1", tags, Key(value) if value else None, NOW + timedelta(days=days_left))


def test_no_ledger_secret_onboards_from_the_primary_key_without_regenerating() -> None:
    assert plan_renewal("s", None, NOW, renew_within=WEEK, force=False) == GatewayPlan(
        "onboard", "s", (GatewayStep("store", "primary"),)
    )


@pytest.mark.parametrize("slot", ["primary", "secondary"])
def test_a_due_token_renews_from_the_key_not_in_use(slot: str) -> None:
    other = "secondary" if slot == "primary" else "primary"
    planned = plan_renewal("s", copy(slot, 3), NOW, renew_within=WEEK, force=False)
    assert planned == GatewayPlan("renew", "s", (GatewayStep("regenerate", other), GatewayStep("store", other)))


def test_a_fresh_token_is_not_due_unless_forced() -> None:
    assert plan_renewal("s", copy("primary", 20), NOW, renew_within=WEEK, force=False) is None
    assert isinstance(plan_renewal("s", copy("primary", 20), NOW, renew_within=WEEK, force=True), GatewayPlan)


def test_unusable_copies_are_refused_with_the_reason() -> None:
    assert "disabled or unreadable" in str(
        plan_renewal("s", copy("primary", 3, None), NOW, renew_within=WEEK, force=False)
    )
    assert "must be primary or secondary" in str(
        plan_renewal("s", copy("tertiary", 3), NOW, renew_within=WEEK, force=False)
    )


def test_secret_names_are_valid_and_collision_safe() -> None:
    long = "g" * 200
    name = gateway_secret_name("apim", long, f"{SVC}/gateways/{long}")
    assert len(name) <= 127
    assert all(c.isalnum() or c == "-" for c in name)
    assert gateway_secret_name("apim", "a.b", f"{SVC}/gateways/a.b") != gateway_secret_name(
        "apim", "a-b", f"{SVC}/gateways/a-b"
    )
    assert gateway_parts(f"{SVC}/gateways/gw") == (SVC, "gw")
    with pytest.raises(PermanentError):
        gateway_parts(f"{SVC}/subscriptions/x")


def test_the_event_names_its_gateway_by_id_or_by_topic_and_subject() -> None:
    by_id = RotationRequest("e", "t", "/gateways/gw", SVC, {"gatewayInfo": {"gatewayId": f"{SVC}/gateways/gw"}})
    by_subject = RotationRequest("e", "t", "/gateways/gw", SVC, {})
    by_name = RotationRequest("e", "t", "", SVC, {"gatewayInfo": {"gatewayId": "gw"}})
    assert _gateway_of(by_id) == _gateway_of(by_subject) == _gateway_of(by_name) == f"{SVC}/gateways/gw"
    with pytest.raises(PermanentError):
        _gateway_of(RotationRequest("e", "t", "", SVC, {}))
