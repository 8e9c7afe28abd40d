"""Conformance: the twin's Azure RBAC (twin/rbac.py) against Microsoft's published behaviour.

Each test names its source. The role definitions are copied from "Azure built-in roles"
(learn.microsoft.com/azure/role-based-access-control/built-in-roles, MicrosoftDocs/azure-docs
articles/role-based-access-control/built-in-roles/*.md); the evaluation rules from
"Understand Azure role definitions" and "Understand scope for Azure RBAC".
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.keyvault.secrets import SecretClient

from tests.conftest import TwinHandle
from twin import rbac

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SUB = "3f2a1b0c-0000-4000-8000-000000000101"
APIM = "2024-05-01"
GROUP = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod"
SERVICE = f"{GROUP}/providers/Microsoft.ApiManagement/service/apim-rbac"
OTHER = f"/subscriptions/{SUB}/resourceGroups/rg-monitoring/providers/Microsoft.ApiManagement/service/apim-other"
WORKSPACE = f"/subscriptions/{SUB}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights/workspaces/law"
VAULT = "kv-rbac-test"
INCIDENT = f"{WORKSPACE}/providers/Microsoft.SecurityInsights/incidents/i"
SETTING = f"{SERVICE}/providers/Microsoft.Insights/diagnosticSettings/x"
KEYS = f"{SERVICE}/subscriptions/s1"
CALLER = {
    "name": "rbac-caller",
    "client_id": "0b5e0c1a-0000-4000-8000-0000000000b1",
    "client_secret": "twin-test-secret-rbac-caller",
    "object_id": "5f1d2e3c-0000-4000-8000-0000000000b1",
}


@pytest.fixture
def estate(twin: TwinHandle) -> TwinHandle:
    """Two services in two groups, a workspace, a vault, and a caller with no role yet."""
    twin.seed(
        {
            "principals": [CALLER],
            "subscriptions": [
                {
                    "id": SUB,
                    "resource_groups": [
                        {
                            "name": "rg-apim-prod",
                            "apim": [{"name": "apim-rbac", "subscriptions": [{"sid": "s1", "scope": "/apis"}]}],
                            "key_vaults": [{"name": VAULT, "secrets": [{"name": "ledger", "value": "v1"}]}],
                        },
                        {
                            "name": "rg-monitoring",
                            "apim": [{"name": "apim-other"}],
                            "workspaces": [{"name": "law", "customer_id": "4d5e6f70-0000-4000-8000-0000000000bb"}],
                        },
                    ],
                }
            ],
        }
    )
    return twin


def grant(twin: TwinHandle, role: str, scope: str) -> None:
    twin.grant(role, scope, principal=CALLER["name"])


def as_caller(twin: TwinHandle, method: str, path: str, **kwargs: Any) -> requests.Response:
    token = twin.token(twin.urls["arm"], client_id=CALLER["client_id"])
    return twin.arm(method, path, token=token, **kwargs)


def error(response: requests.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# -- role definitions and evaluation (no server) --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role_id"),
    [
        ("Reader", "acdd72a7-3385-48ef-bd42-f606fba81ae7"),
        ("Contributor", "b24988ac-6180-42a0-ab88-20f7382dd24c"),
        ("API Management Service Contributor", "312a565d-c81f-4fd8-895a-4e21e48d571c"),
        ("API Management Service Reader Role", "71522526-b88f-4d52-b57f-d31fc3546d0d"),
        ("Key Vault Secrets Officer", "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"),
        ("Key Vault Secrets User", "4633458b-17de-408a-b874-0445c86b69e6"),
        ("Log Analytics Reader", "73c42c96-874c-492b-b04d-ab87d138a893"),
        ("Storage Blob Data Contributor", "ba92f5b4-2d11-453d-a403-e96b0029c9fe"),
        ("Microsoft Sentinel Responder", "3e150937-b8fe-4cfb-8069-0eaf05ecd056"),
    ],
)
def test_built_in_roles_carry_their_published_ids(name: str, role_id: str) -> None:
    """Source: "Azure built-in roles" (general, privileged, integration, security, monitor, storage)."""
    [role] = [r for r in rbac.BUILTIN_ROLES if r.name == name]
    assert role.id == role_id


def role(name: str) -> rbac.RoleDefinition:
    [found] = [r for r in rbac.BUILTIN_ROLES if r.name == name]
    return found


def test_wildcards_match_as_arm_evaluates_them() -> None:
    """Source: "Understand Azure role definitions", Actions: `*` matches any string, operations
    compare case-insensitively; `Microsoft.ApiManagement/service/*/read` covers the reads under
    a service (which is why the product's role lists `service/read` as well)."""
    assert rbac.action_matches("Microsoft.ApiManagement/service/*/read", "Microsoft.ApiManagement/service/apis/read")
    assert rbac.action_matches(
        "Microsoft.ApiManagement/service/*/read", "microsoft.apimanagement/service/apis/operations/READ"
    )
    assert not rbac.action_matches("Microsoft.ApiManagement/service/*/read", "Microsoft.ApiManagement/service/read")
    assert not rbac.action_matches(
        "Microsoft.ApiManagement/service/*/read", "Microsoft.ApiManagement/service/subscriptions/listSecrets/action"
    )
    assert rbac.action_matches("*/read", "Microsoft.Insights/diagnosticSettings/read")
    assert rbac.action_matches("*", "Microsoft.ApiManagement/service/write")


def test_not_actions_are_subtracted_and_management_roles_grant_no_data_actions() -> None:
    """Source: "Understand Azure role definitions", NotActions ("subtracted from the allowed
    Actions") and DataActions ("management wildcards do not grant data access"); the roles'
    lists from "Azure built-in roles"."""
    reader = role("API Management Service Reader Role")
    assert rbac.permits(reader, "Microsoft.ApiManagement/service/apis/read")
    assert not rbac.permits(reader, "Microsoft.ApiManagement/service/users/keys/read")
    contributor = role("Contributor")
    assert rbac.permits(contributor, "Microsoft.ApiManagement/service/write")
    assert not rbac.permits(contributor, "Microsoft.Authorization/roleAssignments/write")
    assert not rbac.permits(contributor, "Microsoft.KeyVault/vaults/secrets/getSecret/action", data=True)
    logs = role("Log Analytics Reader")
    assert rbac.permits(logs, "Microsoft.OperationalInsights/workspaces/query/read")
    assert not rbac.permits(logs, "Microsoft.OperationalInsights/workspaces/sharedKeys/read")
    user = role("Key Vault Secrets User")
    assert rbac.permits(user, "Microsoft.KeyVault/vaults/secrets/getSecret/action", data=True)
    assert not rbac.permits(user, "Microsoft.KeyVault/vaults/secrets/setSecret/action", data=True)
    officer = role("Key Vault Secrets Officer")
    assert rbac.permits(officer, "Microsoft.KeyVault/vaults/secrets/setSecret/action", data=True)


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("POST", f"{KEYS}/listSecrets", "Microsoft.ApiManagement/service/subscriptions/listSecrets/action"),
        ("POST", f"{SERVICE}/namedValues/nv/listValue", "Microsoft.ApiManagement/service/namedValues/listValue/action"),
        ("POST", f"{SERVICE}/subscriptions/s1/regenerateSecondaryKey",
         "Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action"),
        ("PATCH", SERVICE, "Microsoft.ApiManagement/service/write"),
        ("GET", f"{SERVICE}/apis", "Microsoft.ApiManagement/service/apis/read"),
        ("PATCH", f"{SERVICE}/tenant/access", "Microsoft.ApiManagement/service/tenant/write"),
        ("PUT", f"{SERVICE}/portalconfigs/default", "Microsoft.ApiManagement/service/portalconfigs/write"),
        ("DELETE", f"{SERVICE}/backends/b", "Microsoft.ApiManagement/service/backends/delete"),
        ("PUT", SETTING, "Microsoft.Insights/diagnosticSettings/write"),
        ("GET", WORKSPACE, "Microsoft.OperationalInsights/workspaces/read"),
        ("GET", f"/subscriptions/{SUB}/resourceGroups", "Microsoft.Resources/subscriptions/resourceGroups/read"),
        ("PUT", INCIDENT, "Microsoft.SecurityInsights/incidents/write"),
    ],
)  # fmt: skip
def test_each_route_maps_to_its_arm_operation(method: str, path: str, action: str) -> None:
    """Source: the operation names of "Azure permissions" for Microsoft.ApiManagement,
    Microsoft.Insights, Microsoft.OperationalInsights, Microsoft.Resources and
    Microsoft.SecurityInsights ({namespace}/{type}/.../read|write|delete, {type}/{action}/action)."""
    operation = rbac.arm_operation(method, path)
    assert operation is not None
    assert operation.action == action


