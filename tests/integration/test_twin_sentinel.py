"""Sentinel incidents in the twin, driven the way the product calls them: azure-mgmt-core's
ARMPipelineClient (and its async twin) with ARM bearer-challenge auth and raw HttpRequests,
since no maintained SDK covers this API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from azure.core.pipeline import policies
from azure.core.rest import AsyncHttpResponse, HttpRequest, HttpResponse
from azure.mgmt.core import ARMPipelineClient, AsyncARMPipelineClient
from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy, AsyncARMChallengeAuthenticationPolicy

from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

API = "2025-06-01"
PROD = "3f2a1b0c-0000-4000-8000-000000000101"
WORKSPACE = (
    f"/subscriptions/{PROD}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights/workspaces/law-sec"
)
INCIDENTS = f"{WORKSPACE}/providers/Microsoft.SecurityInsights/incidents"


@pytest.fixture
def seeded(twin: TwinHandle) -> TwinHandle:
    twin.seed(
        {
            "subscriptions": [
                {"id": PROD, "resource_groups": [{"name": "rg-monitoring", "workspaces": [{"name": "law-sec"}]}]}
            ]
        }
    )
    # The role an incident sink holds on the workspace (the twin enforces RBAC; who may call
    # is tests/integration/test_twin_rbac.py's subject, not this module's).
    twin.grant("Microsoft Sentinel Responder", f"/subscriptions/{PROD}")
    return twin


@dataclass
class Arm:
    """A bare ARM pipeline (what the product uses for Sentinel) and the base URL."""

    client: ARMPipelineClient[HttpRequest, HttpResponse]
    base: str


@pytest.fixture
def arm(seeded: TwinHandle) -> Arm:
    scope = seeded.urls["arm"] + "/.default"
    client: ARMPipelineClient[HttpRequest, HttpResponse] = ARMPipelineClient(
        base_url=seeded.urls["arm"],
        policies=[
            policies.RequestIdPolicy(),
            policies.HeadersPolicy(),
            policies.RetryPolicy(retry_total=0),
            ARMChallengeAuthenticationPolicy(seeded.credential(), scope),
        ],
        connection_verify=seeded.ca_file,
    )
    return Arm(client, seeded.urls["arm"])


def incident(title: str = "Gateway key leaked", **props: Any) -> dict[str, Any]:
    return {"properties": {"title": title, "severity": "High", "status": "New", **props}}


def send(arm: Arm, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any, Any]:
    url = path if path.startswith("https://") else f"{arm.base}{path}"
    if "api-version=" not in url:
        url += ("&" if "?" in url else "?") + f"api-version={API}"
    request = HttpRequest(method, url, json=body, headers=headers or None)
    response = arm.client.send_request(request)
    response.read()
    payload = response.json() if response.content else None
    return response.status_code, payload, response.headers


def test_create_get_update_delete(seeded: TwinHandle, arm: Arm) -> None:
    first_id = str(uuid.uuid4())
    status, body, headers = send(arm, "PUT", f"{INCIDENTS}/{first_id}", incident(labels=[{"labelName": "apim"}]))
    assert status == 201, body
    assert body["name"] == first_id
    assert body["type"] == "Microsoft.SecurityInsights/Incidents"
    assert body["id"].lower() == f"{INCIDENTS}/{first_id}".lower()
    props = body["properties"]
    assert props["incidentNumber"] == 1
    assert props["severity"] == "High"
    assert props["status"] == "New"
    assert props["labels"] == [{"labelName": "apim", "labelType": "User"}]
    assert props["createdTimeUtc"] == props["lastModifiedTimeUtc"]
    assert props["additionalData"]["alertsCount"] == 0
    assert body["etag"]
    assert headers["ETag"] == body["etag"]

    status, second, _ = send(arm, "PUT", f"{INCIDENTS}/{uuid.uuid4()}", incident("Another"))
    assert (status, second["properties"]["incidentNumber"]) == (201, 2)

    status, fetched, _ = send(arm, "GET", f"{INCIDENTS}/{first_id}")
    assert status == 200
    assert fetched["etag"] == body["etag"]

    seeded.control("POST", "/_twin/clock/advance", json={"hours": 2})
    update = incident(severity="Medium", status="Active")
    update["etag"] = fetched["etag"]
    status, updated, _ = send(arm, "PUT", f"{INCIDENTS}/{first_id}", update)
    assert status == 200, updated
    assert updated["etag"] != body["etag"]
    assert updated["properties"]["incidentNumber"] == 1
    assert updated["properties"]["createdTimeUtc"] == props["createdTimeUtc"]
    assert updated["properties"]["lastModifiedTimeUtc"] > props["createdTimeUtc"]
    assert updated["properties"]["severity"] == "Medium"

    assert send(arm, "DELETE", f"{INCIDENTS}/{first_id}")[0] == 200
    status, gone, _ = send(arm, "GET", f"{INCIDENTS}/{first_id}")
    assert status == 404
    assert gone["error"]["code"] == "NotFound"
    assert send(arm, "DELETE", f"{INCIDENTS}/{first_id}")[0] == 204


def test_stale_etags_are_refused(arm: Arm) -> None:
    path = f"{INCIDENTS}/{uuid.uuid4()}"
    _, created, _ = send(arm, "PUT", path, incident())
    _, _, _ = send(arm, "PUT", path, {**incident(status="Active"), "etag": created["etag"]})
    stale = {**incident(severity="Low"), "etag": created["etag"]}
    status, body, _ = send(arm, "PUT", path, stale)
    assert status == 409
    assert body["error"]["code"] == "Conflict"
    assert "Newer version" in body["error"]["message"]
    status, body, _ = send(arm, "PUT", path, incident(severity="Low"), **{"If-Match": created["etag"]})
    assert status == 412
    assert body["error"]["code"] == "PreconditionFailed"
    status, current, _ = send(arm, "GET", path)
    assert current["properties"]["severity"] == "High"
    assert current["properties"]["status"] == "Active"
    # The current etag (or none at all) is accepted.
    assert send(arm, "PUT", path, incident(severity="Low"), **{"If-Match": current["etag"]})[0] == 200
    assert send(arm, "PUT", path, incident(severity="Informational"))[0] == 200
    status, _, _ = send(arm, "PUT", path, incident(), **{"If-None-Match": "*"})
    assert status == 412
    status, _, _ = send(arm, "DELETE", path, **{"If-Match": created["etag"]})
    assert status == 412


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"properties": {"severity": "High", "status": "New"}}, "title"),
        ({"properties": {"title": " ", "severity": "High", "status": "New"}}, "title"),
        ({"properties": {"title": "t", "status": "New"}}, "severity"),
        (incident(severity="Critical"), "Critical"),
        (incident(status="Resolved"), "Resolved"),
        (incident(status="Closed"), "classification"),
        (incident(status="Closed", classification="Maybe"), "Maybe"),
        (incident(status="Closed", classification="FalsePositive", classificationReason="Because"), "Because"),
        (incident(labels=[{"labelType": "User"}]), "labelName"),
        (incident(firstActivityTimeUtc="yesterday"), "firstActivityTimeUtc"),
        ({"title": "not in properties"}, "properties"),
    ],
)
def test_invalid_incidents_are_rejected(arm: Arm, body: dict[str, Any], fragment: str) -> None:
    status, error, _ = send(arm, "PUT", f"{INCIDENTS}/{uuid.uuid4()}", body)
    assert status == 400
    assert error["error"]["code"] == "BadRequest"
    assert fragment in error["error"]["message"]


def test_closing_with_a_classification_works(arm: Arm) -> None:
    path = f"{INCIDENTS}/{uuid.uuid4()}"
    send(arm, "PUT", path, incident())
    closed = incident(status="closed", classification="BenignPositive", classificationReason="SuspiciousButExpected")
    status, body, _ = send(arm, "PUT", path, closed)
    assert status == 200, body
    assert body["properties"]["status"] == "Closed"
    assert body["properties"]["classification"] == "BenignPositive"


def test_workspace_must_exist(arm: Arm) -> None:
    other = INCIDENTS.replace("law-sec", "law-missing")
    status, body, _ = send(arm, "PUT", f"{other}/{uuid.uuid4()}", incident())
    assert status == 404
    assert body["error"]["code"] == "ResourceNotFound"
    assert "law-missing" in body["error"]["message"]
    assert send(arm, "GET", other)[0] == 404
    status, body, _ = send(arm, "GET", other.replace("rg-monitoring", "rg-gone"))
    assert (status, body["error"]["code"]) == (404, "ResourceGroupNotFound")


def test_list_filter_order_and_paging(seeded: TwinHandle, arm: Arm) -> None:
    for title, status_value in (("one", "New"), ("two", "Active"), ("three", "New"), ("four", "New")):
        send(arm, "PUT", f"{INCIDENTS}/{uuid.uuid4()}", incident(title, status=status_value))
        seeded.control("POST", "/_twin/clock/advance", json={"seconds": 5})
    status, listed, _ = send(arm, "GET", INCIDENTS)
    assert status == 200
    assert [i["properties"]["title"] for i in listed["value"]] == ["one", "two", "three", "four"]
    assert "nextLink" not in listed

    status, new_only, _ = send(arm, "GET", f"{INCIDENTS}?$filter=properties/status eq 'New'")
    assert [i["properties"]["title"] for i in new_only["value"]] == ["one", "three", "four"]

    query = "$filter=properties/status eq 'New'&$orderby=properties/createdTimeUtc desc&$top=2"
    status, page, _ = send(arm, "GET", f"{INCIDENTS}?{query}")
    assert [i["properties"]["title"] for i in page["value"]] == ["four", "three"]
    assert page["nextLink"].startswith(seeded.urls["arm"])
    status, rest, _ = send(arm, "GET", page["nextLink"])
    assert status == 200
    assert [i["properties"]["title"] for i in rest["value"]] == ["one"]
    assert "nextLink" not in rest

    status, numbered, _ = send(arm, "GET", f"{INCIDENTS}?$filter=properties/incidentNumber gt 2")
    assert [i["properties"]["title"] for i in numbered["value"]] == ["three", "four"]


@pytest.mark.parametrize(
    "query",
    [
        "$filter=properties/status eq 'New' or properties/status eq 'Active'",
        "$filter=status eq 'New'",
        "$filter=properties/owner eq 'x'",
        "$orderby=title",
        "$top=1001",
        "$top=0",
        "$skipToken=%%%",
        "$expand=alerts",
    ],
)
def test_unsupported_list_parameters_are_refused(arm: Arm, query: str) -> None:
    status, body, _ = send(arm, "GET", f"{INCIDENTS}?{query}")
    assert status == 400, body
    assert body["error"]["code"] == "BadRequest"


def test_api_version_is_checked(seeded: TwinHandle) -> None:
    # ARM's answers: a well-formed version the provider does not serve, NoRegisteredProviderFound
    # (Azure/azure-cli#28496 quotes it); a malformed one, InvalidApiVersionParameter.
    response = seeded.arm("GET", f"{INCIDENTS}?api-version=2019-01-01-preview")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "NoRegisteredProviderFound"
    malformed = seeded.arm("GET", f"{INCIDENTS}?api-version=v1")
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (400, "InvalidApiVersionParameter")
    for version in ("2023-02-01", "2024-03-01", "2025-06-01"):
        assert seeded.arm("GET", f"{INCIDENTS}?api-version={version}").status_code == 200


async def test_async_pipeline_client(seeded: TwinHandle) -> None:
    credential = seeded.async_credential()
    scope = seeded.urls["arm"] + "/.default"
    client: AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse] = AsyncARMPipelineClient(
        base_url=seeded.urls["arm"],
        policies=[policies.RequestIdPolicy(), AsyncARMChallengeAuthenticationPolicy(credential, scope)],
        connection_verify=seeded.ca_file,
    )
    async with credential, client:
        path = f"{seeded.urls['arm']}{INCIDENTS}/{uuid.uuid4()}?api-version={API}"
        response = await client.send_request(HttpRequest("PUT", path, json=incident("async")))
        await response.read()
        assert response.status_code == 201
        response = await client.send_request(HttpRequest("GET", path))
        await response.read()
        assert response.json()["properties"]["title"] == "async"
