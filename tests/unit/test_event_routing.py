"""The Event Grid handler over recording fakes: routing by type, the service id cut from a
resource id, self-writes, list actions, scope, dedupe by event id (also for deliveries at
the same moment), transient failures giving the event back, permanent ones recorded."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from handlers.events import (
    EventScope,
    EventsDeps,
    EventStatus,
    GridEvent,
    caller_object_ids,
    handle_event,
    service_of,
)
from handlers.reconcile import ReconcileRequest, ReconcileResult
from handlers.rotate_keys import RotationDeps, RotationOutcome, RotationRequest, event_rotator
from shared.errors import OutOfScopeError, PermanentError, TransientError
from shared.identity import token_object_id
from shared.journal import TriggerKind

SUB = "11111111-2222-3333-4444-555555555555"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/rg-apim/providers/Microsoft.ApiManagement/service/apim-one"
PRODUCT_OID = "5f1d2e3c-0000-4000-8000-00000000d001"
OPERATOR_OID = "5f1d2e3c-0000-4000-8000-00000000d002"
AT = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def arm_event(
    resource: str = SERVICE,
    *,
    kind: str = "Microsoft.Resources.ResourceWriteSuccess",
    oid: str = OPERATOR_OID,
    event_id: str = "ev-1",
    operation: str = "Microsoft.ApiManagement/service/write",
    claims: dict[str, str] | None = None,
) -> GridEvent:
    data = {
        "authorization": {"scope": resource, "action": operation, "evidence": {"principalId": oid.replace("-", "")}},
        "claims": claims if claims is not None else {"oid": oid, "appid": "x"},
        "correlationId": "c-1",
        "resourceUri": resource,
        "operationName": operation,
        "status": "Succeeded",
        "subscriptionId": SUB,
    }
    return GridEvent(event_id, kind, resource, f"/subscriptions/{SUB}", AT, data, "2")


@dataclass
class Fakes:
    reconciles: list[ReconcileRequest] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    released: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    rotations: list[RotationRequest] = field(default_factory=list)
    raises: Exception | None = None
    skipped: str | None = None
    oid_reads: int = 0

    async def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        self.reconciles.append(request)
        await asyncio.sleep(0)  # let a simultaneous delivery interleave
        if self.raises is not None:
            raise self.raises
        return ReconcileResult(request.instance_id, request.correlation_id, skipped=self.skipped)

    async def claim(self, event_id: str, *, event_type: str, at: datetime) -> bool:
        if event_id in self.claimed:
            return False
        self.claimed.add(event_id)
        return True

    async def release(self, event_id: str) -> None:
        self.released.append(event_id)
        self.claimed.discard(event_id)

    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None:
        self.failures.append((instance_id, error))

    async def own(self) -> str:
        self.oid_reads += 1
        return PRODUCT_OID.replace("-", "")

    async def rotate(self, request: RotationRequest) -> RotationOutcome:
        self.rotations.append(request)
        return RotationOutcome("done", "rotated (recorded by the fake)")

    def deps(self, groups: frozenset[str] = frozenset()) -> EventsDeps:
        return EventsDeps(
            reconcile=self.reconcile,
            claims=self,
            failures=self,
            own_object_id=self.own,
            scope=EventScope(frozenset({SUB}), groups),
            rotate=self.rotate,
            clock=lambda: AT,
        )


@pytest.mark.parametrize(
    "suffix",
    ["", "/apis/echo", "/subscriptions/s1", "/providers/Microsoft.Insights/diagnosticSettings/d1", "/tenant/access"],
)
async def test_operator_change_at_or_under_a_service_reconciles_that_service(suffix: str) -> None:
    fakes = Fakes()
    outcome = await handle_event(arm_event(SERVICE + suffix), fakes.deps())
    assert outcome.status is EventStatus.RECONCILED
    [request] = fakes.reconciles
    assert request.instance_id == SERVICE
    assert request.not_before == AT  # coalesce: a reconcile after the event covers it
    assert request.trigger.kind is TriggerKind.EVENT
    assert "ev-1" in request.trigger.detail
    assert request.reason == "Microsoft.Resources.ResourceWriteSuccess"


@pytest.mark.parametrize(
    "kind",
    [
        "Microsoft.Resources.ResourceWriteSuccess",
        "microsoft.resources.resourceactionsuccess",
        "Microsoft.Resources.ResourceDeleteSuccess",
    ],
)
async def test_each_arm_event_type_routes_to_reconcile(kind: str) -> None:
    fakes = Fakes()
    event = arm_event(SERVICE + "/backends/b1", kind=kind, operation="Microsoft.ApiManagement/service/backends/write")
    assert (await handle_event(event, fakes.deps())).status is EventStatus.RECONCILED
    assert len(fakes.reconciles) == 1


async def test_the_same_event_three_times_reconciles_once() -> None:
    fakes = Fakes()
    outcomes = [await handle_event(arm_event(), fakes.deps()) for _ in range(3)]
    assert [o.status for o in outcomes] == [EventStatus.RECONCILED, EventStatus.DUPLICATE, EventStatus.DUPLICATE]
    assert len(fakes.reconciles) == 1


async def test_duplicates_delivered_at_once_run_once() -> None:
    fakes = Fakes()
    outcomes = await asyncio.gather(*(handle_event(arm_event(), fakes.deps()) for _ in range(3)))
    assert sorted(o.status for o in outcomes) == sorted([EventStatus.RECONCILED] + [EventStatus.DUPLICATE] * 2)
    assert len(fakes.reconciles) == 1


@pytest.mark.parametrize(
    "claims",
    [
        {"oid": PRODUCT_OID},
        {"http://schemas.microsoft.com/identity/claims/objectidentifier": PRODUCT_OID.upper()},
        {},  # no claims: the authorization evidence still names the caller
    ],
)
async def test_the_products_own_writes_start_nothing(claims: dict[str, str]) -> None:
    fakes = Fakes()
    outcome = await handle_event(arm_event(oid=PRODUCT_OID, claims=claims), fakes.deps())
    assert outcome.status is EventStatus.SELF_WRITE
    assert fakes.reconciles == []
    assert fakes.claimed == set()


def test_caller_object_ids_reads_short_and_long_claims_and_evidence() -> None:
    data = arm_event(claims={"http://schemas.microsoft.com/identity/claims/objectidentifier": OPERATOR_OID}).data
    assert caller_object_ids(data) == {OPERATOR_OID.replace("-", "")}
    assert caller_object_ids({"claims": {"oid": "not-a-guid"}, "authorization": "x"}) == set()


async def test_list_actions_read_and_start_nothing() -> None:
    fakes = Fakes()
    event = arm_event(
        SERVICE + "/subscriptions/s1",
        kind="Microsoft.Resources.ResourceActionSuccess",
        operation="Microsoft.ApiManagement/service/subscriptions/listSecrets/action",
    )
    assert (await handle_event(event, fakes.deps())).status is EventStatus.READ_ONLY
    regenerate = replace(
        event,
        id="ev-2",
        data={
            **event.data,
            "operationName": "Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action",
        },
    )
    assert (await handle_event(regenerate, fakes.deps())).status is EventStatus.RECONCILED
    assert len(fakes.reconciles) == 1


@pytest.mark.parametrize(
    ("resource", "groups", "status"),
    [
        (SERVICE.replace(SUB, "99999999-2222-3333-4444-555555555555"), frozenset(), EventStatus.OUT_OF_SCOPE),
        (SERVICE, frozenset({"rg-other"}), EventStatus.OUT_OF_SCOPE),
        (
            f"/subscriptions/{SUB}/resourceGroups/rg-apim/providers/Microsoft.Storage/storageAccounts/st1",
            frozenset(),
            EventStatus.NOT_APIM,
        ),
        (f"/subscriptions/{SUB}/resourceGroups/rg-apim", frozenset(), EventStatus.NOT_APIM),
        (SERVICE + "?api-version=1", frozenset(), EventStatus.NOT_APIM),
        (SERVICE.replace("apim-one", "apim one"), frozenset(), EventStatus.NOT_APIM),
    ],
)
async def test_ids_outside_scope_or_not_apim_are_acknowledged(
    resource: str, groups: frozenset[str], status: EventStatus
) -> None:
    fakes = Fakes()
    assert (await handle_event(arm_event(resource), fakes.deps(groups))).status is status
    assert fakes.reconciles == []


async def test_deleting_the_service_itself_is_acknowledged_but_a_sub_resource_delete_reconciles() -> None:
    fakes = Fakes()
    gone = arm_event(
        kind="Microsoft.Resources.ResourceDeleteSuccess", operation="Microsoft.ApiManagement/service/delete"
    )
    assert (await handle_event(gone, fakes.deps())).status is EventStatus.SERVICE_DELETED
    sub = arm_event(SERVICE + "/apis/a", kind="Microsoft.Resources.ResourceDeleteSuccess", event_id="ev-3")
    assert (await handle_event(sub, fakes.deps())).status is EventStatus.RECONCILED


async def test_reconcile_refusing_the_service_as_out_of_scope_is_acknowledged() -> None:
    fakes = Fakes(raises=OutOfScopeError("not an APIM instance in the configured scope: ..."))
    assert (await handle_event(arm_event(), fakes.deps())).status is EventStatus.OUT_OF_SCOPE
    assert fakes.failures == []


async def test_a_permanent_failure_is_recorded_and_acknowledged() -> None:
    fakes = Fakes(raises=PermanentError("reading the service: 403 AuthorizationFailed"))
    outcome = await handle_event(arm_event(), fakes.deps())
    assert outcome.status is EventStatus.FAILED
    assert fakes.failures == [(SERVICE, "reading the service: 403 AuthorizationFailed")]
    assert fakes.released == []  # a redelivery would fail the same way


async def test_a_transient_failure_gives_the_event_back_and_raises_for_redelivery() -> None:
    fakes = Fakes(raises=TransientError("instance busy"))
    with pytest.raises(TransientError):
        await handle_event(arm_event(), fakes.deps())
    assert fakes.released == ["ev-1"]
    fakes.raises = None
    assert (await handle_event(arm_event(), fakes.deps())).status is EventStatus.RECONCILED


async def test_a_coalesced_reconcile_is_reported_as_such() -> None:
    fakes = Fakes(skipped="reconciled at ..., after this request was made")
    assert (await handle_event(arm_event(), fakes.deps())).status is EventStatus.COALESCED


@pytest.mark.parametrize(
    "kind",
    [
        "Microsoft.KeyVault.SecretNearExpiry",
        "Microsoft.KeyVault.SecretExpired",
        "Microsoft.ApiManagement.SubscriptionCreated",
        "Microsoft.ApiManagement.GatewayTokenNearExpiry",
    ],
)
async def test_rotation_events_reach_the_rotation_route_with_their_data(kind: str) -> None:
    fakes = Fakes()
    event = GridEvent("kv-1", kind, "apim-key-1", "/subscriptions/s/vaults/kv", AT, {"ObjectName": "apim-key-1"})
    outcome = await handle_event(event, fakes.deps())
    assert outcome.status is EventStatus.ROTATION
    assert outcome.detail == "done: rotated (recorded by the fake)"
    [request] = fakes.rotations
    assert (request.event_type, request.subject, dict(request.data)) == (
        kind,
        "apim-key-1",
        {"ObjectName": "apim-key-1"},
    )
    assert fakes.reconciles == []


async def test_gateway_token_events_without_a_ledger_vault_renew_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The renewal itself is tests/integration/test_rotation_gateways.py (against the twin)."""
    caplog.set_level(logging.INFO, logger="apim_remediator.rotate_keys")
    route = event_rotator(RotationDeps(source=None, policy=None, rotator=None))  # type: ignore[arg-type]
    request = RotationRequest("g-1", "Microsoft.ApiManagement.GatewayTokenNearExpiry", "/gateways/gw", "/svc")
    outcome = await route(request)
    assert outcome.status == "not_configured"
    assert "nothing renewed" in outcome.detail
    assert [r for r in caplog.records if getattr(r, "event", "") == "rotation.event.not_configured"]