def test_the_product_role_is_read_from_its_bicep_file_and_odd_content_is_refused(tmp_path: Path) -> None:
    """The product's custom role as infra/subscription-role.bicep declares it (a role
    definition's Actions, "Understand Azure role definitions"); the reader refuses what it
    does not understand rather than guessing."""
    role_file = ROOT / "infra" / "subscription-role.bicep"
    arrays = rbac.bicep_actions(role_file)
    detect = rbac.role_from_bicep("d", role_file, allow_remediation=False)
    full = rbac.role_from_bicep("r", role_file, allow_remediation=True)
    assert detect.permissions[0].actions == arrays["readActions"]
    assert full.permissions[0].actions == arrays["readActions"] + arrays["writeActions"]
    text = role_file.read_text()
    odd = tmp_path / "odd.bicep"
    odd.write_text(text.replace("  'Microsoft.ResourceGraph/resources/read'\n", "  concat(x, 'y')\n"))
    with pytest.raises(rbac.RbacError, match=r"odd.bicep:\d+: inside 'readActions'"):
        rbac.bicep_actions(odd)
    odd.write_text(text.replace("var writeActions = [", "var moreActions = ["))
    with pytest.raises(rbac.RbacError, match="no writeActions array"):
        rbac.bicep_actions(odd)
    odd.write_text(text.replace("notActions: []", "notActions: ['x']"))
    with pytest.raises(rbac.RbacError, match="not the form the twin understands"):
        rbac.bicep_actions(odd)


