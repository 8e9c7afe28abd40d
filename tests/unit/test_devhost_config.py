"""devhost's reading of the app: settings (local.settings.json vs the environment),
%SETTING% resolution with a clear error, host.json, queue connections, route precedence,
and the test app's metadata read through azure-functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devhost.config import (
    ConfigError,
    HostConfig,
    MissingSettingError,
    merge_settings,
    parse_timespan,
    read_local_settings,
    resolve,
)
from devhost.functions import load_app
from devhost.queues import resolve_connection
from devhost.routing import RouteTemplate, ordered, split_path

TEST_APP = Path(__file__).resolve().parents[1] / "devhost_app"
APP_SETTINGS = {
    "TICK_SCHEDULE": "*/2 * * * * *",
    "WORK_QUEUE": "devhost-work",
    "OUT_QUEUE": "devhost-out",
}


def test_resolve_replaces_every_reference() -> None:
    assert resolve("%A%-%B%", {"A": "x", "B": "y"}, "here") == "x-y"
    assert resolve("plain", {}, "here") == "plain"


def test_missing_setting_names_the_setting_and_the_binding() -> None:
    with pytest.raises(MissingSettingError) as caught:
        resolve("%APIMR_WORK_QUEUE%", {}, "function 'work' binding 'msg' (queueTrigger) property 'queueName'")
    message = str(caught.value)
    assert caught.value.setting == "APIMR_WORK_QUEUE"
    assert "function 'work' binding 'msg' (queueTrigger) property 'queueName'" in message
    assert "'APIMR_WORK_QUEUE' is not set" in message
    assert "local.settings.json" in message


def test_an_empty_setting_counts_as_missing() -> None:
    with pytest.raises(MissingSettingError):
        resolve("%A%", {"A": ""}, "here")


def test_environment_wins_over_local_settings_and_overrides_win_over_both() -> None:
    merged, shadowed = merge_settings({"A": "file", "B": "file"}, {"A": "env", "C": "env"}, {"C": "override"})
    assert merged == {"A": "env", "B": "file", "C": "override"}
    assert shadowed == ["A"]


def test_read_local_settings(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {"A": "1", "B": 2, "C": None}}))
    assert read_local_settings(path) == {"A": "1", "B": "2", "C": ""}
    path.write_text(json.dumps({"IsEncrypted": True, "Values": {}}))
    with pytest.raises(ConfigError, match="encrypted"):
        read_local_settings(path)


def test_product_sample_settings_read() -> None:
    values = read_local_settings(Path(__file__).resolve().parents[2] / "local.settings.sample.json")
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:10:00", 600.0), ("00:00:00.250", 0.25), ("1.02:00:00", 93600.0), ("-1", None)],
)
def test_timespans(text: str, seconds: float | None) -> None:
    assert parse_timespan(text, "x") == seconds


def test_host_json_of_the_product() -> None:
    config = HostConfig.load(Path(__file__).resolve().parents[2] / "host.json")
    assert config.route_prefix == "api"
    assert config.function_timeout == 600.0
    queues = config.queues
    assert (queues.batch_size, queues.threshold, queues.max_dequeue_count) == (4, 2, 5)
    assert (queues.visibility_timeout, queues.max_polling_interval, queues.message_encoding) == (30.0, 30.0, "base64")


def test_host_json_defaults_and_errors() -> None:
    config = HostConfig.from_document({"version": "2.0"})
    assert (config.route_prefix, config.function_timeout) == ("api", 300.0)
    assert (config.queues.batch_size, config.queues.threshold, config.queues.max_dequeue_count) == (16, 8, 5)
    assert HostConfig.from_document({"extensions": {"http": {"routePrefix": ""}}}).route_prefix == ""
    with pytest.raises(ConfigError, match="batchSize"):
        HostConfig.from_document({"extensions": {"queues": {"batchSize": 64}}})
    with pytest.raises(ConfigError, match="messageEncoding"):
        HostConfig.from_document({"extensions": {"queues": {"messageEncoding": "utf8"}}})
    with pytest.raises(ConfigError, match="functionTimeout"):
        HostConfig.from_document({"functionTimeout": "ten minutes"})


def test_queue_connection_forms() -> None:
    where = "function 'work'"
    conn = resolve_connection("Store", {"Store": "UseDevelopmentStorage=true"}, where)
    assert conn.connection_string == "UseDevelopmentStorage=true"
    assert "connection string" in conn.describe()
    assert "UseDevelopment" not in conn.describe()
    conn = resolve_connection("Store", {"Store__queueServiceUri": "https://127.0.0.1:1/acct/"}, where)
    assert conn.service_url == "https://127.0.0.1:1/acct"
    conn = resolve_connection("AzureWebJobsStorage", {"AzureWebJobsStorage__accountName": "st1"}, where)
    assert conn.service_url == "https://st1.queue.core.windows.net"
    conn = resolve_connection("Other", {"AzureWebJobsOther": "AccountName=a;AccountKey=k"}, where)
    assert conn.prefix == "AzureWebJobsOther"
    with pytest.raises(MissingSettingError, match=r"function 'work' connection 'Store' \(expects Store, "):
        resolve_connection("Store", {}, where)


def route_order(*templates: str) -> list[str]:
    return [t.template for t, _ in ordered([(RouteTemplate.parse(t), t) for t in templates])]


def test_route_precedence_literal_then_constrained_then_parameter_then_catch_all() -> None:
    assert route_order("{*rest}", "items/{name}", "items/{id:int}", "items/new") == [
        "items/new",
        "items/{id:int}",
        "items/{name}",
        "{*rest}",
    ]


def test_route_matching() -> None:
    route = RouteTemplate.parse("items/{id:int}/{rest?}")
    assert route.match(split_path("/Items/42/")) == {"id": "42"}
    assert route.match(split_path("items/42/x")) == {"id": "42", "rest": "x"}
    assert route.match(split_path("items/abc")) is None
    assert route.match(split_path("items/42/x/y")) is None
    catch_all = RouteTemplate.parse("/{*route}")
    assert catch_all.match(split_path("a/b/c")) == {"route": "a/b/c"}
    assert catch_all.match([]) == {}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("files/{*rest}/x", "may only be the last segment"),
        ("file.{ext}", "not supported by devhost"),
        ("a/{id:regex}", "constraint 'regex'"),
        ("a/{id}/{ID}", "appears twice"),
    ],
)
def test_unsupported_routes_are_refused(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RouteTemplate.parse(template)


def test_test_app_metadata_is_read_from_the_app() -> None:
    app = load_app(TEST_APP, "function_app.py", APP_SETTINGS)
    kinds = {name: spec.trigger_type for name, spec in app.functions.items()}
    assert kinds["tick"] == "timerTrigger"
    assert kinds["work"] == "queueTrigger"
    assert kinds["events"] == "eventGridTrigger"
    assert kinds["hello"] == "httpTrigger"
    work = app.functions["work"]
    assert (work.queue_name, work.connection) == ("devhost-work", "DevhostStorage")
    assert [o["queueName"] for o in work.outputs] == ["devhost-out"]
    assert app.functions["tick"].schedule.expression == "*/2 * * * * *"
    assert (app.functions["hello"].auth_level, app.functions["items_new"].auth_level) == ("ANONYMOUS", "FUNCTION")
    assert app.functions["echo"].is_async
    assert not app.functions["hello"].is_async


def test_a_missing_binding_setting_stops_the_load_and_names_it() -> None:
    settings = {k: v for k, v in APP_SETTINGS.items() if k != "WORK_QUEUE"}
    with pytest.raises(MissingSettingError, match=r"function 'work' binding 'msg' \(queueTrigger\)") as caught:
        load_app(TEST_APP, "function_app.py", settings)
    assert caught.value.setting == "WORK_QUEUE"


def test_a_bad_schedule_setting_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="function 'tick': schedule"):
        load_app(TEST_APP, "function_app.py", {**APP_SETTINGS, "TICK_SCHEDULE": "0 */5 * * *"})


def test_loading_twice_indexes_a_fresh_module() -> None:
    first = load_app(TEST_APP, "function_app.py", APP_SETTINGS)
    second = load_app(TEST_APP, "function_app.py", APP_SETTINGS)
    assert first.module is not second.module


def test_the_asgi_app_registers_a_catch_all_async_function() -> None:
    app = load_app(TEST_APP, "asgi_app.py", {})
    spec = app.functions["http_app_func"]
    assert spec.route.template == "/{*route}"
    assert spec.is_async
    assert spec.parameters == ("req", "context")


def test_storage_settings_follow_the_products_own() -> None:
    from devhost.queues import storage_settings_for

    endpoints = {f"APIMR_STORAGE_{s}_ENDPOINT": f"https://127.0.0.1:1/{s.lower()}" for s in ("BLOB", "QUEUE", "TABLE")}
    assert storage_settings_for(endpoints)["AzureWebJobsStorage__queueServiceUri"] == "https://127.0.0.1:1/queue"
    assert storage_settings_for({"APIMR_STORAGE_CONNECTION_STRING": "cs"}, "X") == {"X": "cs"}
    assert storage_settings_for({"APIMR_STORAGE_ACCOUNT": "st"}) == {"AzureWebJobsStorage__accountName": "st"}
