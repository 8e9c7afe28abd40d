"""Runtime signals: LOG-004 (gateway logs stopped flowing) and THR-001..005 (attacks in
progress), from what the gateway logs in Log Analytics say now.

The signals are read on their own schedule into `Snapshot.signals` (`shared.signals`; the
KQL is in `shared.signal_queries`); these rules are pure over it. Without signals (a scan
that did not read them, no workspace receives gateway logs) every rule here is silent, and
LOG-001 reports a missing diagnostic setting. A query that failed or answered in part is a
LOG-004 finding about monitoring, and the rule that needed it stays silent: a blind check
is reported as blind, never as clean.

Findings carry the query's name and window, the numbers and the top offenders (client IPs,
APIM subscription ids, API and operation names); never a key, a header or a body.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from shared import signal_queries as kql
from shared.model import Finding, Severity, Snapshot
from shared.rules import Param, References, Rule, rule
from shared.signals import (
    API_CALLERS,
    AUTH_FAILURES,
    KEY_SPREAD,
    LLM_TOKENS,
    LOG_FLOW,
    OBJECT_WALK,
    REQUEST_RATE,
    DayCount,
    QueryRun,
    RuntimeSignals,
)

STRATEGY = "https://learn.microsoft.com/azure/api-management/mitigate-owasp-api-threats"
MONITOR_DOC = "https://learn.microsoft.com/azure/api-management/monitor-api-management"
LLM_LOG_DOC = "https://learn.microsoft.com/azure/api-management/api-management-howto-llm-logs"
TOP = 5  # offenders a finding names
# Hosts of Azure's AI model endpoints: an API whose service URL is one of these is an AI API.
AI_HOST_SUFFIXES = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")

_WINDOW_LONG = Param("window_minutes", 60, "Length of the window the signal counts over, in minutes.", minimum=5)
_WINDOW_SHORT = Param("window_minutes", 15, "Length of the window the signal counts over, in minutes.", minimum=5)
_BASELINE_DAYS = Param(
    "baseline_days",
    7,
    "Previous days whose same window forms the baseline (its median).",
    minimum=1,
    maximum=30,
)


def _signals(snapshot: Snapshot) -> RuntimeSignals | None:
    signals = snapshot.signals
    return signals if signals is not None and signals.missing is None else None


def _where(run: QueryRun) -> str:
    return ", ".join(run.workspaces) or "(no workspace)"


def _query_evidence(run: QueryRun) -> str:
    return f"query {run.name} over {run.window_minutes} min on {_where(run)}"


def _median_baseline(days: Sequence[DayCount], baseline_days: int) -> tuple[float, tuple[int, ...]]:
    """The median of days 1..baseline_days (a day without rows counts 0) and the values."""
    by_day = {d.days_back: d.value for d in days}
    values = tuple(by_day.get(day, 0) for day in range(1, baseline_days + 1))
    return float(statistics.median(values)), values


def _current(days: Sequence[DayCount]) -> int:
    return next((d.value for d in days if d.days_back == 0), 0)


def _number(value: float) -> str:
    return f"{value:g}"


# -- LOG-004 ----------------------------------------------------------------------------------


@rule(
    "LOG-004",
    title="Gateway logs stopped flowing, or a runtime check could not run",
    severity=Severity.MEDIUM,
    rationale=(
        "A diagnostic setting can look right while nothing arrives: the workspace was deleted or moved, "
        "its daily cap is reached, ingestion is broken or the setting points at the wrong place. Every "
        "runtime check (THR-*) and KEY-001's evidence then sees silence and calls it normal. The rule "
        "counts the service's gateway log rows in the workspace over the last `silence_minutes` and "
        "flags none at all (query `log_flow`). It also reports each runtime query that failed or "
        "answered only in part, naming the query and the check it blinds. An instance that truly has "
        "no traffic for that long looks the same: raise `silence_minutes` or exempt it. Silent when no "
        "setting sends GatewayLogs to a workspace (LOG-001 says so) and when the signals were not read."
    ),
    references=References(mcsb=("LT-3", "LT-4"), owasp_api=("API8:2023",), docs=(MONITOR_DOC,)),
    params=[
        Param(
            "silence_minutes",
            60,
            "Minutes without a single gateway log row after which the logs count as stopped.",
            minimum=5,
            maximum=10080,
        )
    ],
    queries=[(LOG_FLOW, kql.LOG_FLOW)],
)
def logs_stopped(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    if signals is None:
        return []
    found: list[Finding] = []
    for run in signals.runs:
        if run.problem is None:
            continue
        found.append(
            rule.finding(
                snapshot,
                message=(
                    f"Runtime query '{run.name}' on '{snapshot.service.name}' did not answer in full, so its check is "
                    f"blind: {run.problem}."
                ),
                path=f"signals.{run.name}",
                actual=run.problem,
                expected=f"the query answers ({run.window_minutes} min window)",
                entry=run.name,
            )
        )
    flow = signals.answered(LOG_FLOW)
    if flow is not None and signals.log_rows == 0:
        minutes = int(params["silence_minutes"])
        last = signals.last_row.isoformat() if signals.last_row else "none in the last day"
        found.append(
            rule.finding(
                snapshot,
                message=(
                    f"No gateway log row of '{snapshot.service.name}' reached {_where(flow)} ({signals.table}) in the "
                    f"last {minutes} minutes, although a diagnostic setting sends them there (newest row: {last})."
                ),
                path="signals.log_flow",
                actual=f"0 rows in {minutes} min; newest row {last}; {_query_evidence(flow)}",
                expected="at least one gateway log row in the window",
            )
        )
    return found


# -- THR-001 ----------------------------------------------------------------------------------


@rule(
    "THR-001",
    title="Request rate far above its baseline",
    severity=Severity.HIGH,
    rationale=(
        "The API-security strategy the product follows: establish a baseline and flag a 1000% jump. The "
        "rule counts the service's gateway requests in the last `window_minutes` and in the same window "
        "of each of the previous `baseline_days` days (query `request_rate`); the baseline is the median "
        "of those days, so a daily peak that recurs at the same hour is part of its own baseline and stays "
        "quiet. It fires when the window holds at least `factor` times the baseline (default 10, the "
        "strategy's 1000%) and at least `min_requests` requests. Silent without a baseline (median 0: "
        "a new or idle service has nothing to compare against)."
    ),
    references=References(mcsb=("LT-1",), owasp_api=("API4:2023",), docs=(STRATEGY,)),
    params=[
        _WINDOW_LONG,
        _BASELINE_DAYS,
        Param("factor", 10.0, "Multiple of the baseline that counts as a spike (10 = +900%).", minimum=1.0),
        Param("min_requests", 100, "Fewer requests than this in the window never count as a spike.", minimum=1),
    ],
    queries=[(REQUEST_RATE, kql.REQUEST_RATE)],
)
def request_spike(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    run = signals.answered(REQUEST_RATE) if signals else None
    if signals is None or run is None:
        return []
    baseline, days = _median_baseline(signals.requests_by_day, int(params["baseline_days"]))
    current = _current(signals.requests_by_day)
    factor = float(params["factor"])
    if baseline <= 0 or current < int(params["min_requests"]) or current < factor * baseline:
        return []
    return [
        rule.finding(
            snapshot,
            message=(
                f"'{snapshot.service.name}' served {current} requests in the last {run.window_minutes} minutes, "
                f"{_number(current / baseline)}x its baseline of {_number(baseline)} (median of the same window over "
                f"the previous {len(days)} days)."
            ),
            path="signals.request_rate",
            actual=f"{current} requests; baseline {_number(baseline)} from {list(days)}; {_query_evidence(run)}",
            expected=f"fewer than {_number(factor)}x the baseline ({_number(factor * baseline)})",
        )
    ]


# -- THR-002 ----------------------------------------------------------------------------------


@rule(
    "THR-002",
    title="401/403 storm from one caller or on one subscription",
    severity=Severity.HIGH,
    rationale=(
        "Many authentication or authorization failures in a short window are credential stuffing, key "
        "guessing or a client probing what it may reach (OWASP API2). The rule counts 401 and 403 answers "
        "in the last `window_minutes` (query `auth_failures`) per caller IP and per APIM subscription, "
        "and fires for each dimension where one caller or one subscription has more than "
        "`max_failures`, naming the top offenders."
    ),
    references=References(mcsb=("LT-1",), owasp_api=("API2:2023",), docs=(STRATEGY,)),
    params=[_WINDOW_SHORT, Param("max_failures", 100, "401/403 answers one caller may get in the window.", minimum=1)],
    queries=[(AUTH_FAILURES, kql.AUTH_FAILURES)],
)
def auth_failure_storm(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    run = signals.answered(AUTH_FAILURES) if signals else None
    if signals is None or run is None:
        return []
    limit = int(params["max_failures"])
    found: list[Finding] = []
    for dimension, label in (("caller_ip", "client IP"), ("subscription", "APIM subscription")):
        totals: dict[str, int] = {}
        for row in signals.auth_failures:
            key = row.caller_ip if dimension == "caller_ip" else row.subscription
            if key:
                totals[key] = totals.get(key, 0) + row.failures
        over = sorted(((n, k) for k, n in totals.items() if n > limit), key=lambda t: (-t[0], t[1]))
        if not over:
            continue
        top = ", ".join(f"{k} ({n})" for n, k in over[:TOP])
        found.append(
            rule.finding(
                snapshot,
                message=(
                    f"{len(over)} {label}(s) got more than {limit} 401/403 answers from '{snapshot.service.name}' "
                    f"in the last {run.window_minutes} minutes; top: {top}."
                ),
                path="signals.auth_failures",
                actual=f"{top}; {_query_evidence(run)}",
                expected=f"at most {limit} per {label}",
                entry=dimension,
            )
        )
    return found


# -- THR-003 ----------------------------------------------------------------------------------


@rule(
    "THR-003",
    title="Subscription key used from many client IPs (leaked key)",
    severity=Severity.HIGH,
    rationale=(
        "A subscription key belongs to one client; used from everywhere at once, it has leaked (a public "
        "repository, a mobile app, a paste). The rule counts distinct client IPs per APIM subscription in "
        "the last `window_minutes` (query `key_spread`) and fires for each subscription seen from more "
        "than `max_client_ips`, naming some of the IPs. Remedy: rotate the key and revoke the old one; "
        "the rule is detect-only until key rotation (issue 12) lands, and a gateway pool or NAT in front "
        "of many clients can look the same (raise the threshold or exempt the subscription)."
    ),
    references=References(mcsb=("IM-8", "LT-1"), owasp_api=("API2:2023",), docs=(STRATEGY,)),
    params=[
        _WINDOW_LONG,
        Param("max_client_ips", 10, "Distinct client IPs one subscription may be used from in the window.", minimum=1),
    ],
    queries=[(KEY_SPREAD, kql.KEY_SPREAD)],
)
def leaked_key(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    run = signals.answered(KEY_SPREAD) if signals else None
    if signals is None or run is None:
        return []
    limit = int(params["max_client_ips"])
    ids = {s.sid.lower(): s.id for s in snapshot.subscriptions}
    found: list[Finding] = []
    for spread in sorted(signals.key_spread, key=lambda s: (-s.ips, s.subscription)):
        if spread.ips <= limit or not spread.subscription:
            continue
        sample = ", ".join(spread.sample_ips[:TOP])
        found.append(
            rule.finding(
                snapshot,
                resource_id=ids.get(spread.subscription.lower()),
                message=(
                    f"APIM subscription '{spread.subscription}' of '{snapshot.service.name}' was used from "
                    f"{spread.ips} distinct client IPs in the last {run.window_minutes} minutes ({spread.requests} "
                    f"requests; e.g. {sample}): its key has probably leaked."
                ),
                path="signals.key_spread",
                actual=f"{spread.ips} client IPs, {spread.requests} requests, e.g. {sample}; {_query_evidence(run)}",
                expected=f"at most {limit} client IPs",
                entry=spread.subscription.lower(),
            )
        )
    return found


# -- THR-004 ----------------------------------------------------------------------------------


@rule(
    "THR-004",
    title="One caller walking many object ids (BOLA)",
    severity=Severity.HIGH,
    rationale=(
        "Broken object level authorization is the top API risk (OWASP API1): a caller that requests one "
        "operation for many different object ids is enumerating objects that may not be theirs. The "
        "rule counts, per caller IP and operation, the distinct URL paths requested in the last "
        "`window_minutes` (query `object_walk`; the query string is cut off, so the ids are those in the "
        "path) and fires for each caller above `max_object_ids` on one operation."
    ),
    references=References(mcsb=("LT-1",), owasp_api=("API1:2023",), docs=(STRATEGY,)),
    params=[
        _WINDOW_SHORT,
        Param("max_object_ids", 50, "Distinct object ids one caller may request on one operation.", minimum=1),
    ],
    queries=[(OBJECT_WALK, kql.OBJECT_WALK)],
)
def object_walk(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    run = signals.answered(OBJECT_WALK) if signals else None
    if signals is None or run is None:
        return []
    limit = int(params["max_object_ids"])
    found: list[Finding] = []
    for walk in sorted(signals.object_walks, key=lambda w: (-w.ids, w.caller_ip, w.api, w.operation)):
        if walk.ids <= limit:
            continue
        subs = f" with subscription(s) {', '.join(walk.subscriptions)}" if walk.subscriptions else ""
        found.append(
            rule.finding(
                snapshot,
                message=(
                    f"Client {walk.caller_ip or '(unknown IP)'}{subs} requested {walk.ids} distinct objects of "
                    f"operation {walk.api}/{walk.operation} on '{snapshot.service.name}' in the last "
                    f"{run.window_minutes} minutes ({walk.requests} requests): an object-id walk (BOLA)."
                ),
                path="signals.object_walk",
                actual=f"{walk.ids} object ids, {walk.requests} requests; {_query_evidence(run)}",
                expected=f"at most {limit} object ids per caller and operation",
                entry=f"{walk.caller_ip} {walk.api}/{walk.operation}".lower(),
            )
        )
    return found


# -- THR-005 ----------------------------------------------------------------------------------


def _ai_apis(snapshot: Snapshot, named: Sequence[str]) -> dict[str, str]:
    """AI APIs by lowercased name: those named in the policy and those whose service URL is an
    Azure AI model endpoint."""
    found = {n.strip().lower(): n.strip() for n in named if n.strip()}
    for api in snapshot.apis:
        try:
            host = (urlsplit(api.service_url or "").hostname or "").lower()
        except ValueError:
            continue
        if host.endswith(AI_HOST_SUFFIXES):
            found[api.name.lower()] = api.name
    return found


@rule(
    "THR-005",
    title="AI API abused (LLM-jacking): many callers or a token surge",
    severity=Severity.HIGH,
    rationale=(
        "A stolen key to a language-model API is worth money: attackers resell it and run up token bills "
        "(LLM-jacking). The rule watches the AI APIs (those whose service URL is an Azure OpenAI / AI "
        "Services endpoint, plus any named in `ai_apis`): it fires for an AI API called from more than "
        "`max_client_ips` distinct client IPs in the last `window_minutes` (query `api_callers`), and "
        "when the service's language-model tokens in the window (query `llm_tokens`, from "
        "ApiManagementGatewayLlmLog where a setting sends GatewayLlmLogs resource-specific) reach "
        "`token_factor` times the median of the same window over the previous `baseline_days` days and "
        "at least `min_tokens`."
    ),
    references=References(mcsb=("LT-1",), owasp_api=("API6:2023",), docs=(STRATEGY, LLM_LOG_DOC)),
    params=[
        _WINDOW_LONG,
        _BASELINE_DAYS,
        Param("max_client_ips", 20, "Distinct client IPs one AI API may be called from in the window.", minimum=1),
        Param("token_factor", 10.0, "Multiple of the token baseline that counts as a surge.", minimum=1.0),
        Param("min_tokens", 10000, "Fewer tokens than this in the window never count as a surge.", minimum=1),
        Param("ai_apis", (), "Names of further APIs to treat as AI APIs (besides Azure AI endpoints)."),
    ],
    queries=[(API_CALLERS, kql.API_CALLERS), (LLM_TOKENS, kql.LLM_TOKENS)],
)
def llm_jacking(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    signals = _signals(snapshot)
    if signals is None:
        return []
    found: list[Finding] = []
    callers = signals.answered(API_CALLERS)
    ai = _ai_apis(snapshot, tuple(params["ai_apis"]))
    limit = int(params["max_client_ips"])
    if callers is not None and ai:
        ids = {a.name.lower(): a.id for a in snapshot.apis}
        for api in sorted(signals.api_callers, key=lambda a: (-a.ips, a.api)):
            name = api.api.split(";", 1)[0].lower()  # "name;rev=2" is a revision of the API
            if name not in ai or api.ips <= limit:
                continue
            sample = ", ".join(api.sample_ips[:TOP])
            found.append(
                rule.finding(
                    snapshot,
                    resource_id=ids.get(name),
                    message=(
                        f"AI API '{ai[name]}' of '{snapshot.service.name}' was called from {api.ips} distinct client "
                        f"IPs in the last {callers.window_minutes} minutes ({api.requests} requests; e.g. {sample})."
                    ),
                    path="signals.api_callers",
                    actual=f"{api.ips} client IPs, {api.requests} requests, e.g. {sample}; {_query_evidence(callers)}",
                    expected=f"at most {limit} client IPs",
                    entry=f"callers {name}",
                )
            )
    tokens = signals.answered(LLM_TOKENS)
    if tokens is not None:
        baseline, days = _median_baseline(signals.tokens_by_day, int(params["baseline_days"]))
        current = _current(signals.tokens_by_day)
        factor = float(params["token_factor"])
        if baseline > 0 and current >= int(params["min_tokens"]) and current >= factor * baseline:
            found.append(
                rule.finding(
                    snapshot,
                    message=(
                        f"'{snapshot.service.name}' passed {current} language-model tokens in the last "
                        f"{tokens.window_minutes} minutes, {_number(current / baseline)}x its baseline of "
                        f"{_number(baseline)} (median of the same window over the previous {len(days)} days)."
                    ),
                    path="signals.llm_tokens",
                    actual=(
                        f"{current} tokens; baseline {_number(baseline)} from {list(days)}; {_query_evidence(tokens)}"
                    ),
                    expected=f"fewer than {_number(factor)}x the baseline ({_number(factor * baseline)})",
                    entry="tokens",
                )
            )
    return found
