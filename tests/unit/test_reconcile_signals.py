"""Reconcile runs the runtime signals on their own schedule (recording fakes of the findings
store and the signals reader): the first reconcile reads them, one within the interval does
not and keeps the signal rules' stored findings as they are, one after the interval reads
them again; an interval of zero never reads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.reconcile import LogSink, ReconcileDeps, ReconcileRequest, reconcile
from shared.findings_store import FindingChanges
from shared.journal import Trigger, TriggerKind
from shared.model import Finding, Snapshot
from shared.signals import KEY_SPREAD, SIGNAL_RULES, KeySpread, QueryRun, RuntimeSignals
from tests.factories import SERVICE_ID
from tests.unit.test_remediate_engine import engine

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Findings:
    def __init__(self) -> None:
        self.signals_at: datetime | None = None
        self.synced: list[dict[str, Any]] = []

    async def sync(
        self,
        instance_id: str,
        findings: Sequence[Finding],
        *,
        seen_at: datetime,
        correlation_id: str = "",
        keep_rules: frozenset[str] = frozenset(),
        signals_at: datetime | None = None,
    ) -> FindingChanges:
        self.synced.append({"rules": sorted({f.rule_id for f in findings}), "keep": keep_rules, "at": signals_at})
        if signals_at is not None:
            self.signals_at = signals_at
        return FindingChanges(instance_id)

    async def last_reconciled(self, instance_id: str) -> datetime | None:
        return None

    async def last_signals(self, instance_id: str) -> datetime | None:
        return self.signals_at


class Signals:
    """A leaked key: one subscription used from 50 client IPs."""

    def __init__(self) -> None:
        self.reads: list[Mapping[str, Mapping[str, Any]]] = []

    async def read(self, snapshot: Snapshot, params: Mapping[str, Mapping[str, Any]]) -> RuntimeSignals:
        self.reads.append(params)
        return RuntimeSignals(
            table="ApiManagementGatewayLogs",
            workspaces=("law",),
            runs=(QueryRun(KEY_SPREAD, "ApiManagementGatewayLogs | ...", 60, ("law",)),),
            key_spread=(KeySpread("orders-mobile", 50, 400, ("192.0.2.1", "192.0.2.2")),),
        )


def deps(clock: Clock, findings: Findings, signals: Signals, interval: timedelta) -> ReconcileDeps:
    remediation, _, _, _, _ = engine()
    return ReconcileDeps(
        remediation=remediation,
        findings=findings,
        sink=LogSink(),
        clock=clock,
        signals=signals,
        signals_interval=interval,
    )


async def run(d: ReconcileDeps) -> None:
    result = await reconcile(ReconcileRequest(SERVICE_ID, Trigger(TriggerKind.TIMER, "sweep"), "sweep"), d)
    assert result.skipped is None


async def test_signals_run_on_their_own_interval() -> None:
    clock, findings, signals = Clock(), Findings(), Signals()
    d = deps(clock, findings, signals, timedelta(minutes=15))

    await run(d)  # never ran: runs now
    assert len(signals.reads) == 1
    assert set(signals.reads[0]) == SIGNAL_RULES  # every signal rule is on in the engine's policy
    assert signals.reads[0]["THR-003"]["max_client_ips"] == 10
    first = findings.synced[-1]
    assert "THR-003" in first["rules"]
    assert first["keep"] == frozenset()
    assert first["at"] == T0

    clock.now = T0 + timedelta(minutes=14, seconds=59)  # inside the interval: no query
    await run(d)
    assert len(signals.reads) == 1
    within = findings.synced[-1]
    assert "THR-003" not in within["rules"]
    assert within["keep"] == SIGNAL_RULES
    assert within["at"] is None

    clock.now = T0 + timedelta(minutes=15)  # the interval has passed: runs again
    await run(d)
    assert len(signals.reads) == 2
    assert findings.synced[-1]["at"] == clock.now


async def test_an_interval_of_zero_never_runs_the_signals() -> None:
    clock, findings, signals = Clock(), Findings(), Signals()
    await run(deps(clock, findings, signals, timedelta(0)))
    assert signals.reads == []
    assert findings.synced[-1]["keep"] == SIGNAL_RULES


async def test_an_events_reconcile_never_runs_the_signals() -> None:
    clock, findings, signals = Clock(), Findings(), Signals()
    d = deps(clock, findings, signals, timedelta(minutes=15))
    event = Trigger(TriggerKind.EVENT, "event id")
    result = await reconcile(ReconcileRequest(SERVICE_ID, event, "Microsoft.Resources.ResourceWriteSuccess"), d)
    assert result.skipped is None
    assert signals.reads == []
    assert findings.synced[-1]["keep"] == SIGNAL_RULES
    await run(d)  # the sweep's reconcile does
    assert len(signals.reads) == 1
