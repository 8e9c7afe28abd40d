"""Events: react to Event Grid events within seconds, without trusting them.

The Event Grid-triggered function `events` runs `handle_event` for each event (Event Grid
schema; CloudEvents carrying the same type, source and data are mapped onto it by the
function). Routing is a table keyed by event type:

- `Microsoft.Resources.ResourceWriteSuccess` / `ResourceActionSuccess` /
  `ResourceDeleteSuccess` for a resource at or under an API Management service
  -> reconcile that service (its id is cut from the resource id), directly in this
  function: the event path must fix drift in seconds, and a queue hop would add up to the
  queue's polling interval (host.json `maxPollingInterval`). Event Grid retries a failed
  delivery itself (with back-off, for 24 hours), so the queue's retries are not needed.
- Key Vault `SecretNearExpiry` / `SecretExpired`, APIM `SubscriptionCreated` /
  `GatewayTokenNearExpiry` -> key rotation (handlers/rotate_keys.py `event_rotator`): the
  secret or subscription is read again and rotated or onboarded once (a gateway's ledger
  token is renewed once, handlers/rotate_gateways.py); a rotation left pending raises so
  Event Grid delivers again.
- Anything else, and anything malformed, is logged and acknowledged: never retried forever.

Never trusting the payload: the event only says which service to look at. The id must
have the exact shape of an APIM service id; the subscription and resource group must be
in the settings' scope (checked here, without a call); reconcile then re-reads the service
from Azure and refuses one outside the settings' and the policy's scope (tags included).
What the event says about the change itself is never used.

Not reacting to ourselves: a resource event carries the caller's claims. An event whose
caller is the product's own identity (object id from `data.claims` — `oid`, or the long
`.../identity/claims/objectidentifier` name Azure uses — or `data.authorization.evidence.
principalId`) starts nothing; the product's object id is read from its own token
(shared/identity.py). Even if one got through, a converged instance makes zero writes.
Actions named `list*` (listSecrets, listValue) read, change nothing, and are acknowledged.

At least once: Event Grid may deliver an event more than once, even at the same moment.
The event id is taken in the message ledger (an insert that only one delivery can win)
before anything runs; a later delivery of it is acknowledged as a duplicate. A run that
fails transiently gives the id back and raises, so Event Grid's retry runs it. On top,
reconcile coalesces by the event's time: a service reconciled since is not redone.

Azure actions: those of handlers/reconcile.py; Storage Table Data Contributor on the
product's own storage account (message ledger, findings; main.bicep).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from handlers.reconcile import ReconcileRequest, ReconcileResult
from handlers.rotate_keys import RotationOutcome, RotationRequest, rotation_not_configured
from shared.errors import OutOfScopeError, PermanentError
from shared.identity import normalise_object_id
from shared.journal import Trigger, TriggerKind

LOG = logging.getLogger("apim_remediator.events")

Reconciler = Callable[[ReconcileRequest], Awaitable[ReconcileResult]]
Rotator = Callable[[RotationRequest], Awaitable[RotationOutcome]]

WRITE = "Microsoft.Resources.ResourceWriteSuccess"
ACTION = "Microsoft.Resources.ResourceActionSuccess"
DELETE = "Microsoft.Resources.ResourceDeleteSuccess"
ROTATION_TYPES = (
    "Microsoft.KeyVault.SecretNearExpiry",
    "Microsoft.KeyVault.SecretExpired",
    "Microsoft.ApiManagement.SubscriptionCreated",
    "Microsoft.ApiManagement.GatewayTokenNearExpiry",
)
_SERVICE = re.compile(
    r"^(?P<service>/subscriptions/(?P<sub>[0-9A-Fa-f-]{36})/resourceGroups/(?P<rg>[-\w._()]{1,90})"
    r"/providers/Microsoft\.ApiManagement/service/(?P<name>[A-Za-z](?:[A-Za-z0-9-]{0,48}[A-Za-z0-9])?))"
    r"(?P<rest>/[^?#\s]*)?$",
    re.IGNORECASE,
)
# Where an ARM event's claims carry the caller's object id (short and long claim names).
_OID_CLAIMS = ("oid", "http://schemas.microsoft.com/identity/claims/objectidentifier")
_MAX_ID = 200


@dataclass(frozen=True)
class GridEvent:
    """One event as delivered: every field is untrusted input."""

    id: str
    event_type: str
    subject: str
    topic: str
    event_time: datetime | None
    data: Any  # the parsed JSON `data` (for CloudEvents: `data`)
    data_version: str = ""

    def __post_init__(self) -> None:
        # Event Grid times are UTC; a binding may hand them over without a zone (the
        # azure-functions EventGridEvent does), which must still compare with stored times.
        if self.event_time is not None and self.event_time.tzinfo is None:
            object.__setattr__(self, "event_time", self.event_time.replace(tzinfo=UTC))


class EventStatus(StrEnum):
    RECONCILED = "reconciled"
    COALESCED = "coalesced"  # the service was reconciled after the event: nothing ran
    DUPLICATE = "duplicate"  # another delivery of this event took it
    SELF_WRITE = "self_write"  # the product's own change
    READ_ONLY = "read_only"  # a list* action: nothing changed
    OUT_OF_SCOPE = "out_of_scope"
    NOT_APIM = "not_apim"  # a resource event for something else in the subscription
    SERVICE_DELETED = "service_deleted"
    ROTATION = "rotation"  # routed to key rotation; the detail says what it did
    FAILED = "failed"  # a permanent failure, recorded on the service's summary
    UNKNOWN = "unknown"  # an event type nobody handles
    MALFORMED = "malformed"


@dataclass(frozen=True)
class EventOutcome:
    status: EventStatus
    detail: str = ""
    instance_id: str | None = None


class EventClaims(Protocol):
    async def claim(self, event_id: str, *, event_type: str, at: datetime) -> bool: ...

    async def release(self, event_id: str) -> None: ...


class FailureLog(Protocol):
    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None: ...


@dataclass(frozen=True)
class EventScope:
    """The settings' scope, as far as an id shows it (tags and policy scope: reconcile)."""

    subscription_ids: frozenset[str]  # lowercase
    resource_groups: frozenset[str] = frozenset()  # lowercase; empty = all

    def admits(self, subscription_id: str, resource_group: str) -> bool:
        if subscription_id.lower() not in self.subscription_ids:
            return False
        return not self.resource_groups or resource_group.lower() in self.resource_groups


