"""function_app.py through the azure-functions library: it indexes, its bindings are
valid, and its functions answer real func.* request objects."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

import function_app
from shared import __version__
from shared.settings import SETTING_NAMES

ROOT = Path(__file__).resolve().parents[2]
TRIGGERS = {"httpTrigger", "timerTrigger", "queueTrigger", "eventGridTrigger", "blobTrigger"}
OUTPUTS = {"http", "queue", "blob", "table", "eventGrid"}
SUB = "11111111-2222-3333-4444-555555555555"


@functools.cache
def indexed() -> tuple[Any, ...]:
    # get_functions() builds and validates the app; the library allows it once per app.
    return tuple(function_app.app.get_functions())


def bindings(fn: Any) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in fn.get_raw_bindings()]


def test_app_indexes_with_unique_function_names() -> None:
    names = [fn.get_function_name() for fn in indexed()]
    assert names, "function_app.py registers no function"
    duplicates = [n for n, count in Counter(names).items() if count > 1]
    assert duplicates == []


def test_every_function_has_one_trigger_and_valid_bindings() -> None:
    for fn in indexed():
        found = bindings(fn)
        json.loads(fn.get_function_json())  # serialises
        triggers = [b for b in found if b["type"] in TRIGGERS]
        assert len(triggers) == 1, (fn.get_function_name(), found)
        signature = inspect.signature(fn.get_user_function()).parameters
        # The invocation context is passed by the worker, not bound (the ASGI function takes one).
        params = {name for name, p in signature.items() if p.annotation not in (func.Context, "func.Context")}
        for b in found:
            assert b["direction"] in {"IN", "OUT", "INOUT"}, b
            assert b["type"] in TRIGGERS | OUTPUTS, b
            if b["name"] != "$return":
                assert b["name"] in params, (fn.get_function_name(), b["name"], params)
        for p in params:
            assert any(b["name"] == p for b in found), f"{fn.get_function_name()}: parameter {p} has no binding"


def http_triggers() -> dict[str, dict[str, Any]]:
    return {fn.get_function_name(): b for fn in indexed() for b in bindings(fn) if b["type"] == "httpTrigger"}


def test_http_routes_do_not_collide() -> None:
    """Two functions on one (method, route) collide. The API is the ASGI catch-all
    `{*route}`; the host strips the leading slash and puts it under the routePrefix, and
    ASP.NET Core routing prefers literal segments to a catch-all, so a literal route (health)
    wins for its methods. The API must then never define a route a literal one would shadow
    (it would be unreachable)."""
    routes = []
    for b in http_triggers().values():
        routes.extend((method, b["route"].strip("/").lower()) for method in b.get("methods", ["*"]))
    assert len(routes) == len(set(routes)), routes

    triggers = http_triggers()
    asgi = triggers.pop("http_app_func")
    assert (asgi["route"], asgi["authLevel"]) == ("/{*route}", "FUNCTION")  # the host checks the function key
    prefix = json.loads((ROOT / "host.json").read_text())["extensions"]["http"]["routePrefix"]
    api_paths = {r.path for r in api_routes()}
    assert api_paths
    assert all(p.startswith(f"/{prefix}/") for p in api_paths), api_paths
    for name, b in triggers.items():
        assert "{*" not in b["route"], f"{name}: a second catch-all"
        shadowed = f"/{prefix}/{b['route'].strip('/')}"
        assert shadowed not in api_paths, f"{name} ({b['route']}) shadows the API's {shadowed}"


def api_routes() -> list[Any]:
    from starlette.routing import Route

    return [r for r in function_app.api.app.routes if isinstance(r, Route)]


def function(name: str) -> Any:
    for fn in indexed():
        if fn.get_function_name() == name:
            return fn.get_user_function()
    raise AssertionError(f"no function named {name}")


def health_answer() -> tuple[int, dict[str, Any]]:
    response = function("health")(func.HttpRequest(method="GET", url="/api/health", body=b""))
    return response.status_code, json.loads(response.get_body())


def test_health_reports_configured_with_status_and_version_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIMR_SUBSCRIPTION_IDS", SUB)
    monkeypatch.setenv("APIMR_STORAGE_ACCOUNT", "apimrstate")
    status, body = health_answer()
    assert status == 200
    # Anonymous: no settings summary (endpoints, storage URL) for anyone who asks.
    assert body == {"status": "healthy", "version": __version__}


def test_health_logs_a_broken_policy_file_and_answers_status_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  NOPE-001: {mode: detect}\n")
    monkeypatch.setenv("APIMR_SUBSCRIPTION_IDS", SUB)
    monkeypatch.setenv("APIMR_STORAGE_ACCOUNT", "apimrstate")
    monkeypatch.setenv("APIMR_POLICY_FILE", str(policy))
    caplog.set_level(logging.ERROR, logger="handlers.health")
    status, body = health_answer()
    assert status == 503
    assert body == {"status": "misconfigured", "version": __version__}
    assert f"{policy}:3: rules.NOPE-001: unknown rule id" in caplog.text


def test_health_never_echoes_setting_values_to_anonymous_callers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    canary = "CANARY-5f0c1d2e-key"
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APIMR_STORAGE_CONNECTION_STRING", f"nonsense;AccountKey={canary}")
    monkeypatch.setenv("APIMR_CLOUD", "Mars")
    # A SAS URL pasted into a URL setting: the query is the credential.
    monkeypatch.setenv("APIMR_KEY_VAULT_URL", f"http://admin:{canary}@kv.example.net/?sv=2022-11-02&sig={canary}")
    caplog.set_level(logging.ERROR, logger="handlers.health")
    status, body = health_answer()
    assert status == 503
    assert body == {"status": "misconfigured", "version": __version__}
    # The problems go to the log, every one named, no value of a secret in them.
    assert canary not in caplog.text
    for name in ("APIMR_CLOUD:", "APIMR_SUBSCRIPTION_IDS:", "APIMR_STORAGE_CONNECTION_STRING:", "APIMR_KEY_VAULT_URL:"):
        assert name in caplog.text
    assert "'http://***@kv.example.net/?***'" in caplog.text


# -- the triggers: bindings name settings that exist, and each reaches its handler ------------

ROOT = Path(__file__).resolve().parents[2]
SETTING_REF = re.compile(r"%([A-Za-z0-9_]+)%")
QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


def sample_values() -> dict[str, str]:
    values: dict[str, str] = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    return values


def resolve(text: str) -> str:
    values = sample_values()
    return SETTING_REF.sub(lambda m: values[m.group(1)], text)


def test_every_setting_a_binding_names_is_in_the_sample_and_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    named = {name for fn in indexed() for raw in fn.get_raw_bindings() for name in SETTING_REF.findall(raw)}
    assert {"APIMR_SWEEP_SCHEDULE", "APIMR_WORK_QUEUE"} <= named
    assert sorted(n for n in named if n not in sample_values()) == []
    assert sorted(n for n in named if f"`{n}`" not in readme) == []
    assert named <= set(SETTING_NAMES)  # validated at start-up like every other setting


def test_queue_triggers_read_valid_queues_of_the_products_storage_by_identity() -> None:
    values = sample_values()
    queues = {fn.get_function_name(): b for fn in indexed() for b in bindings(fn) if b["type"] == "queueTrigger"}
    assert set(queues) == {"work", "poison"}
    work, poison = resolve(queues["work"]["queueName"]), resolve(queues["poison"]["queueName"])
    assert poison == work + "-poison"  # the host's poison queue for the work queue
    for name in (work, poison):
        assert 3 <= len(name) <= 63
        assert QUEUE_NAME.match(name), name
    for b in queues.values():
        connection = b["connection"]
        # Identity-based: an account name, no connection string (a secret) in the settings.
        assert f"{connection}__accountName" in values
        assert connection not in values
        # The sweep sends to the product's storage account; the trigger must read that one.
        assert values[f"{connection}__accountName"] == values["APIMR_STORAGE_ACCOUNT"]


def test_the_sweep_schedule_in_the_sample_loads() -> None:
    from shared.settings import load_settings

    settings = load_settings(sample_values())
    timers = {fn.get_function_name(): b for fn in indexed() for b in bindings(fn) if b["type"] == "timerTrigger"}
    assert set(timers) == {"sweep", "backup", "restore_test"}
    assert resolve(timers["sweep"]["schedule"]) == settings.sweep_schedule
    assert resolve(timers["backup"]["schedule"]) == settings.backup_schedule
    assert resolve(timers["restore_test"]["schedule"]) == settings.restore_test_schedule
    for schedule in (settings.sweep_schedule, settings.backup_schedule, settings.restore_test_schedule):
        assert len(schedule.split()) == 6


class FakeContext:
    """What function_app asks of AppContext, over the recording fakes of the handlers' tests."""

    def __init__(self) -> None:
        from shared.settings import load_settings
        from tests.unit.test_event_routing import Fakes
        from tests.unit.test_work_and_sweep import Recorder, ref

        self.settings = load_settings(sample_values())
        self.sweep_fakes = Recorder(refs=(ref("a"), ref("b")))
        self.work_fakes = Recorder()
        self.event_fakes = Fakes()

    def sweep_deps(self) -> Any:
        from handlers.sweep import SweepDeps

        f = self.sweep_fakes
        return SweepDeps(inventory=f, policy=f, queue=f, ledger=f)

    def work_deps(self) -> Any:
        return self.work_fakes.work_deps()

    def events_deps(self) -> Any:
        return self.event_fakes.deps()

    def backup_deps(self) -> Any:
        from tests.unit.test_backup_handlers import Fakes as BackupFakes
        from tests.unit.test_backup_handlers import deps

        if not hasattr(self, "backup_fakes"):
            self.backup_fakes = BackupFakes({"a": "Premium", "t": "Premium"})
        return deps(self.backup_fakes, {"a": "t"})