# -- ARM ------------------------------------------------------------------------------------------


def test_a_call_no_assignment_grants_is_authorization_failed_naming_principal_action_and_scope(
    estate: TwinHandle,
) -> None:
    """Source: ARM's 403 AuthorizationFailed as ARM answers it (message quoted in
    Azure/Enterprise-Scale's docs and many public reports): "The client '{id}' with object id
    '{id}' does not have authorization to perform action '{action}' over scope '{scope}' or the
    scope is invalid. If access was recently granted, please refresh your credentials."."""
    grant(estate, "Reader", GROUP)
    assert as_caller(estate, "GET", f"{SERVICE}?api-version={APIM}").status_code == 200
    refused = as_caller(estate, "POST", f"{SERVICE}/subscriptions/s1/regenerateSecondaryKey?api-version={APIM}")
    assert refused.status_code == 403
    oid = CALLER["object_id"]
    assert error(refused) == {
        "code": "AuthorizationFailed",
        "message": f"The client '{oid}' with object id '{oid}' does not have authorization to perform action "
        "'Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action' over scope "
        f"'{SERVICE}/subscriptions/s1' or the scope is invalid. If access was recently granted, please "
        "refresh your credentials.",
    }


def test_assignments_apply_at_their_scope_and_below_only(estate: TwinHandle) -> None:
    """Source: "Understand scope for Azure RBAC": a role assigned at a parent scope is inherited
    by the child scopes, not by siblings."""
    grant(estate, "API Management Service Contributor", SERVICE)
    body = {"properties": {"enabled": False}}
    ok = as_caller(estate, "PATCH", f"{SERVICE}/tenant/access?api-version={APIM}", json=body, headers={"If-Match": "*"})
    assert ok.status_code == 200, ok.text
    # Event Grid's ResourceWriteSuccess names the assignment that granted it ("Azure Resource
    # Manager as an Event Grid source": data.authorization.evidence{role, roleAssignmentScope,
    # roleDefinitionId, principalId, ...}).
    _, events = estate.control("GET", "/_twin/events")
    [written] = [e for e in events["value"] if e["subject"].lower() == f"{SERVICE}/tenant/access".lower()]
    evidence = written["data"]["authorization"]["evidence"]
    assert evidence["role"] == "API Management Service Contributor"
    assert evidence["roleAssignmentScope"] == SERVICE
    assert evidence["roleDefinitionId"] == "312a565dc81f4fd8895a4e21e48d571c"
    sibling = as_caller(estate, "GET", f"{OTHER}?api-version={APIM}")
    assert (sibling.status_code, error(sibling)["code"]) == (403, "AuthorizationFailed")
    group = as_caller(estate, "GET", f"{GROUP}?api-version=2021-04-01")
    assert group.status_code == 403  # nothing granted on the group itself


def test_the_subscription_list_shows_only_subscriptions_where_the_caller_holds_a_role(estate: TwinHandle) -> None:
    """Source: Subscriptions - List ("Gets all subscriptions for a tenant" the caller can
    access): a principal sees a subscription once it holds any role in it."""
    listed = as_caller(estate, "GET", "/subscriptions?api-version=2022-12-01").json()["value"]
    assert listed == []
    grant(estate, "Reader", GROUP)
    listed = as_caller(estate, "GET", "/subscriptions?api-version=2022-12-01").json()["value"]
    assert [s["subscriptionId"] for s in listed] == [SUB]