@dataclass(frozen=True)
class EventsDeps:
    reconcile: Reconciler
    claims: EventClaims
    failures: FailureLog
    own_object_id: Callable[[], Awaitable[str]]  # normalised (shared.identity)
    scope: EventScope
    rotate: Rotator = rotation_not_configured
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


Route = Callable[[GridEvent, EventsDeps], Awaitable[EventOutcome]]


def _log(outcome: EventOutcome, event: GridEvent, level: int = logging.INFO) -> EventOutcome:
    LOG.log(
        level,
        "event %s (%s): %s%s",
        event.id[:_MAX_ID],
        event.event_type[:_MAX_ID],
        outcome.status.value,
        f": {outcome.detail}" if outcome.detail else "",
        extra={
            "event": f"event.{outcome.status.value}",
            "event_id": event.id[:_MAX_ID],
            "event_type": event.event_type[:_MAX_ID],
            "instance_id": outcome.instance_id or "",
        },
    )
    return outcome


def service_of(resource_id: str) -> tuple[str, str, str, bool] | None:
    """(service id, subscription, resource group, is the service itself) for an id at or
    under an APIM service; None for anything else."""
    match = _SERVICE.match(resource_id)
    if match is None:
        return None
    rest = match.group("rest") or ""
    return match.group("service"), match.group("sub"), match.group("rg"), rest.strip("/") == ""


def caller_object_ids(data: Mapping[str, Any]) -> set[str]:
    """Every object id the event names as its caller, normalised."""
    found: set[str] = set()
    claims = data.get("claims")
    if isinstance(claims, Mapping):
        for name in _OID_CLAIMS:
            oid = normalise_object_id(claims.get(name))
            if oid:
                found.add(oid)
    authorization = data.get("authorization")
    evidence = authorization.get("evidence") if isinstance(authorization, Mapping) else None
    if isinstance(evidence, Mapping):
        principal = normalise_object_id(evidence.get("principalId"))
        if principal:
            found.add(principal)
    return found


def _is_read_action(event: GridEvent, data: Mapping[str, Any]) -> bool:
    if event.event_type.lower() != ACTION.lower():
        return False
    operation = data.get("operationName")
    parts = operation.split("/") if isinstance(operation, str) else []
    return len(parts) >= 2 and parts[-1].lower() == "action" and parts[-2].lower().startswith("list")


