"""The Functions triggers at the function level, against the twin and Azurite with the
production AppContext: the sweep fans out through a real queue, work messages reconcile
(and coalesce), malformed and poisoned messages are recorded, and an operator's ARM write
delivered by the twin's Event Grid (three times) fixes the drift once, while the product's
own write events start nothing (the twin's request log shows no further write)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
import pytest_asyncio
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

import function_app
from handlers.context import AppContext
from shared.journal import TriggerKind
from shared.work_queue import AzureWorkQueue, WorkMessage, parse_work_message
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, drift, fragment_for
from tests.functions.test_function_app import function
from tests.integration.test_remediate import apim_writes, product_env
from tests.integration.test_remediate_engine_safety import seed_drifts
from tests.integration.test_twin_eventgrid import Receiver, flush, subscribe

pytestmark = pytest.mark.integration

POLICY = "version: 1\nrules:\n  TLS-001: {mode: remediate}\n  MGMT-001: {mode: remediate}\n"
OPERATOR_CLIENT_ID = "0b5e0c1a-0000-4000-8000-00000000c002"  # estates/test.yaml: platform-operator
API = "api-version=2024-05-01"


@pytest_asyncio.fixture(loop_scope="function")
async def context(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], AppContext]]:
    """The production composition root, configured by environment as in Azure, with a
    work queue of its own; function_app uses it. Built after the test seeds its estate."""
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built: list[AppContext] = []

    def make() -> AppContext:
        env = product_env(twin, tmp_path, POLICY)
        env["APIMR_WORK_QUEUE"] = f"work-{uuid.uuid4().hex[:12]}"
        built.append(AppContext.load(env))
        monkeypatch.setattr(function_app, "app_context", lambda: built[-1])
        return built[-1]

    yield make
    for ctx in built:
        await ctx.aclose()


async def receive(ctx: AppContext, queue: str) -> list[QueueMessage]:
    """Take every message off a queue as the host would hand it to a function."""
    client = ctx.factory.queue_async(queue)
    taken = []
    async for item in client.receive_messages(max_messages=32, visibility_timeout=60):
        taken.append(QueueMessage(id=item.id, body=item.content, dequeue_count=item.dequeue_count))
        await client.delete_message(item)
    return taken


def tls10(twin: TwinHandle, service_id: str) -> str:
    body = twin.arm("GET", f"{service_id}?{API}").json()
    return str(
        body["properties"]["customProperties"]["Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10"]
    )


def reconciles(caplog: pytest.LogCaptureFixture, service_id: str) -> int:
    return sum(
        1
        for r in caplog.records
        if getattr(r, "event", "") == "reconcile.done"
        and str(getattr(r, "instance_id", "")).lower() == service_id.lower()
    )


async def test_sweep_enqueues_one_message_per_instance_in_scope(
    twin: TwinHandle, context: Callable[[], AppContext]
) -> None:
    one, two = compliant("sweep-one", twin.subscription_id), compliant("sweep-two", twin.subscription_id)
    drift("TLS-001", one)
    fragment, ids = fragment_for({"sweep-one": one, "sweep-two": two}, twin.subscription_id)
    twin.seed(fragment)
    first, second = ids["sweep-one"], ids["sweep-two"]
    ctx = context()
    in_scope = {r.id.lower() for r in await ctx.source().discover()}
    assert {first.lower(), second.lower()} <= in_scope
    twin.control("DELETE", "/_twin/log")

    await function("sweep")(TimerRequest(past_due=False))

    messages = [parse_work_message(m.get_body()) for m in await receive(ctx, ctx.settings.work_queue)]
    assert sorted(m.instance_id.lower() for m in messages) == sorted(in_scope)  # one each, nothing else
    assert {m.reason for m in messages} == {"sweep"}
    assert len({m.sweep_id for m in messages}) == 1
    assert apim_writes(twin) == []  # the sweep itself did no per-instance work


async def test_a_work_message_reconciles_and_a_duplicate_burst_reconciles_once(
    twin: TwinHandle, context: Callable[[], AppContext], caplog: pytest.LogCaptureFixture
) -> None:
    service_id = seed_drifts(twin, "work-fix", "TLS-001")
    ctx = context()
    caplog.set_level(logging.INFO, logger="apim_remediator")
    assert tls10(twin, service_id).lower() == "true"
    queue = AzureWorkQueue(ctx.factory.queue_async(ctx.settings.work_queue))
    asked = datetime.now(UTC)
    for _ in range(2):  # the same instance queued twice in a burst (two sweeps, or a sweep and a retry)
        await queue.send(WorkMessage(service_id, "sweep", str(uuid.uuid4()), asked, TriggerKind.TIMER, "s-1"))

    burst = await receive(ctx, ctx.settings.work_queue)
    assert len(burst) == 2
    for message in burst:
        await function("work")(message)

    assert tls10(twin, service_id).lower() == "false"  # fixed: the policy puts TLS-001 in remediate
    assert reconciles(caplog, service_id) == 1  # the second message was coalesced
    summary = await ctx.findings().summary(service_id)
    assert summary is not None
    assert summary.last_reconciled is not None
    assert summary.last_reconciled >= asked


async def test_a_malformed_message_is_recorded_not_retried(twin: TwinHandle, context: Callable[[], AppContext]) -> None:
    service_id = seed_drifts(twin, "work-malformed")
    ctx = context()
    client = ctx.factory.queue_async(ctx.settings.work_queue)
    await client.create_queue()
    await client.send_message(b"{not json")
    await client.send_message(b'{"version": 9, "instance_id": "' + service_id.encode() + b'"}')
    taken = await receive(ctx, ctx.settings.work_queue)
    for message in taken:
        await function("work")(message)  # returns: the host deletes the message, no retry
    ids = {m.id for m in taken}
    letters = [d for d in await ctx.messages().dead_letters(limit=1000) if d.message_id in ids]
    assert sorted(d.source for d in letters) == ["work", "work"]
    assert all(d.reason.startswith("malformed work message") for d in letters)
    summary = await ctx.findings().summary(service_id)
    assert summary is not None
    assert summary.last_error is not None
    assert "unknown version 9" in summary.last_error
    assert apim_writes(twin) == []


async def test_a_poison_message_is_recorded_for_the_operator(
    twin: TwinHandle, context: Callable[[], AppContext]
) -> None:
    service_id = seed_drifts(twin, "work-poison", "TLS-001")
    ctx = context()
    poisoned = AzureWorkQueue(ctx.factory.queue_async(ctx.settings.poison_queue))
    correlation = str(uuid.uuid4())
    await poisoned.send(WorkMessage(service_id, "sweep", correlation, datetime.now(UTC), TriggerKind.TIMER, "s-9"))
    [message] = await receive(ctx, ctx.settings.poison_queue)
    twin.control("DELETE", "/_twin/log")

    await function("poison")(message)

    summary = await ctx.findings().summary(service_id)
    assert summary is not None
    assert summary.last_error is not None
    assert f"was moved to {ctx.settings.poison_queue}" in summary.last_error
    [letter] = [d for d in await ctx.messages().dead_letters(limit=1000) if d.message_id == message.id]
    assert (letter.source, letter.instance_id) == ("poison", service_id)
    assert apim_writes(twin) == []  # a poisoned message is never worked on
    assert tls10(twin, service_id).lower() == "true"


def as_function_event(body: dict[str, Any]) -> func.EventGridEvent:
    """An Event Grid delivery as the Functions host decodes it for the trigger."""
    return func.EventGridEvent(
        id=body["id"],
        data=body["data"],
        topic=body["topic"],
        subject=body["subject"],
        event_type=body["eventType"],
        event_time=datetime.fromisoformat(body["eventTime"].replace("Z", "+00:00")),
        data_version=body["dataVersion"],
    )


async def test_an_operators_write_is_fixed_once_and_our_own_writes_start_nothing(
    twin: TwinHandle, context: Callable[[], AppContext], caplog: pytest.LogCaptureFixture
) -> None:
    service_id = seed_drifts(twin, "event-fix")
    context()
    caplog.set_level(logging.INFO, logger="apim_remediator")
    hook = Receiver().start()
    try:
        assert subscribe(twin, hook.url, duplicates=2)[0] == 201  # every event delivered three times
        operator = twin.token(twin.urls["arm"], client_id=OPERATOR_CLIENT_ID)
        answer = twin.arm(
            "PATCH",
            f"{service_id}/tenant/access?{API}",
            token=operator,
            json={"properties": {"enabled": True}},
            headers={"If-Match": "*"},
        )
        assert answer.status_code in (200, 204), answer.text
        flush(twin)
        operator_events = [body[0] for _, body in hook.notifications()]
        assert len(operator_events) == 3
        assert len({e["id"] for e in operator_events}) == 1
        twin.control("DELETE", "/_twin/log")

        # The three deliveries arrive at the same moment.
        await asyncio.gather(*(function("events")(as_function_event(e)) for e in operator_events))

        assert reconciles(caplog, service_id) == 1
        writes = apim_writes(twin)
        assert [w.lower() for w in writes] == [f"patch {service_id}/tenant/access".lower()]  # MGMT-001 fixed
        state = twin.arm("GET", f"{service_id}/tenant/access?{API}").json()
        assert state["properties"]["enabled"] is False

        # The fix raised events of its own (the product's identity in the claims).
        flush(twin)
        seen = {e["id"] for e in operator_events}
        own = [body[0] for _, body in hook.notifications() if body[0]["id"] not in seen]
        assert own, "the product's write raised no event"
        assert all(e["data"]["claims"]["appid"] == twin.client_id for e in own)
        twin.control("DELETE", "/_twin/log")
        for event in own:
            await function("events")(as_function_event(event))
        _, log = twin.control("GET", "/_twin/log?service=arm")
        assert apim_writes(twin) == []  # zero further writes
        assert [
            e for e in log["entries"] if "/providers/Microsoft.ApiManagement/" in e["path"]
        ] == []  # not even a read
        assert reconciles(caplog, service_id) == 1
    finally:
        twin.control("DELETE", "/_twin/events/subscriptions")
        hook.stop()
