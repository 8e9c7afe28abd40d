"""Reconcile's coalescing over recording fakes: a run is stamped with its start, so a change
made while it ran (its event asks for a reconcile after the run began) is not skipped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.reconcile import LogSink, ReconcileDeps, ReconcileRequest, reconcile
from shared.findings_store import FindingChanges
from shared.inventory import InstanceRef
from shared.journal import Trigger, TriggerKind
from shared.model import Finding, Snapshot
from tests.factories import SERVICE_ID
from tests.unit.test_remediate_engine import engine

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class SlowSource:
    """The engine's source, where every read takes a minute of the clock."""

    def __init__(self, inner: Any, clock: Clock) -> None:
        self.inner, self.clock = inner, clock

    async def discover(self) -> tuple[InstanceRef, ...]:
        result: tuple[InstanceRef, ...] = await self.inner.discover()
        return result

    async def locate(self, instance_id: str) -> InstanceRef | None:
        result: InstanceRef | None = await self.inner.locate(instance_id)
        return result

    async def read(self, ref: InstanceRef) -> Snapshot:
        self.clock.now += timedelta(minutes=1)
        snapshot: Snapshot = await self.inner.read(ref)
        return snapshot


class FakeFindings:
    def __init__(self) -> None:
        self.last: datetime | None = None

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
        self.last = seen_at
        return FindingChanges(instance_id)

    async def last_reconciled(self, instance_id: str) -> datetime | None:
        return self.last

    async def last_signals(self, instance_id: str) -> datetime | None:
        return None


async def test_a_change_made_during_a_run_is_not_coalesced_away() -> None:
    clock = Clock()
    remediation, _, _, _, _ = engine()
    remediation = replace(remediation, source=SlowSource(remediation.source, clock))
    findings = FakeFindings()
    deps = ReconcileDeps(remediation=remediation, findings=findings, sink=LogSink(), clock=clock)
    event = Trigger(TriggerKind.EVENT, "test")
    first = await reconcile(ReconcileRequest(SERVICE_ID, event, "sweep"), deps)
    assert first.skipped is None
    assert findings.last == T0  # the moment the run began, before it read anything

    # An operator wrote while that run was under way (after it began): its event must run.
    during = await reconcile(ReconcileRequest(SERVICE_ID, event, "event", not_before=T0 + timedelta(seconds=30)), deps)
    assert during.skipped is None
    # A request made before the last run began is covered by it.
    before = await reconcile(ReconcileRequest(SERVICE_ID, event, "event", not_before=findings.last), deps)
    assert before.skipped is not None
