"""The sweep and work handlers over recording fakes: one message per in-scope instance;
a message's fields reach reconcile; malformed, permanent and poisoned messages are recorded
and end; transient errors raise for the host to retry; the message format is strict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from handlers.reconcile import ReconcileRequest, ReconcileResult
from handlers.sweep import EVENT_RETENTION, SweepDeps, SweepRequest, sweep
from handlers.work import QueueDelivery, WorkDeps, WorkStatus, handle_poison, handle_work
from shared.errors import OutOfScopeError, TransientError
from shared.inventory import InstanceRef
from shared.journal import TriggerKind
from shared.locks import InstanceBusy
from shared.message_ledger import DeadLetter
from shared.work_queue import MalformedMessage, WorkMessage, parse_work_message

SUB = "11111111-2222-3333-4444-555555555555"
AT = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


def service(name: str, group: str = "rg-apim") -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{group}/providers/Microsoft.ApiManagement/service/{name}"


def ref(name: str, group: str = "rg-apim", **tags: str) -> InstanceRef:
    return InstanceRef(service(name, group), name, SUB, group, "westeurope", tags)


@dataclass
class Recorder:
    refs: tuple[InstanceRef, ...] = ()
    sent: list[WorkMessage] = field(default_factory=list)
    purged: list[datetime] = field(default_factory=list)
    reconciles: list[ReconcileRequest] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    raises: Exception | None = None
    skipped: str | None = None

    async def discover(self) -> tuple[InstanceRef, ...]:
        return self.refs

    def in_scope(self, subscription_id: str, resource_group: str, tags: dict[str, str]) -> bool:
        return tags.get("env") != "sandbox"

    async def send(self, message: WorkMessage) -> None:
        self.sent.append(message)

    async def purge(self, *, older_than: datetime, limit: int = 1000) -> int:
        self.purged.append(older_than)
        return 2

    async def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        self.reconciles.append(request)
        if self.raises is not None:
            raise self.raises
        return ReconcileResult(request.instance_id, request.correlation_id, skipped=self.skipped)

    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None:
        self.failures.append((instance_id, error, correlation_id))

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    def work_deps(self) -> WorkDeps:
        return WorkDeps(reconcile=self.reconcile, failures=self, dead_letters=self, clock=lambda: AT)


async def test_sweep_sends_one_message_per_instance_in_scope_and_nothing_else() -> None:
    fakes = Recorder(refs=(ref("a"), ref("b", "rg-two"), ref("c", env="sandbox")))
    deps = SweepDeps(inventory=fakes, policy=fakes, queue=fakes, ledger=fakes, clock=lambda: AT)
    result = await sweep(SweepRequest(sweep_id="sweep-1"), deps)
    assert [m.instance_id for m in fakes.sent] == [service("a"), service("b", "rg-two")]
    assert result.enqueued == (service("a"), service("b", "rg-two"))
    assert result.outside_policy_scope == (service("c"),)
    for message in fakes.sent:
        assert (message.reason, message.sweep_id, message.requested_at, message.trigger) == (
            "sweep",
            "sweep-1",
            AT,
            TriggerKind.TIMER,
        )
    assert len({m.correlation_id for m in fakes.sent}) == 2
    assert fakes.purged == [AT - EVENT_RETENTION]
    assert fakes.reconciles == []  # never per-instance work


@dataclass
class Housekeeping:
    calls: list[str] = field(default_factory=list)

    async def deliver_pending(self, *, limit: int = 100) -> object:
        self.calls.append("deliver")
        return None

    async def purge(self, *, now: datetime | None = None) -> int:
        self.calls.append(f"purge {now}")
        return 3


async def test_sweep_delivers_waiting_incident_changes_then_purges_old_ones() -> None:
    fakes, incidents = Recorder(refs=(ref("a"),)), Housekeeping()
    deps = SweepDeps(inventory=fakes, policy=fakes, queue=fakes, ledger=fakes, clock=lambda: AT, incidents=incidents)
    result = await sweep(SweepRequest(sweep_id="sweep-1"), deps)
    assert incidents.calls == ["deliver", f"purge {AT}"]
    assert result.purged_incident_rows == 3


def message(**overrides: Any) -> bytes:
    body: dict[str, Any] = json.loads(
        WorkMessage(service("a"), "sweep", "corr-1", AT, TriggerKind.TIMER, "sweep-1").to_json()
    )
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_work_message_round_trips() -> None:
    original = WorkMessage(service("a"), "Microsoft.Resources.ResourceWriteSuccess", "c", AT, TriggerKind.EVENT)
    assert parse_work_message(original.to_json()) == original
    assert parse_work_message(original.to_json().decode()) == original


async def test_work_reconciles_with_the_message_time_as_not_before() -> None:
    fakes = Recorder()
    outcome = await handle_work(QueueDelivery(message(), "m1", 1, "apimr-work"), fakes.work_deps())
    assert outcome.status is WorkStatus.RECONCILED
    [request] = fakes.reconciles
    assert (request.instance_id, request.reason, request.correlation_id, request.not_before) == (
        service("a"),
        "sweep",
        "corr-1",
        AT,
    )
    assert request.trigger.kind is TriggerKind.TIMER
    assert request.trigger.detail == "sweep sweep-1"


async def test_work_reports_a_coalesced_message() -> None:
    fakes = Recorder(skipped="reconciled at ..., nothing to do twice")
    assert (await handle_work(QueueDelivery(message()), fakes.work_deps())).status is WorkStatus.COALESCED


@pytest.mark.parametrize(
    ("body", "names_instance"),
    [
        (b"not json", False),
        (b"[1, 2]", False),
        (message(instance_id="/subscriptions/x/resourceGroups/rg/providers/Microsoft.Web/sites/a"), False),
        (message(version=2), True),
        (message(requested_at="yesterday"), True),
        (message(requested_at="2026-11-30T06:00:00"), True),  # no zone
        (message(trigger="cron"), True),
        (message(reason="two words"), True),
        (message(correlation_id=None), True),
        (message(extra="field"), True),
        (b"{" + b" " * 60000 + b"}", False),
    ],
)
async def test_malformed_messages_are_recorded_and_end(body: bytes, names_instance: bool) -> None:
    fakes = Recorder()
    outcome = await handle_work(QueueDelivery(body, "m1", 1, "apimr-work"), fakes.work_deps())
    assert outcome.status is WorkStatus.MALFORMED
    assert fakes.reconciles == []
    [letter] = fakes.letters
    assert (letter.source, letter.message_id, letter.dequeue_count) == ("work", "m1", 1)
    assert letter.reason.startswith("malformed work message: ")
    assert [f[0] for f in fakes.failures] == ([service("a")] if names_instance else [])


def test_parse_refuses_what_it_cannot_read() -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_work_message(message(version=2))
    assert info.value.instance_id == service("a")


@pytest.mark.parametrize("error", [TransientError("HTTP 503"), InstanceBusy(service("a"), 10.0)])
async def test_transient_failures_raise_for_the_host_to_retry(error: Exception) -> None:
    fakes = Recorder(raises=error)
    with pytest.raises(TransientError):
        await handle_work(QueueDelivery(message(), "m1", 1), fakes.work_deps())
    assert fakes.failures == []
    assert fakes.letters == []


async def test_permanent_failures_are_recorded_and_end_the_message() -> None:
    fakes = Recorder(raises=OutOfScopeError("not an APIM instance in the configured scope"))
    outcome = await handle_work(QueueDelivery(message(), "m1", 1), fakes.work_deps())
    assert outcome.status is WorkStatus.FAILED
    assert fakes.failures == [(service("a"), "not an APIM instance in the configured scope", "corr-1")]


async def test_a_bug_is_not_swallowed() -> None:
    fakes = Recorder(raises=KeyError("bug"))
    with pytest.raises(KeyError):
        await handle_work(QueueDelivery(message()), fakes.work_deps())


async def test_poison_is_recorded_on_the_instance_and_in_the_ledger() -> None:
    fakes = Recorder()
    outcome = await handle_poison(QueueDelivery(message(), "m9", 5, "apimr-work-poison"), fakes.work_deps())
    assert outcome.status is WorkStatus.POISONED
    assert fakes.reconciles == []
    [(instance, reason, correlation)] = fakes.failures
    assert (instance, correlation) == (service("a"), "corr-1")
    assert "failed after 5 attempt(s) and was moved to apimr-work-poison" in reason
    [letter] = fakes.letters
    assert (letter.source, letter.message_id, letter.dequeue_count, letter.instance_id) == (
        "poison",
        "m9",
        5,
        service("a"),
    )


async def test_unreadable_poison_is_still_recorded() -> None:
    fakes = Recorder()
    outcome = await handle_poison(QueueDelivery(b"\xff\xfe", "m9", 5, "apimr-work-poison"), fakes.work_deps())
    assert outcome.status is WorkStatus.POISONED
    [letter] = fakes.letters
    assert letter.source == "poison"
    assert fakes.failures == []


def test_retention_outlives_event_grid_retries() -> None:
    assert timedelta(hours=24) < EVENT_RETENTION
