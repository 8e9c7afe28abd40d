"""Runtime signals end to end: seeded gateway-log datasets in the twin, read by the production
reader (`AzureSignalsSource`: the workspace's customerId from ARM, the real async
LogsQueryClient), evaluated by the pure rules LOG-004 and THR-001..005.

One dataset per scenario: normal traffic with a daily peak, a spike, a 401 storm, a leaked
key, a BOLA walk, LLM abuse, silence; each rule fires on its own scenario and stays quiet on
normal traffic, and each threshold is tested at N (quiet) and N+1 (fires) in the same data.
Rows are placed with `ago` relative to the twin's clock and well inside their windows, so the
windows are deterministic however long the test takes.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.incidents import RunIncidents
from handlers.reconcile import LogSink, ReconcileDeps, ReconcileRequest, reconcile
from shared.azure import ClientFactory
from shared.findings_store import FindingsStore
from shared.incidents import IncidentReporter, IncidentStore, fingerprint_of
from shared.inventory import instance_ref
from shared.journal import Trigger, TriggerKind
from shared.model import Finding, Snapshot
from shared.rules import evaluate_rule
from shared.settings import load_settings
from shared.signals import SIGNAL_RULES, RuntimeSignals
from shared.signals_source import AzureSignalsSource
from shared.snapshot import read_snapshot
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, fragment_for
from tests.integration.test_remediate import product_env
from tests.integration.test_remediate_engine_safety import deps_for

pytestmark = pytest.mark.integration

ALL = {rule_id: {} for rule_id in SIGNAL_RULES}
DAY = 1440  # minutes
AI_URL = "https://contoso-ai.openai.azure.com/openai"


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


# -- datasets ----------------------------------------------------------------------------------


def req(minutes_ago: float, *, repeat: int = 1, ip: str = "10.1.0.1", code: int = 200, sub: str = "orders-mobile",
        url: str = "https://gw.example/orders/1", api: str = "orders", op: str = "get-order",
        ) -> dict[str, Any]:  # fmt: skip
    return {
        "ago": f"{minutes_ago:g}m",
        "repeat": repeat,
        "CallerIpAddress": ip,
        "ResponseCode": code,
        "ApimSubscriptionId": sub,
        "Url": url,
        "ApiId": api,
        "OperationId": op,
    }


def normal_traffic(now_requests: int = 60) -> list[dict[str, Any]]:
    """Seven days of traffic with a daily peak at this hour: 60 requests in this hour every
    previous day (the peak), 5 an hour at other times of the day, from two regular callers;
    `now_requests` in the last hour today (60: today is like every day)."""
    rows = [req(10, repeat=now_requests // 2), req(30, repeat=now_requests - now_requests // 2, ip="10.1.0.2")]
    for day in range(1, 8):
        rows.append(req(day * DAY + 10, repeat=30))
        rows.append(req(day * DAY + 30, repeat=30, ip="10.1.0.2"))
    for day in range(8):
        for hour in (3, 6, 9, 12, 18):
            rows.append(req(day * DAY + hour * 60, repeat=5))
    return rows


def seed(
    twin: TwinHandle,
    gateway_rows: list[dict[str, Any]],
    *,
    llm_rows: list[dict[str, Any]] | None = None,
    legacy: bool = False,
    name: str = "signals",
) -> str:
    """One instance whose diagnostic setting sends GatewayLogs (and GatewayLlmLogs with
    `llm_rows`) to workspace 'law', resource-specific or (legacy) AzureDiagnostics; the rows go
    to that workspace with the instance's `_ResourceId`. It has an AI API 'chat'."""
    spec = compliant(name, twin.subscription_id)
    spec["apis"].append({"id": "chat", "path": "chat", "protocols": ["https"], "serviceUrl": AI_URL})
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    service_id = ids[name]
    [group] = fragment["subscriptions"][0]["resource_groups"]
    [setting] = group["diagnostic_settings"]
    if legacy:
        del setting["properties"]["logAnalyticsDestinationType"]
    if llm_rows is not None:
        setting["properties"]["logs"].append({"category": "GatewayLlmLogs", "enabled": True})
    tables: dict[str, Any] = {}
    if legacy:
        tables["AzureDiagnostics"] = {"rows": [_legacy(r, service_id) for r in gateway_rows]}
    else:
        tables["ApiManagementGatewayLogs"] = {"rows": [{"_ResourceId": service_id.upper(), **r} for r in gateway_rows]}
    if llm_rows is not None:
        tables["ApiManagementGatewayLlmLog"] = {"rows": [{"_ResourceId": service_id.upper(), **r} for r in llm_rows]}
    group["workspaces"][0]["tables"] = tables
    twin.seed(fragment)
    return service_id


