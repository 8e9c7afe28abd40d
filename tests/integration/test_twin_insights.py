"""Diagnostic settings (Microsoft.Insights) in the twin, driven by the real
azure-mgmt-monitor client, sync and async: what Azure accepts works, what it rejects fails."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.monitor import MonitorManagementClient
from azure.mgmt.monitor.aio import MonitorManagementClient as AsyncMonitorManagementClient

from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

API = "2021-05-01-preview"
PROD = "3f2a1b0c-0000-4000-8000-000000000101"
APIM_ID = f"/subscriptions/{PROD}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/apim-diag"
VAULT_ID = f"/subscriptions/{PROD}/resourceGroups/rg-apim-prod/providers/Microsoft.KeyVault/vaults/kv-diag"
WORKSPACE_ID = (
    f"/subscriptions/{PROD}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights/workspaces/law-diag"
)
OTHER_WORKSPACE_ID = WORKSPACE_ID.replace("law-diag", "law-other")


def estate(**group_sections: Any) -> dict[str, Any]:
    return {
        "subscriptions": [
            {
                "id": PROD,
                "resource_groups": [
                    {
                        "name": "rg-monitoring",
                        "location": "westeurope",
                        "workspaces": [{"name": "law-diag"}, {"name": "law-other"}],
                    },
                    {
                        "name": "rg-apim-prod",
                        "location": "westeurope",
                        "graph_resources": [
                            {"name": "apim-diag", "type": "Microsoft.ApiManagement/service"},
                            {"name": "kv-diag", "type": "Microsoft.KeyVault/vaults"},
                        ],
                        **group_sections,
                    },
                ],
            }
        ]
    }


@pytest.fixture
def seeded(twin: TwinHandle) -> TwinHandle:
    twin.seed(estate())
    # These tests are about Azure Monitor's behaviour, not about who may call it: the caller
    # is a Contributor (the twin enforces RBAC; tests/integration/test_twin_rbac.py covers it).
    twin.grant("Contributor")
    return twin


def client(twin: TwinHandle) -> MonitorManagementClient:
    return MonitorManagementClient(
        twin.credential(),
        PROD,
        api_version=API,
        base_url=twin.urls["arm"],
        credential_scopes=[twin.urls["arm"] + "/.default"],
        **twin.sdk_kwargs,
    )


def gateway_logs(workspace: str = WORKSPACE_ID, **extra: Any) -> dict[str, Any]:
    return {
        "properties": {
            "workspaceId": workspace,
            "logAnalyticsDestinationType": "Dedicated",
            "logs": [{"category": "GatewayLogs", "enabled": True}],
            "metrics": [{"category": "AllMetrics", "enabled": True}],
            **extra,
        }
    }


def error_of(raised: pytest.ExceptionInfo[HttpResponseError]) -> tuple[int, str, str]:
    error = raised.value
    assert error.error is not None
    return int(error.status_code or 0), str(error.error.code), str(error.error.message)


def test_create_get_list_delete_sync(seeded: TwinHandle) -> None:
    monitor = client(seeded)
    created = monitor.diagnostic_settings.create_or_update(APIM_ID, "to-law", gateway_logs())
    assert created.name == "to-law"
    assert created.type == "Microsoft.Insights/diagnosticSettings"
    assert created.id.lower() == f"{APIM_ID}/providers/microsoft.insights/diagnosticSettings/to-law".lower()
    assert created.workspace_id == WORKSPACE_ID
    assert created.log_analytics_destination_type == "Dedicated"
    assert [(log.category, log.enabled) for log in created.logs] == [("GatewayLogs", True)]

    fetched = monitor.diagnostic_settings.get(APIM_ID, "to-law")
    assert fetched.workspace_id == WORKSPACE_ID
    assert fetched.metrics[0].category == "AllMetrics"

    monitor.diagnostic_settings.create_or_update(
        APIM_ID,
        "audit-to-other",
        {"properties": {"workspaceId": OTHER_WORKSPACE_ID, "logs": [{"categoryGroup": "audit", "enabled": True}]}},
    )
    listed = list(monitor.diagnostic_settings.list(APIM_ID))
    assert sorted(s.name for s in listed) == ["audit-to-other", "to-law"]
    group_setting = next(s for s in listed if s.name == "audit-to-other")
    assert group_setting.logs[0].category_group == "audit"
    assert group_setting.logs[0].category is None
    assert group_setting.log_analytics_destination_type is None

    monitor.diagnostic_settings.delete(APIM_ID, "to-law")
    with pytest.raises(ResourceNotFoundError):
        monitor.diagnostic_settings.get(APIM_ID, "to-law")
    assert [s.name for s in monitor.diagnostic_settings.list(APIM_ID)] == ["audit-to-other"]


async def test_create_get_list_delete_async(seeded: TwinHandle) -> None:
    credential = seeded.async_credential()
    async with (
        credential,
        AsyncMonitorManagementClient(
            credential,
            PROD,
            api_version=API,
            base_url=seeded.urls["arm"],
            credential_scopes=[seeded.urls["arm"] + "/.default"],
            **seeded.sdk_kwargs,
        ) as monitor,
    ):
        created = await monitor.diagnostic_settings.create_or_update(
            VAULT_ID,
            "kv-audit",
            {"properties": {"workspaceId": WORKSPACE_ID, "logs": [{"category": "AuditEvent", "enabled": True}]}},
        )
        assert created.name == "kv-audit"
        fetched = await monitor.diagnostic_settings.get(VAULT_ID, "kv-audit")
        assert fetched.logs[0].category == "AuditEvent"
        names = [s.name async for s in monitor.diagnostic_settings.list(VAULT_ID)]
        assert names == ["kv-audit"]
        await monitor.diagnostic_settings.delete(VAULT_ID, "kv-audit")
        assert [s.name async for s in monitor.diagnostic_settings.list(VAULT_ID)] == []
        with pytest.raises(HttpResponseError) as raised:
            await monitor.diagnostic_settings.create_or_update(
                VAULT_ID,
                "bad",
                gateway_logs(),  # GatewayLogs is an APIM category, not a Key Vault one
            )
        assert error_of(raised)[:2] == (400, "BadRequest")


def test_invalid_apim_category_is_rejected(seeded: TwinHandle) -> None:
    monitor = client(seeded)
    body = gateway_logs()
    body["properties"]["logs"] = [{"category": "GatewayLogz", "enabled": True}]
    with pytest.raises(HttpResponseError) as raised:
        monitor.diagnostic_settings.create_or_update(APIM_ID, "typo", body)
    status, code, message = error_of(raised)
    assert (status, code) == (400, "BadRequest")
    assert "Category 'GatewayLogz' is not supported" in message
    assert list(monitor.diagnostic_settings.list(APIM_ID)) == []


@pytest.mark.parametrize(
    ("logs", "metrics", "fragment"),
    [
        ([{"category": "GatewayLogs", "categoryGroup": "allLogs", "enabled": True}], [], "exactly one of"),
        ([{"enabled": True}], [], "exactly one of"),
        ([{"categoryGroup": "everything", "enabled": True}], [], "Category group 'everything'"),
        ([{"category": "GatewayLogs"}], [], "enabled is required"),
        ([], [{"category": "Requests", "enabled": True}], "Metric category 'Requests' is not supported"),
    ],
)
def test_malformed_log_and_metric_entries_are_rejected(
    seeded: TwinHandle, logs: list[dict[str, Any]], metrics: list[dict[str, Any]], fragment: str
) -> None:
    body = {"properties": {"workspaceId": WORKSPACE_ID, "logs": logs, "metrics": metrics}}
    with pytest.raises(HttpResponseError) as raised:
        client(seeded).diagnostic_settings.create_or_update(APIM_ID, "bad", body)
    status, code, message = error_of(raised)
    assert (status, code) == (400, "BadRequest")
    assert fragment in message


def test_missing_destination_is_rejected(seeded: TwinHandle) -> None:
    body = {"properties": {"logs": [{"category": "GatewayLogs", "enabled": True}]}}
    with pytest.raises(HttpResponseError) as raised:
        client(seeded).diagnostic_settings.create_or_update(APIM_ID, "nowhere", body)
    status, code, message = error_of(raised)
    assert (status, code) == (400, "BadRequest")
    assert "destination" in message


def test_unknown_destination_type_is_rejected(seeded: TwinHandle) -> None:
    with pytest.raises(HttpResponseError) as raised:
        client(seeded).diagnostic_settings.create_or_update(
            APIM_ID, "x", gateway_logs(logAnalyticsDestinationType="ResourceSpecific")
        )
    assert error_of(raised)[:2] == (400, "BadRequest")


def test_unknown_target_resource_is_404(seeded: TwinHandle) -> None:
    missing = APIM_ID.replace("apim-diag", "apim-nope")
    monitor = client(seeded)
    with pytest.raises(ResourceNotFoundError) as raised:
        monitor.diagnostic_settings.create_or_update(missing, "x", gateway_logs())
    assert raised.value.error is not None
    assert raised.value.error.code == "ResourceNotFound"
    assert "Microsoft.ApiManagement/service/apim-nope" in str(raised.value.error.message)
    with pytest.raises(ResourceNotFoundError):
        list(monitor.diagnostic_settings.list(missing))
    with pytest.raises(ResourceNotFoundError) as group_missing:
        list(monitor.diagnostic_settings.list(APIM_ID.replace("rg-apim-prod", "rg-nope")))
    assert group_missing.value.error is not None
    assert group_missing.value.error.code == "ResourceGroupNotFound"


def test_workspace_must_exist_and_be_an_arm_id(seeded: TwinHandle) -> None:
    monitor = client(seeded)
    with pytest.raises(ResourceNotFoundError) as raised:
        monitor.diagnostic_settings.create_or_update(APIM_ID, "x", gateway_logs(WORKSPACE_ID + "-gone"))
    assert raised.value.error is not None
    assert "law-diag-gone" in str(raised.value.error.message)
    with pytest.raises(HttpResponseError) as bad_id:
        # The workspace's GUID (customer id) is not what the API takes.
        monitor.diagnostic_settings.create_or_update(APIM_ID, "x", gateway_logs("1c11b111-111e-1f11-b111-beef1111c1e1"))
    assert error_of(bad_id)[:2] == (400, "LinkedInvalidPropertyId")
    with pytest.raises(ResourceNotFoundError):
        # An existing resource that is not a workspace.
        monitor.diagnostic_settings.create_or_update(APIM_ID, "x", gateway_logs(VAULT_ID))


def test_a_sink_cannot_take_the_same_category_from_two_settings(seeded: TwinHandle) -> None:
    monitor = client(seeded)
    monitor.diagnostic_settings.create_or_update(APIM_ID, "first", gateway_logs())
    with pytest.raises(HttpResponseError) as raised:
        monitor.diagnostic_settings.create_or_update(APIM_ID, "second", gateway_logs())
    status, code, message = error_of(raised)
    assert (status, code) == (409, "Conflict")
    assert "first" in message
    # Rewriting the same setting is fine.
    monitor.diagnostic_settings.create_or_update(APIM_ID, "first", gateway_logs())


def test_unknown_setting_is_404_and_delete_of_absent_is_204(seeded: TwinHandle) -> None:
    with pytest.raises(ResourceNotFoundError):
        client(seeded).diagnostic_settings.get(APIM_ID, "never")
    path = f"{APIM_ID}/providers/Microsoft.Insights/diagnosticSettings/never?api-version={API}"
    assert seeded.arm("DELETE", path).status_code == 204


def test_api_version_is_checked(seeded: TwinHandle) -> None:
    base = f"{APIM_ID}/providers/Microsoft.Insights/diagnosticSettings"
    response = seeded.arm("GET", base + "?api-version=2024-01-01")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "NoRegisteredProviderFound"  # well formed, not served
    assert seeded.arm("GET", base).json()["error"]["code"] == "MissingApiVersionParameter"
    # The older version works, but without category groups.
    old = seeded.arm(
        "PUT",
        base + "/old?api-version=2017-05-01-preview",
        json={"properties": {"workspaceId": WORKSPACE_ID, "logs": [{"categoryGroup": "allLogs", "enabled": True}]}},
    )
    assert old.status_code == 400
    ok = seeded.arm("PUT", base + "/old?api-version=2017-05-01-preview", json=gateway_logs())
    assert ok.status_code == 200, ok.text


def test_estate_section_seeds_settings_and_validates_them(twin: TwinHandle) -> None:
    setting = {"resource": APIM_ID, "name": "seeded", "properties": gateway_logs()["properties"]}
    twin.seed(estate(diagnostic_settings=[setting]))
    fetched = client(twin).diagnostic_settings.get(APIM_ID, "seeded")
    assert fetched.workspace_id == WORKSPACE_ID

    bad = {
        "resource": APIM_ID,
        "name": "bad",
        "properties": {"workspaceId": WORKSPACE_ID, "logs": [{"category": "NotACategory", "enabled": True}]},
    }
    status, body = twin.control("POST", "/_twin/estate", json=estate(diagnostic_settings=[bad]))
    assert status == 400
    assert "diagnostic_settings" in body["error"]["message"]
    assert "NotACategory" in body["error"]["message"]


def test_settings_on_a_service_seeded_by_the_apim_section(twin: TwinHandle) -> None:
    fragment = estate()
    fragment["subscriptions"][0]["resource_groups"][1]["apim"] = [{"name": "apim-real"}]
    twin.seed(fragment)
    service = APIM_ID.replace("apim-diag", "apim-real")
    monitor = client(twin)
    monitor.diagnostic_settings.create_or_update(service, "to-law", gateway_logs())
    assert [s.name for s in monitor.diagnostic_settings.list(service)] == ["to-law"]


def test_writes_raise_resource_events_typed_by_the_extension_provider(seeded: TwinHandle) -> None:
    """Azure raises Microsoft.Resources events for diagnostic-setting writes, typed by the
    Insights provider, whatever resource the setting hangs under."""
    twin = seeded
    monitor = client(twin)
    monitor.diagnostic_settings.create_or_update(APIM_ID, "to-law", gateway_logs())
    monitor.diagnostic_settings.delete(APIM_ID, "to-law")
    _, body = twin.control("GET", "/_twin/events?type=Microsoft.Resources.ResourceWriteSuccess")
    writes = [e for e in body["value"] if e["subject"].endswith("/diagnosticSettings/to-law")]
    assert len(writes) == 1
    assert writes[0]["data"]["operationName"] == "Microsoft.Insights/diagnosticSettings/write"
    assert writes[0]["data"]["claims"]["appid"] == twin.client_id
    _, deletes = twin.control("GET", "/_twin/events?type=Microsoft.Resources.ResourceDeleteSuccess")
    assert [e["data"]["operationName"] for e in deletes["value"]] == ["Microsoft.Insights/diagnosticSettings/delete"]


# -- issue 10, item 3: Microsoft.Insights' own error shape, categories vs category groups -------------


def test_insights_errors_are_the_flat_code_and_message_of_its_spec(seeded: TwinHandle) -> None:
    """diagnosticsSettings_API.json (2021-05-01-preview), every operation's `default` response:
    ErrorResponse {code, message}, not ARM's {"error": {...}}. ARM's own answers in front of the
    provider (api-version, the target's resource group) keep ARM's shape."""
    base = f"{APIM_ID}/providers/Microsoft.Insights/diagnosticSettings"
    missing = seeded.arm("GET", f"{base}/never?api-version={API}")
    assert missing.status_code == 404
    assert set(missing.json()) == {"code", "message"}
    assert missing.json()["code"] == "ResourceNotFound"
    no_sink = seeded.arm("PUT", f"{base}/bad?api-version={API}", json={"properties": {"logs": []}})
    assert no_sink.status_code == 400
    assert set(no_sink.json()) == {"code", "message"}
    seeded.arm("PUT", f"{base}/first?api-version={API}", json=gateway_logs())
    conflict = seeded.arm("PUT", f"{base}/second?api-version={API}", json=gateway_logs())
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "Conflict"
    assert "error" in seeded.arm("GET", f"{base}?api-version=2001-01-01").json()  # ARM's check, ARM's shape


def test_a_category_and_a_category_group_in_one_setting_are_refused(seeded: TwinHandle) -> None:
    """What Azure answers (Azure/azure-rest-api-specs#22719), even with one entry disabled."""
    body = gateway_logs(
        logs=[{"categoryGroup": "allLogs", "enabled": True}, {"category": "GatewayLogs", "enabled": False}]
    )
    with pytest.raises(HttpResponseError) as raised:
        client(seeded).diagnostic_settings.create_or_update(APIM_ID, "mixed", body)
    status, code, message = error_of(raised)
    assert (status, code) == (400, "BadRequest")
    assert message == "Diagnostic setting does not support mix of log category and log category group."


@pytest.mark.parametrize(("first", "second"), [("category", "group"), ("group", "category")])
def test_a_category_and_a_group_that_includes_it_conflict_at_one_destination(
    seeded: TwinHandle, first: str, second: str
) -> None:
    """The data-sink rule (one destination takes a category from one setting of a resource,
    409 Conflict) applied through category groups: allLogs includes GatewayLogs. [Closest
    documented behaviour: Azure's exact answer for this pair is not published.]"""
    entry = {
        "category": {"category": "GatewayLogs", "enabled": True},
        "group": {"categoryGroup": "allLogs", "enabled": True},
    }
    monitor = client(seeded)
    monitor.diagnostic_settings.create_or_update(APIM_ID, "one", gateway_logs(logs=[entry[first]], metrics=[]))
    with pytest.raises(HttpResponseError) as raised:
        monitor.diagnostic_settings.create_or_update(APIM_ID, "two", gateway_logs(logs=[entry[second]], metrics=[]))
    status, code, message = error_of(raised)
    assert (status, code) == (409, "Conflict")
    assert "'GatewayLogs'" in message
    # Another destination is fine; so is the audit group, which the twin does not know to include GatewayLogs.
    monitor.diagnostic_settings.create_or_update(
        APIM_ID, "two", gateway_logs(OTHER_WORKSPACE_ID, logs=[entry[second]], metrics=[])
    )
    monitor.diagnostic_settings.create_or_update(
        APIM_ID, "three", gateway_logs(logs=[{"categoryGroup": "audit", "enabled": True}], metrics=[])
    )
