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

Runtime signals (LOG-004, THR-001..005) run on their own schedule: they cost Log Analytics
queries, not ARM reads, so a reconcile runs them only when the instance's last signals run
(kept on its findings summary) is at least `signals_interval` old, over the rescan's
snapshot; never for an event (a configuration change that must be answered in seconds).
Between runs, the open findings of those rules stay as the last signals run left them: a
reconcile that did not look cannot resolve them.

Azure actions: those of handlers/remediate.py (it runs the engine), and for the runtime
signals Microsoft.OperationalInsights/workspaces/read and
Microsoft.OperationalInsights/workspaces/query/read on the workspaces the instances' diagnostic
settings send gateway logs to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from handlers.remediate import RemediateRequest, RemediationDeps, RemediationReport, remediate
from shared.evaluation import evaluate
from shared.findings_store import FindingChanges, StoredFinding
from shared.journal import Trigger, TriggerKind
from shared.model import Finding, Mode, Snapshot
from shared.policy import Policy
from shared.signals import SIGNAL_RULES, RuntimeSignals

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
        self,
        instance_id: str,
        findings: Sequence[Finding],
        *,
        seen_at: datetime,
        correlation_id: str = "",
        keep_rules: frozenset[str] = frozenset(),
        signals_at: datetime | None = None,
    ) -> FindingChanges: ...

    async def last_reconciled(self, instance_id: str) -> datetime | None: ...

    async def last_signals(self, instance_id: str) -> datetime | None: ...


class SignalsApi(Protocol):
    async def read(self, snapshot: Snapshot, params: Mapping[str, Mapping[str, Any]]) -> RuntimeSignals:
        """The runtime signals the rules in `params` need; a failed query is recorded, not raised."""
        ...


class ChangeSink(Protocol):
    async def report(self, changes: FindingChanges, *, correlation_id: str) -> None: ...


class IncidentStep(Protocol):
    """What a run leaves to people becomes incidents (handlers/incidents.py RunIncidents)."""

    async def after_reconcile(
        self,
        report: RemediationReport,
        changes: FindingChanges,
        *,
        run_id: str,
        batch_id: str | None,
        signals: Sequence[Finding] = (),
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
    signals: SignalsApi | None = None  # None: the runtime signals never run here
    signals_interval: timedelta = timedelta(minutes=15)  # zero: never


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
    signal_findings, keep, signals_at = await _signals(request, report, deps, started)
    changes = await deps.findings.sync(
        report.instance_id,
        [*report.remaining, *signal_findings],
        seen_at=started,
        correlation_id=request.correlation_id,
        keep_rules=keep,
        signals_at=signals_at,
    )
    await deps.sink.report(changes, correlation_id=request.correlation_id)
    if deps.incidents is not None:
        # Signal findings are problems like the others (`changes.kept`: the ones not evaluated now).
        await deps.incidents.after_reconcile(
            report,
            changes,
            run_id=request.correlation_id,
            batch_id=request.batch_id or request.correlation_id,
            signals=signal_findings,
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


async def _signals(
    request: ReconcileRequest, report: RemediationReport, deps: ReconcileDeps, started: datetime
) -> tuple[list[Finding], frozenset[str], datetime | None]:
    """The signal rules' findings when their schedule says so, the rules whose stored findings
    stay as they are (not evaluated now), and the moment the signals ran (None: not now).

    An event's reconcile never runs them: it is about a configuration change and must answer
    Event Grid within its ~30 s; the next sweep's reconcile runs them."""
    if deps.signals is None or deps.signals_interval <= timedelta(0) or report.snapshot is None:
        return [], SIGNAL_RULES, None
    if request.trigger.kind is TriggerKind.EVENT:
        return [], SIGNAL_RULES, None
    last = await deps.findings.last_signals(report.instance_id)
    if last is not None and started - last < deps.signals_interval:
        return [], SIGNAL_RULES, None
    policy: Policy = deps.remediation.policy
    params = {rule_id: policy.params_of(rule_id) for rule_id in SIGNAL_RULES if policy.mode_of(rule_id) is not Mode.OFF}
    signals = await deps.signals.read(report.snapshot, params)
    result = evaluate(replace(report.snapshot, signals=signals), policy, today=started.date())
    failed = frozenset(f.rule_id for f in result.failures if f.rule_id in SIGNAL_RULES)
    found = [f for f in result.findings if f.rule_id in SIGNAL_RULES and f.rule_id not in failed and not f.exempt]
    LOG.info(
        "runtime signals of %s: %d quer(ies), %d finding(s)",
        report.instance_id,
        len(signals.runs),
        len(found),
        extra={"event": "signals.done", "instance_id": report.instance_id},
    )
    return found, failed, started