async def test_without_a_ledger_vault_rotation_events_are_acknowledged_not_rotated() -> None:
    route = event_rotator(RotationDeps(source=None, policy=None, rotator=None))  # type: ignore[arg-type]
    request = RotationRequest("k-1", "Microsoft.KeyVault.SecretNearExpiry", "apim-key-1", "/vault")
    assert (await route(request)).status == "not_configured"


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (GridEvent("x", "Microsoft.Storage.BlobCreated", "/b", "/t", AT, {}), EventStatus.UNKNOWN),
        (GridEvent("", "Microsoft.Resources.ResourceWriteSuccess", SERVICE, "/t", AT, {}), EventStatus.MALFORMED),
        (GridEvent("x", "", SERVICE, "/t", AT, {}), EventStatus.MALFORMED),
        (GridEvent("x", "Microsoft.Resources.ResourceWriteSuccess", SERVICE, "/t", AT, None), EventStatus.MALFORMED),
        (
            GridEvent("x", "Microsoft.Resources.ResourceWriteSuccess", SERVICE, "/t", AT, {"resourceUri": 7}),
            EventStatus.MALFORMED,
        ),
    ],
)
async def test_unknown_and_malformed_events_are_acknowledged(event: GridEvent, status: EventStatus) -> None:
    fakes = Fakes()
    assert (await handle_event(event, fakes.deps())).status is status
    assert fakes.reconciles == []


