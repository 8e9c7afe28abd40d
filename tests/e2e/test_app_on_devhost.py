"""The product's own function_app.py running on the local Functions host (devhost) against
the twin and Azurite, the way it runs in Azure: a sweep tick fans out through the work
queue and fixes what the policy allows; an operator's ARM write reaches the `events`
function through the twin's Event Grid and is fixed; the same event delivered three times
reconciles once; the product's own write events make no further write; a message that
keeps failing ends in the poison queue and is recorded for the operator."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from devhost.host import DevHost, storage_settings_for
from handlers.context import AppContext
from tests.conftest import ROOT, TwinHandle
from tests.e2e.test_scan_estate import compliant, drift, fragment_for
from tests.integration.test_remediate import product_env
from tests.integration.test_remediate_engine_safety import seed_drifts

pytestmark = pytest.mark.integration

POLICY = "version: 1\nrules:\n  TLS-001: {mode: remediate}\n"
OPERATOR = ("0b5e0c1a-0000-4000-8000-00000000c002", "twin-test-secret-operator")  # estates/test.yaml
TLS10 = "Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10"
API = "api-version=2024-05-01"
ARM_EVENTS = [
    "Microsoft.Resources.ResourceWriteSuccess",
    "Microsoft.Resources.ResourceActionSuccess",
    "Microsoft.Resources.ResourceDeleteSuccess",
]


def app_values(twin: TwinHandle, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = product_env(twin, tmp_path, POLICY)
    env.update(
        FUNCTIONS_WORKER_RUNTIME="python",
        APIMR_WORK_QUEUE=f"work-{uuid.uuid4().hex[:12]}",
        APIMR_SWEEP_SCHEDULE="0 0 0 1 1 *",  # once a year: the tests tick it through the admin endpoint
        APIMR_BACKUP_SCHEDULE="0 0 0 1 1 *",
        APIMR_RESTORE_TEST_SCHEDULE="0 0 0 1 1 *",
        APIMR_RETRY_TOTAL="0",
        **extra,
    )
    env.update(storage_settings_for(env))
    return env


@pytest_asyncio.fixture(loop_scope="function")
async def start_app(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """Start the product's app on devhost once the test has seeded its estate."""
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    hosts: list[DevHost] = []

    async def start(app_dir: Path = ROOT, **extra: str) -> DevHost:
        host = DevHost(app_dir, values=app_values(twin, tmp_path, **extra), max_polling_interval=0.2)
        await host.__aenter__()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.__aexit__(None, None, None)


def tls10(twin: TwinHandle, service_id: str) -> str:
    body = twin.arm("GET", f"{service_id}?{API}").json()
    return str(body["properties"]["customProperties"][TLS10]).lower()


def product_patches(twin: TwinHandle, service_id: str) -> int:
    _, log = twin.control("GET", "/_twin/log?service=arm")
    return sum(
        1
        for e in log["entries"]
        if e["method"] == "PATCH"
        and e["path"].lower() == service_id.lower()
        and e.get("principal") == twin.env["AZURE_CLIENT_ID"]
    )


def operator_turns_tls10_on(twin: TwinHandle, service_id: str) -> None:
    """A person's plain ARM PATCH (the whole customProperties map, as they must send it)."""
    token = twin.credential(*OPERATOR).get_token(twin.urls["arm"] + "/.default").token
    current = twin.arm("GET", f"{service_id}?{API}").json()["properties"]["customProperties"]
    started = twin.arm(
        "PATCH",
        f"{service_id}?{API}",
        token=token,
        json={"properties": {"customProperties": {**current, TLS10: "True"}}},
    )
    assert started.status_code in (200, 202), started.text
    status_url = started.headers.get("Azure-AsyncOperation")
    for _ in range(100):  # wait for the operation to land, as `az` would
        if status_url is None:
            break
        answer = twin.arm("GET", status_url[len(twin.urls["arm"]) :], token=token).json()
        if answer["status"] != "InProgress":
            assert answer["status"] == "Succeeded", answer
            break
    assert tls10(twin, service_id) == "true" or product_patches(twin, service_id) > 0


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if await asyncio.to_thread(check):
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {within} s")