async def on_resource_event(event: GridEvent, deps: EventsDeps) -> EventOutcome:
    data = event.data
    if not isinstance(data, Mapping):
        return _log(EventOutcome(EventStatus.MALFORMED, "the event has no data object"), event, logging.WARNING)
    resource_id = data.get("resourceUri", event.subject)
    if not isinstance(resource_id, str) or len(resource_id) > 2000:
        return _log(EventOutcome(EventStatus.MALFORMED, "the event names no resource"), event, logging.WARNING)
    found = service_of(resource_id)
    if found is None:
        return _log(EventOutcome(EventStatus.NOT_APIM, "not an API Management resource"), event, logging.DEBUG)
    service_id, subscription_id, resource_group, is_service = found
    if is_service and event.event_type.lower() == DELETE.lower():
        return _log(EventOutcome(EventStatus.SERVICE_DELETED, "the service itself was deleted", service_id), event)
    if _is_read_action(event, data):
        return _log(EventOutcome(EventStatus.READ_ONLY, "a list action changes nothing", service_id), event)
    callers = caller_object_ids(data)
    if callers and await deps.own_object_id() in callers:
        return _log(EventOutcome(EventStatus.SELF_WRITE, "the product's own change", service_id), event)
    if not deps.scope.admits(subscription_id, resource_group):
        return _log(
            EventOutcome(EventStatus.OUT_OF_SCOPE, "subscription or resource group not in scope", service_id), event
        )
    if not await deps.claims.claim(event.id, event_type=event.event_type, at=deps.clock()):
        return _log(EventOutcome(EventStatus.DUPLICATE, "already taken by another delivery", service_id), event)
    request = ReconcileRequest(
        instance_id=service_id,
        trigger=Trigger(TriggerKind.EVENT, f"{event.event_type} {event.id[:_MAX_ID]}"),
        reason=event.event_type,
        not_before=event.event_time,
    )
    try:
        result = await deps.reconcile(request)
    except OutOfScopeError as error:
        return _log(EventOutcome(EventStatus.OUT_OF_SCOPE, str(error), service_id), event)
    except PermanentError as error:
        await deps.failures.record_failure(
            service_id, str(error), at=deps.clock(), correlation_id=request.correlation_id
        )
        return _log(EventOutcome(EventStatus.FAILED, str(error), service_id), event, logging.ERROR)
    except Exception:
        # Transient (or unexpected): give the event back so Event Grid's redelivery runs it.
        await deps.claims.release(event.id)
        raise
    if result.skipped is not None:
        return _log(EventOutcome(EventStatus.COALESCED, result.skipped, service_id), event)
    return _log(EventOutcome(EventStatus.RECONCILED, f"correlation id {request.correlation_id}", service_id), event)


async def on_rotation_event(event: GridEvent, deps: EventsDeps) -> EventOutcome:
    if not await deps.claims.claim(event.id, event_type=event.event_type, at=deps.clock()):
        return _log(EventOutcome(EventStatus.DUPLICATE, "already taken by another delivery"), event)
    try:
        outcome = await deps.rotate(
            RotationRequest(
                event_id=event.id[:_MAX_ID],
                event_type=event.event_type,
                subject=event.subject[:_MAX_ID],
                source=event.topic[:2000],
                data=event.data if isinstance(event.data, Mapping) else {},
            )
        )
    except Exception:
        # A rotation left pending (journaled) or a busy subscription: Event Grid delivers again.
        await deps.claims.release(event.id)
        raise
    return _log(EventOutcome(EventStatus.ROTATION, f"{outcome.status}: {outcome.detail}", outcome.instance_id), event)


ROUTES: Mapping[str, Route] = {
    **{kind.lower(): on_resource_event for kind in (WRITE, ACTION, DELETE)},
    **{kind.lower(): on_rotation_event for kind in ROTATION_TYPES},
}


async def handle_event(event: GridEvent, deps: EventsDeps) -> EventOutcome:
    """Route one event; raise only when Event Grid should deliver it again."""
    if not event.id or not event.event_type or not isinstance(event.subject, str):
        return _log(EventOutcome(EventStatus.MALFORMED, "id, type and subject are required"), event, logging.WARNING)
    route = ROUTES.get(event.event_type.lower())
    if route is None:
        return _log(EventOutcome(EventStatus.UNKNOWN, "no handler for this event type"), event, logging.WARNING)
    return await route(event, deps)


def parse_data(raw: Any) -> Any:
    """`data` as a function receives it: a JSON object, or JSON text of one."""
    if isinstance(raw, str | bytes):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return raw
