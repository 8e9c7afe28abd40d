"""Log Analytics query through the real LogsQueryClient (sync and async): typed tables over
seeded gateway logs, the KQL subset, timespans, and clear errors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.monitor.query import LogsQueryClient, LogsQueryStatus
from azure.monitor.query.aio import LogsQueryClient as AsyncLogsQueryClient

from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

WORKSPACE = "3c9d1e2f-0000-4000-8000-00000000f001"


def seed_logs(twin: TwinHandle) -> None:
    rows: list[dict[str, Any]] = [
        {
            "ago": "10m",
            "ApimSubscriptionId": "sub-a",
            "ResponseCode": 200,
            "TotalTime": 12,
            "ApiId": "orders",
            "repeat": 3,
        },
        {"ago": "20m", "ApimSubscriptionId": "sub-b", "ResponseCode": 401, "TotalTime": 3, "ApiId": "orders"},
        {"ago": "90m", "ApimSubscriptionId": "sub-a", "ResponseCode": 500, "TotalTime": 250, "ApiId": "billing"},
        {"ago": "3d", "ApimSubscriptionId": "sub-old", "ResponseCode": 200, "TotalTime": 9, "ApiId": "orders"},
    ]
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": twin.subscription_id,
                    "resource_groups": [
                        {
                            "name": "rg-monitoring",
                            "workspaces": [
                                {
                                    "name": "law-apim",
                                    "customer_id": WORKSPACE,
                                    "tables": {"ApiManagementGatewayLogs": {"rows": rows}},
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )


def client(twin: TwinHandle) -> LogsQueryClient:
    return LogsQueryClient(twin.credential(), endpoint=twin.urls["logs"], audience=twin.urls["logs"], **twin.sdk_kwargs)


def test_summarize_returns_typed_columns(twin: TwinHandle) -> None:
    seed_logs(twin)
    result = client(twin).query_workspace(
        WORKSPACE,
        "ApiManagementGatewayLogs | where TimeGenerated > ago(1h) | summarize calls = count(), worst = max(TotalTime) "
        "by ApimSubscriptionId | order by calls desc",
        timespan=timedelta(days=1),
    )
    assert result.status == LogsQueryStatus.SUCCESS
    [table] = result.tables
    assert table.columns == ["ApimSubscriptionId", "calls", "worst"]
    assert table.columns_types == ["string", "long", "long"]
    assert [list(row) for row in table.rows] == [["sub-a", 3, 12], ["sub-b", 1, 3]]


def test_timespan_prefilters_and_datetimes_come_back_as_datetimes(twin: TwinHandle) -> None:
    seed_logs(twin)
    logs = client(twin)
    week = logs.query_workspace(WORKSPACE, "ApiManagementGatewayLogs | count", timespan=timedelta(days=7))
    hours = logs.query_workspace(WORKSPACE, "ApiManagementGatewayLogs | count", timespan=timedelta(hours=2))
    assert week.tables[0].rows[0][0] == 6
    assert hours.tables[0].rows[0][0] == 5
    now = datetime.now(UTC)
    window = logs.query_workspace(
        WORKSPACE,
        "ApiManagementGatewayLogs | summarize last = max(TimeGenerated)",
        timespan=(now - timedelta(hours=1), now),
    )
    last = window.tables[0].rows[0][0]
    assert isinstance(last, datetime)
    assert timedelta(minutes=9) < now - last < timedelta(minutes=11)


def test_unsupported_kql_is_a_clear_400(twin: TwinHandle) -> None:
    seed_logs(twin)
    with pytest.raises(HttpResponseError) as info:
        client(twin).query_workspace(
            WORKSPACE, "ApiManagementGatewayLogs | join (Heartbeat) on Computer", timespan=None
        )
    assert info.value.status_code == 400
    assert "join" in str(info.value)


def test_unknown_workspace_is_404(twin: TwinHandle) -> None:
    with pytest.raises(HttpResponseError) as info:
        client(twin).query_workspace(str(uuid.uuid4()), "ApiManagementGatewayLogs | count", timespan=None)
    assert info.value.status_code == 404
    assert "WorkspaceNotFoundError" in str(info.value)


def test_arm_token_is_refused_by_log_analytics(twin: TwinHandle) -> None:
    arm_audience = LogsQueryClient(
        twin.credential(), endpoint=twin.urls["logs"], audience=twin.urls["arm"], **twin.sdk_kwargs
    )
    with pytest.raises(HttpResponseError) as info:
        arm_audience.query_workspace(WORKSPACE, "ApiManagementGatewayLogs | count", timespan=None)
    assert info.value.status_code == 401


async def test_async_client_queries_the_same_rows(twin: TwinHandle) -> None:
    seed_logs(twin)
    async with (
        twin.async_credential() as credential,
        AsyncLogsQueryClient(
            credential, endpoint=twin.urls["logs"], audience=twin.urls["logs"], **twin.sdk_kwargs
        ) as logs,
    ):
        result = await logs.query_workspace(
            WORKSPACE,
            "ApiManagementGatewayLogs | where ResponseCode >= 400 | project ApiId, ResponseCode"
            " | order by ResponseCode asc",
            timespan=timedelta(days=1),
        )
    assert [list(r) for r in result.tables[0].rows] == [["orders", 401], ["billing", 500]]
    assert result.tables[0].columns_types == ["string", "int"]


def test_arm_serves_the_workspace_resource_with_its_customer_id(twin: TwinHandle) -> None:
    # Workspaces - Get: what the product reads to turn a diagnostic setting's workspace
    # resource id into the id the query API takes.
    seed_logs(twin)
    path = f"/subscriptions/{twin.subscription_id}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights"
    answer = twin.arm("GET", f"{path}/workspaces/LAW-APIM?api-version=2023-09-01")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["properties"]["customerId"] == WORKSPACE
    assert body["type"] == "Microsoft.OperationalInsights/workspaces"
    assert answer.headers["ETag"]
    missing = twin.arm("GET", f"{path}/workspaces/nope?api-version=2023-09-01")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "ResourceNotFound")
    # ARM answers a well-formed version the provider does not serve with NoRegisteredProviderFound
    # (Azure/azure-cli#28496 quotes it), a malformed one with InvalidApiVersionParameter.
    unknown_version = twin.arm("GET", f"{path}/workspaces/law-apim?api-version=2019-01-01")
    assert unknown_version.json()["error"]["code"] == "NoRegisteredProviderFound"
    malformed = twin.arm("GET", f"{path}/workspaces/law-apim?api-version=latest")
    assert malformed.json()["error"]["code"] == "InvalidApiVersionParameter"


def test_a_partial_fault_answers_200_with_partial_error_and_the_sdk_sees_a_partial_result(twin: TwinHandle) -> None:
    """Log Analytics' partial success: 200 with the tables and `error` (queryResults.error, an
    errorInfo, in azure-rest-api-specs specification/operationalinsights/data-plane/
    Microsoft.OperationalInsights/stable/v1/OperationalInsights.json); the SDK returns a
    LogsQueryPartialResult whose partial_error is the PartialError."""
    seed_logs(twin)
    status, _ = twin.control("POST", "/_twin/faults", {"service": "logs", "path": "/query$", "action": "partial"})
    assert status == 201
    result = client(twin).query_workspace(WORKSPACE, "ApiManagementGatewayLogs | count", timespan=timedelta(days=1))
    assert result.status == LogsQueryStatus.PARTIAL
    assert result.partial_error is not None
    assert result.partial_error.code == "PartialError"
    assert [list(row) for row in result.partial_data[0].rows] == [[5]]
    # once: the next query answers in full
    again = client(twin).query_workspace(WORKSPACE, "ApiManagementGatewayLogs | count", timespan=timedelta(days=1))
    assert again.status == LogsQueryStatus.SUCCESS


def test_llm_log_and_azure_diagnostics_have_their_default_columns(twin: TwinHandle) -> None:
    """ApiManagementGatewayLlmLog's columns as the Azure Monitor table reference lists them;
    AzureDiagnostics with the common columns and APIM's flattened GatewayLogs fields."""
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": twin.subscription_id,
                    "resource_groups": [
                        {
                            "name": "rg-monitoring",
                            "workspaces": [
                                {
                                    "name": "law-llm",
                                    "customer_id": WORKSPACE,
                                    "tables": {
                                        "ApiManagementGatewayLlmLog": {
                                            "rows": [{"ago": "5m", "TotalTokens": 120, "ModelName": "gpt-4o"}]
                                        },
                                        "AzureDiagnostics": {
                                            "rows": [{"ago": "5m", "Category": "GatewayLogs", "responseCode_d": 401}]
                                        },
                                    },
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )
    logs = client(twin)
    llm = logs.query_workspace(
        WORKSPACE, "ApiManagementGatewayLlmLog | project TotalTokens, PromptTokens, ModelName, Type", timespan=None
    )
    assert [list(row) for row in llm.tables[0].rows] == [[120, None, "gpt-4o", "ApiManagementGatewayLlmLog"]]
    legacy = logs.query_workspace(
        WORKSPACE, "AzureDiagnostics | project code = toint(responseCode_d), Category, url_s", timespan=None
    )
    assert legacy.tables[0].columns_types == ["int", "string", "string"]
    assert [list(row) for row in legacy.tables[0].rows] == [[401, "GatewayLogs", ""]]
