"""Event Grid delivery from the twin to a webhook: the validation handshake, Notification
deliveries with Event Grid's headers, at-least-once duplicates, retries, event type
filters, and refusal of non-loopback endpoints and failed handshakes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import TwinHandle
from twin.eventgrid import make_event
from twin.state import Clock

pytestmark = pytest.mark.integration

KV_TYPE = "Microsoft.KeyVault.SecretNearExpiry"
APIM_TYPE = "Microsoft.ApiManagement.SubscriptionUpdated"


class Receiver:
    """A webhook on 127.0.0.1 (plain HTTP) in its own thread, recording what it gets.

    mode: "ok" answers the handshake; "wrong-code" answers it with another code;
    "no-code" answers 200 without a body; "fail-first" answers the first notification 500.
    """

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[tuple[dict[str, str], Any]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def notifications(self) -> list[tuple[dict[str, str], Any]]:
        with self.lock:
            return [(h, b) for h, b in self.requests if h.get("aeg-event-type") == "Notification"]

    def handshakes(self) -> list[tuple[dict[str, str], Any]]:
        with self.lock:
            return [(h, b) for h, b in self.requests if h.get("aeg-event-type") == "SubscriptionValidation"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self.lock:
            self.requests.append((headers, body))
            notifications = sum(1 for h, _ in self.requests if h.get("aeg-event-type") == "Notification")
        if headers.get("aeg-event-type") == "SubscriptionValidation":
            code = body[0]["data"]["validationCode"]
            if self.mode == "wrong-code":
                return web.json_response({"validationResponse": "not-the-code"})
            if self.mode == "no-code":
                return web.Response(status=200)
            return web.json_response({"validationResponse": code})
        if self.mode == "fail-first" and notifications == 1:
            return web.Response(status=500)
        return web.Response(status=200)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def start(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver().start()
    yield hook
    hook.stop()


def subscribe(twin: TwinHandle, endpoint: str, **options: Any) -> tuple[int, Any]:
    return twin.control("POST", "/_twin/events/subscriptions", json={"endpoint": endpoint, **options})


def emit(twin: TwinHandle, event_type: str, subject: str = "/secrets/apim-key", data: Any = None) -> dict[str, Any]:
    status, event = twin.control(
        "POST", "/_twin/events/emit", json={"event_type": event_type, "subject": subject, "data": data or {"k": 1}}
    )
    assert status == 201, event
    return dict(event)


def flush(twin: TwinHandle) -> dict[str, Any]:
    status, body = twin.control("POST", "/_twin/events/flush")
    assert status == 200, body
    return dict(body)


def test_handshake_then_notifications_with_event_grid_headers(twin: TwinHandle, receiver: Receiver) -> None:
    status, sub = subscribe(twin, receiver.url, name="product-hook")
    assert status == 201, sub
    [(headers, body)] = receiver.handshakes()
    assert body[0]["eventType"] == "Microsoft.EventGrid.SubscriptionValidationEvent"
    assert body[0]["data"]["validationCode"]
    assert body[0]["data"]["validationUrl"].startswith("https://")
    assert headers["aeg-subscription-name"] == "PRODUCT-HOOK"

    event = emit(twin, KV_TYPE, data={"ObjectName": "apim-key", "VaultName": "kv1"})
    assert flush(twin)["delivered"] == 1
    [(headers, body)] = receiver.notifications()
    assert isinstance(body, list)
    assert len(body) == 1
    assert body[0] == event
    assert headers["aeg-event-type"] == "Notification"
    assert headers["aeg-subscription-name"] == "PRODUCT-HOOK"
    assert headers["aeg-delivery-count"] == "0"
    assert headers["aeg-data-version"] == "1"
    assert headers["aeg-metadata-version"] == "1"
    assert headers["content-type"].startswith("application/json")
    assert set(body[0]) == {
        "id",
        "topic",
        "subject",
        "eventType",
        "eventTime",
        "data",
        "dataVersion",
        "metadataVersion",
    }

    status, listed = twin.control("GET", "/_twin/events", json=None)
    assert status == 200
    assert [e["id"] for e in listed["value"]] == [event["id"]]


def test_duplicates_deliver_each_event_again(twin: TwinHandle, receiver: Receiver) -> None:
    assert subscribe(twin, receiver.url, duplicates=2)[0] == 201
    event = emit(twin, APIM_TYPE)
    flush(twin)
    deliveries = receiver.notifications()
    assert [b[0]["id"] for _, b in deliveries] == [event["id"]] * 3
    assert [h["aeg-delivery-count"] for h, _ in deliveries] == ["0", "1", "2"]


def test_event_type_filter(twin: TwinHandle, receiver: Receiver) -> None:
    assert subscribe(twin, receiver.url, event_types=[KV_TYPE.lower()])[0] == 201
    emit(twin, APIM_TYPE)
    wanted = emit(twin, KV_TYPE)
    flush(twin)
    assert [b[0]["id"] for _, b in receiver.notifications()] == [wanted["id"]]
    status, only_kv = twin.control("GET", f"/_twin/events?type={KV_TYPE}")
    assert status == 200
    assert [e["eventType"] for e in only_kv["value"]] == [KV_TYPE]


def test_failed_delivery_is_retried(twin: TwinHandle) -> None:
    hook = Receiver("fail-first").start()
    try:
        assert subscribe(twin, hook.url)[0] == 201
        event = emit(twin, KV_TYPE)
        outcome = flush(twin)
        assert outcome["delivered"] == 1
        deliveries = hook.notifications()
        assert [b[0]["id"] for _, b in deliveries] == [event["id"], event["id"]]
        assert [h["aeg-delivery-count"] for h, _ in deliveries] == ["0", "1"]
        [record] = twin.control("GET", "/_twin/events/subscriptions")[1]["deliveries"]
        assert [a.get("status") for a in record["attempts"]] == [500, 200]
    finally:
        hook.stop()


@pytest.mark.parametrize("mode", ["wrong-code", "no-code"])
def test_a_failed_handshake_refuses_the_subscription(twin: TwinHandle, mode: str) -> None:
    hook = Receiver(mode).start()
    try:
        status, body = subscribe(twin, hook.url)
        assert status == 400
        assert "validation handshake failed" in body["error"]["message"]
        assert len(hook.handshakes()) == 1
        emit(twin, KV_TYPE)
        flush(twin)
        assert hook.notifications() == []
        assert twin.control("GET", "/_twin/events/subscriptions")[1]["value"] == []
    finally:
        hook.stop()


def test_unreachable_endpoint_is_refused(twin: TwinHandle) -> None:
    hook = Receiver().start()
    url = hook.url
    hook.stop()
    status, body = subscribe(twin, url)
    assert status == 400
    assert "could not be reached" in body["error"]["message"]


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://example.com/hook",
        "http://10.0.0.5:8080/hook",
        "http://127.0.0.1.nip.io/hook",
        "ftp://127.0.0.1/hook",
        "http://user:pw@127.0.0.1:9/hook",
        "",
    ],
)
def test_non_loopback_endpoints_are_refused(twin: TwinHandle, endpoint: str) -> None:
    status, body = subscribe(twin, endpoint)
    assert status == 400
    assert body["error"]["code"] == "InvalidSubscription"


def test_subscription_options_are_checked(twin: TwinHandle, receiver: Receiver) -> None:
    assert subscribe(twin, receiver.url, duplicates=-1)[0] == 400
    assert subscribe(twin, receiver.url, event_types="all")[0] == 400
    assert subscribe(twin, receiver.url, retries=3)[0] == 400
    assert subscribe(twin, receiver.url, name="one")[0] == 201
    assert subscribe(twin, receiver.url, name="ONE")[0] == 400
    status, _ = twin.control("DELETE", "/_twin/events/subscriptions?name=missing")
    assert status == 404
    assert twin.control("DELETE", "/_twin/events/subscriptions")[0] == 204
    emit(twin, KV_TYPE)
    flush(twin)
    assert receiver.notifications() == []


def test_emit_requires_type_subject_and_data(twin: TwinHandle) -> None:
    for body in ({"subject": "s", "data": {}}, {"event_type": "T", "data": {}}, {"event_type": "T", "subject": "s"}):
        status, _ = twin.control("POST", "/_twin/events/emit", json=body)
        assert status == 400, body


def test_make_event_uses_the_twin_clock() -> None:
    clock = Clock()
    clock.advance(timedelta(days=3))
    event = make_event(KV_TYPE, "/secrets/x", "/subscriptions/s/vault", {"a": 1}, clock=clock)
    stamp = datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00"))
    assert abs(stamp - (datetime.now(UTC) + timedelta(days=3))) < timedelta(seconds=5)
    assert event["metadataVersion"] == "1"
    assert event["dataVersion"] == "1"
    assert event["eventType"] == KV_TYPE
    assert make_event(KV_TYPE, "s", "t", None, clock=clock)["id"] != event["id"]
