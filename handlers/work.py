"""Work: reconcile the one instance a work-queue message names; record what gives up.

The queue-triggered function `work` runs `handle_work` for each message on
`APIMR_WORK_QUEUE`, and `poison` runs `handle_poison` for each message the host moved to
`<queue>-poison` after `maxDequeueCount` (host.json) failed attempts.

- A malformed message is recorded (message ledger; and on the instance's findings
  summary when it named an instance) and ends: retrying cannot fix it.
- A transient failure (`TransientError`: throttling, a storage or network hiccup, the
  instance's lease held by another worker) raises, so the host makes the message visible
  again and retries it, up to `maxDequeueCount` times, then poisons it.
- A permanent failure (`PermanentError`: out of scope, refused, a 403) is recorded on the
  instance's summary, where the operator and the HTTP API see it, and ends the message.
- A permanent failure and a poison message are also incidents (handlers/incidents.py),
  resolved by the instance's next successful reconcile.
- Coalescing: the request's `not_before` is the message's `requested_at`, so an instance
  reconciled after the message was sent (the same instance queued twice in a burst, or
  an event got there first) is not reconciled again.

Azure actions: those of handlers/reconcile.py (it runs the engine), and Storage Table Data
Contributor on the product's own storage account (findings, message ledger; main.bicep).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from handlers.incidents import IncidentsPort, report_work_failure
from handlers.reconcile import ReconcileRequest, ReconcileResult
from shared.errors import PermanentError, TransientError
from shared.journal import Trigger
from shared.message_ledger import DeadLetter
from shared.work_queue import MalformedMessage, WorkMessage, parse_work_message

LOG = logging.getLogger("apim_remediator.work")

Reconciler = Callable[[ReconcileRequest], Awaitable[ReconcileResult]]


@dataclass(frozen=True)
class QueueDelivery:
    """One queue message as the host hands it over (the body already base64-decoded)."""

    body: bytes
    message_id: str = ""
    dequeue_count: int | None = None
    queue: str = ""


class WorkStatus(StrEnum):
    RECONCILED = "reconciled"
    COALESCED = "coalesced"  # reconciled since the message was sent: nothing ran
    MALFORMED = "malformed"  # recorded, message ended
    FAILED = "failed"  # permanent failure recorded, message ended
    POISONED = "poisoned"  # recorded from the poison queue


@dataclass(frozen=True)
class WorkOutcome:
    status: WorkStatus
    instance_id: str | None = None
    detail: str = ""


class FailureLog(Protocol):
    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None: ...


class DeadLetters(Protocol):
    async def record_dead_letter(self, letter: DeadLetter) -> None: ...


@dataclass(frozen=True)
class WorkDeps:
    reconcile: Reconciler
    failures: FailureLog
    dead_letters: DeadLetters
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    incidents: IncidentsPort | None = None  # a permanent failure or a poison message is an incident


def _fields(delivery: QueueDelivery, instance_id: str | None, correlation_id: str = "") -> dict[str, object]:
    return {
        "message_id": delivery.message_id,
        "dequeue_count": delivery.dequeue_count,
        "queue": delivery.queue,
        "instance_id": instance_id or "",
        "correlation_id": correlation_id,
    }


async def _record_malformed(error: MalformedMessage, delivery: QueueDelivery, deps: WorkDeps, source: str) -> None:
    at = deps.clock()
    await deps.dead_letters.record_dead_letter(
        DeadLetter(
            source=source,
            reason=str(error),
            at=at,
            message_id=delivery.message_id,
            dequeue_count=delivery.dequeue_count,
            instance_id=error.instance_id,
        )
    )
    if error.instance_id is not None:
        await deps.failures.record_failure(error.instance_id, str(error), at=at)


async def handle_work(delivery: QueueDelivery, deps: WorkDeps) -> WorkOutcome:
    """Reconcile the instance a message names; raise only what the host should retry."""
    try:
        message = parse_work_message(delivery.body)
    except MalformedMessage as error:
        LOG.error(
            "work: %s; recorded, not retried",
            error,
            extra={"event": "work.malformed", **_fields(delivery, error.instance_id)},
        )
        await _record_malformed(error, delivery, deps, "work")
        return WorkOutcome(WorkStatus.MALFORMED, error.instance_id, str(error))
    request = ReconcileRequest(
        instance_id=message.instance_id,
        trigger=Trigger(message.trigger, _trigger_detail(message)),
        reason=message.reason,
        correlation_id=message.correlation_id,
        not_before=message.requested_at,
        batch_id=message.sweep_id or None,
    )
    fields = _fields(delivery, message.instance_id, message.correlation_id)
    try:
        result = await deps.reconcile(request)
    except TransientError as error:
        LOG.warning("work: %s; the host retries the message", error, extra={"event": "work.retry", **fields})
        raise
    except PermanentError as error:
        LOG.error("work: %s; recorded, not retried", error, extra={"event": "work.failed", **fields})
        await deps.failures.record_failure(
            message.instance_id, str(error), at=deps.clock(), correlation_id=message.correlation_id
        )
        if deps.incidents is not None:
            await report_work_failure(
                deps.incidents, message.instance_id, str(error), poisoned=False, run_id=message.correlation_id
            )
        return WorkOutcome(WorkStatus.FAILED, message.instance_id, str(error))
    if result.skipped is not None:
        LOG.info("work: %s: %s", message.instance_id, result.skipped, extra={"event": "work.coalesced", **fields})
        return WorkOutcome(WorkStatus.COALESCED, message.instance_id, result.skipped)
    return WorkOutcome(WorkStatus.RECONCILED, message.instance_id)


def _trigger_detail(message: WorkMessage) -> str:
    if message.sweep_id:
        return f"sweep {message.sweep_id}"
    return message.reason


async def handle_poison(delivery: QueueDelivery, deps: WorkDeps) -> WorkOutcome:
    """A message the host gave up on: record it where the operator looks, never retry it."""
    attempts = f"{delivery.dequeue_count} attempt(s)" if delivery.dequeue_count is not None else "its attempts"
    try:
        message = parse_work_message(delivery.body)
    except MalformedMessage as error:
        LOG.error("poison: %s", error, extra={"event": "work.poison", **_fields(delivery, error.instance_id)})
        await _record_malformed(error, delivery, deps, "poison")
        return WorkOutcome(WorkStatus.POISONED, error.instance_id, str(error))
    reason = (
        f"work message {delivery.message_id or '(no id)'} for this instance ({message.reason}) failed after "
        f"{attempts} and was moved to {delivery.queue or 'the poison queue'}; the instance was not reconciled "
        "(the Function App's log has each attempt's error under this correlation id)"
    )
    LOG.error(
        "poison: %s: %s",
        message.instance_id,
        reason,
        extra={"event": "work.poison", **_fields(delivery, message.instance_id, message.correlation_id)},
    )
    at = deps.clock()
    await deps.dead_letters.record_dead_letter(
        DeadLetter(
            source="poison",
            reason=reason,
            at=at,
            message_id=delivery.message_id,
            dequeue_count=delivery.dequeue_count,
            instance_id=message.instance_id,
        )
    )
    await deps.failures.record_failure(message.instance_id, reason, at=at, correlation_id=message.correlation_id)
    if deps.incidents is not None:
        await report_work_failure(
            deps.incidents, message.instance_id, reason, poisoned=True, run_id=message.correlation_id
        )
    return WorkOutcome(WorkStatus.POISONED, message.instance_id, reason)
