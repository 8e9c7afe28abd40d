"""The production signals reader: the queries of `shared.signal_queries` through the async
`LogsQueryClient` against the workspaces the instance's diagnostic settings send to.

Which workspaces and which table: the settings (from the snapshot) that send GatewayLogs
(category, or the allLogs group) to a workspace. A workspace written resource-specific
(`destination type: Dedicated`) is read from `ApiManagementGatewayLogs`; when no setting
writes resource-specific, the legacy `AzureDiagnostics` table is read instead. The LLM
token query runs on the workspaces that receive GatewayLlmLogs resource-specific (its table
exists only there). ARM gives each workspace's customerId (Workspaces - Get), the id the
query API takes.

A failure never raises: a workspace that cannot be read, a query Log Analytics refuses or
answers only in part becomes that query's `problem` (LOG-004 reports it; the rule that
needed it stays silent). Counts from several workspaces are added; distinct counts (IPs,
paths) cannot be added, so the largest per key is kept.

Azure actions: Microsoft.OperationalInsights/workspaces/read (customerId) and
Microsoft.OperationalInsights/workspaces/query/read (the queries), on each workspace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import AzureError
from azure.monitor.query import LogsQueryStatus

from shared import signal_queries as kql
from shared import signals as names
from shared.actions.executor import ArmApi
from shared.armapi import AzureArm
from shared.azure import ClientFactory
from shared.errors import RemediatorError, error_code_and_message
from shared.model import DiagnosticSetting, Snapshot
from shared.rules import REGISTRY
from shared.signals import (
    ApiCallers,
    CallerFailures,
    DayCount,
    KeySpread,
    ObjectWalk,
    QueryRun,
    RuntimeSignals,
)

WORKSPACE_API_VERSION = "2023-09-01"
QUERY_TIMEOUT = 60  # seconds Log Analytics may spend on one query
QUERY_ACTION = "Microsoft.OperationalInsights/workspaces/query/read"
LOOKBACK_DAYS_LOG_FLOW = 1  # how far back LOG-004 looks for the newest row
# What Log Analytics says (SEM0100) about a table the workspace does not have (yet).
_ABSENT_TABLE = "Failed to resolve table or column expression named"

Row = dict[str, Any]


@dataclass(frozen=True)
class _Workspace:
    resource_id: str
    legacy: bool  # AzureDiagnostics shape

    @property
    def name(self) -> str:
        return self.resource_id.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Ask:
    """One signal query to run on some workspaces."""

    name: str
    template: str
    service_id: str
    window: int  # minutes
    span: timedelta  # what Log Analytics scans
    on: list[_Workspace]

    def table(self, workspace: _Workspace) -> str:
        """The table the query reads on `workspace`."""
        if self.template == kql.LLM_TOKENS:
            return kql.LLM_TABLE
        return kql.LEGACY_TABLE if workspace.legacy else kql.GATEWAY_TABLE

    def query(self, workspace: _Workspace) -> str:
        return kql.build(self.template, self.service_id, legacy=workspace.legacy, window_minutes=self.window)


@dataclass
class _Answer:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    workspaces: list[str] = field(default_factory=list)


def _enabled(setting: DiagnosticSetting, categories: set[str]) -> bool:
    return bool(setting.workspace_id) and any(
        log.enabled and ((log.category or "").lower() in categories or (log.category_group or "").lower() == "alllogs")
        for log in setting.logs
    )


def _dedicated(setting: DiagnosticSetting) -> bool:
    return (setting.destination_type or "").lower() == "dedicated"


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _strings(value: Any) -> tuple[str, ...]:
    """A dynamic array cell: Log Analytics sends it as JSON text, the twin as a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else []
        except ValueError:
            return ()
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value if v not in (None, ""))


def merged_params(params: Mapping[str, Mapping[str, Any]], rule_id: str) -> dict[str, Any] | None:
    """The rule's defaults overridden by `params[rule_id]`; None when the rule is not asked for."""
    if rule_id not in params:
        return None
    values: dict[str, Any] = REGISTRY[rule_id].defaults()
    values.update(params[rule_id])
    return values