@pytest.fixture
def fake_context(monkeypatch: pytest.MonkeyPatch) -> FakeContext:
    context = FakeContext()
    monkeypatch.setattr(function_app, "app_context", lambda: context)
    return context


async def test_the_timer_reaches_the_sweep(fake_context: FakeContext) -> None:
    await function("sweep")(TimerRequest(past_due=True))
    from tests.unit.test_work_and_sweep import service

    assert [m.instance_id for m in fake_context.sweep_fakes.sent] == [service("a"), service("b")]


async def test_the_backup_timers_reach_their_jobs(fake_context: FakeContext) -> None:
    from shared.backup import RunKind

    await function("backup")(TimerRequest(past_due=False))
    begun = [c for c in fake_context.backup_fakes.calls if c[0] == "begin"]
    assert [(c[1], c[2].rsplit("/", 1)[1]) for c in begun] == [(RunKind.BACKUP, "a"), (RunKind.BACKUP, "t")]
    await function("restore_test")(TimerRequest(past_due=False))
    # The target carries no designation tag in the fakes: refused, recorded, no restore begun.
    assert not [c for c in fake_context.backup_fakes.calls if c[0] == "begin" and c[1] is RunKind.RESTORE_TEST]
    tests = [r for r in fake_context.backup_fakes.saved.values() if r.kind is RunKind.RESTORE_TEST]
    assert [r.error_code for r in tests] == ["RestoreRefused"]