def _legacy(row: dict[str, Any], service_id: str) -> dict[str, Any]:
    """The same request as an AzureDiagnostics row (Azure diagnostics destination mode)."""
    return {
        "ago": row["ago"],
        "repeat": row["repeat"],
        "ResourceId": service_id.upper(),
        "_ResourceId": service_id.lower(),
        "ResourceProvider": "MICROSOFT.APIMANAGEMENT",
        "Category": "GatewayLogs",
        "CallerIPAddress": row["CallerIpAddress"],
        "responseCode_d": float(row["ResponseCode"]),
        "url_s": row["Url"],
        "apimSubscriptionId_s": row["ApimSubscriptionId"],
        "apiId_s": row["ApiId"],
        "operationId_s": row["OperationId"],
    }


# -- reading and evaluating ------------------------------------------------------------------


async def read(twin: TwinHandle, service_id: str, params: Mapping[str, Mapping[str, Any]] = ALL) -> Snapshot:
    """The instance's snapshot with the signals the production reader gets from the twin."""
    factory = ClientFactory(load_settings(twin.env))
    try:
        ref = instance_ref(service_id, "westeurope", {})
        assert ref is not None
        snapshot = await read_snapshot(factory, ref, key_vault_url=None, hash_key=b"h" * 32, now=datetime.now(UTC))
        signals = await AzureSignalsSource(factory).read(snapshot, params)
        return replace(snapshot, signals=signals)
    finally:
        await factory.aclose()
        factory.close()


def fired(snapshot: Snapshot, params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, list[Finding]]:
    """Each signal rule's findings (rules without any left out)."""
    found = {rule_id: evaluate_rule(rule_id, snapshot, (params or {}).get(rule_id)) for rule_id in sorted(SIGNAL_RULES)}
    return {rule_id: findings for rule_id, findings in found.items() if findings}


def signals_of(snapshot: Snapshot) -> RuntimeSignals:
    assert snapshot.signals is not None
    return snapshot.signals


# -- normal traffic and THR-001 ---------------------------------------------------------------


async def test_normal_traffic_with_a_daily_peak_is_quiet(twin: TwinHandle) -> None:
    service_id = seed(twin, normal_traffic())
    snapshot = await read(twin, service_id)
    signals = signals_of(snapshot)
    assert [r.problem for r in signals.runs] == [None] * len(signals.runs)
    assert signals.table == "ApiManagementGatewayLogs"
    assert signals.workspaces == ("law",)
    assert signals.log_rows == 60
    assert [d.value for d in signals.requests_by_day] == [60] * 8  # the peak, every day at this hour
    assert fired(snapshot) == {}


@pytest.mark.parametrize(("current", "fires"), [(599, False), (600, True)])
async def test_thr_001_fires_at_ten_times_the_median_of_the_same_window(
    twin: TwinHandle, current: int, fires: bool
) -> None:
    service_id = seed(twin, normal_traffic(current))
    snapshot = await read(twin, service_id)
    assert [d.value for d in signals_of(snapshot).requests_by_day] == [current] + [60] * 7
    found = fired(snapshot)
    assert set(found) == ({"THR-001"} if fires else set())
    if fires:
        [finding] = found["THR-001"]
        assert "600 requests in the last 60 minutes, 10x its baseline of 60" in finding.message
        assert "query request_rate over 60 min on law" in finding.evidence.actual


# -- THR-002 ----------------------------------------------------------------------------------


async def test_thr_002_401_storm_per_caller_ip_and_per_subscription(twin: TwinHandle) -> None:
    rows = [
        *normal_traffic(),
        req(5, repeat=21, ip="203.0.113.7", code=401, sub=""),  # N+1 from one IP: fires
        req(5, repeat=20, ip="203.0.113.8", code=403, sub=""),  # N from one IP: quiet
        # one subscription, 21 failures from three IPs of 7 each: fires per subscription only
        *(req(6, repeat=7, ip=f"198.51.100.{i}", code=401, sub="partner") for i in (1, 2, 3)),
        req(40, repeat=50, ip="203.0.113.9", code=401, sub=""),  # outside the 15 min window
    ]
    service_id = seed(twin, rows)
    snapshot = await read(twin, service_id)
    found = fired(snapshot, {"THR-002": {"max_failures": 20}})
    assert set(found) == {"THR-002"}
    by_entry = {f.entry: f for f in found["THR-002"]}
    assert set(by_entry) == {"caller_ip", "subscription"}
    assert "203.0.113.7 (21)" in by_entry["caller_ip"].message
    assert "203.0.113.8" not in by_entry["caller_ip"].message
    assert "198.51.100" not in by_entry["caller_ip"].message
    assert "partner (21)" in by_entry["subscription"].message
    # With the default threshold (100) the same storm is quiet.
    assert fired(snapshot) == {}


