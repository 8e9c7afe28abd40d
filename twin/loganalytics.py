"""Azure Monitor Logs query (`POST /v1/workspaces/{id}/query`) over rows seeded per
workspace, evaluated with the documented KQL subset in `twin.kql`; and, on the ARM port, the
workspace resource itself (`setup_arm`: Workspaces - Get), whose `properties.customerId` is
the id the query API takes.

Estate section `workspaces`: `{name, customer_id, tables: {TableName: {columns?: {col:
type}, rows: [{col: value, ago: "5m"}]}}}`. `ago` sets TimeGenerated relative to the twin
clock at seeding time. ApiManagementGatewayLogs and ApiManagementGatewayLlmLog have their real
column sets by default, AzureDiagnostics the common columns and APIM's flattened GatewayLogs fields.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from twin.arm import provider_version_error, resource_group_or_404, resource_not_found, subscription_or_404
from twin.estate import EstateError, SeedContext, register_seeder
from twin.kql import Column, KqlError, Table, run_query
from twin.state import TwinState
from twin.web import LRO_FAIL, ServiceError, add_route, json_response, params, read_json, state_of

WORKSPACE_TYPE = "Microsoft.OperationalInsights/workspaces"
WORKSPACE_PATH = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.OperationalInsights/workspaces/{ws}"
# Workspaces - Get (Microsoft Learn, REST API "Workspaces - Get"; azure-rest-api-specs
# specification/operationalinsights/resource-manager/Microsoft.OperationalInsights/OperationalInsights/
# stable/<version>/Workspaces.json): the stable versions.
WORKSPACE_VERSIONS = frozenset({"2020-08-01", "2020-10-01", "2021-06-01", "2022-10-01", "2023-09-01", "2025-02-01"})
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_ISO_DURATION = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)

GATEWAY_LOG_COLUMNS: dict[str, str] = {
    "TimeGenerated": "datetime",
    "OperationName": "string",
    "CorrelationId": "string",
    "Region": "string",
    "IsRequestSuccess": "bool",
    "Category": "string",
    "TotalTime": "long",
    "CallerIpAddress": "string",
    "Method": "string",
    "Url": "string",
    "ClientProtocol": "string",
    "ResponseCode": "int",
    "BackendMethod": "string",
    "BackendUrl": "string",
    "BackendResponseCode": "int",
    "BackendProtocol": "string",
    "RequestSize": "int",
    "ResponseSize": "int",
    "Cache": "string",
    "BackendTime": "long",
    "ApiId": "string",
    "OperationId": "string",
    "ProductId": "string",
    "UserId": "string",
    "ApimSubscriptionId": "string",
    "BackendId": "string",
    "ApiRevision": "string",
    "ClientTlsVersion": "string",
    "LastErrorReason": "string",
    "LastErrorMessage": "string",
    "RequestHeaders": "dynamic",
    "ResponseHeaders": "dynamic",
    "_ResourceId": "string",
    "Type": "string",
}
# ApiManagementGatewayLlmLog (Azure Monitor Logs table reference): the LLM gateway log, one
# row per language-model request; joined to ApiManagementGatewayLogs by CorrelationId.
GATEWAY_LLM_LOG_COLUMNS: dict[str, str] = {
    "TimeGenerated": "datetime",
    "ApiVersion": "string",
    "CompletionTokens": "int",
    "CorrelationId": "string",
    "DeploymentName": "string",
    "IsStreamCompletion": "bool",
    "ModelName": "string",
    "OperationName": "string",
    "PromptTokens": "int",
    "Region": "string",
    "RequestId": "string",
    "RequestMessages": "dynamic",
    "ResponseMessages": "dynamic",
    "SequenceNumber": "int",
    "TotalTokens": "int",
    "_ResourceId": "string",
    "Type": "string",
}
# AzureDiagnostics (the legacy "Azure diagnostics" destination mode): the common columns and
# APIM GatewayLogs' properties as Azure Monitor flattens them (name_s string, name_d number).
# The real table has hundreds of columns from every resource type; an estate adds what it needs.
AZURE_DIAGNOSTICS_COLUMNS: dict[str, str] = {
    "TimeGenerated": "datetime",
    "ResourceId": "string",
    "_ResourceId": "string",
    "ResourceProvider": "string",
    "Category": "string",
    "OperationName": "string",
    "CallerIPAddress": "string",
    "method_s": "string",
    "url_s": "string",
    "responseCode_d": "real",
    "apiId_s": "string",
    "operationId_s": "string",
    "apimSubscriptionId_s": "string",
    "Type": "string",
}
DEFAULT_COLUMNS = {
    "ApiManagementGatewayLogs": GATEWAY_LOG_COLUMNS,
    "ApiManagementGatewayLlmLog": GATEWAY_LLM_LOG_COLUMNS,
    "AzureDiagnostics": AZURE_DIAGNOSTICS_COLUMNS,
}
KQL_TYPES = {"string", "datetime", "long", "int", "real", "bool", "dynamic", "guid", "timespan"}


def parse_span(text: str) -> timedelta:
    match = _SPAN.match(text.strip())
    if not match:
        raise EstateError(f"'{text}' is not a timespan like 30m, 2h, 1d")
    number, unit = float(match.group(1)), match.group(2)
    return {
        "ms": timedelta(milliseconds=number),
        "s": timedelta(seconds=number),
        "m": timedelta(minutes=number),
        "h": timedelta(hours=number),
        "d": timedelta(days=number),
    }[unit]


def _parse_datetime(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso_duration(text: str) -> timedelta:
    match = _ISO_DURATION.match(text)
    if not match or text in ("P", "PT"):
        raise ValueError(text)
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def parse_timespan(text: str, now: datetime) -> tuple[datetime, datetime]:
    """ISO 8601 interval as Log Analytics takes it: duration, start/end, start/duration, duration/end."""
    try:
        if "/" not in text:
            return now - _iso_duration(text), now
        first, second = text.split("/", 1)
        if first.startswith("P"):
            end = _parse_datetime(second)
            return end - _iso_duration(first), end
        start = _parse_datetime(first)
        if second.startswith("P"):
            return start, start + _iso_duration(second)
        return start, _parse_datetime(second)
    except ValueError as error:
        raise ServiceError(
            400,
            "BadArgumentError",
            f"The request had some invalid properties: timespan '{text}' is not an ISO 8601 interval.",
        ) from error


def _convert(value: Any, kind: str, where: str) -> Any:
    if value is None:
        return None
    try:
        if kind == "datetime":
            return value if isinstance(value, datetime) else _parse_datetime(str(value))
        if kind in ("int", "long"):
            return int(value)
        if kind == "real":
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind == "timespan":
            return value if isinstance(value, timedelta) else parse_span(str(value))
        if kind == "dynamic":
            return value
        return str(value)
    except (TypeError, ValueError) as error:
        raise EstateError(f"{where}: {value!r} is not a {kind}") from error


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    workspaces: dict[str, Any] = state.extra.setdefault("workspaces", {})
    now = state.clock.now()
    for i, item in enumerate(items):
        where = f"[{i}]"
        name = item.get("name")
        customer_id = str(item.get("customer_id", uuid.uuid4()))
        if not isinstance(name, str) or not name:
            raise EstateError(f"{where}.name: required")
        if not _GUID.match(customer_id):
            raise EstateError(f"{where}.customer_id: a workspace id (GUID) is required")
        resource_id = f"{ctx.group_id}/providers/{WORKSPACE_TYPE}/{name}"
        state.store.put(
            resource_id,
            {
                "id": resource_id,
                "name": name,
                "type": WORKSPACE_TYPE,
                "location": ctx.location,
                "properties": {"customerId": customer_id, "provisioningState": "Succeeded", "retentionInDays": 30},
            },
        )
        tables: dict[str, Any] = {}
        for table_name, spec in (item.get("tables") or {}).items():
            columns = dict(DEFAULT_COLUMNS.get(table_name, {}))
            columns.update(spec.get("columns") or {})
            bad = {c: t for c, t in columns.items() if t not in KQL_TYPES}
            if bad:
                raise EstateError(f"{where}.tables.{table_name}.columns: unknown types {bad}")
            if "TimeGenerated" not in columns:
                columns["TimeGenerated"] = "datetime"
            rows = []
            for j, raw in enumerate(spec.get("rows") or []):
                row = dict.fromkeys(columns)
                for key, value in raw.items():
                    if key == "ago":
                        row["TimeGenerated"] = now - parse_span(str(value))
                    elif key == "repeat":
                        continue
                    elif key not in columns:
                        raise EstateError(f"{where}.tables.{table_name}.rows[{j}]: unknown column '{key}'")
                    else:
                        row[key] = _convert(value, columns[key], f"{where}.tables.{table_name}.rows[{j}].{key}")
                if row["TimeGenerated"] is None:
                    row["TimeGenerated"] = now
                if table_name in DEFAULT_COLUMNS:
                    row["Type"] = table_name
                rows.extend([row] * int(raw.get("repeat", 1)))
            tables[table_name] = {"columns": columns, "rows": rows}
        workspaces[customer_id.lower()] = {"resource_id": resource_id, "tables": tables}


register_seeder("workspaces", seed)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, timedelta):
        total = value.total_seconds()
        hours, rest = divmod(abs(total), 3600)
        minutes, seconds = divmod(rest, 60)
        sign = "-" if total < 0 else ""
        return f"{sign}{int(hours):02d}:{int(minutes):02d}:{seconds:09.6f}"
    return value


def _query_error(message: str, inner: str) -> ServiceError:
    return ServiceError(
        400,
        "BadArgumentError",
        "The request had some invalid properties",
        correlationId=str(uuid.uuid4()),
        innererror={"code": inner, "message": message},
    )


async def _run(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    state = state_of(request)
    workspace_id = params(request)["workspace"].lower()
    workspace = state.extra.get("workspaces", {}).get(workspace_id)
    if workspace is None:
        raise ServiceError(404, "WorkspaceNotFoundError", f"Workspace {workspace_id} not found.")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _query_error("'query' is required and must be a non-empty string.", "EmptyQuery")
    if body.get("workspaces"):
        raise _query_error("cross-workspace queries ('workspaces') are not supported by the twin.", "NotSupported")
    now = state.clock.now()
    timespan = parse_timespan(str(body["timespan"]), now) if body.get("timespan") else None
    tables = {
        name: Table(
            columns=tuple(Column(c, t) for c, t in spec["columns"].items()),
            rows=tuple(spec["rows"]),
        )
        for name, spec in workspace["tables"].items()
    }
    try:
        result = run_query(query, tables, now=now, timespan=timespan)
    except KqlError as error:
        raise _query_error(str(error), "SemanticError") from error
    answer: dict[str, Any] = {
        "tables": [
            {
                "name": "PrimaryResult",
                "columns": [{"name": c.name, "type": c.type} for c in result.columns],
                "rows": [[_json_value(v) for v in row] for row in result.rows],
            }
        ]
    }
    fault = request.get(LRO_FAIL)
    if fault is not None and fault.action == "partial":
        # A partial result (queryResults.error, errorInfo in the data-plane spec
        # OperationalInsights/stable/v1/OperationalInsights.json): 200 with the rows that were
        # computed and an error saying the rest failed. The twin keeps every row; a client must
        # not treat the answer as complete either way.
        answer["error"] = {
            "code": "PartialError",
            "message": "There were some errors when processing your query.",
            "details": [
                {
                    "code": "EngineError",
                    "message": "Something went wrong processing your query on the server.",
                    "innererror": {"code": "-2133196797", "message": f"Fault injected by the twin ({fault.id})."},
                }
            ],
        }
    return json_response(answer)


async def query_post(request: web.Request) -> web.StreamResponse:
    return await _run(request, await read_json(request))


async def query_get(request: web.Request) -> web.StreamResponse:
    return await _run(request, {"query": request.query.get("query"), "timespan": request.query.get("timespan")})


async def get_workspace(request: web.Request) -> web.StreamResponse:
    """ARM GET of a workspace: {id, name, type, location, properties{customerId, provisioningState,
    retentionInDays, ...}} with its ETag, or ARM's ResourceNotFound."""
    state = state_of(request)
    p = params(request)
    subscription_or_404(state, p["sub"])
    resource_group_or_404(state, p["sub"], p["rg"])
    resource_id = f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/{WORKSPACE_TYPE}/{p['ws']}"
    found = state.store.get(resource_id)
    if found is None or str(found.body.get("type", "")).lower() != WORKSPACE_TYPE.lower():
        raise resource_not_found(WORKSPACE_TYPE, p["ws"], p["rg"])
    return json_response({**found.body, "etag": found.etag}, headers={"ETag": found.etag})


def setup_arm(app: web.Application) -> None:
    unserved = provider_version_error("workspaces")  # ARM's answer for a provider's unserved version
    add_route(app, "GET", WORKSPACE_PATH, get_workspace, versions=WORKSPACE_VERSIONS, version_error=unserved)


def setup(app: web.Application) -> None:
    add_route(app, "POST", "/v1/workspaces/{workspace}/query", query_post, versions=None)
    add_route(app, "GET", "/v1/workspaces/{workspace}/query", query_get, versions=None)
