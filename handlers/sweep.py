"""Sweep: inventory the estate once, then one work message per in-scope instance.

The timer-triggered function `sweep` runs this. It never does per-instance work: each
message is reconciled by the queue-triggered function `work` (handlers/work.py), so a
large estate spreads across Function instances and one slow or failing instance holds up
no other. Each message carries the sweep's time as `requested_at`: an instance reconciled
after it (by an event, a person, a duplicate message) is not reconciled again.

After the fan-out the sweep also purges event ids older than Event Grid's retry window
from the message ledger (Table storage has no TTL), delivers incident changes still in
the outbox and purges outbox rows delivered more than 30 days ago.

Azure actions (a subset of the read role in infra/subscription-role.bicep):
    Microsoft.Resources/subscriptions/read
    Microsoft.ResourceGraph/resources/read
    Microsoft.ApiManagement/service/read
and, on the product's own storage account (infra/main.bicep), Storage Queue Data
Contributor (create the work queue, send messages) and Storage Table Data Contributor
(the message ledger).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from shared.inventory import InstanceRef
from shared.journal import TriggerKind
from shared.work_queue import WorkMessage

LOG = logging.getLogger("apim_remediator.sweep")
# Event Grid retries a delivery for 24 hours by default; keep taken event ids twice that.
EVENT_RETENTION = timedelta(hours=48)


@dataclass(frozen=True)
class SweepRequest:
    sweep_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    past_due: bool = False  # the host fired late (e.g. after a restart): logged, nothing else changes


@dataclass(frozen=True)
class SweepResult:
    sweep_id: str
    requested_at: datetime
    enqueued: tuple[str, ...]  # instance ids, one message each
    outside_policy_scope: tuple[str, ...] = ()
    purged_events: int = 0
    purged_incident_rows: int = 0


class Inventory(Protocol):
    async def discover(self) -> tuple[InstanceRef, ...]: ...


class ScopePolicy(Protocol):
    def in_scope(self, subscription_id: str, resource_group: str, tags: dict[str, str]) -> bool: ...


class WorkQueue(Protocol):
    async def send(self, message: WorkMessage) -> None: ...


class EventIdPurger(Protocol):
    async def purge(self, *, older_than: datetime, limit: int = ...) -> int: ...


class IncidentHousekeeping(Protocol):
    """The incident outbox's share of the sweep (shared/incidents.py IncidentReporter)."""

    async def deliver_pending(self, *, limit: int = ...) -> object: ...

    async def purge(self, *, now: datetime | None = None) -> int: ...


@dataclass(frozen=True)
class SweepDeps:
    inventory: Inventory
    policy: ScopePolicy
    queue: WorkQueue
    ledger: EventIdPurger
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    incidents: IncidentHousekeeping | None = None  # deliver what waits, purge what was delivered long ago


async def sweep(request: SweepRequest, deps: SweepDeps) -> SweepResult:
    """Discover once; enqueue one work message per instance the settings and policy put in scope."""
    requested_at = deps.clock()
    refs = await deps.inventory.discover()  # settings scope (subscriptions, groups, tags) applied
    wanted = [r for r in refs if deps.policy.in_scope(r.subscription_id, r.resource_group, dict(r.tags))]
    skipped = tuple(r.id for r in refs if r not in wanted)
    for ref in wanted:
        await deps.queue.send(
            WorkMessage(
                instance_id=ref.id,
                reason="sweep",
                correlation_id=str(uuid.uuid4()),
                requested_at=requested_at,
                trigger=TriggerKind.TIMER,
                sweep_id=request.sweep_id,
            )
        )
    LOG.info(
        "sweep %s: %d instance(s) queued, %d outside the policy's scope%s",
        request.sweep_id,
        len(wanted),
        len(skipped),
        " (the timer fired late)" if request.past_due else "",
        extra={"event": "sweep.enqueued", "sweep_id": request.sweep_id, "correlation_id": request.sweep_id},
    )
    purged = await deps.ledger.purge(older_than=requested_at - EVENT_RETENTION)
    purged_incident_rows = 0
    if deps.incidents is not None:
        # Undelivered incident changes wait for the next run of any instance; the sweep is
        # one, even when nothing is in scope or every work message coalesces.
        await deps.incidents.deliver_pending()
        purged_incident_rows = await deps.incidents.purge(now=requested_at)
    return SweepResult(
        sweep_id=request.sweep_id,
        requested_at=requested_at,
        enqueued=tuple(r.id for r in wanted),
        outside_policy_scope=skipped,
        purged_events=purged,
        purged_incident_rows=purged_incident_rows,
    )
