"""devhost, the local stand-in for the Functions host, driving its own test app
(tests/devhost_app) against the twin's Azurite and Event Grid: timers on their schedule
and through the admin endpoint, queue triggers with base64, retries and the poison queue,
the Event Grid webhook with the handshake and the twin's real deliveries, HTTP routes with
keys, precedence, the ASGI function, timeouts, and `python -m devhost start`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient

from devhost.config import MissingSettingError
from devhost.host import BackgroundHost, DevHost, HostKeys, storage_settings_for
from tests.conftest import ROOT, TwinHandle

pytestmark = pytest.mark.integration

TEST_APP = ROOT / "tests" / "devhost_app"
START = [sys.executable, "-m", "devhost", "start", "--app-dir", str(TEST_APP), "--port", "0"]
NEVER = "0 0 0 1 1 *"  # once a year: the timer stays quiet unless a test wants it


def host_values(twin: TwinHandle, records: Path, **extra: str) -> dict[str, str]:
    """The test app's settings: the twin's client environment, its Azurite queue endpoint
    under the identity form of the connection, unique queue names."""
    suffix = uuid.uuid4().hex[:10]
    values = {
        **twin.env,
        **storage_settings_for(twin.env, "DevhostStorage"),
        "DEVHOST_RECORDS": str(records),
        "TICK_SCHEDULE": NEVER,
        "WORK_QUEUE": f"work-{suffix}",
        "OUT_QUEUE": f"out-{suffix}",
    }
    values.update(extra)
    return values


def read_records(path: Path, function: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["function"] == function]


def queue(twin: TwinHandle, name: str) -> QueueClient:
    return QueueClient(
        twin.env["APIMR_STORAGE_QUEUE_ENDPOINT"], name, credential=twin.credential(), connection_verify=twin.ca_file
    )


def send(twin: TwinHandle, name: str, text: str) -> None:
    client = queue(twin, name)
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()
    client.send_message(base64.b64encode(text.encode()).decode())


def peek_all(twin: TwinHandle, name: str) -> list[str]:
    return [m.content for m in queue(twin, name).peek_messages(max_messages=32)]


@pytest.fixture
def records(tmp_path: Path) -> Path:
    return tmp_path / "records.jsonl"


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- timers ------------------------------------------------------------------------------


async def test_timer_fires_on_its_seconds_schedule(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records, TICK_SCHEDULE="*/2 * * * * *")
    async with DevHost(TEST_APP, values=values) as host:
        results = await host.wait_for_invocations("tick", 2, within=10)
    ticks = read_records(records, "tick")
    assert len(ticks) >= 2
    assert all(r.succeeded for r in results)
    assert ticks[0]["past_due"] is False
    assert ticks[0]["type"] == "azure.functions.timer"
    assert set(ticks[0]["status"]) == {"Last", "Next", "LastUpdated"}
    # Fired on even seconds, as */2 says.
    assert int(ticks[1]["status"]["Last"][17:19]) % 2 == 0


async def test_timer_overrunning_its_schedule_gets_one_past_due_catch_up(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records, TICK_SCHEDULE="* * * * * *", TICK_SLEEP="2.5")
    async with DevHost(TEST_APP, values=values, function_timeout=None) as host:
        await host.wait_for_invocations("tick", 2, within=15)
    first, second = read_records(records, "tick")[:2]
    # The first run overran two occurrences: they become one invocation marked past due.
    assert (first["past_due"], second["past_due"]) == (False, True)


async def test_admin_endpoint_fires_a_timer_now_with_the_master_key(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records), run_timers=False) as host:
        url = host.admin_url("tick")
        async with http.post(url, json={"input": ""}) as response:
            assert response.status == 401
        async with http.post(url, json={}, headers={"x-functions-key": host.keys.function}) as response:
            assert response.status == 401  # a function key is not the master key
        async with http.post(url, json={"input": ""}, headers={"x-functions-key": host.keys.master}) as response:
            assert response.status == 202
        await host.wait_for_invocations("tick", 1, within=10)
        async with http.post(host.admin_url("nope"), json={}, headers={"x-functions-key": host.keys.master}) as r:
            assert r.status == 404
    assert [r["past_due"] for r in read_records(records, "tick")] == [False]


async def test_admin_endpoint_passes_its_input_to_queue_and_eventgrid_functions(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records), run_timers=False) as host:
        headers = {"x-functions-key": host.keys.master}
        async with http.post(host.admin_url("work"), json={"input": "from admin"}, headers=headers) as r:
            assert r.status == 202
        event = {"id": "e-1", "eventType": "T", "subject": "s", "topic": "t", "data": {}, "dataVersion": "1"}
        async with http.post(host.admin_url("events"), json={"input": json.dumps(event)}, headers=headers) as r:
            assert r.status == 202
        async with http.post(host.admin_url("hello"), json={}, headers=headers) as r:
            assert r.status == 400  # HTTP functions are called at their URL
        await host.wait_for_invocations("work", 1, within=10)
        await host.wait_for_invocations("events", 1, within=10)
    (work,) = read_records(records, "work")
    assert (work["body"], work["dequeue_count"]) == ("from admin", 1)
    assert [e["id"] for e in read_records(records, "events")] == ["e-1"]


# -- queues ------------------------------------------------------------------------------


async def test_queue_message_arrives_base64_decoded_with_dequeue_count_one(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    send(twin, values["WORK_QUEUE"], "hello queue ü")
    async with DevHost(TEST_APP, values=values) as host:
        await host.drain(within=20)
        (result,) = await host.wait_for_invocations("work", 1, within=5)
    (seen,) = read_records(records, "work")
    assert result.succeeded
    assert seen["body"] == "hello queue ü"
    assert seen["dequeue_count"] == 1
    assert seen["id"]
    assert seen["pop_receipt"] is True
    assert seen["insertion_time"]
    assert seen["expiration_time"]
    assert peek_all(twin, values["WORK_QUEUE"]) == []  # success deleted it


async def test_queue_output_binding_writes_base64_to_its_queue(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    send(twin, values["WORK_QUEUE"], "forward:onward")
    async with DevHost(TEST_APP, values=values) as host:
        await host.drain(within=20)
    assert [base64.b64decode(c).decode() for c in peek_all(twin, values["OUT_QUEUE"])] == ["onward"]


async def test_failing_message_is_retried_to_max_dequeue_count_then_poisoned(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    send(twin, values["WORK_QUEUE"], "fail please")
    send(twin, values["WORK_QUEUE"], "fine")
    async with DevHost(TEST_APP, values=values) as host:
        await host.drain(within=30)
    attempts = [r for r in read_records(records, "work") if r["body"] == "fail please"]
    # host.json maxDequeueCount is 3: three attempts, each with the dequeue count Azure gives.
    assert [r["dequeue_count"] for r in attempts] == [1, 2, 3]
    assert len({r["id"] for r in attempts}) == 1
    assert [r["body"] for r in read_records(records, "work") if r["body"] == "fine"] == ["fine"]
    assert peek_all(twin, values["WORK_QUEUE"]) == []
    poisoned = peek_all(twin, values["WORK_QUEUE"] + "-poison")
    assert [base64.b64decode(c).decode() for c in poisoned] == ["fail please"]


async def test_stopping_gives_a_running_message_back_at_once(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    send(twin, values["WORK_QUEUE"], "sleep:3")
    async with DevHost(TEST_APP, values=values, function_timeout=None):
        async with asyncio.timeout(15):
            while not read_records(records, "work"):  # noqa: ASYNC110 - another thread writes the file
                await asyncio.sleep(0.05)
    # Visible again now, not after the 10-minute lease.
    assert [base64.b64decode(c).decode() for c in peek_all(twin, values["WORK_QUEUE"])] == ["sleep:3"]


async def test_invalid_base64_is_never_delivered_and_ends_in_poison(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    client = queue(twin, values["WORK_QUEUE"])
    client.create_queue()
    client.send_message("not base64 at all!")
    async with DevHost(TEST_APP, values=values) as host:
        await host.drain(within=30)
    assert read_records(records, "work") == []
    assert peek_all(twin, values["WORK_QUEUE"] + "-poison") == ["not base64 at all!"]


# -- Event Grid --------------------------------------------------------------------------


def validation_event(code: str) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "topic": "/subscriptions/x",
            "subject": "",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime": "2026-11-30T00:00:00.1234567Z",
            "data": {"validationCode": code, "validationUrl": "https://example.invalid"},
            "dataVersion": "2",
            "metadataVersion": "1",
        }
    ]


async def test_eventgrid_handshake_answers_the_code_and_needs_the_system_key(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    headers = {"aeg-event-type": "SubscriptionValidation"}
    async with DevHost(TEST_APP, values=host_values(twin, records)) as host:
        async with http.post(host.eventgrid_url("events"), json=validation_event("CODE-1"), headers=headers) as r:
            assert r.status == 200
            assert await r.json() == {"validationResponse": "CODE-1"}
        async with http.post(
            host.eventgrid_url("events", with_key=False),
            json=validation_event("CODE-2"),
            headers={**headers, "x-functions-key": host.keys.eventgrid},
        ) as r:
            assert (await r.json())["validationResponse"] == "CODE-2"
        for key in ("", host.keys.function):
            async with http.post(
                host.eventgrid_url("events", with_key=False) + (f"&code={key}" if key else ""),
                json=validation_event("CODE-3"),
                headers=headers,
            ) as r:
                assert r.status == 401
        wrong = host.eventgrid_url("events").replace("functionName=events", "functionName=hello")
        async with http.post(wrong, json=validation_event("CODE-4"), headers=headers) as r:
            assert r.status == 404
    assert read_records(records, "events") == []


async def test_twin_deliveries_reach_the_function_once_per_copy(twin: TwinHandle, records: Path) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records)) as host:
        # The twin's control calls block; run them off the loop the host serves on.
        status, body = await asyncio.to_thread(
            twin.control,
            "POST",
            "/_twin/events/subscriptions",
            {"endpoint": host.eventgrid_url("events"), "name": "devhost", "duplicates": 2},
        )
        assert status == 201, body
        status, event = await asyncio.to_thread(
            twin.control,
            "POST",
            "/_twin/events/emit",
            {
                "event_type": "Microsoft.Resources.ResourceWriteSuccess",
                "subject": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a",
                "data": {"operationName": "Microsoft.ApiManagement/service/write"},
                "data_version": "2",
            },
        )
        assert status == 201, event
        status, flushed = await asyncio.to_thread(twin.control, "POST", "/_twin/events/flush")
        assert status == 200
        assert flushed["delivered"] == 3
        await host.wait_for_invocations("events", 3, within=10)
    seen = read_records(records, "events")
    assert [r["id"] for r in seen] == [event["id"]] * 3
    first = seen[0]
    assert first["event_type"] == "Microsoft.Resources.ResourceWriteSuccess"
    assert first["subject"] == event["subject"]
    assert first["topic"] == event["topic"]
    assert first["data"] == {"operationName": "Microsoft.ApiManagement/service/write"}
    assert first["data_version"] == "2"
    assert first["event_time"].startswith(event["eventTime"][:19].replace("T", " "))


async def test_cloudevents_are_delivered_as_eventgrid_events(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    cloud_event = {
        "specversion": "1.0",
        "id": "ce-1",
        "source": "/subscriptions/s/resourceGroups/rg",
        "type": "Microsoft.KeyVault.SecretNearExpiry",
        "subject": "secret-1",
        "time": "2026-11-30T10:00:00Z",
        "data": {"ObjectName": "secret-1"},
    }
    async with DevHost(TEST_APP, values=host_values(twin, records)) as host:
        async with http.options(
            host.eventgrid_url("events"), headers={"WebHook-Request-Origin": "eventgrid.azure.net"}
        ) as r:
            assert r.status == 200
            assert r.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
        async with http.post(
            host.eventgrid_url("events"),
            data=json.dumps(cloud_event),
            headers={"Content-Type": "application/cloudevents+json; charset=utf-8"},
        ) as r:
            assert r.status == 202
    (seen,) = read_records(records, "events")
    assert (seen["id"], seen["event_type"], seen["topic"]) == ("ce-1", cloud_event["type"], cloud_event["source"])


async def test_eventgrid_failure_answers_500_so_event_grid_redelivers(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    event = {"id": "f-1", "eventType": "T", "subject": "fail", "topic": "t", "data": {}, "dataVersion": "1"}
    ok = {**event, "id": "ok-1", "subject": "fine"}
    async with DevHost(TEST_APP, values=host_values(twin, records)) as host:
        url = host.eventgrid_url("events")
        async with http.post(url, json=[event, ok], headers={"aeg-event-type": "Notification"}) as r:
            assert r.status == 500
        async with http.post(url, json=[ok], headers={"aeg-event-type": "Notification"}) as r:
            assert r.status == 202
        async with http.post(url, json=[ok], headers={"aeg-event-type": "Unsubscribe"}) as r:
            assert r.status == 202
        async with http.post(url, json=[ok], headers={"aeg-event-type": "Surprise"}) as r:
            assert r.status == 400
        async with http.post(url, data=b"not json", headers={"aeg-event-type": "Notification"}) as r:
            assert r.status == 400
    assert sorted(r["id"] for r in read_records(records, "events")) == ["f-1", "ok-1", "ok-1"]


# -- HTTP --------------------------------------------------------------------------------


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.text()


async def test_http_keys_anonymous_function_and_admin(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    keys = HostKeys(master="m-key", function="f-key", eventgrid="s-key")
    async with DevHost(TEST_APP, values=host_values(twin, records), keys=keys) as host:
        api = host.api_url
        assert await get(http, f"{api}/hello/world") == (200, "hello world")
        assert (await get(http, f"{api}/items/new"))[0] == 401
        assert (await get(http, f"{api}/items/new?code=wrong"))[0] == 401
        assert (await get(http, f"{api}/items/new?code=s-key"))[0] == 401  # a system key is not a function key
        assert await get(http, f"{api}/items/new?code=f-key") == (200, "literal")
        assert await get(http, f"{api}/items/new", headers={"x-functions-key": "f-key"}) == (200, "literal")
        assert await get(http, f"{api}/items/new", headers={"x-functions-key": "m-key"}) == (200, "literal")
        assert (await get(http, f"{api}/secret?code=f-key"))[0] == 401
        assert await get(http, f"{api}/secret?code=m-key") == (200, "admin only")
        assert (await get(http, f"{host.base_url}/hello/world"))[0] == 404  # only under the route prefix
        assert (await get(http, f"{api}/nothing-here"))[0] == 404


async def test_http_route_precedence(twin: TwinHandle, records: Path, http: aiohttp.ClientSession) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records), keys=HostKeys("m", "f", "s")) as host:
        api = host.api_url
        assert await get(http, f"{api}/items/new?code=f") == (200, "literal")
        assert await get(http, f"{api}/items/42?code=f") == (200, "constrained 42")
        assert await get(http, f"{api}/items/widget?code=f") == (200, "parameter widget")
        assert await get(http, f"{api}/files/a/b/c.txt?code=f") == (200, "catch-all a/b/c.txt")
        assert await get(http, f"{api}/files?code=f") == (200, "catch-all ")


async def test_http_request_and_response_objects_async_function(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records)) as host:
        async with http.post(
            f"{host.api_url}/echo/thing?a=1&b=two", data=b"payload", headers={"X-Test": "header value"}
        ) as response:
            assert response.status == 201
            assert response.headers["X-Echo"] == "yes"
            assert response.headers["Content-Type"].startswith("application/json")
            body = await response.json()
        (result,) = await host.wait_for_invocations("echo")
    assert body["method"] == "POST"
    assert body["url"] == f"{host.api_url}/echo/thing?a=1&b=two"
    assert body["header"] == "header value"
    assert body["params"] == {"a": "1", "b": "two"}
    assert body["route_params"] == {"kind": "thing"}
    assert body["body"] == "payload"
    assert body["function_name"] == "echo"
    assert body["invocation_id"] == result.invocation_id


async def test_http_failure_and_timeout_answer_a_bare_500(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    async with DevHost(TEST_APP, values=host_values(twin, records), function_timeout=0.5) as host:
        status, text = await get(http, f"{host.api_url}/crash")
        assert (status, text) == (500, "")
        assert (await get(http, f"{host.api_url}/slow?seconds=5"))[0] == 500
        assert await get(http, f"{host.api_url}/slow?seconds=0") == (200, "finished")
        outcomes = [r.outcome for r in host.invocations]
    assert outcomes == ["Failed", "TimedOut", "Succeeded"]


async def test_asgi_function_app_serves_every_route(
    twin: TwinHandle, records: Path, http: aiohttp.ClientSession
) -> None:
    keys = HostKeys("m", "f", "s")
    async with DevHost(TEST_APP, script_file="asgi_app.py", values=host_values(twin, records), keys=keys) as host:
        assert set(host.functions) == {"http_app_func", "asgi_tick"}
        assert (await get(http, f"{host.api_url}/instances"))[0] == 401
        async with http.post(f"{host.api_url}/instances/x/plan?dry=1&code=f", data=b"{}") as response:
            assert response.status == 200
            body = await response.json()
        assert (await get(http, f"{host.api_url}/missing?code=f"))[0] == 404
    assert body["method"] == "POST"
    assert body["path"] == "/api/instances/x/plan"
    assert "dry=1" in body["query"]
    assert body["body"] == "{}"
    assert body["invocation_id"]


async def test_a_missing_setting_stops_the_start_and_restores_the_environment(twin: TwinHandle, records: Path) -> None:
    values = host_values(twin, records)
    del values["WORK_QUEUE"]
    before = dict(os.environ)
    with pytest.raises(MissingSettingError, match="WORK_QUEUE"):
        await DevHost(TEST_APP, values=values).start()
    assert dict(os.environ) == before


def test_background_host_serves_synchronous_callers(twin: TwinHandle, records: Path) -> None:
    import requests

    values = host_values(twin, records)
    send(twin, values["WORK_QUEUE"], "from a sync caller")
    background = BackgroundHost(DevHost(TEST_APP, values=values, run_timers=False))
    with background as host:
        assert requests.get(f"{host.api_url}/hello/sync", timeout=10).text == "hello sync"
        background.drain(timeout=20)
        assert [r["body"] for r in read_records(records, "work")] == ["from a sync caller"]


# -- the command -------------------------------------------------------------------------


def test_cli_prints_urls_and_keys_serves_and_stops_on_interrupt(twin: TwinHandle, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": host_values(twin, records)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    process = subprocess.Popen(
        [*START, "--settings", str(settings), "--master-key", "cli-master"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Host ready:"):
                break
        printed = "".join(lines)
        base = lines[-1].split()[2]
        assert "cli-master" in printed
        assert f"hello: [GET] {base}/api/hello/{{name}}  (auth: anonymous)" in printed
        assert f"events: eventGridTrigger {base}/runtime/webhooks/eventgrid?functionName=events" in printed
        assert "eventgrid_extension:" in printed
        import requests

        assert requests.get(f"{base}/api/hello/cli", timeout=10).text == "hello cli"
        assert requests.get(f"{base}/admin/host/status", headers={"x-functions-key": "cli-master"}, timeout=10).ok
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Executed 'Functions.hello' (Succeeded, Id=" in stderr


def test_cli_names_a_missing_setting_and_exits_2(tmp_path: Path) -> None:
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"Values": {"TICK_SCHEDULE": NEVER, "OUT_QUEUE": "out-cli"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORK_QUEUE", "OUT_QUEUE")}
    done = subprocess.run(
        [*START, "--settings", str(settings)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "the app setting 'WORK_QUEUE' is not set" in done.stderr
