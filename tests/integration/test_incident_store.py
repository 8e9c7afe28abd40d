"""The incident reporter against Azurite (no sink needs the twin here): one incident per
fingerprint under concurrent writers, one outbox row per change and sink written with the
change, the new-incident limit per batch and its summary incident, the public
raise/resolve entry point other use cases call, and work failures (a poison message) that
the instance's next successful reconcile resolves."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from handlers.incidents import RunIncidents, report_work_failure
from handlers.remediate import RemediationReport
from handlers.work import QueueDelivery, WorkDeps, WorkStatus, handle_poison
from shared.azure import ClientFactory
from shared.errors import TransientError
from shared.findings_store import FindingChanges
from shared.incidents import (
    SUMMARY_FINGERPRINT,
    ChangeKind,
    IncidentChange,
    IncidentReporter,
    IncidentStatus,
    IncidentStore,
    Problem,
    ProblemKind,
    fingerprint_of,
)
from shared.journal import TriggerKind
from shared.message_ledger import DeadLetter
from shared.model import Severity
from shared.settings import load_settings
from shared.work_queue import WorkMessage
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SERVICE = "/subscriptions/{sub}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/{name}"


@pytest_asyncio.fixture(loop_scope="function")
async def store(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[IncidentStore]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    factory = ClientFactory(load_settings(twin.env))
    yield IncidentStore(factory.table_service_async(), f"inc{uuid.uuid4().hex[:12]}")
    await factory.aclose()
    factory.close()


@dataclass
class Recorder:
    """A sink that records what it is given (the outbox and its ordering are under test, not
    a transport); it can be switched down."""

    name: str = "recorder"
    kinds: frozenset[ChangeKind] = frozenset(ChangeKind)
    state_based: bool = False
    down: bool = False
    got: list[tuple[str, int]] = field(default_factory=list)

    async def deliver(self, change: IncidentChange, state: dict[str, str]) -> dict[str, str]:
        if self.down:
            raise TransientError("recorder is down")
        self.got.append((change.kind.value, change.incident.version))
        return state


def backup_problem(resource: str, severity: Severity = Severity.HIGH, family: str = "BACKUP") -> Problem:
    return Problem(
        kind=ProblemKind.BACKUP if family == "BACKUP" else ProblemKind.FINDING,
        family=family,
        resource_id=resource,
        title="Backup of apim-one failed",
        severity=severity,
        description="The backup operation ended Failed: StorageAccountNotFound.",
        instance_id=resource,
    )


async def test_the_public_entry_point_raises_counts_and_resolves(twin: TwinHandle, store: IncidentStore) -> None:
    """What rotation (issue 12) and backups (issue 13) will call."""
    sink = Recorder()
    reporter = IncidentReporter(store, [sink])
    resource = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    first = await reporter.raise_problem(backup_problem(resource), run_id="r1")
    again = await reporter.raise_problem(backup_problem(resource), run_id="r1")  # the same run: counted once
    assert (first.count, again.count, again.status) == (1, 1, IncidentStatus.NEW)
    later = await reporter.raise_problem(backup_problem(resource, Severity.CRITICAL), run_id="r2")
    assert (later.count, later.status, later.severity) == (2, IncidentStatus.ACTIVE, Severity.CRITICAL)
    done = await reporter.resolve(fingerprint_of("BACKUP", resource), "the next backup succeeded", run_id="r3")
    assert done is not None
    assert (done.status, done.note) == (IncidentStatus.RESOLVED, "the next backup succeeded")
    assert await reporter.resolve(fingerprint_of("BACKUP", resource), "again") is None
    reopened = await reporter.raise_problem(backup_problem(resource), run_id="r4")
    assert (reopened.status, reopened.count, reopened.version) == (IncidentStatus.NEW, 1, 4)

    report = await reporter.deliver_pending()
    assert sink.got == [("opened", 1), ("escalated", 2), ("resolved", 3), ("reopened", 4)]
    assert len(report.delivered) == 4
    assert (await reporter.deliver_pending()).delivered == ()  # delivered once, never again


async def test_concurrent_writers_make_one_incident_and_lose_no_count(twin: TwinHandle, store: IncidentStore) -> None:
    sink = Recorder()
    resource = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    reporters = [IncidentReporter(store, [sink]) for _ in range(6)]
    results = await asyncio.gather(
        *(r.raise_problem(backup_problem(resource), run_id=f"run-{i}") for i, r in enumerate(reporters))
    )
    incident = await store.get(fingerprint_of("BACKUP", resource))
    assert incident is not None
    assert incident.count == 6
    assert incident.version == 6
    assert sorted(r.count for r in results) == [1, 2, 3, 4, 5, 6]
    rows = await store.outbox_of(incident.fingerprint)
    assert [r.change.incident.version for r in rows] == [1, 2, 3, 4, 5, 6]  # one change each, none lost


async def test_a_sink_that_is_down_keeps_its_rows_in_order(twin: TwinHandle, store: IncidentStore) -> None:
    sink = Recorder(down=True)
    reporter = IncidentReporter(store, [sink])
    resource = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    for run in ("r1", "r2"):
        await reporter.raise_problem(backup_problem(resource), run_id=run)
        failed = await reporter.deliver_pending()
        assert len(failed.failed) == 1  # tried once per run, then left for the next
    sink.down = False
    await reporter.deliver_pending()
    assert sink.got == [("opened", 1), ("activated", 2)]


async def test_state_based_sinks_get_only_the_latest_version(twin: TwinHandle, store: IncidentStore) -> None:
    sink = Recorder(name="latest", state_based=True)
    reporter = IncidentReporter(store, [sink])
    resource = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    for run in ("r1", "r2", "r3"):
        await reporter.raise_problem(backup_problem(resource), run_id=run)
    report = await reporter.deliver_pending()
    assert sink.got == [("updated", 3)]
    assert report.skipped == 2


async def test_over_the_limit_problems_wait_in_one_summary_incident(twin: TwinHandle, store: IncidentStore) -> None:
    sink = Recorder()
    reporter = IncidentReporter(store, [sink], max_new_per_batch=2)
    names = [SERVICE.format(sub=twin.subscription_id, name=f"apim-{i}-{uuid.uuid4().hex[:6]}") for i in range(5)]
    for name in names:
        await reporter.raise_problem(backup_problem(name, family="TLS"), run_id="sweep-1-run", batch_id="sweep-1")
    opened = [i for i in await store.incidents() if i.kind is ProblemKind.FINDING]
    assert len(opened) == 2
    summary = await store.get(SUMMARY_FINGERPRINT)
    assert summary is not None
    assert summary.status is IncidentStatus.NEW
    assert len(summary.members) == 3
    assert summary.title == "3 problem(s) over the new-incident limit"

    # The next sweep has room for two more; the repeated ones are updates, not new.
    for name in names:
        await reporter.raise_problem(backup_problem(name, family="TLS"), run_id="sweep-2-run", batch_id="sweep-2")
    assert len([i for i in await store.incidents() if i.kind is ProblemKind.FINDING]) == 4
    summary = await store.get(SUMMARY_FINGERPRINT)
    assert summary is not None
    assert len(summary.members) == 1

    # The last one goes away before it got an incident: a reconcile of its instance that no
    # longer shows it takes it out; the summary has nothing left and is resolved.
    [waiting] = summary.members
    instance = next(n for n in names if fingerprint_of("TLS", n) == waiting)
    await RunIncidents(reporter).after_reconcile(
        RemediationReport(instance, dry_run=False, correlation_id="run-9"),
        FindingChanges(instance),
        run_id="run-9",
        batch_id="sweep-3",
    )
    summary = await store.get(SUMMARY_FINGERPRINT)
    assert summary is not None
    assert summary.status is IncidentStatus.RESOLVED
    assert summary.members == ()
    assert await reporter.waiting_in_summary() == ()


@dataclass
class Ledger:
    letters: list[DeadLetter] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None:
        self.failures.append(instance_id)


async def test_a_poison_message_is_an_incident_until_the_instance_reconciles(
    twin: TwinHandle, store: IncidentStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apim_remediator")
    sink = Recorder()
    reporter = IncidentReporter(store, [sink])
    instance = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    ledger = Ledger()

    async def never(_: object) -> object:
        raise AssertionError("poison never reconciles")

    deps = WorkDeps(reconcile=never, failures=ledger, dead_letters=ledger, incidents=reporter)  # type: ignore[arg-type]
    message = WorkMessage(
        instance, "sweep", "corr-1", datetime.now(UTC) - timedelta(minutes=5), TriggerKind.TIMER, "s-1"
    )
    outcome = await handle_poison(
        QueueDelivery(message.to_json(), message_id="m-1", dequeue_count=5, queue="apimr-work-poison"), deps
    )
    assert outcome.status is WorkStatus.POISONED
    [incident] = await reporter.open_incidents(instance)
    assert incident.kind is ProblemKind.WORK
    assert "was given up on" in incident.title
    assert sink.got == [("opened", 1)]  # delivered at once
    assert any(getattr(r, "event", "") == "incident.opened" for r in caplog.records)  # and logged

    # The next reconcile of the instance succeeds: resolved with a note.
    await RunIncidents(reporter).after_reconcile(
        RemediationReport(instance, dry_run=False, correlation_id="corr-2"),
        FindingChanges(instance),
        run_id="corr-2",
        batch_id=None,
    )
    resolved = await store.get(incident.fingerprint)
    assert resolved is not None
    assert resolved.status is IncidentStatus.RESOLVED
    assert resolved.note == "the instance was reconciled successfully in run corr-2"
    assert sink.got[-1] == ("resolved", 2)

    # A permanent failure raised the same way is the same incident again (reopened).
    again = await report_work_failure(reporter, instance, "403 AuthorizationFailed", poisoned=False)
    assert again.status is IncidentStatus.NEW
    assert again.fingerprint == incident.fingerprint


async def test_the_sweep_purges_what_was_delivered_long_ago_and_keeps_the_rest(
    twin: TwinHandle, store: IncidentStore
) -> None:
    sink = Recorder()
    waiting = Recorder(name="waiting", down=True)
    reporter = IncidentReporter(store, [sink, waiting], max_new_per_batch=5)
    resource = SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:6]}")
    await reporter.raise_problem(backup_problem(resource), run_id="r1", batch_id="sweep-old")
    await reporter.raise_problem(backup_problem(resource), run_id="r2")
    await reporter.deliver_pending()
    fingerprint = fingerprint_of("BACKUP", resource)
    assert len(await store.outbox_of(fingerprint)) == 4  # two versions, two sinks

    assert await reporter.purge() == 0  # nothing is old yet
    later = datetime.now(UTC) + timedelta(days=31)
    assert await reporter.purge(now=later) == 3  # two delivered rows and the sweep's budget row
    left = await store.outbox_of(fingerprint)
    assert [(r.sink, r.delivered) for r in left] == [("waiting", False), ("waiting", False)]  # never lost
    incident = await store.get(fingerprint)
    assert incident is not None
    assert incident.count == 2