async def test_a_queue_message_reaches_work(fake_context: FakeContext) -> None:
    from tests.unit.test_work_and_sweep import message, service

    await function("work")(QueueMessage(id="m1", body=message(), dequeue_count=1))
    [request] = fake_context.work_fakes.reconciles
    assert request.instance_id == service("a")
    await function("work")(QueueMessage(id="m2", body=b"garbage", dequeue_count=1))
    [letter] = fake_context.work_fakes.letters
    assert (letter.message_id, letter.source) == ("m2", "work")


async def test_a_poison_message_reaches_poison(fake_context: FakeContext) -> None:
    from tests.unit.test_work_and_sweep import message, service

    await function("poison")(QueueMessage(id="m9", body=message(), dequeue_count=5))
    [(instance, reason, _)] = fake_context.work_fakes.failures
    assert instance == service("a")
    assert "after 5 attempt(s) and was moved to apimr-work-poison" in reason
    assert fake_context.work_fakes.reconciles == []


async def test_an_event_grid_event_reaches_events(fake_context: FakeContext) -> None:
    from tests.unit.test_event_routing import AT, SERVICE, arm_event

    source = arm_event(SERVICE + "/apis/echo")
    await function("events")(
        func.EventGridEvent(
            id=source.id,
            data=source.data,
            topic=source.topic,
            subject=source.subject,
            event_type=source.event_type,
            event_time=AT,
            data_version="2",
        )
    )
    [request] = fake_context.event_fakes.reconciles
    assert (request.instance_id, request.not_before) == (SERVICE, AT)


async def test_a_cloud_event_reaches_events_too(fake_context: FakeContext) -> None:
    from tests.unit.test_event_routing import AT, SERVICE, arm_event

    source = arm_event(SERVICE, event_id="ce-1")
    await function("events")(
        func.CloudEvent(
            id=source.id,
            source=source.topic,
            type=source.event_type,
            specversion="1.0",
            data=source.data,
            time=AT,
            subject=source.subject,
        )
    )
    [request] = fake_context.event_fakes.reconciles
    assert request.instance_id == SERVICE