class AzureSignalsSource:
    """Reads `RuntimeSignals` for one instance with the factory's Logs client and ARM pipeline."""

    def __init__(self, factory: ClientFactory, *, arm: ArmApi | None = None) -> None:
        self.factory = factory
        self.arm: ArmApi = arm or AzureArm(factory)

    async def read(self, snapshot: Snapshot, params: Mapping[str, Mapping[str, Any]]) -> RuntimeSignals:
        """The signals the rules in `params` (rule id -> parameters) need; never raises for Azure."""
        if not snapshot.readable("diagnostic_settings"):
            return RuntimeSignals(
                table="",
                missing=(
                    "the service's diagnostic settings could not be read, so no workspace is known to hold its logs"
                ),
            )
        gateway = [s for s in snapshot.diagnostic_settings if _enabled(s, {"gatewaylogs"})]
        dedicated = [s for s in gateway if _dedicated(s)]
        chosen = dedicated or gateway
        if not chosen:
            return RuntimeSignals(
                table="", missing="no diagnostic setting sends the service's GatewayLogs to a Log Analytics workspace"
            )
        legacy = not dedicated
        workspaces = list(
            {s.workspace_id.lower(): _Workspace(s.workspace_id, legacy) for s in chosen if s.workspace_id}.values()
        )
        llm_settings = [s for s in snapshot.diagnostic_settings if _enabled(s, {"gatewayllmlogs"}) and _dedicated(s)]
        llm_workspaces = list(
            {s.workspace_id.lower(): _Workspace(s.workspace_id, False) for s in llm_settings if s.workspace_id}.values()
        )
        customer_ids = await self._customer_ids({w.resource_id.lower(): w for w in [*workspaces, *llm_workspaces]})
        service = snapshot.service.id
        plan: list[_Ask] = []

        def ask(name: str, rule_id: str, template: str, window_key: str, days: int, on: list[_Workspace]) -> None:
            values = merged_params(params, rule_id)
            if values is None or not on:
                return
            window = int(values[window_key])
            back = int(values["baseline_days"]) if days < 0 else days
            plan.append(_Ask(name, template, service, window, kql.lookback(window, back), on))

        ask(names.LOG_FLOW, "LOG-004", kql.LOG_FLOW, "silence_minutes", LOOKBACK_DAYS_LOG_FLOW, workspaces)
        ask(names.REQUEST_RATE, "THR-001", kql.REQUEST_RATE, "window_minutes", -1, workspaces)
        ask(names.AUTH_FAILURES, "THR-002", kql.AUTH_FAILURES, "window_minutes", 0, workspaces)
        ask(names.KEY_SPREAD, "THR-003", kql.KEY_SPREAD, "window_minutes", 0, workspaces)
        ask(names.OBJECT_WALK, "THR-004", kql.OBJECT_WALK, "window_minutes", 0, workspaces)
        ask(names.API_CALLERS, "THR-005", kql.API_CALLERS, "window_minutes", 0, workspaces)
        ask(names.LLM_TOKENS, "THR-005", kql.LLM_TOKENS, "window_minutes", -1, llm_workspaces)

        answers = await asyncio.gather(*(self._run_on(item, customer_ids) for item in plan))
        runs: list[QueryRun] = []
        results: dict[str, _Answer] = {}
        for item, answer in zip(plan, answers, strict=True):
            runs.append(
                QueryRun(
                    name=item.name,
                    kql=item.query(item.on[0]),
                    window_minutes=item.window,
                    workspaces=tuple(answer.workspaces),
                    problem="; ".join(answer.problems) or None,
                )
            )
            results[item.name] = answer
        return self._signals(legacy, workspaces, bool(llm_workspaces), runs, results)

    async def _customer_ids(self, workspaces: Mapping[str, _Workspace]) -> dict[str, str | Exception]:
        """customerId per workspace id (lowercased), or the problem reading it."""
        found: dict[str, str | Exception] = {}
        for key, workspace in workspaces.items():
            try:
                response = await self.arm.send("GET", workspace.resource_id, WORKSPACE_API_VERSION)
            except RemediatorError as error:
                found[key] = RuntimeError(f"reading workspace {workspace.name} failed ({error})")
                continue
            body = response.body if isinstance(response.body, dict) else {}
            customer_id = (body.get("properties") or {}).get("customerId") if response.status < 400 else None
            if customer_id:
                found[key] = str(customer_id)
                continue
            code, message = error_code_and_message(body)
            refused = code in ("AuthorizationFailed", "LinkedAuthorizationFailed") and message
            detail = f": {message[:500]}" if refused else ""
            found[key] = RuntimeError(
                f"reading workspace {workspace.name} failed ({response.status} {code or 'no customerId'}{detail})"
            )
        return found

    async def _run_on(self, item: _Ask, customer_ids: Mapping[str, str | Exception]) -> _Answer:
        answer = _Answer()
        for workspace in item.on:
            customer = customer_ids.get(workspace.resource_id.lower())
            if not isinstance(customer, str):
                answer.problems.append(str(customer or f"workspace {workspace.name} was not read"))
                continue
            problem = await self._query(
                workspace, customer, item.query(workspace), item.span, answer.rows, item.table(workspace)
            )
            if problem:
                answer.problems.append(problem)
            else:
                answer.workspaces.append(workspace.name)
        return answer

    async def _query(
        self, workspace: _Workspace, customer_id: str, query: str, span: timedelta, rows: list[Row], table_name: str
    ) -> str | None:
        try:
            result = await self.factory.logs_async().query_workspace(
                customer_id, query, timespan=span, server_timeout=QUERY_TIMEOUT
            )
        except AzureError as error:
            if f"{_ABSENT_TABLE} '{table_name}'" in str(error):
                # A workspace creates a resource-specific table with its first row: a table
                # that does not exist holds no rows (LOG-004 then sees the silence).
                return None
            first_line = (str(error).splitlines() or [""])[0][:200]
            hint = (
                f"; the identity needs {QUERY_ACTION!r} on the workspace"
                if "InsufficientAccessError" in str(error)
                else ""
            )
            return f"querying workspace {workspace.name} failed ({type(error).__name__}: {first_line}){hint}"
        if result.status != LogsQueryStatus.SUCCESS:
            return f"querying workspace {workspace.name} returned a partial result"
        for table in result.tables:
            for row in table.rows:
                rows.append(dict(zip(table.columns, row, strict=False)))
        return None

    @staticmethod
    def _signals(
        legacy: bool,
        workspaces: list[_Workspace],
        llm_log: bool,
        runs: list[QueryRun],
        results: Mapping[str, _Answer],
    ) -> RuntimeSignals:
        def rows(name: str) -> list[Row]:
            answer = results.get(name)
            return answer.rows if answer is not None else []

        flow = rows(names.LOG_FLOW)
        last_rows = [t for r in flow if (t := _utc(r.get("last_seen"))) is not None]
        queried = [t for r in flow if (t := _utc(r.get("queried_at"))) is not None]
        return RuntimeSignals(
            table=kql.LEGACY_TABLE if legacy else kql.GATEWAY_TABLE,
            workspaces=tuple(w.name for w in workspaces),
            queried_at=max(queried) if queried else None,
            runs=tuple(runs),
            log_rows=sum(_int(r.get("rows")) for r in flow),
            last_row=max(last_rows) if last_rows else None,
            requests_by_day=_by_day(rows(names.REQUEST_RATE), "requests"),
            auth_failures=_auth_failures(rows(names.AUTH_FAILURES)),
            key_spread=_key_spread(rows(names.KEY_SPREAD)),
            object_walks=_object_walks(rows(names.OBJECT_WALK)),
            api_callers=_api_callers(rows(names.API_CALLERS)),
            llm_log=llm_log,
            tokens_by_day=_by_day(rows(names.LLM_TOKENS), "tokens"),
        )


