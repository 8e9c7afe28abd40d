"""Event Grid delivery: the twin's services emit Event Grid schema events (`state.emit`);
this module delivers them to webhook subscriptions the tests register, like Event Grid's
push delivery (at-least-once, retried, with the validation handshake).

Control routes (no token, under `/_twin/`):
- `GET /_twin/events[?type=T]`: every event emitted since the last reset (type: case-insensitive).
- `POST /_twin/events/emit` `{event_type, subject, data, topic?, data_version?}`: emit one
  event built by `make_event` (for tests of delivery itself, and for driving the product);
  201 with the event.
- `POST /_twin/events/subscriptions` `{endpoint, name?, event_types?: [...], duplicates?: n}`:
  add a webhook subscription. The endpoint must be an http(s) URL on 127.0.0.1, localhost
  or ::1 (anything else: 400). The twin performs the validation handshake first (POST of a
  `Microsoft.EventGrid.SubscriptionValidationEvent` with `aeg-event-type:
  SubscriptionValidation`); the endpoint must answer 200 with `{"validationResponse":
  <validationCode>}`, else the subscription is refused (400 naming why). `duplicates: n`
  delivers every event 1+n times (same event id, rising `aeg-delivery-count`) to test
  idempotent handlers.
- `GET /_twin/events/subscriptions`: subscriptions and the delivery log.
- `DELETE /_twin/events/subscriptions[?name=N]`: remove all (or one).
- `POST /_twin/events/flush`: wait until every queued delivery has finished; returns counts.

Delivery: POST of a JSON array holding one event, headers `aeg-event-type: Notification`,
`aeg-subscription-name` (upper case, as Event Grid sends it), `aeg-delivery-count` (0 on the
first attempt), `aeg-data-version`, `aeg-metadata-version`. 2xx is success; 400, 401, 403,
404 and 413 are final (Event Grid does not retry them); anything else, or a connection
error, is retried up to RETRIES times with a short backoff. HTTPS endpoints are checked
against the twin's CA (`state.extra["ca_file"]`) and the system store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from twin.state import Clock, TwinState
from twin.web import STATE_KEY, ServiceError, add_route, json_response, read_json, state_of

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETRIES = 3
BACKOFF = 0.05  # seconds, doubled per retry
FINAL_STATUSES = frozenset({400, 401, 403, 404, 413})
MAX_DUPLICATES = 10
TIMEOUT = aiohttp.ClientTimeout(total=10)
TOPIC = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/twin/providers/Microsoft.EventGrid/topics/twin"
)


def event_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def make_event(
    event_type: str, subject: str, topic: str, data: Any, *, clock: Clock, data_version: str = "1"
) -> dict[str, Any]:
    """An Event Grid schema event stamped with the twin clock."""
    return {
        "id": str(uuid.uuid4()),
        "topic": topic,
        "subject": subject,
        "eventType": event_type,
        "eventTime": event_time(clock.now()),
        "data": data,
        "dataVersion": data_version,
        "metadataVersion": "1",
    }


def _subscriptions(state: TwinState) -> list[dict[str, Any]]:
    subs: list[dict[str, Any]] = state.extra.setdefault("eventgrid_subscriptions", [])
    return subs


def _deliveries(state: TwinState) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = state.extra.setdefault("eventgrid_deliveries", [])
    return log


def _wants(sub: dict[str, Any], event: dict[str, Any]) -> bool:
    types = sub.get("event_types")
    if not types:
        return True
    return str(event.get("eventType", "")).lower() in {str(t).lower() for t in types}


class Dispatcher:
    """Owns the HTTP client and the queued deliveries; runs on the twin's loop."""

    def __init__(self, state: TwinState) -> None:
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: aiohttp.ClientSession | None = None
        self.pending: set[asyncio.Task[None]] = set()

    # The listener runs inside state.emit: usually on the twin's loop (a handler), but a
    # caller on another thread is handed over to the loop.
    def listener(self, event: dict[str, Any]) -> None:
        targets = [dict(sub) for sub in _subscriptions(self.state) if _wants(sub, event)]
        if not targets:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and (self.loop is None or running is self.loop):
            self.loop = running
            self._schedule(targets, dict(event))
        elif self.loop is not None:
            self.loop.call_soon_threadsafe(self._schedule, targets, dict(event))

    def _schedule(self, targets: list[dict[str, Any]], event: dict[str, Any]) -> None:
        for sub in targets:
            task = asyncio.get_running_loop().create_task(self._deliver_copies(sub, event))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca_file = self.state.extra.get("ca_file")
        if ca_file:
            context.load_verify_locations(cafile=str(ca_file))
        return context

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                timeout=TIMEOUT, connector=aiohttp.TCPConnector(ssl=self._ssl(), force_close=True)
            )
        return self.session

    def _headers(self, sub: dict[str, Any], kind: str, count: int, event: dict[str, Any]) -> dict[str, str]:
        return {
            "Content-Type": "application/json; charset=utf-8",
            "aeg-event-type": kind,
            "aeg-subscription-name": str(sub["name"]).upper(),
            "aeg-delivery-count": str(count),
            "aeg-data-version": str(event.get("dataVersion", "")),
            "aeg-metadata-version": str(event.get("metadataVersion", "1")),
        }

    async def _deliver_copies(self, sub: dict[str, Any], event: dict[str, Any]) -> None:
        for copy in range(1 + int(sub.get("duplicates", 0))):
            await self._deliver(sub, event, copy)

    async def _deliver(self, sub: dict[str, Any], event: dict[str, Any], first_count: int) -> None:
        record: dict[str, Any] = {"subscription": sub["name"], "event_id": event["id"], "attempts": []}
        _deliveries(self.state).append(record)
        for attempt in range(RETRIES + 1):
            count = first_count + attempt
            status: int | None = None
            try:
                async with self.client().post(
                    sub["endpoint"], json=[event], headers=self._headers(sub, "Notification", count, event)
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                record["attempts"].append({"delivery_count": count, "error": type(error).__name__})
            else:
                record["attempts"].append({"delivery_count": count, "status": status})
                if 200 <= status <= 204:
                    record["outcome"] = "delivered"
                    return
                if status in FINAL_STATUSES:
                    record["outcome"] = "dropped"
                    return
            if attempt < RETRIES:
                await asyncio.sleep(BACKOFF * 2**attempt)
        record["outcome"] = "failed"

    async def handshake(self, sub: dict[str, Any]) -> None:
        """Event Grid's validation handshake; raises the 400 that refuses the subscription."""
        code = str(uuid.uuid4()).upper()
        base = self.state.urls.get("arm", "")
        event = make_event(
            VALIDATION_EVENT,
            "",
            TOPIC,
            {"validationCode": code, "validationUrl": f"{base}/_twin/events/validate?id={code}"},
            clock=self.state.clock,
            data_version="2",
        )
        why: str
        try:
            async with self.client().post(
                sub["endpoint"], json=[event], headers=self._headers(sub, "SubscriptionValidation", 0, event)
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            why = f"the endpoint could not be reached ({type(error).__name__}: {error})"
        else:
            if status != 200:
                why = f"Http POST request returned {status}; 200 OK with the validation code was expected"
            else:
                try:
                    body = json.loads(text)
                except ValueError:
                    body = None
                answer = body.get("validationResponse") if isinstance(body, dict) else None
                if answer is not None and str(answer).upper() == code:
                    return
                why = (
                    "Http POST request returned 200 without the validation code in the response body "
                    '({"validationResponse": <validationCode>} was expected)'
                )
        raise ServiceError(
            400, "WebhookValidationFailed", f"Webhook validation handshake failed for {sub['endpoint']}: {why}."
        )

    async def flush(self) -> int:
        waited = 0
        while self.pending:
            batch = list(self.pending)
            waited += len(batch)
            await asyncio.gather(*batch, return_exceptions=True)
        return waited

    async def close(self) -> None:
        for task in list(self.pending):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


DISPATCHER_KEY: web.AppKey[Dispatcher] = web.AppKey("eventgrid", Dispatcher)


def _check_endpoint(endpoint: Any) -> str:
    if not isinstance(endpoint, str) or not endpoint:
        raise ServiceError(400, "InvalidSubscription", "'endpoint' (an http(s) URL) is required.")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https"):
        raise ServiceError(400, "InvalidSubscription", f"The endpoint '{endpoint}' must be an http or https URL.")
    if parsed.hostname not in LOOPBACK:
        raise ServiceError(
            400,
            "InvalidSubscription",
            f"The endpoint host '{parsed.hostname}' is refused: the twin only delivers to 127.0.0.1, localhost or ::1.",
        )
    if parsed.username or parsed.password:
        raise ServiceError(400, "InvalidSubscription", "The endpoint must not carry credentials.")
    return endpoint


# -- control routes --------------------------------------------------------------------------


async def list_events(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    wanted = request.query.get("type")
    events = [e for e in state.events if wanted is None or str(e.get("eventType", "")).lower() == wanted.lower()]
    return json_response({"value": events})


async def emit_event(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await read_json(request)
    unknown = set(body) - {"event_type", "subject", "data", "topic", "data_version"}
    if unknown:
        raise ServiceError(400, "InvalidEvent", f"Unknown fields {sorted(unknown)}.")
    event_type, subject = body.get("event_type"), body.get("subject")
    if not isinstance(event_type, str) or not event_type or not isinstance(subject, str):
        raise ServiceError(400, "InvalidEvent", "'event_type' (non-empty) and 'subject' (a string) are required.")
    if "data" not in body:
        raise ServiceError(400, "InvalidEvent", "'data' is required.")
    event = make_event(
        event_type,
        subject,
        str(body.get("topic") or TOPIC),
        body["data"],
        clock=state.clock,
        data_version=str(body.get("data_version", "1")),
    )
    state.emit(event)
    return json_response(event, status=201)


async def add_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await read_json(request)
    unknown = set(body) - {"endpoint", "name", "event_types", "duplicates"}
    if unknown:
        raise ServiceError(400, "InvalidSubscription", f"Unknown fields {sorted(unknown)}.")
    endpoint = _check_endpoint(body.get("endpoint"))
    subs = _subscriptions(state)
    name = body.get("name") or f"twin-subscription-{len(subs) + 1}"
    if not isinstance(name, str) or any(s["name"].lower() == name.lower() for s in subs):
        raise ServiceError(400, "InvalidSubscription", f"The subscription name '{name}' is invalid or already used.")
    event_types = body.get("event_types")
    if event_types is not None and (
        not isinstance(event_types, list) or not all(isinstance(t, str) and t for t in event_types)
    ):
        raise ServiceError(400, "InvalidSubscription", "'event_types' must be a list of event type names.")
    duplicates = body.get("duplicates", 0)
    if not isinstance(duplicates, int) or isinstance(duplicates, bool) or not 0 <= duplicates <= MAX_DUPLICATES:
        raise ServiceError(400, "InvalidSubscription", f"'duplicates' must be an integer 0..{MAX_DUPLICATES}.")
    sub = {"name": name, "endpoint": endpoint, "event_types": event_types, "duplicates": duplicates}
    await request.app[DISPATCHER_KEY].handshake(sub)
    subs.append(sub)
    return json_response(sub, status=201)


async def list_subscriptions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response({"value": _subscriptions(state), "deliveries": _deliveries(state)})


async def delete_subscriptions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    name = request.query.get("name")
    subs = _subscriptions(state)
    keep = [s for s in subs if name is not None and s["name"].lower() != name.lower()]
    if name is not None and len(keep) == len(subs):
        raise ServiceError(404, "NotFound", f"No event subscription named '{name}'.")
    subs[:] = keep
    return web.Response(status=204)


async def flush(request: web.Request) -> web.StreamResponse:
    waited = await request.app[DISPATCHER_KEY].flush()
    deliveries = _deliveries(state_of(request))
    outcomes = {o: sum(1 for d in deliveries if d.get("outcome") == o) for o in ("delivered", "dropped", "failed")}
    return json_response({"awaited": waited, **outcomes})


async def manual_validation(request: web.Request) -> web.StreamResponse:
    raise ServiceError(
        400,
        "NotSupported",
        "The twin validates subscriptions only by the synchronous handshake (answer the validation event with "
        '{"validationResponse": <validationCode>}); the manual validation URL is not supported.',
    )


def setup(app: web.Application) -> None:
    state = app[STATE_KEY]
    dispatcher = Dispatcher(state)
    app[DISPATCHER_KEY] = dispatcher
    state.event_listeners.append(dispatcher.listener)

    async def on_startup(_: web.Application) -> None:
        dispatcher.loop = asyncio.get_running_loop()

    async def on_cleanup(_: web.Application) -> None:
        await dispatcher.close()
        with contextlib.suppress(ValueError):
            state.event_listeners.remove(dispatcher.listener)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    add_route(app, "GET", "/_twin/events", list_events, versions=None)
    add_route(app, "POST", "/_twin/events/emit", emit_event, versions=None)
    add_route(app, "GET", "/_twin/events/subscriptions", list_subscriptions, versions=None)
    add_route(app, "POST", "/_twin/events/subscriptions", add_subscription, versions=None)
    add_route(app, "DELETE", "/_twin/events/subscriptions", delete_subscriptions, versions=None)
    add_route(app, "POST", "/_twin/events/flush", flush, versions=None)
    add_route(app, "GET", "/_twin/events/validate", manual_validation, versions=None)
