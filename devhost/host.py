"""A local stand-in for the Azure Functions host (Core Tools cannot be installed here).

Production runs on the Functions host: `func start` with local.settings.json locally, or
Azure. This host loads the same `function_app.py`, reads each function's own metadata and
drives it with real `azure.functions` objects: timers on their NCRONTAB schedules, queue
triggers polling Azure Storage (Azurite), the Event Grid webhook with its validation
handshake, HTTP triggers under the route prefix with the key check, and the admin endpoint
`POST /admin/functions/{name}`. It runs in-process (`DevHost`) or as `python -m devhost start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import typing
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar

import azure.functions as func
from aiohttp import web
from azure.functions.timer import TimerRequest

from devhost.config import ConfigError, HostConfig, merge_settings, read_local_settings
from devhost.functions import FunctionSpec, InvocationResult, LoadedApp, invoke, load_app, queue_message
from devhost.queues import QueuePoller, QueueService, output_messages, resolve_connection, storage_settings_for
from devhost.routing import RouteTemplate, ordered, split_path

log = logging.getLogger("devhost")

T = TypeVar("T")
VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
MAX_REQUEST_BYTES = 100 * 1024 * 1024  # the host's request size limit
PAST_DUE_GRACE = 1.0  # seconds late before an occurrence counts as missed
_UNSET: Any = object()


@dataclass(frozen=True)
class HostKeys:
    """The keys the host checks: the master key (admin, and everything else), the host's
    default function key (function-level HTTP), and the `eventgrid_extension` system key."""

    master: str
    function: str
    eventgrid: str

    @classmethod
    def generate(cls) -> HostKeys:
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(32))


def _key_of(request: web.Request) -> str:
    return request.headers.get("x-functions-key") or request.query.get("code") or ""


def _same(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized() -> web.Response:
    return web.Response(status=401)


def _parse_event_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def eventgrid_event(event: Mapping[str, Any]) -> func.EventGridEvent:
    """A func.EventGridEvent from an Event Grid schema event (or a CloudEvents 1.0 event)."""
    if "specversion" in event:
        return func.EventGridEvent(
            id=str(event.get("id", "")),
            data=typing.cast(dict[str, object], event.get("data")),
            topic=str(event.get("source", "")),
            subject=str(event.get("subject", "")),
            event_type=str(event.get("type", "")),
            event_time=_parse_event_time(event.get("time")),
            data_version=str(event.get("dataversion", "")),
        )
    return func.EventGridEvent(
        id=str(event.get("id", "")),
        data=typing.cast(dict[str, object], event.get("data")),
        topic=str(event.get("topic", "")),
        subject=str(event.get("subject", "")),
        event_type=str(event.get("eventType", "")),
        event_time=_parse_event_time(event.get("eventTime")),
        data_version=str(event.get("dataVersion", "")),
    )


def http_response(result: InvocationResult, spec: FunctionSpec) -> web.Response:
    """The function's HTTP output as the host answers it; a failure is a bare 500."""
    if not result.succeeded:
        return web.Response(status=500)
    value: Any = result.return_value
    for output in spec.outputs:
        if output["type"] == "http" and output["name"] != "$return":
            value = result.outputs.get(str(output["name"]))
    if value is None:
        return web.Response(status=204)
    if isinstance(value, str | bytes):
        return web.Response(status=200, body=value.encode("utf-8") if isinstance(value, str) else value)
    if not isinstance(value, func.HttpResponse):
        log.error("Function '%s' returned %s where an HttpResponse was expected", spec.name, type(value).__name__)
        return web.Response(status=500)
    headers = {str(k): str(v) for k, v in value.headers.items()}
    if not any(k.lower() == "content-type" for k in headers) and value.mimetype:
        charset = f"; charset={value.charset}" if value.charset else ""
        headers["Content-Type"] = f"{value.mimetype}{charset}"
    return web.Response(status=value.status_code, body=value.get_body(), headers=headers)