def test_a_diagnostic_setting_to_a_workspace_the_caller_cannot_reach_is_linked_authorization_failed(
    estate: TwinHandle,
) -> None:
    """Source: ARM's LinkedAuthorizationFailed for a diagnostic setting (as ARM answers it,
    e.g. CDCgov/prime-reportstream#7678, JimGBritt/AzurePolicy#17): the setting's write is
    granted, the destination workspace's 'Microsoft.OperationalInsights/workspaces/sharedKeys/
    action' is not (the action MicrosoftDocs/azure-docs#80159 names for a workspace)."""
    grant(estate, "Contributor", GROUP)  # the service's group, not the workspace's
    setting = f"{SERVICE}/providers/Microsoft.Insights/diagnosticSettings/to-law"
    body = {"properties": {"workspaceId": WORKSPACE, "logs": [{"category": "GatewayLogs", "enabled": True}]}}
    refused = as_caller(estate, "PUT", f"{setting}?api-version=2021-05-01-preview", json=body)
    assert refused.status_code == 403
    oid = CALLER["object_id"]
    assert error(refused) == {
        "code": "LinkedAuthorizationFailed",
        "message": f"The client '{oid}' with object id '{oid}' has permission to perform action "
        f"'Microsoft.Insights/diagnosticSettings/write' on scope '{setting}'; however, it does not have "
        "permission to perform action 'Microsoft.OperationalInsights/workspaces/sharedKeys/action' on the "
        f"linked scope(s) '{WORKSPACE}' or the linked scope(s) are invalid.",
    }
    grant(estate, "Contributor", WORKSPACE)
    assert as_caller(estate, "PUT", f"{setting}?api-version=2021-05-01-preview", json=body).status_code == 200


def test_resource_graph_returns_only_what_the_caller_can_read(estate: TwinHandle) -> None:
    """Source: Resource Graph overview, "Permissions in Azure Resource Graph": "without at least
    read permissions to the Azure object or object group, results aren't returned" (no 403)."""
    query = {
        "subscriptions": [SUB],
        "query": "resources | where type =~ 'microsoft.apimanagement/service' | project id",
    }
    url = "/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
    nothing = as_caller(estate, "POST", url, json=query)
    assert (nothing.status_code, nothing.json()["data"]) == (200, [])
    grant(estate, "Reader", GROUP)
    rows = as_caller(estate, "POST", url, json=query).json()["data"]
    assert [r["id"].lower() for r in rows] == [SERVICE.lower()]


def test_an_estate_that_says_rbac_off_keeps_the_lenient_behaviour(estate: TwinHandle) -> None:
    """The twin's own switch (no Azure source): `rbac: off` lets any valid token do anything,
    for tests whose subject is not authorization."""
    assert as_caller(estate, "GET", f"{SERVICE}?api-version={APIM}").status_code == 403
    estate.seed({"rbac": "off"})
    assert as_caller(estate, "GET", f"{SERVICE}?api-version={APIM}").status_code == 200


def reader_for(principal: dict[str, str]) -> dict[str, Any]:
    return {"role_assignments": [{"principal": principal, "role": "Reader", "scope": "/"}]}


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ({"role_assignments": [{"principal": "nobody", "role": "Reader", "scope": "/"}]}, "neither a principal"),
        ({"role_assignments": [{"principal": "rbac-caller", "role": "Owner-ish", "scope": "/"}]}, "unknown role"),
        ({"role_assignments": [{"principal": "rbac-caller", "role": "Reader", "scope": "rg-x"}]}, "scope"),
        ({"rbac": "maybe"}, "'on' or 'off'"),
        # A managed identity is named by what carries it, and must exist when the assignment is applied.
        (reader_for({"managed_identity_of": "apim-nowhere"}), "no APIM service 'apim-nowhere'"),
        (reader_for({"managed_identity_of": SERVICE}), "has no system-assigned identity"),
        (
            reader_for(
                {"managed_identity_of": f"{GROUP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"}
            ),
            "no APIM service carries the user-assigned identity",
        ),
        (reader_for({"object": "apim-rbac"}), "managed_identity_of"),
        ({"custom_roles": [{"name": "x", "from_bicep": "nowhere.bicep"}]}, "cannot read the Bicep file"),
    ],
)
def test_a_wrong_rbac_section_is_refused_naming_where(
    estate: TwinHandle, fragment: dict[str, Any], message: str
) -> None:
    status, body = estate.control("POST", "/_twin/estate", json=fragment)
    assert status == 400
    assert message in body["error"]["message"]


