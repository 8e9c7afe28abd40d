"""The twin's APIM workspaces against the REST specs, stable 2024-05-01: `apimworkspaces.json`
(Workspace_*, WorkspacePolicy_*, WorkspaceApi_*, WorkspaceApiPolicy_*, WorkspaceProduct_*,
WorkspaceProductPolicy_*, WorkspaceProductApiLink_*, WorkspaceSubscription_*,
WorkspaceNamedValue_*), `apimworkspacebackends.json` (WorkspaceBackend_*) and the contracts
in `definitions.json` (WorkspaceContract: displayName required; ProductApiLinkContract:
apiId). Checked: api-version, RBAC actions derived from the path, validation, ETags and
If-Match (required on PATCH and DELETE), and that the product's SDK reads what it seeds."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TwinHandle
from twin import rbac

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
RG = "rg-apim-prod"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/apim-wstwin"
WS = f"{SERVICE}/workspaces/team-a"
V = "api-version=2024-05-01"
OPERATOR = ("0b5e0c1a-0000-4000-8000-00000000c002", "twin-test-secret-operator")  # estates/test.yaml
POLICY = "<policies><inbound><base /></inbound><backend><base /></backend><outbound><base /></outbound></policies>"


def seed(twin: TwinHandle) -> None:
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": SUB,
                    "resource_groups": [
                        {
                            "name": RG,
                            "location": "westeurope",
                            "apim": [
                                {
                                    "name": "apim-wstwin",
                                    "sku": {"name": "Premium", "capacity": 1},
                                    "workspaces": [
                                        {
                                            "id": "team-a",
                                            "displayName": "Team A",
                                            "apis": [{"id": "orders"}],
                                            "products": [{"id": "p", "apis": ["orders"]}],
                                            "policies": {"workspace": POLICY},
                                        },
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )


def operator(twin: TwinHandle) -> str:
    return str(twin.credential(*OPERATOR).get_token(twin.urls["arm"] + "/.default").token)


def put(twin: TwinHandle, path: str, body: dict[str, Any], **headers: str) -> Any:
    return twin.arm("PUT", f"{path}?{V}", token=operator(twin), json=body, headers=headers)


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("GET", f"{SERVICE}/workspaces", "Microsoft.ApiManagement/service/workspaces/read"),
        ("PUT", WS, "Microsoft.ApiManagement/service/workspaces/write"),
        ("GET", f"{WS}/apis", "Microsoft.ApiManagement/service/workspaces/apis/read"),
        ("GET", f"{WS}/apis/x/policies/policy", "Microsoft.ApiManagement/service/workspaces/apis/policies/read"),
        ("GET", f"{WS}/products/p/apiLinks", "Microsoft.ApiManagement/service/workspaces/products/apiLinks/read"),
        ("DELETE", f"{WS}/subscriptions/s", "Microsoft.ApiManagement/service/workspaces/subscriptions/delete"),
        ("GET", f"{WS}/namedValues", "Microsoft.ApiManagement/service/workspaces/namedValues/read"),
        ("GET", f"{WS}/backends", "Microsoft.ApiManagement/service/workspaces/backends/read"),
    ],
)  # fmt: skip
def test_workspace_routes_map_to_their_arm_operations(method: str, path: str, action: str) -> None:
    """Source: "Azure permissions for Integration", Microsoft.ApiManagement/service/workspaces/..."""
    operation = rbac.arm_operation(method, path)
    assert operation is not None
    assert operation.action == action


def test_workspaces_are_listed_read_with_etags_and_versions_checked(twin: TwinHandle) -> None:
    seed(twin)
    listed = twin.arm("GET", f"{SERVICE}/workspaces?{V}")
    assert listed.status_code == 200, listed.text
    [item] = listed.json()["value"]
    assert item["id"] == WS
    assert item["type"] == "Microsoft.ApiManagement/service/workspaces"
    assert item["properties"]["displayName"] == "Team A"
    got = twin.arm("GET", f"{WS}?{V}")
    assert got.status_code == 200
    assert got.headers["ETag"]
    assert twin.arm("HEAD", f"{WS}?{V}").headers["ETag"] == got.headers["ETag"]
    unknown = twin.arm("GET", f"{WS}?api-version=2015-01-01")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "NoRegisteredProviderFound"
    assert twin.arm("GET", f"{SERVICE}/workspaces/nope?{V}").status_code == 404
    assert twin.arm("GET", f"{SERVICE}/workspaces/nope/apis?{V}").status_code == 404
    links = twin.arm("GET", f"{WS}/products/p/apiLinks?{V}").json()["value"]
    assert [link["properties"]["apiId"] for link in links] == [f"{WS}/apis/orders"]
    policy = twin.arm("GET", f"{WS}/policies/policy?{V}&format=rawxml")
    assert policy.status_code == 200
    assert policy.json()["properties"]["format"] == "rawxml"
    assert twin.arm("GET", f"{WS}/apis/orders/policies/policy?{V}").status_code == 404  # none set


CALLER = {
    "name": "ws-caller",
    "client_id": "0b5e0c1a-0000-4000-8000-0000000000b7",
    "client_secret": "twin-test-secret-ws-caller",
    "object_id": "5f1d2e3c-0000-4000-8000-0000000000b7",
}


def test_reads_need_a_role_that_grants_them(twin: TwinHandle) -> None:
    seed(twin)
    twin.seed({"principals": [CALLER]})
    token = twin.token(twin.urls["arm"], client_id=CALLER["client_id"])
    refused = twin.arm("GET", f"{WS}/apis?{V}", token=token)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "AuthorizationFailed"
    assert "'Microsoft.ApiManagement/service/workspaces/apis/read'" in refused.json()["error"]["message"]
    twin.grant("API Management Service Reader Role", SERVICE, principal=CALLER["name"])
    assert twin.arm("GET", f"{WS}/apis?{V}", token=token).status_code == 200
    # The reader role reads; it does not write.
    write = twin.arm("PUT", f"{WS}/apis/x?{V}", token=token, json={"properties": {"displayName": "X", "path": "x"}})
    assert write.status_code == 403


def test_writes_are_validated_and_etags_guard_updates(twin: TwinHandle) -> None:
    seed(twin)
    missing = put(twin, f"{SERVICE}/workspaces/team-b", {"properties": {}})
    assert missing.status_code == 400
    assert "displayName" in missing.text
    created = put(twin, f"{SERVICE}/workspaces/team-b", {"properties": {"displayName": "Team B"}})
    assert created.status_code == 201
    assert created.headers["ETag"]
    token = operator(twin)
    no_match = twin.arm("PATCH", f"{SERVICE}/workspaces/team-b?{V}", token=token, json={"properties": {}})
    assert no_match.status_code == 400
    assert "If-Match" in no_match.text
    stale = twin.arm(
        "PATCH",
        f"{SERVICE}/workspaces/team-b?{V}",
        token=token,
        json={"properties": {"description": "x"}},
        headers={"If-Match": '"stale"'},
    )
    assert stale.status_code == 412
    fresh = twin.arm(
        "PATCH",
        f"{SERVICE}/workspaces/team-b?{V}",
        token=token,
        json={"properties": {"description": "x"}},
        headers={"If-Match": created.headers["ETag"]},
    )
    assert fresh.status_code == 200
    assert fresh.json()["properties"]["description"] == "x"

    bad_api = put(twin, f"{WS}/apis/new", {"properties": {"displayName": "New", "path": "new", "protocols": ["ftp"]}})
    assert bad_api.status_code == 400
    assert "protocols" in bad_api.text
    api = put(twin, f"{WS}/apis/new", {"properties": {"displayName": "New", "path": "new"}})
    assert api.status_code == 201
    assert api.json()["type"] == "Microsoft.ApiManagement/service/workspaces/apis"
    bad_scope = put(twin, f"{WS}/subscriptions/s", {"properties": {"displayName": "S", "scope": "/apis/ghost"}})
    assert bad_scope.status_code == 400
    assert "ghost" in bad_scope.text
    sub = put(twin, f"{WS}/subscriptions/s", {"properties": {"displayName": "S", "scope": "/apis/new"}})
    assert sub.status_code == 201
    assert sub.json()["properties"]["scope"] == f"{WS}/apis/new"
    assert "primaryKey" not in sub.text  # keys only through listSecrets, as at the service level
    nv = put(twin, f"{WS}/namedValues/pw", {"properties": {"displayName": "pw", "secret": True, "value": "canary-ws"}})
    assert nv.status_code == 201
    assert "canary-ws" not in nv.text
    assert "canary-ws" not in twin.arm("GET", f"{WS}/namedValues?{V}").text
    bad_link = put(twin, f"{WS}/products/p/apiLinks/l", {"properties": {"apiId": f"{SERVICE}/apis/orders"}})
    assert bad_link.status_code == 400  # a service-level API is not the workspace's
    bad_policy = put(
        twin, f"{WS}/policies/policy", {"properties": {"value": "<policies><inbound><nonsense /></inbound></policies>"}}
    )
    assert bad_policy.status_code == 400
    deleted = twin.arm("DELETE", f"{WS}/subscriptions/s?{V}", token=token)
    assert deleted.status_code == 400
    assert "If-Match" in deleted.text
    etag = twin.arm("GET", f"{WS}/subscriptions/s?{V}").headers["ETag"]
    gone = twin.arm("DELETE", f"{WS}/subscriptions/s?{V}", token=token, headers={"If-Match": etag})
    assert gone.status_code == 200
    assert twin.arm("GET", f"{WS}/subscriptions/s?{V}").status_code == 404
    workspace_etag = twin.arm("GET", f"{WS}?{V}").headers["ETag"]
    assert twin.arm("DELETE", f"{WS}?{V}", token=token, headers={"If-Match": workspace_etag}).status_code == 200
    assert twin.arm("GET", f"{WS}/apis/new?{V}").status_code == 404  # its children went with it