class DevHost:
    """The host, in-process: `async with DevHost(app_dir) as host: ...`.

    app_dir: the app directory (host.json, local.settings.json, the script).
    script_file: the app's script (default: PYTHON_SCRIPT_FILE_NAME or function_app.py).
    settings_file: local settings (default: app_dir/local.settings.json when it exists).
    values: app settings that win over the environment and the settings file (tests).
    port: 0 picks a free port. keys: fixed keys (default: generated per start).
    max_polling_interval: override host.json's for queue triggers (seconds).
    function_timeout: override host.json's functionTimeout (seconds; None = unbounded).
    run_timers: False leaves timers to the admin endpoint only.

    While it runs, the app settings are in os.environ (as the worker's environment) and are
    restored on stop.
    """

    def __init__(
        self,
        app_dir: str | Path = ".",
        *,
        script_file: str | None = None,
        settings_file: str | Path | None = None,
        values: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keys: HostKeys | None = None,
        max_polling_interval: float | None = None,
        function_timeout: float | None = _UNSET,
        run_timers: bool = True,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self._script_file = script_file
        self._settings_file = Path(settings_file) if settings_file is not None else None
        self._values = dict(values or {})
        self._bind = host
        self._port = port
        self.keys = keys or HostKeys.generate()
        self._max_polling_interval = max_polling_interval
        self._function_timeout_override = function_timeout
        self.run_timers = run_timers
        self.config = HostConfig()
        self.settings: dict[str, str] = {}
        self.invocations: list[InvocationResult] = []
        self._app: LoadedApp | None = None
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._services: dict[str, QueueService] = {}
        self._pollers: list[QueuePoller] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed_env: dict[str, str | None] = {}
        self._invoked: asyncio.Condition | None = None
        self._routes: list[tuple[RouteTemplate, FunctionSpec]] = []

    # -- public surface --------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self._bind}:{self._port}"

    @property
    def api_url(self) -> str:
        prefix = self.config.route_prefix
        return f"{self.base_url}/{prefix}" if prefix else self.base_url

    @property
    def functions(self) -> Mapping[str, FunctionSpec]:
        return self._loaded.functions

    @property
    def module(self) -> ModuleType:
        return self._loaded.module

    @property
    def function_timeout(self) -> float | None:
        if self._function_timeout_override is not _UNSET:
            timeout: float | None = self._function_timeout_override
            return timeout
        return self.config.function_timeout

    def eventgrid_url(self, function_name: str, *, with_key: bool = True) -> str:
        url = f"{self.base_url}/runtime/webhooks/eventgrid?functionName={function_name}"
        return f"{url}&code={self.keys.eventgrid}" if with_key else url

    def admin_url(self, function_name: str) -> str:
        return f"{self.base_url}/admin/functions/{function_name}"

    def describe(self) -> str:
        """What `func start` prints: every function with its URL or trigger, then the keys."""
        lines = ["Functions:"]
        for name, spec in sorted(self.functions.items()):
            kind = spec.trigger_type
            if kind == "httpTrigger":
                methods = ",".join(sorted(spec.methods)) or "*"
                route = spec.route.template.strip("/")
                lines.append(f"  {name}: [{methods}] {self.api_url}/{route}  (auth: {spec.auth_level.lower()})")
            elif kind == "timerTrigger":
                lines.append(f"  {name}: timerTrigger '{spec.trigger['schedule']}'")
            elif kind == "queueTrigger":
                where = self._services[spec.connection].connection.describe()
                lines.append(f"  {name}: queueTrigger '{spec.queue_name}' ({where})")
            else:
                lines.append(f"  {name}: eventGridTrigger {self.eventgrid_url(name, with_key=False)}")
        lines += [
            "Keys (x-functions-key header or ?code=):",
            f"  master:              {self.keys.master}",
            f"  default (function):  {self.keys.function}",
            f"  eventgrid_extension: {self.keys.eventgrid}",
            f"Admin: POST {self.base_url}/admin/functions/{{name}} with the master key",
        ]
        return "\n".join(lines)

    async def __aenter__(self) -> DevHost:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Read settings and host.json, index the app, listen, start timers and queue pollers.
        ConfigError (a missing setting, an unsupported binding) stops the start."""
        _ensure_log_handler()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings_file = self._settings_file
        if settings_file is None and (self.app_dir / "local.settings.json").exists():
            settings_file = self.app_dir / "local.settings.json"
        file_values = read_local_settings(settings_file) if settings_file is not None else {}
        self.settings, shadowed = merge_settings(file_values, os.environ, self._values)
        for name in shadowed:
            if name not in self._values:
                log.warning("Skipping '%s' from local settings as it's already defined in the environment", name)
        self._apply_environment()
        self.config = HostConfig.load(self.app_dir / "host.json")
        script = self._script_file or self.settings.get("PYTHON_SCRIPT_FILE_NAME") or "function_app.py"
        self._app = load_app(self.app_dir, script, self.settings)
        self._routes = ordered(
            [(spec.route, spec) for spec in self._app.functions.values() if spec.trigger_type == "httpTrigger"]
        )
        for spec in self._app.functions.values():
            prefixes = [spec.connection] if spec.trigger_type == "queueTrigger" else []
            prefixes += [
                str(o.get("connection") or "AzureWebJobsStorage") for o in spec.outputs if o["type"] == "queue"
            ]
            for prefix in prefixes:
                if prefix not in self._services:
                    where = f"function '{spec.name}'"
                    connection = resolve_connection(prefix, self.settings, where)
                    self._services[prefix] = QueueService(
                        connection, self.settings, self.config.queues.message_encoding
                    )
        threads = int(self.settings.get("PYTHON_THREADPOOL_THREAD_COUNT") or min(32, (os.cpu_count() or 1) + 4))
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="devhost-worker")
        self._invoked = asyncio.Condition()
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._bind, self._port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        for spec in self._app.functions.values():
            if spec.trigger_type == "queueTrigger":
                poller = QueuePoller(
                    spec,
                    self._services[spec.connection],
                    self.config.queues,
                    self._queue_runner(spec),
                    max_polling_interval=self._max_polling_interval,
                    function_timeout=self.function_timeout,
                )
                self._pollers.append(poller)
                self._spawn(poller.run_forever())
            elif spec.trigger_type == "timerTrigger" and self.run_timers:
                self._spawn(self._timer_loop(spec))
        log.info("Host started (devhost, a local stand-in for the Functions host): %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening, cancel timers, pollers and running invocations, restore the environment."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for poller in self._pollers:
            await poller.stop()
        self._pollers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for service in self._services.values():
            with contextlib.suppress(Exception):
                await service.close()
        self._services.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._restore_environment()

    async def invoke(self, function_name: str, input: str | None = None) -> InvocationResult:
        """Run a non-HTTP function now, as the admin endpoint does, and return its result."""
        spec = self._spec(function_name)
        return await self._invoke(
            spec, self._admin_input(spec, input), "This function was programmatically called via the host APIs."
        )

    async def wait_for_invocations(
        self, function_name: str, count: int = 1, *, within: float = 30.0
    ) -> list[InvocationResult]:
        """Wait until `function_name` has run at least `count` times; its results in order."""
        assert self._invoked is not None, "the host is not started"

        def done() -> bool:
            return sum(1 for r in self.invocations if r.function == function_name) >= count

        async with self._invoked:
            await asyncio.wait_for(self._invoked.wait_for(done), within)
        return [r for r in self.invocations if r.function == function_name]

    async def drain(self, *, within: float = 60.0) -> None:
        """Wait until every queue-triggered queue is empty (visible or not) and nothing runs.
        Wakes the pollers so no backoff delays it; TimeoutError if the queues never empty."""

        async def settled() -> None:
            quiet_rounds = 0
            while quiet_rounds < 2:
                for poller in self._pollers:
                    poller.wake.set()
                await asyncio.sleep(0.1)
                states = [await poller.idle() for poller in self._pollers]
                quiet_rounds = quiet_rounds + 1 if all(states) else 0

        await asyncio.wait_for(settled(), within)

    # -- internals ----------------------------------------------------------------------------

    @property
    def _loaded(self) -> LoadedApp:
        if self._app is None:
            raise RuntimeError("the host is not started")
        return self._app

    def _spec(self, name: str) -> FunctionSpec:
        for spec_name, spec in self.functions.items():
            if spec_name.lower() == name.lower():
                return spec
        raise KeyError(name)

    def _apply_environment(self) -> None:
        for name, value in self.settings.items():
            if os.environ.get(name) != value:
                self._changed_env.setdefault(name, os.environ.get(name))
                os.environ[name] = value

    def _restore_environment(self) -> None:
        for name, previous in self._changed_env.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
        self._changed_env.clear()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _invoke(self, spec: FunctionSpec, trigger_value: Any, reason: str) -> InvocationResult:
        assert self._executor is not None
        assert self._invoked is not None
        result = await invoke(
            spec,
            trigger_value,
            reason=reason,
            limit=self.function_timeout,
            executor=self._executor,
            function_directory=str(self.app_dir),
        )
        if result.succeeded:
            try:
                await self._write_queue_outputs(spec, result)
            except Exception as error:  # like the host: an unwritten output fails the invocation
                log.error("Function '%s': writing its queue output failed: %s", spec.name, error)
                result.outcome, result.error = "Failed", error
        async with self._invoked:
            self.invocations.append(result)
            self._invoked.notify_all()
        return result

    async def _write_queue_outputs(self, spec: FunctionSpec, result: InvocationResult) -> None:
        for output in spec.outputs:
            if output["type"] != "queue":
                continue
            name = str(output["name"])
            value = result.return_value if name == "$return" else result.outputs.get(name)
            prefix = str(output.get("connection") or "AzureWebJobsStorage")
            service, queue = self._services[prefix], str(output["queueName"])
            for body in output_messages(value):
                await service.send(queue, service.encode(body))
            # The host notices its own writes at once instead of waiting for the next poll.
            for poller in self._pollers:
                if poller.queue_name == queue and poller.service is service:
                    poller.wake.set()

    def _queue_runner(self, spec: FunctionSpec) -> Callable[[func.QueueMessage], Awaitable[InvocationResult]]:
        async def run(message: func.QueueMessage) -> InvocationResult:
            return await self._invoke(spec, message, f"New queue message detected on '{spec.queue_name}'.")

        return run

    async def _fire_timer(self, spec: FunctionSpec, *, past_due: bool, last: datetime | None, nxt: datetime) -> None:
        now = datetime.now(UTC)
        status = {
            "Last": (last or now).isoformat(),
            "Next": nxt.isoformat(),
            "LastUpdated": now.isoformat(),
        }
        request = TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})
        await self._invoke(spec, request, f"Timer fired at {now.isoformat()}")

    async def _timer_loop(self, spec: FunctionSpec) -> None:
        schedule = spec.schedule
        last: datetime | None = None
        if spec.trigger.get("runOnStartup"):
            await self._fire_timer(spec, past_due=False, last=None, nxt=schedule.next_after(datetime.now(UTC)))
        due = schedule.next_after(datetime.now(UTC))
        while True:
            await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
            past_due = (datetime.now(UTC) - due).total_seconds() > PAST_DUE_GRACE
            following = schedule.next_after(due)
            await self._fire_timer(spec, past_due=past_due, last=last, nxt=following)
            last = due
            now = datetime.now(UTC)
            # Invocations never overlap (a timer runs as a singleton). Occurrences missed
            # while one ran become one immediate past-due invocation, not a burst.
            due = following if following < now and not past_due else schedule.next_after(now)

    def _admin_input(self, spec: FunctionSpec, input: str | None) -> Any:
        kind = spec.trigger_type
        if kind == "timerTrigger":
            now = datetime.now(UTC)
            nxt = spec.schedule.next_after(now)
            return TimerRequest(
                past_due=False,
                schedule_status={"Last": now.isoformat(), "Next": nxt.isoformat(), "LastUpdated": now.isoformat()},
                schedule={"AdjustForDST": True},
            )
        if kind == "queueTrigger":
            now = datetime.now(UTC)
            return queue_message(
                id=secrets.token_hex(16), body=(input or "").encode("utf-8"), dequeue_count=1, insertion_time=now
            )
        if kind == "eventGridTrigger":
            event = json.loads(input or "{}")
            if not isinstance(event, dict):
                raise ValueError("the input of an Event Grid function is one event (a JSON object)")
            return eventgrid_event(event)
        raise ValueError(f"'{spec.name}' is an HTTP function: call its URL")

    # -- HTTP --------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/admin/"):
            return await self._admin(request)
        if path.rstrip("/") == "/runtime/webhooks/eventgrid":
            return await self._eventgrid(request)
        prefix = self.config.route_prefix
        segments = split_path(path)
        if prefix:
            if not segments or segments[0].lower() != prefix.lower():
                return web.Response(status=404)
            segments = segments[1:]
        return await self._http(request, segments)

    async def _admin(self, request: web.Request) -> web.StreamResponse:
        if not _same(_key_of(request), self.keys.master):
            return _unauthorized()
        segments = split_path(request.path)
        if request.method == "GET" and segments == ["admin", "host", "status"]:
            return web.json_response({"state": "Running", "version": "devhost"})
        if request.method != "POST" or len(segments) != 3 or segments[1] != "functions":
            return web.Response(status=404)
        try:
            spec = self._spec(segments[2])
        except KeyError:
            return web.Response(status=404)
        text = await request.text()
        try:
            body = json.loads(text) if text.strip() else {}
            given = body.get("input") if isinstance(body, dict) else None
            trigger_value = self._admin_input(spec, None if given is None else str(given))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        self._spawn(self._invoke(spec, trigger_value, "This function was programmatically called via the host APIs."))
        return web.Response(status=202)

    async def _eventgrid(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            # CloudEvents webhook validation (abuse protection).
            origin = request.headers.get("WebHook-Request-Origin")
            if not _same(_key_of(request), self.keys.eventgrid) and not _same(_key_of(request), self.keys.master):
                return _unauthorized()
            return web.Response(status=200, headers={"WebHook-Allowed-Origin": origin} if origin else {})
        if request.method != "POST":
            return web.Response(status=405)
        key = _key_of(request)
        if not (_same(key, self.keys.eventgrid) or _same(key, self.keys.master)):
            return _unauthorized()
        name = request.query.get("functionName", "")
        try:
            spec = self._spec(name)
        except KeyError:
            return web.json_response({"error": f"no function named '{name}'"}, status=404)
        if spec.trigger_type != "eventGridTrigger":
            return web.json_response({"error": f"'{name}' is not an Event Grid function"}, status=404)
        try:
            body = json.loads(await request.text())
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        events = body if isinstance(body, list) else [body]
        if not all(isinstance(e, dict) for e in events):
            return web.json_response({"error": "expected an array of events"}, status=400)
        kind = request.headers.get("aeg-event-type", "")
        if kind == "SubscriptionValidation":
            for event in events:
                if event.get("eventType") == VALIDATION_EVENT and isinstance(event.get("data"), dict):
                    log.info("Event Grid subscription validation for '%s'", spec.name)
                    return web.json_response({"validationResponse": event["data"].get("validationCode")})
            return web.json_response({"error": "no SubscriptionValidationEvent in the body"}, status=400)
        if kind in ("Unsubscribe", "SubscriptionDeletion"):
            return web.Response(status=202)
        cloud_events = request.content_type.startswith("application/cloudevents")
        if kind.lower() != "notification" and not (cloud_events and not kind):
            return web.json_response({"error": f"unexpected aeg-event-type {kind!r}"}, status=400)
        # Like the extension: every event of the delivery runs at once; one failure answers
        # 500 and Event Grid redelivers the whole batch (at-least-once).
        reason = f"EventGrid trigger fired at {datetime.now(UTC).isoformat()}"
        results = await asyncio.gather(*(self._invoke(spec, eventgrid_event(e), reason) for e in events))
        return web.Response(status=202 if all(r.succeeded for r in results) else 500)

    async def _http(self, request: web.Request, segments: list[str]) -> web.StreamResponse:
        method = request.method.upper()
        found: tuple[FunctionSpec, dict[str, str]] | None = None
        for route, spec in self._routes:
            if spec.methods and method not in spec.methods:
                continue
            params = route.match(segments)
            if params is not None:
                found = (spec, params)
                break
        if found is None:
            return web.Response(status=404)
        spec, params = found
        if not self._authorized(spec.auth_level, _key_of(request)):
            return _unauthorized()
        body = await request.read()
        http_request = func.HttpRequest(
            method=method,
            url=str(request.url),
            headers=dict(request.headers.items()),
            params=dict(request.query.items()),
            route_params=params,
            body=body,
        )
        result = await self._invoke(spec, http_request, "This function was programmatically called via the host APIs.")
        return http_response(result, spec)

    def _authorized(self, level: str, key: str) -> bool:
        if level == "ANONYMOUS":
            return True
        if level == "ADMIN":
            return _same(key, self.keys.master)
        return _same(key, self.keys.function) or _same(key, self.keys.master)


def _ensure_log_handler() -> None:
    # Invocation logs go to stderr unless the embedding program configured logging itself.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


class BackgroundHost:
    """A DevHost on its own event loop thread, for synchronous callers (the demo, a benchmark):

    with BackgroundHost(DevHost(".", values=...)) as host:
        host.call(host.devhost.drain())
    """

    def __init__(self, devhost: DevHost) -> None:
        self.devhost = devhost
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="devhost", daemon=True)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the host's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self, timeout: float = 60.0) -> DevHost:
        self._thread.start()
        self.call(self.devhost.start(), timeout)
        return self.devhost

    def stop(self, timeout: float = 60.0) -> None:
        try:
            self.call(self.devhost.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()

    def drain(self, timeout: float = 60.0) -> None:
        self.call(self.devhost.drain(within=timeout), timeout + 5)

    def __enter__(self) -> DevHost:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


__all__ = [
    "BackgroundHost",
    "ConfigError",
    "DevHost",
    "HostKeys",
    "eventgrid_event",
    "http_response",
    "storage_settings_for",
]