def test_service_of() -> None:
    assert service_of(SERVICE.lower() + "/apis/a") == (SERVICE.lower(), SUB, "rg-apim", False)
    assert service_of(SERVICE) == (SERVICE, SUB, "rg-apim", True)
    assert service_of(SERVICE + "/") == (SERVICE, SUB, "rg-apim", True)
    assert service_of("/subscriptions/x/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a") is None


def jwt(payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(payload)}.sig"


def test_own_object_id_comes_from_the_tokens_oid_claim() -> None:
    assert token_object_id(jwt({"oid": PRODUCT_OID.upper(), "appid": "a"})) == PRODUCT_OID.replace("-", "")
    for bad in (jwt({"appid": "a"}), jwt({"oid": "nope"}), "opaque-token", "a.!!!.c"):
        with pytest.raises(PermanentError):
            token_object_id(bad)


async def test_rotation_events_act_only_where_the_policy_says_remediate() -> None:
    from shared.policy import Policy
    from shared.rotation import Rotator

    idle = Rotator(keys=None, vault=None, journal=None, locks=None)  # type: ignore[arg-type]  # never called
    route = event_rotator(RotationDeps(source=None, policy=Policy(), rotator=idle, vault_url="https://kv"))  # type: ignore[arg-type]
    for kind, rule in (
        ("Microsoft.KeyVault.SecretNearExpiry", "KEY-003"),
        ("Microsoft.ApiManagement.SubscriptionCreated", "KEY-002"),
    ):
        outcome = await route(RotationRequest("e-1", kind, "x", "/t"))
        assert outcome.status == "skipped"
        assert f"{rule} is in detect mode" in outcome.detail