def test_the_app_context_is_built_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in sample_values().items():
        if name.startswith("APIMR_"):
            monkeypatch.setenv(name, value)
    function_app.app_context.cache_clear()
    try:
        assert function_app.app_context() is function_app.app_context()
    finally:
        function_app.app_context.cache_clear()


def test_the_deployment_sets_every_setting_a_binding_names() -> None:
    # The host resolves %SETTING% in a binding itself: a missing app setting stops the function.
    bicep = (ROOT / "infra" / "modules" / "app.bicep").read_text()  # main.bicep deploys the app from it
    named = {name for fn in indexed() for raw in fn.get_raw_bindings() for name in SETTING_REF.findall(raw)}
    assert sorted(n for n in named if f"name: '{n}'" not in bicep) == []


class InvocationContext(func.Context):
    """What the worker passes as `context` (the ASGI bridge reads these into the scope)."""

    invocation_id = "00000000-0000-4000-8000-000000000001"
    function_name = "http_app_func"
    function_directory = str(ROOT)
    trace_context = None  # type: ignore[assignment]
    retry_context = None  # type: ignore[assignment]
    thread_local_storage = None  # type: ignore[assignment]


@pytest.fixture
def fresh_context() -> Iterator[None]:
    """The composition root caches its AppContext per process: each test starts without one."""
    function_app.app_context.cache_clear()
    yield
    function_app.app_context.cache_clear()


async def invoke_api(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> func.HttpResponse:
    request = func.HttpRequest(method=method, url=url, headers=headers, body=body)
    response: func.HttpResponse = await function("http_app_func")(request, InvocationContext())
    return response


async def test_the_asgi_function_hands_requests_to_the_api(
    monkeypatch: pytest.MonkeyPatch, fresh_context: None
) -> None:
    """A real func.HttpRequest through the function reaches the FastAPI app: without a token
    it answers 401 with the challenge (the function key is the host's check, before the
    function runs; it is not part of the request the function sees)."""
    monkeypatch.setenv("APIMR_SUBSCRIPTION_IDS", SUB)
    monkeypatch.setenv("APIMR_STORAGE_ACCOUNT", "apimrstate")
    monkeypatch.setenv("APIMR_API_AUDIENCE", "api://apim-remediator")
    monkeypatch.setenv("APIMR_API_TENANT_ID", SUB)
    response = await invoke_api("GET", "http://localhost:7071/api/instances", {})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="apim-remediator"'
    assert json.loads(response.get_body())["error"]["code"] == "Unauthenticated"

    oversized = await invoke_api(
        "POST",
        f"http://localhost:7071/api/instances/{SUB}/rg/apim/remediations",
        {"Content-Type": "application/json", "Content-Length": str(64 * 1024)},
        b"{" + b" " * (64 * 1024 - 2) + b"}",
    )
    assert oversized.status_code == 413


async def test_the_api_answers_503_while_not_configured(monkeypatch: pytest.MonkeyPatch, fresh_context: None) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APIMR_SUBSCRIPTION_IDS", SUB)
    monkeypatch.setenv("APIMR_STORAGE_ACCOUNT", "apimrstate")  # the product is configured, its API is not
    response = await invoke_api("GET", "http://localhost:7071/api/instances", {"Authorization": "Bearer x.y.z"})
    assert response.status_code == 503
    assert json.loads(response.get_body())["error"]["code"] == "NotConfigured"


async def test_a_bug_answers_500_json_without_a_stack_trace(caplog: pytest.LogCaptureFixture) -> None:
    """Through the real ASGI bridge: an unexpected exception becomes a JSON 500 with a
    reference to the log line, and does not fail the invocation."""
    from handlers.api import create_api

    def broken() -> Any:
        raise RuntimeError("secret-looking internals /home/site/wwwroot")

    bridge = func.AsgiMiddleware(create_api(broken))
    request = func.HttpRequest(method="GET", url="http://localhost:7071/api/instances", headers={}, body=b"")
    caplog.set_level(logging.ERROR, logger="apim_remediator.api")
    response = await bridge.handle_async(request, InvocationContext())
    assert response.status_code == 500
    body = json.loads(response.get_body())
    assert body["error"]["code"] == "InternalError"
    reference = body["error"]["message"].split("reference ")[1].split(" ")[0]
    assert "internals" not in response.get_body().decode()
    assert "Traceback" not in response.get_body().decode()
    assert reference in caplog.text  # the log has it, with the traceback