# -- THR-003 ----------------------------------------------------------------------------------


async def test_thr_003_a_key_used_from_more_than_n_ips_has_leaked(twin: TwinHandle) -> None:
    rows = [
        *normal_traffic(),
        *(req(10 + i, ip=f"192.0.2.{i}", sub="leaked") for i in range(11)),  # N+1 = 11 IPs
        *(req(10 + i, ip=f"192.0.2.{i}", sub="fine", repeat=3) for i in range(10)),  # N = 10 IPs
    ]
    service_id = seed(twin, rows)
    snapshot = await read(twin, service_id)
    found = fired(snapshot)
    assert set(found) == {"THR-003"}
    [finding] = found["THR-003"]
    assert finding.entry == "leaked"
    assert "'leaked'" in finding.message
    assert "11 distinct client IPs" in finding.message
    assert "192.0.2." in finding.evidence.actual
    assert not finding.remediable  # detect-only until key rotation lands


# -- THR-004 ----------------------------------------------------------------------------------


async def test_thr_004_one_caller_walking_object_ids(twin: TwinHandle) -> None:
    rows = [
        *normal_traffic(),
        # N+1 distinct order ids from one caller: fires
        *(req(5, ip="203.0.113.50", url=f"https://gw.example/orders/{i}") for i in range(51)),
        # N distinct ids: quiet
        *(req(5, ip="203.0.113.51", url=f"https://gw.example/orders/{i}") for i in range(50)),
        # one id with 80 different query strings: one object, quiet
        *(req(5, ip="203.0.113.52", url=f"https://gw.example/orders/7?page={i}") for i in range(80)),
    ]
    service_id = seed(twin, rows)
    snapshot = await read(twin, service_id)
    found = fired(snapshot)
    assert set(found) == {"THR-004"}
    [finding] = found["THR-004"]
    assert finding.entry == "203.0.113.50 orders/get-order"
    assert "requested 51 distinct objects of operation orders/get-order" in finding.message
    assert "orders-mobile" in finding.message  # the subscription it used


# -- THR-005 ----------------------------------------------------------------------------------


def llm_traffic(current_tokens: int) -> list[dict[str, Any]]:
    rows = [{"ago": "15m", "TotalTokens": current_tokens, "PromptTokens": current_tokens, "CompletionTokens": 0}]
    rows += [{"ago": f"{d * DAY + 15}m", "TotalTokens": 1000, "repeat": 1} for d in range(1, 8)]
    return rows


async def test_thr_005_ai_api_called_from_many_ips(twin: TwinHandle) -> None:
    rows = [
        *normal_traffic(),
        *(req(8, ip=f"100.64.0.{i}", api="chat", op="chat-completions", sub="") for i in range(21)),  # N+1
        # a non-AI API from as many IPs is not THR-005's business
        *(req(8, ip=f"100.65.0.{i}", api="orders", sub="") for i in range(30)),
    ]
    service_id = seed(twin, rows, llm_rows=llm_traffic(1000))
    snapshot = await read(twin, service_id)
    found = fired(snapshot)
    assert set(found) == {"THR-005"}
    [finding] = found["THR-005"]
    assert finding.entry == "callers chat"
    assert finding.resource_id.lower().endswith("/apis/chat")
    assert "21 distinct client IPs" in finding.message
    # N = 21 allowed: quiet
    assert fired(snapshot, {"THR-005": {"max_client_ips": 21}}) == {}


@pytest.mark.parametrize(("tokens", "fires"), [(9999, False), (10000, True)])
async def test_thr_005_token_volume_far_above_its_baseline(twin: TwinHandle, tokens: int, fires: bool) -> None:
    service_id = seed(twin, normal_traffic(), llm_rows=llm_traffic(tokens))
    snapshot = await read(twin, service_id)
    signals = signals_of(snapshot)
    assert signals.llm_log
    assert [d.value for d in signals.tokens_by_day] == [tokens] + [1000] * 7
    found = fired(snapshot)
    assert set(found) == ({"THR-005"} if fires else set())
    if fires:
        [finding] = found["THR-005"]
        assert finding.entry == "tokens"
        assert "10000 language-model tokens" in finding.message