async def test_a_sweep_tick_fans_out_through_the_queue_and_fixes(
    twin: TwinHandle, start_app: Callable[..., Any]
) -> None:
    one, two = compliant("tick-one", twin.subscription_id), compliant("tick-two", twin.subscription_id)
    drift("TLS-001", one)
    drift("TLS-001", two)
    fragment, ids = fragment_for({"tick-one": one, "tick-two": two}, twin.subscription_id)
    twin.seed(fragment)
    first, second = ids["tick-one"], ids["tick-two"]
    host = await start_app()
    await host.invoke("sweep")
    await host.drain(within=90)
    assert (tls10(twin, first), tls10(twin, second)) == ("false", "false")
    work = [i for i in host.invocations if i.function == "work"]
    assert len(work) >= 2
    assert all(i.outcome == "Succeeded" for i in work)


async def test_an_operators_write_is_fixed_through_event_grid_once_and_our_own_writes_start_nothing(
    twin: TwinHandle, start_app: Callable[..., Any]
) -> None:
    service_id = seed_drifts(twin, "evented")
    host = await start_app()
    await host.invoke("sweep")  # reconciled once already: the event must compare with a stored time
    await host.drain(within=60)
    status, body = await asyncio.to_thread(
        twin.control,
        "POST",
        "/_twin/events/subscriptions",
        {"endpoint": host.eventgrid_url("events"), "name": "apimr", "event_types": ARM_EVENTS, "duplicates": 2},
    )
    assert status == 201, body
    twin.control("DELETE", "/_twin/log")

    await asyncio.to_thread(operator_turns_tls10_on, twin, service_id)
    seconds = await until(lambda: tls10(twin, service_id) == "false", 30, "the fix through Event Grid")
    assert seconds < 30
    await asyncio.to_thread(twin.control, "POST", "/_twin/events/flush")
    await asyncio.sleep(1.0)  # let the deliveries of our own write's events run their course
    await asyncio.to_thread(twin.control, "POST", "/_twin/events/flush")
    assert product_patches(twin, service_id) == 1  # three deliveries, one fix; our own events: nothing
    events = [i for i in host.invocations if i.function == "events"]
    assert len(events) >= 3  # the operator's event, delivered three times (plus our own write's events)
    assert all(i.outcome == "Succeeded" for i in events)


async def test_a_message_that_keeps_failing_is_poisoned_and_recorded(
    twin: TwinHandle, start_app: Callable[..., Any], tmp_path: Path
) -> None:
    service_id = seed_drifts(twin, "poisoned", "TLS-001")
    # The service cannot be read (503, every time): each attempt is a transient failure.
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "method": "GET", "path": "/service/poisoned$", "status": 503, "times": 0},
    )
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(ROOT / "function_app.py", app_dir / "function_app.py")
    host_json = (ROOT / "host.json").read_text()
    host_json = host_json.replace('"visibilityTimeout": "00:00:30"', '"visibilityTimeout": "00:00:00"')
    host_json = host_json.replace('"maxDequeueCount": 5', '"maxDequeueCount": 2')
    (app_dir / "host.json").write_text(host_json)
    host = await start_app(app_dir)
    await host.invoke("sweep")
    poisoned = await host.wait_for_invocations("poison", 1, within=60)
    assert poisoned[0].outcome == "Succeeded"
    failed = [i for i in host.invocations if i.function == "work" and i.outcome == "Failed"]
    assert len(failed) == 2  # tried maxDequeueCount times, then moved
    context = AppContext.load(app_values(twin, tmp_path))
    try:
        summary = await context.findings().summary(service_id)
    finally:
        await context.aclose()
    assert summary is not None
    assert summary.last_error
    assert "poison" in summary.last_error.lower()
