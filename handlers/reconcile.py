"""Reconcile one APIM instance: the unit of work every trigger ends in.

Read a fresh snapshot (never an event's payload), apply what the policy puts in
`remediate` mode through the remediation engine (lease, journal, If-Match, verify), store
what the rescan still shows, and report what changed — new, changed, resolved findings —
to one sink (a structured log event per change), then open, update or resolve incidents
for what the run leaves to people (handlers/incidents.py). Running it
twice changes nothing the second time: a converged instance makes zero writes.

Coalescing: a request names the moment it was made (`not_before`: the queue message's or
event's time). If the instance was reconciled after that moment (by another message, an
event, a person), the work is already done and nothing runs.

Azure actions: those of handlers/remediate.py (it runs the engine).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from handlers.remediate import RemediateRequest, RemediationDeps, RemediationReport, remediate
from shared.findings_store import FindingChanges, StoredFinding
from shared.journal import Trigger
from shared.model import Finding

LOG = logging.getLogger("apim_remediator.reconcile")


@dataclass(frozen=True)
class ReconcileRequest:
    instance_id: str
    trigger: Trigger
    reason: str  # why this instance is reconciled now: "sweep", an event type, "http"
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # When the work was asked for; an instance reconciled since then is not done again.
    not_before: datetime | None = None
    # The batch this run belongs to (the sweep id): new incidents are limited per batch.
    # None: the run is its own batch.
    batch_id: str | None = None


@dataclass(frozen=True)
class ReconcileResult:
    instance_id: str
    correlation_id: str
    skipped: str | None = None  # why nothing ran (coalesced with a later reconcile)
    remediation: RemediationReport | None = None
    changes: FindingChanges | None = None


class FindingsApi(Protocol):
    async def sync(
        self, instance_id: str, findings: Sequence[Finding], *, seen_at: datetime, correlation_id: str = ""
    ) -> FindingChanges: ...

    async def last_reconciled(self, instance_id: str) -> datetime | None: ...


class ChangeSink(Protocol):
    async def report(self, changes: FindingChanges, *, correlation_id: str) -> None: ...


class IncidentStep(Protocol):
    """What a run leaves to people becomes incidents (handlers/incidents.py RunIncidents)."""

    async def after_reconcile(
        self, report: RemediationReport, changes: FindingChanges, *, run_id: str, batch_id: str | None
    ) -> object: ...


class LogSink:
    """One structured log event per new, changed or resolved finding (incidents are the
    separate `IncidentStep`)."""

    def __init__(self, logger: logging.Logger = LOG) -> None:
        self.logger = logger

    async def report(self, changes: FindingChanges, *, correlation_id: str) -> None:
        for change, rows in (("new", changes.new), ("changed", changes.changed), ("resolved", changes.resolved)):
            for row in rows:
                self.logger.log(
                    logging.INFO if change == "resolved" else logging.WARNING,
                    "finding %s: %s %s",
                    change,
                    row.rule_id,
                    row.message,
                    extra=_fields(row, change, correlation_id),
                )


def _fields(row: StoredFinding, change: str, correlation_id: str) -> dict[str, str]:
    return {
        "event": f"finding.{change}",
        "rule_id": row.rule_id,
        "resource_id": row.resource_id,
        "instance_id": row.instance_id,
        "severity": row.severity.value,
        "correlation_id": correlation_id,
    }


@dataclass(frozen=True)
class ReconcileDeps:
    remediation: RemediationDeps
    findings: FindingsApi
    sink: ChangeSink
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    incidents: IncidentStep | None = None  # None: findings are only logged


async def reconcile(request: ReconcileRequest, deps: ReconcileDeps) -> ReconcileResult:
    """Scan, remediate what the policy allows, store the findings, report the changes."""
    # The run is stamped with the moment it started, before anything is read: a change
    # made while it runs (an operator's write whose event arrives meanwhile) is newer than
    # this stamp, so that event's reconcile is not coalesced away by this run.
    started = deps.clock()
    if request.not_before is not None:
        asked = request.not_before if request.not_before.tzinfo else request.not_before.replace(tzinfo=UTC)
        last = await deps.findings.last_reconciled(request.instance_id)
        if last is not None and last >= asked:
            return ReconcileResult(
                request.instance_id,
                request.correlation_id,
                skipped=f"reconciled at {last.isoformat()}, after this request was made: nothing to do twice",
            )
    report = await remediate(
        RemediateRequest(
            instance_id=request.instance_id,
            trigger=request.trigger,
            apply=True,
            correlation_id=request.correlation_id,
        ),
        deps.remediation,
    )
    changes = await deps.findings.sync(
        report.instance_id, report.remaining, seen_at=started, correlation_id=request.correlation_id
    )
    await deps.sink.report(changes, correlation_id=request.correlation_id)
    if deps.incidents is not None:
        await deps.incidents.after_reconcile(
            report, changes, run_id=request.correlation_id, batch_id=request.batch_id or request.correlation_id
        )
    LOG.info(
        "reconciled %s (%s): %d write(s), %d finding(s) open",
        report.instance_id,
        request.reason,
        report.writes,
        len(report.remaining),
        extra={"event": "reconcile.done", "instance_id": report.instance_id, "correlation_id": request.correlation_id},
    )
    return ReconcileResult(report.instance_id, request.correlation_id, remediation=report, changes=changes)