# -- LOG-004 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("newest", "fires"), [(55, False), (65, True)])
async def test_log_004_logs_stopped_flowing(twin: TwinHandle, newest: int, fires: bool) -> None:
    """Traffic until `newest` minutes ago, then silence; the window is 60 minutes."""
    rows = [req(newest), *(req(day * DAY + 30, repeat=5) for day in (1, 2))]
    service_id = seed(twin, rows)
    snapshot = await read(twin, service_id)
    found = fired(snapshot)
    assert set(found) == ({"LOG-004"} if fires else set())
    if fires:
        [finding] = found["LOG-004"]
        assert "No gateway log row of 'signals' reached law (ApiManagementGatewayLogs) in the last 60 minutes" in (
            finding.message
        )
        assert signals_of(snapshot).last_row is not None


async def test_log_004_a_failed_and_a_partial_query_are_monitoring_findings_not_crashes(twin: TwinHandle) -> None:
    service_id = seed(twin, normal_traffic())
    # The first two queries the reader sends fail: one refused (400), one partial (200 + error).
    twin.control("POST", "/_twin/faults", {"service": "logs", "path": "/query$", "status": 400, "times": 1})
    twin.control("POST", "/_twin/faults", {"service": "logs", "path": "/query$", "action": "partial", "times": 1})
    snapshot = await read(twin, service_id)
    signals = signals_of(snapshot)
    problems = [r for r in signals.runs if r.problem]
    assert len(problems) == 2
    assert any("partial result" in (r.problem or "") for r in problems)
    assert any("HttpResponseError" in (r.problem or "") for r in problems)
    found = fired(snapshot)
    assert set(found) == {"LOG-004"}
    assert {f.entry for f in found["LOG-004"]} == {r.name for r in problems}
    assert all("blind" in f.message for f in found["LOG-004"])


async def test_a_refused_query_names_the_action(twin: TwinHandle) -> None:
    """Without query/read on the workspace Log Analytics answers 403; the finding names the action."""
    service_id = seed(twin, normal_traffic())
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "logs", "path": "/query$", "status": 403, "code": "InsufficientAccessError", "times": 0},
    )
    snapshot = await read(twin, service_id)
    found = fired(snapshot)
    assert set(found) == {"LOG-004"}
    # every query the reader sent (no LLM log here, so THR-005 sends one): none crashed
    assert len(found["LOG-004"]) == len(signals_of(snapshot).runs) == 6
    assert all("Microsoft.OperationalInsights/workspaces/query/read" in f.message for f in found["LOG-004"])


# -- the legacy AzureDiagnostics shape --------------------------------------------------------


async def test_legacy_azure_diagnostics_mode_reads_the_same_signals(twin: TwinHandle) -> None:
    rows = [
        *normal_traffic(),
        *(req(10 + i, ip=f"192.0.2.{i}", sub="leaked") for i in range(11)),
        *(req(5, ip="203.0.113.50", url=f"https://gw.example/orders/{i}?x=1") for i in range(51)),
    ]
    service_id = seed(twin, copy.deepcopy(rows), legacy=True)
    snapshot = await read(twin, service_id)
    signals = signals_of(snapshot)
    assert signals.table == "AzureDiagnostics"
    assert [r.problem for r in signals.runs] == [None] * len(signals.runs)
    assert "AzureDiagnostics" in (signals.run("request_rate") or signals.runs[0]).kql
    assert set(fired(snapshot)) == {"THR-003", "THR-004"}


async def test_no_setting_no_signals_and_every_rule_silent(twin: TwinHandle) -> None:
    spec = compliant("quiet", twin.subscription_id)
    spec["_diagnostic_setting"] = False
    fragment, ids = fragment_for({"quiet": spec}, twin.subscription_id)
    twin.seed(fragment)
    snapshot = await read(twin, ids["quiet"])
    assert signals_of(snapshot).missing
    assert signals_of(snapshot).runs == ()
    assert fired(snapshot) == {}


# -- reconcile: the signals on their own schedule, stored with the other findings -------------


def query_count(twin: TwinHandle) -> int:
    _, log = twin.control("GET", "/_twin/log")
    return sum(1 for e in log["entries"] if e["path"].endswith("/query"))