def _by_day(rows: list[Row], column: str) -> tuple[DayCount, ...]:
    totals: dict[int, int] = {}
    for r in rows:
        day = _int(r.get("days_back"))
        totals[day] = totals.get(day, 0) + _int(r.get(column))
    return tuple(DayCount(day, value) for day, value in sorted(totals.items()))


def _auth_failures(rows: list[Row]) -> tuple[CallerFailures, ...]:
    totals: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (str(r.get("CallerIpAddress") or ""), str(r.get("ApimSubscriptionId") or ""))
        totals[key] = totals.get(key, 0) + _int(r.get("failures"))
    return tuple(CallerFailures(ip, sub, n) for (ip, sub), n in totals.items())


def _key_spread(rows: list[Row]) -> tuple[KeySpread, ...]:
    found: dict[str, KeySpread] = {}
    for r in rows:
        sub = str(r.get("ApimSubscriptionId") or "")
        before = found.get(sub.lower())
        ips, requests, sample = _int(r.get("ips")), _int(r.get("requests")), _strings(r.get("sample_ips"))
        if before is not None:
            ips, requests = max(ips, before.ips), requests + before.requests
            sample = tuple(dict.fromkeys((*before.sample_ips, *sample)))[:10]
        found[sub.lower()] = KeySpread(sub, ips, requests, sample)
    return tuple(found.values())


def _object_walks(rows: list[Row]) -> tuple[ObjectWalk, ...]:
    found: dict[tuple[str, str, str], ObjectWalk] = {}
    for r in rows:
        ip, api, op = (str(r.get(c) or "") for c in ("CallerIpAddress", "ApiId", "OperationId"))
        key = (ip, api.lower(), op.lower())
        before = found.get(key)
        ids, requests, subs = _int(r.get("ids")), _int(r.get("requests")), _strings(r.get("subscriptions"))
        if before is not None:
            ids, requests = max(ids, before.ids), requests + before.requests
            subs = tuple(dict.fromkeys((*before.subscriptions, *subs)))[:5]
        found[key] = ObjectWalk(ip, api, op, ids, requests, subs)
    return tuple(found.values())


def _api_callers(rows: list[Row]) -> tuple[ApiCallers, ...]:
    found: dict[str, ApiCallers] = {}
    for r in rows:
        api = str(r.get("ApiId") or "")
        before = found.get(api.lower())
        ips, requests, sample = _int(r.get("ips")), _int(r.get("requests")), _strings(r.get("sample_ips"))
        if before is not None:
            ips, requests = max(ips, before.ips), requests + before.requests
            sample = tuple(dict.fromkeys((*before.sample_ips, *sample)))[:10]
        found[api.lower()] = ApiCallers(api, ips, requests, sample)
    return tuple(found.values())