def test_arm_401_carries_the_www_authenticate_challenge(estate: TwinHandle) -> None:
    """Source: ARM's 401 challenge as azure-mgmt-core's and azure-sdk-for-go's challenge tests
    quote it: `Bearer authorization_uri="https://login.windows.net/", error="invalid_token",
    error_description="The authentication failed because of missing 'Authorization' header."`
    (the twin's authority stands in for login.windows.net)."""
    missing = estate.arm("GET", f"{SERVICE}?api-version={APIM}", token="")
    assert missing.status_code == 401
    login = estate.urls["login"]
    assert missing.headers["WWW-Authenticate"] == (
        f'Bearer authorization_uri="{login}/", error="invalid_token", '
        "error_description=\"The authentication failed because of missing 'Authorization' header.\""
    )
    expired = estate.arm("GET", f"{SERVICE}?api-version={APIM}", token=estate.token(estate.urls["arm"], lifetime=-60))
    assert expired.status_code == 401
    assert expired.headers["WWW-Authenticate"].startswith(f'Bearer authorization_uri="{login}/", error="invalid_token"')
    assert "expiry" in expired.headers["WWW-Authenticate"]


# -- data planes ---------------------------------------------------------------------------------


def vault_client(twin: TwinHandle) -> SecretClient:
    return SecretClient(
        twin.urls[f"vault:{VAULT}"],
        twin.credential(CALLER["client_id"], CALLER["client_secret"]),
        verify_challenge_resource=False,
        connection_verify=twin.ca_file,
    )


def test_key_vault_refuses_a_data_action_no_role_grants_with_forbidden_by_rbac(estate: TwinHandle) -> None:
    """Source: Key Vault's 403 under RBAC authorization as Key Vault answers it (e.g.
    Azure/Commercial-Marketplace-SaaS-Accelerator#710): code Forbidden, innererror
    ForbiddenByRbac, "Caller is not authorized to perform action on resource." naming the
    data action; the data actions from "Azure permissions for Security" (Microsoft.KeyVault)."""
    vault_id = f"{GROUP}/providers/Microsoft.KeyVault/vaults/{VAULT}"
    grant(estate, "Contributor", GROUP)  # management rights grant no data actions
    client = vault_client(estate)
    with pytest.raises(HttpResponseError) as refused:
        client.get_secret("ledger")
    assert refused.value.status_code == 403
    assert refused.value.error is not None
    assert refused.value.error.code == "Forbidden"
    assert refused.value.error.innererror == {"code": "ForbiddenByRbac"}
    message = refused.value.error.message or ""
    assert message.startswith("Caller is not authorized to perform action on resource.\r\n")
    assert "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'\r\n" in message
    assert f"Resource: '{vault_id.lower()}/secrets/ledger'\r\n" in message
    grant(estate, "Key Vault Secrets User", vault_id)
    assert vault_client(estate).get_secret("ledger").value == "v1"
    with pytest.raises(HttpResponseError, match="setSecret/action"):
        vault_client(estate).set_secret("ledger", "v2")


def test_log_analytics_query_needs_query_read_on_the_workspace(estate: TwinHandle) -> None:
    """Source: azure-monitor-query's TROUBLESHOOTING.md ("Insufficient access error for logs
    query": 403 `{"error":{"message":"The provided credentials have insufficient access to
    perform the requested operation","code":"InsufficientAccessError",...}}`); the action
    checked is 'Microsoft.OperationalInsights/workspaces/query/read' ("Manage access to Log
    Analytics workspaces")."""
    url = estate.urls["logs"] + "/v1/workspaces/4d5e6f70-0000-4000-8000-0000000000bb/query"
    token = estate.token(estate.urls["logs"], client_id=CALLER["client_id"])
    headers = {"Authorization": f"Bearer {token}"}
    body = {"query": "ApiManagementGatewayLogs | take 1"}
    refused = requests.post(url, json=body, headers=headers, verify=estate.ca_file, timeout=30)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "InsufficientAccessError"
    assert refused.json()["error"]["message"] == (
        "The provided credentials have insufficient access to perform the requested operation"
    )
    grant(estate, "Log Analytics Reader", WORKSPACE)
    assert requests.post(url, json=body, headers=headers, verify=estate.ca_file, timeout=30).status_code != 403


def test_unknown_principals_tokens_are_refused_everything(estate: TwinHandle) -> None:
    """A token for a principal the estate grants nothing (a test token for an unknown app):
    every resource call is 403, as for an app with no role assignment."""
    token = estate.token(estate.urls["arm"], client_id=str(uuid.uuid4()))
    assert estate.arm("GET", f"{SERVICE}?api-version={APIM}", token=token).status_code == 403