async def test_reconcile_runs_the_signals_on_their_interval_and_keeps_their_findings_between_runs(
    twin: TwinHandle, tmp_path: Path
) -> None:
    canary = "CANARY-subscription-key-0123456789"
    rows = [*normal_traffic(), *(req(10 + i, ip=f"192.0.2.{i}", sub="leaked") for i in range(11))]
    # A request header holding a key reaches the log table; nothing of it may reach a finding.
    rows[0] = {**rows[0], "RequestHeaders": {"Ocp-Apim-Subscription-Key": canary}}
    service_id = seed(twin, rows)
    factory = ClientFactory(load_settings(product_env(twin, tmp_path, "version: 1\n")))
    now = {"at": datetime.now(UTC)}
    try:
        store = FindingsStore(factory.table_service_async(), f"findings{uuid.uuid4().hex[:10]}")
        reporter = IncidentReporter(IncidentStore(factory.table_service_async(), f"inc{uuid.uuid4().hex[:10]}"))
        deps = ReconcileDeps(
            remediation=deps_for(factory, "version: 1\n", "journalsignals"),
            findings=store,
            sink=LogSink(),
            clock=lambda: now["at"],
            signals=AzureSignalsSource(factory),
            signals_interval=timedelta(minutes=15),
            incidents=RunIncidents(reporter),
        )
        thr = fingerprint_of("THR", service_id)  # the estate has no APIM subscription "leaked": the service

        async def thr_incident() -> tuple[str, int]:
            incident = await reporter.store.get(thr)
            assert incident is not None, [i.fingerprint for i in await reporter.open_incidents()]
            return incident.status.value, incident.count

        trigger = Trigger(TriggerKind.TIMER, "sweep test")

        before = query_count(twin)
        first = await reconcile(ReconcileRequest(service_id, trigger, "sweep"), deps)
        assert first.changes is not None
        assert [f.rule_id for f in first.changes.new] == ["THR-003"]
        assert query_count(twin) - before == 6  # LOG-004 and THR-001..005 (no LLM log here)
        assert await store.last_signals(service_id) == now["at"]
        stored = await store.findings(service_id)
        assert [f.rule_id for f in stored] == ["THR-003"]
        assert canary not in repr(stored)
        assert canary not in repr(first)
        # A signal finding is left to people like any other: an incident (issue 11).
        assert await thr_incident() == ("new", 1)
        assert canary not in repr(await reporter.store.get(thr))

        # Five minutes later: a reconcile that queries nothing and keeps THR-003 open.
        now["at"] += timedelta(minutes=5)
        before = query_count(twin)
        second = await reconcile(ReconcileRequest(service_id, trigger, "event"), deps)
        assert second.changes is not None
        assert second.changes.empty
        assert query_count(twin) == before
        assert [f.rule_id for f in await store.findings(service_id)] == ["THR-003"]
        summary = await store.summary(service_id)
        assert summary is not None
        assert summary.open_by_severity["high"] == 1
        assert await thr_incident() == ("new", 1)  # held: neither resolved nor counted again

        # Past the interval: the signals run again (the leak is still in the window).
        now["at"] += timedelta(minutes=10)
        before = query_count(twin)
        third = await reconcile(ReconcileRequest(service_id, trigger, "sweep"), deps)
        assert third.changes is not None
        assert third.changes.empty
        assert query_count(twin) - before == 6
        assert await store.last_signals(service_id) == now["at"]
        assert await thr_incident() == ("active", 2)

        # Two hours on, the leak has stopped and so has all traffic: the next signals run
        # resolves THR-003, and LOG-004 sees the silence.
        twin.control("POST", "/_twin/clock/advance", {"seconds": 7200})
        now["at"] += timedelta(minutes=20)
        fourth = await reconcile(ReconcileRequest(service_id, trigger, "sweep"), deps)
        assert fourth.changes is not None
        assert [f.rule_id for f in fourth.changes.resolved] == ["THR-003"]
        assert [f.rule_id for f in fourth.changes.new] == ["LOG-004"]
        assert (await thr_incident())[0] == "resolved"
        log = await reporter.store.get(fingerprint_of("LOG", service_id))
        assert log is not None
        assert log.open
    finally:
        await factory.aclose()
        factory.close()


async def test_a_table_the_workspace_does_not_have_yet_holds_no_rows(twin: TwinHandle) -> None:
    """A workspace creates ApiManagementGatewayLogs with its first row: before that, Log
    Analytics cannot resolve the table. That is silence (LOG-004), not a blind check."""
    spec = compliant("no-rows-yet", twin.subscription_id)
    fragment, ids = fragment_for({"no-rows-yet": spec}, twin.subscription_id)
    twin.seed(fragment)  # the workspace has no tables at all
    snapshot = await read(twin, ids["no-rows-yet"])
    assert [r.problem for r in signals_of(snapshot).runs] == [None] * 6
    found = fired(snapshot)
    assert set(found) == {"LOG-004"}
    [finding] = found["LOG-004"]
    assert finding.entry == ""
    assert "newest row: none in the last day" in finding.message
