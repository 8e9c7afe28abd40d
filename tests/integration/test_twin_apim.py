"""The twin's Microsoft.ApiManagement provider, driven by the real azure-mgmt-apimanagement
clients (sync and async): every route the product uses, and the requests Azure rejects."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.mgmt.apimanagement import ApiManagementClient
from azure.mgmt.apimanagement.aio import ApiManagementClient as AsyncApiManagementClient
from azure.mgmt.apimanagement.models import (
    AccessInformationUpdateParameters,
    ApiCreateOrUpdateParameter,
    ApiManagementServiceBackupRestoreParameters,
    ApiManagementServiceUpdateParameters,
    ApiUpdateContract,
    BackendContract,
    BackendTlsProperties,
    BackendUpdateParameters,
    DiagnosticContract,
    IdentityProviderCreateContract,
    LoggerContract,
    NamedValueCreateContract,
    NamedValueUpdateParameters,
    PolicyContract,
    PortalConfigContract,
    PortalSigninSettings,
    PortalSignupSettings,
    SubscriptionCreateParameters,
    SubscriptionUpdateParameters,
)

from twin.apim import APIM_VERSIONS
from twin.apim.common import RETIRED_APIM_VERSIONS

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
RG = "rg-apim-prod"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
TLS10 = GW + "Security.Protocols.Tls10"
TLS11 = GW + "Security.Protocols.Tls11"
SSL30 = GW + "Security.Protocols.Ssl30"
BACKEND_TLS10 = GW + "Security.Backend.Protocols.Tls10"
TRIPLE_DES = GW + "Security.Ciphers.TripleDes168"
HTTP2 = GW + "Protocols.Server.Http2"
POLICY = "<policies><inbound><base /></inbound><backend><base /></backend><outbound><base /></outbound></policies>"


def service_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{name}"


def seed_service(twin: Any, name: str, **fields: Any) -> str:
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": SUB,
                    "resource_groups": [{"name": RG, "location": "westeurope", "apim": [{"name": name, **fields}]}],
                }
            ]
        }
    )
    return service_id(name)


def client(twin: Any) -> ApiManagementClient:
    return ApiManagementClient(
        twin.credential(),
        SUB,
        base_url=twin.urls["arm"],
        credential_scopes=[twin.urls["arm"] + "/.default"],
        **twin.sdk_kwargs,
    )


def async_client(twin: Any) -> AsyncApiManagementClient:
    return AsyncApiManagementClient(
        twin.async_credential(),
        SUB,
        base_url=twin.urls["arm"],
        credential_scopes=[twin.urls["arm"] + "/.default"],
        **twin.sdk_kwargs,
    )


def with_etag(response: Any, deserialized: Any, headers: dict[str, Any]) -> tuple[Any, str]:
    return deserialized, str(response.http_response.headers["ETag"])


def events(twin: Any, event_type: str) -> list[dict[str, Any]]:
    status, body = twin.control("GET", f"/_twin/events?type={event_type}")
    assert status == 200, body
    return list(body["value"])


def gateway(twin: Any, name: str, key: str, api_id: str | None = None) -> dict[str, Any]:
    status, body = twin.control(
        "POST", "/_twin/gateway/check", json={"service_id": service_id(name), "key": key, "api_id": api_id}
    )
    assert status == 200, body
    return dict(body)


@pytest.fixture(autouse=True)
def _apim_contributor(twin: Any, _fresh_twin: None) -> None:
    """These tests are about APIM's behaviour, not about who may call it: the caller is an
    API Management Service Contributor (the twin enforces RBAC; test_twin_rbac.py covers it)."""
    for subscription_id in twin.subscription_ids:
        twin.grant("API Management Service Contributor", f"/subscriptions/{subscription_id}")


@pytest.fixture
def apim(twin: Any) -> Iterator[ApiManagementClient]:
    with client(twin) as sdk:
        yield sdk


FULL_SERVICE: dict[str, Any] = {
    "sku": {"name": "Premium", "capacity": 1},
    "tags": {"env": "prod"},
    "identity": {"type": "SystemAssigned"},
    "products": [{"id": "starter", "displayName": "Starter", "apis": ["orders"]}],
    "apis": [
        {"id": "orders", "displayName": "Orders", "path": "orders", "protocols": ["https"]},
        {"id": "billing", "displayName": "Billing", "path": "billing", "protocols": ["http", "https"]},
    ],
    "loggers": [
        {"id": "azuremonitor", "loggerType": "azureMonitor"},
        {"id": "ai", "loggerType": "applicationInsights", "credentials": {"instrumentationKey": "ikey-secret"}},
    ],
    "diagnostics": [{"id": "azuremonitor", "loggerId": "/loggers/azuremonitor", "verbosity": "information"}],
    "backends": [{"id": "orders-be", "url": "https://orders.internal", "protocol": "http"}],
    "identity_providers": [
        {"type": "aad", "clientId": "aad-client", "clientSecret": "aad-secret", "signinTenant": "contoso"}
    ],
    "named_values": [
        {"id": "plain", "displayName": "plain", "value": "hello"},
        {"id": "hidden", "displayName": "hidden", "value": "s3cret", "secret": True},
    ],
    "subscriptions": [
        {"sid": "orders-sub", "displayName": "Orders client", "scope": "/apis/orders", "state": "active",
         "primaryKey": "p" * 32, "secondaryKey": "s" * 32},
        {"sid": "starter-sub", "displayName": "Starter client", "scope": "/products/starter", "state": "active"},
        {"sid": "paused", "displayName": "Paused", "scope": "/apis", "state": "suspended", "primaryKey": "z" * 32},
    ],
    "tenant_access": {"enabled": True},
    "git_access": {"enabled": False},
    "portal": {"signup_enabled": True, "signin_enabled": False, "basic_auth_enabled": True},
    "policies": {"service": POLICY, "apis": {"orders": POLICY}, "products": {"starter": POLICY}},
}  # fmt: skip


# -- the service ----------------------------------------------------------------------------------------


def test_a_fresh_service_reads_as_azure_creates_it(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-fresh")
    service, etag = apim.api_management_service.get(RG, "apim-fresh", cls=with_etag)
    assert etag
    assert service.etag == etag
    assert service.public_network_access == "Enabled"
    assert service.virtual_network_type == "None"
    assert service.custom_properties[TLS10] == "False"
    assert service.custom_properties[HTTP2] == "False"
    assert service.provisioning_state == "Succeeded"
    subs = list(apim.subscription.list(RG, "apim-fresh"))
    assert [s.name for s in subs] == ["master"]
    assert subs[0].scope == service_id("apim-fresh") + "/"
    assert subs[0].state == "active"
    assert subs[0].primary_key is None
    by_group = [s.name for s in apim.api_management_service.list_by_resource_group(RG)]
    assert "apim-fresh" in by_group
    assert "apim-fresh" in [s.name for s in apim.api_management_service.list()]


def test_unknown_service_is_arm_resource_not_found(twin: Any, apim: ApiManagementClient) -> None:
    with pytest.raises(ResourceNotFoundError) as caught:
        apim.api_management_service.get(RG, "apim-nowhere")
    assert caught.value.error is not None
    assert caught.value.error.code == "ResourceNotFound"
    with pytest.raises(ResourceNotFoundError) as caught:
        apim.subscription.get(RG, "apim-nowhere", "master")
    assert caught.value.error is not None
    assert caught.value.error.code == "ResourceNotFound"
    with pytest.raises(ResourceNotFoundError) as caught:
        apim.api_management_service.get("rg-missing", "apim-nowhere")
    assert caught.value.error is not None
    assert caught.value.error.code == "ResourceGroupNotFound"


def test_an_unknown_api_version_is_refused(twin: Any) -> None:
    seed_service(twin, "apim-versions")
    path = service_id("apim-versions")
    assert twin.arm("GET", path + "?api-version=2022-08-01").status_code == 200  # what the Azure CLI sends
    response = twin.arm("GET", path + "?api-version=2099-01-01")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "NoRegisteredProviderFound"
    assert "2024-05-01" in response.json()["error"]["message"]
    malformed = twin.arm("GET", path + "?api-version=latest")
    assert malformed.json()["error"]["code"] == "InvalidApiVersionParameter"


@pytest.mark.parametrize("version", sorted(APIM_VERSIONS))
def test_every_api_version_azure_serves_is_accepted(twin: Any, version: str) -> None:
    """The version folders of specification/apimanagement (stable/, preview/, and main.tsp's
    Versions) from 2021-08-01 on: a client built on any of them (an older SDK, Terraform, the CLI,
    a Bicep file) reads and writes the twin."""
    base = seed_service(twin, "apim-any-version")
    assert twin.arm("GET", f"{base}?api-version={version}").status_code == 200
    assert twin.arm("GET", f"{base}/subscriptions?api-version={version}").status_code == 200


@pytest.mark.parametrize("version", sorted(RETIRED_APIM_VERSIONS))
def test_retired_api_versions_fail_as_arm_answers(twin: Any, version: str) -> None:
    """Every Microsoft.ApiManagement api-version before 2021-08-01 was retired on 30 September
    2023 (Azure's retirement notice, as PSRule's Azure.APIM.MinAPIVersion quotes it: calls with
    them fail); ARM answers a version the provider does not serve with NoRegisteredProviderFound."""
    base = seed_service(twin, "apim-old-version")
    response = twin.arm("GET", f"{base}?api-version={version}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "NoRegisteredProviderFound"


def test_service_patch_is_an_lro_applied_on_completion(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-patch")
    twin.control("PUT", "/_twin/lro", json={"polls": 2})
    full = {TLS10: "false", TLS11: "false", SSL30: "false", BACKEND_TLS10: "false", TRIPLE_DES: "false", HTTP2: "true"}
    poller = apim.api_management_service.begin_update(
        RG,
        "apim-patch",
        ApiManagementServiceUpdateParameters(public_network_access="Disabled", custom_properties=full),
        polling_interval=0,
    )
    result = poller.result()
    assert result.public_network_access == "Disabled"
    assert result.provisioning_state == "Succeeded"
    again = apim.api_management_service.get(RG, "apim-patch")
    assert again.public_network_access == "Disabled"
    assert again.custom_properties[HTTP2] == "true"  # stored as sent
    assert again.custom_properties[TLS10] == "false"
    written = [
        e for e in events(twin, "Microsoft.Resources.ResourceWriteSuccess") if e["subject"] == service_id("apim-patch")
    ]
    assert len(written) == 1
    data = written[0]["data"]
    assert data["operationName"] == "Microsoft.ApiManagement/service/write"
    assert data["claims"]["appid"] == twin.client_id
    assert data["httpRequest"]["method"] == "PATCH"
    assert written[0]["topic"] == f"/subscriptions/{SUB}"


def test_service_patch_answers_202_with_both_polling_headers(twin: Any) -> None:
    seed_service(twin, "apim-raw")
    response = twin.arm(
        "PATCH",
        service_id("apim-raw") + "?api-version=2024-05-01",
        json={"properties": {"publicNetworkAccess": "Enabled"}},
    )
    assert response.status_code == 202
    assert "Location" in response.headers
    assert "Azure-AsyncOperation" in response.headers


def test_partial_custom_properties_reset_the_omitted_switches(twin: Any, apim: ApiManagementClient) -> None:
    # Created after 2018-04-01: omitted protocol switches go back to False (enabled legacy TLS off),
    # and an enabled HTTP/2 silently turns off.
    seed_service(twin, "apim-modern", properties={"customProperties": {HTTP2: "True", TLS11: "True"}})
    before = apim.api_management_service.get(RG, "apim-modern").custom_properties
    assert before[HTTP2] == "True"
    assert before[TLS11] == "True"
    apim.api_management_service.begin_update(
        RG, "apim-modern", ApiManagementServiceUpdateParameters(custom_properties={TLS10: "false"}), polling_interval=0
    ).result()
    after = apim.api_management_service.get(RG, "apim-modern").custom_properties
    assert after[HTTP2] == "False"
    assert after[TLS11] == "False"
    assert after[TLS10] == "false"  # as sent; the reset ones as Azure spells its defaults

    # Created on/before 2018-04-01: the omitted ones go back to True (legacy protocols re-enabled).
    seed_service(twin, "apim-legacy", created_at="2017-06-01T00:00:00Z")
    legacy = apim.api_management_service.get(RG, "apim-legacy").custom_properties
    assert legacy[TLS10] == "True"
    apim.api_management_service.begin_update(
        RG, "apim-legacy", ApiManagementServiceUpdateParameters(custom_properties={TLS10: "False"}), polling_interval=0
    ).result()
    legacy = apim.api_management_service.get(RG, "apim-legacy").custom_properties
    assert legacy[TLS10] == "False"
    assert legacy[TLS11] == "True"
    assert legacy[TRIPLE_DES] == "True"
    assert legacy[HTTP2] == "False"


@pytest.mark.parametrize(
    "update",
    [
        {"properties": {"publicNetworkAccess": "Sometimes"}},
        {"properties": {"virtualNetworkType": "Hybrid"}},
        {"properties": {"customProperties": {TLS10: "maybe"}}},
        {"properties": {"customProperties": {GW + "Security.Protocols.Tls99": "false"}}},
        {"identity": {"type": "Magic"}},
        {"sku": {"name": "Gold", "capacity": 1}},
    ],
)
def test_bad_service_values_are_rejected(twin: Any, update: dict[str, Any]) -> None:
    seed_service(twin, "apim-enums")
    response = twin.arm("PATCH", service_id("apim-enums") + "?api-version=2024-05-01", json=update)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "ValidationError"


def test_service_if_match_and_put_validation(twin: Any, apim: ApiManagementClient) -> None:
    # ApiManagementService_Update (specification/apimanagement/.../apimdeployment.json) declares
    # no If-Match parameter: Azure does not evaluate the header on the service PATCH. The twin
    # ignores it too, and enforces it only when a test asks (lro.enforce_service_if_match).
    seed_service(twin, "apim-etag")
    path = service_id("apim-etag") + "?api-version=2024-05-01"
    ignored = twin.arm("PATCH", path, json={"tags": {"a": "b"}}, headers={"If-Match": '"stale"'})
    assert ignored.status_code == 202, ignored.text
    assert twin.control("PUT", "/_twin/lro", {"enforce_service_if_match": True})[0] == 200
    stale = twin.arm("PATCH", path, json={"tags": {"a": "b"}}, headers={"If-Match": '"stale"'})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "PreconditionFailed"
    etag = twin.arm("GET", path).headers["ETag"]
    assert twin.arm("PATCH", path, json={"tags": {"a": "b"}}, headers={"If-Match": etag}).status_code == 202
    missing = twin.arm("PUT", service_id("apim-new") + "?api-version=2024-05-01", json={"location": "westeurope"})
    assert missing.status_code == 400
    bad_name = twin.arm(
        "PUT",
        service_id("1bad") + "?api-version=2024-05-01",
        json={"location": "westeurope", "sku": {"name": "Developer", "capacity": 1}},
    )
    assert bad_name.status_code == 400


def test_service_put_creates_with_defaults_then_delete(twin: Any, apim: ApiManagementClient) -> None:
    from azure.mgmt.apimanagement.models import ApiManagementServiceResource, ApiManagementServiceSkuProperties

    created = apim.api_management_service.begin_create_or_update(
        RG,
        "apim-made",
        ApiManagementServiceResource(
            location="westeurope",
            sku=ApiManagementServiceSkuProperties(name="Developer", capacity=1),
            publisher_email="ops@contoso.example",
            publisher_name="Contoso",
        ),
        polling_interval=0,
    ).result()
    assert created.provisioning_state == "Succeeded"
    assert created.custom_properties[TLS10] == "False"
    assert [s.name for s in apim.subscription.list(RG, "apim-made")] == ["master"]
    apim.api_management_service.begin_delete(RG, "apim-made", polling_interval=0).result()
    with pytest.raises(ResourceNotFoundError):
        apim.api_management_service.get(RG, "apim-made")
    assert any(
        e["subject"] == service_id("apim-made") for e in events(twin, "Microsoft.Resources.ResourceDeleteSuccess")
    )


# -- subscriptions --------------------------------------------------------------------------------------


def test_paging_2500_subscriptions_sync(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-many", subscriptions=[{"generate": {"count": 2500, "scope": "/apis"}}])
    names = [s.name for s in apim.subscription.list(RG, "apim-many", filter="startswith(name,'gen-')")]
    assert len(names) == 2500
    assert len(set(names)) == 2500
    everything = [s.name for s in apim.subscription.list(RG, "apim-many", top=500)]
    assert len(everything) == 2501
    assert len(set(everything)) == 2501


async def test_paging_2500_subscriptions_async(twin: Any) -> None:
    seed_service(twin, "apim-many-async", subscriptions={"generate": {"count": 2500, "prefix": "a-"}})
    async with async_client(twin) as sdk:
        names = [s.name async for s in sdk.subscription.list(RG, "apim-many-async", filter="startswith(name,'a-')")]
        service = await sdk.api_management_service.get(RG, "apim-many-async")
        poller = await sdk.api_management_service.begin_update(
            RG, "apim-many-async", ApiManagementServiceUpdateParameters(tags={"k": "v"}), polling_interval=0
        )
        updated = await poller.result()
    assert len(names) == 2500
    assert len(set(names)) == 2500
    assert service.name == "apim-many-async"
    assert updated.tags == {"k": "v"}


def test_subscription_filters(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-filter", **{k: FULL_SERVICE[k] for k in ("products", "apis", "subscriptions")})
    listed = lambda f: sorted(s.name for s in apim.subscription.list(RG, "apim-filter", filter=f))  # noqa: E731
    assert listed("state eq 'suspended'") == ["paused"]
    assert listed("productId eq 'starter'") == ["starter-sub"]
    assert listed("contains(displayName,'client') and state eq 'active'") == ["orders-sub", "starter-sub"]
    assert listed("name eq 'paused' or name eq 'master'") == ["master", "paused"]
    assert listed("endswith(scope,'/apis/orders')") == ["orders-sub"]
    base = service_id("apim-filter") + "/subscriptions?api-version=2024-05-01"
    for bad, named in (
        ("$filter=colour eq 'red'", "colour"),
        ("$filter=state ne 'active'", "ne"),
        ("$filter=name eq", ""),
    ):
        response = twin.arm("GET", f"{base}&{bad}")
        assert response.status_code == 400, bad
        assert named in response.json()["error"]["message"]
    assert twin.arm("GET", f"{base}&$top=0").status_code == 400
    assert twin.arm("GET", f"{base}&$skip=-1").status_code == 400
    page = twin.arm("GET", f"{base}&$top=2").json()
    assert len(page["value"]) == 2
    assert page["count"] == 4
    assert page["nextLink"].startswith("https://")


def test_keys_only_through_list_secrets_and_regeneration_flips_the_gateway(
    twin: Any, apim: ApiManagementClient
) -> None:
    seed_service(twin, "apim-keys", **{k: FULL_SERVICE[k] for k in ("products", "apis", "subscriptions")})
    raw = twin.arm("GET", service_id("apim-keys") + "/subscriptions/orders-sub?api-version=2024-05-01")
    assert "primaryKey" not in raw.json()["properties"]
    assert raw.headers["ETag"]
    sub = apim.subscription.get(RG, "apim-keys", "orders-sub")
    assert sub.primary_key is None
    assert sub.secondary_key is None
    keys = apim.subscription.list_secrets(RG, "apim-keys", "orders-sub")
    assert keys.primary_key == "p" * 32
    assert keys.secondary_key == "s" * 32

    assert gateway(twin, "apim-keys", keys.primary_key, "orders")["valid"] is True
    assert gateway(twin, "apim-keys", keys.primary_key, "billing")["valid"] is False  # scope is one API
    apim.subscription.regenerate_primary_key(RG, "apim-keys", "orders-sub")
    fresh = apim.subscription.list_secrets(RG, "apim-keys", "orders-sub")
    assert fresh.primary_key != keys.primary_key
    assert len(fresh.primary_key) == 32
    assert fresh.secondary_key == keys.secondary_key
    assert gateway(twin, "apim-keys", keys.primary_key, "orders")["valid"] is False
    assert gateway(twin, "apim-keys", fresh.primary_key, "orders") == {
        "valid": True,
        "subscription": "orders-sub",
        "reason": "ok",
    }
    assert (
        gateway(twin, "apim-keys", keys.secondary_key, "orders")["valid"] is True
    )  # zero downtime: the other key works

    # A product subscription covers the product's APIs only; a suspended one covers nothing.
    starter = apim.subscription.list_secrets(RG, "apim-keys", "starter-sub")
    assert len(starter.primary_key) == 32
    assert gateway(twin, "apim-keys", starter.primary_key, "orders")["valid"] is True
    assert gateway(twin, "apim-keys", starter.primary_key, "billing")["valid"] is False
    assert gateway(twin, "apim-keys", "z" * 32, "orders")["reason"] == "subscription is suspended"
    actions = events(twin, "Microsoft.Resources.ResourceActionSuccess")
    assert any(e["data"]["operationName"].endswith("subscriptions/regeneratePrimaryKey/action") for e in actions)


def test_subscription_crud_with_etags_and_events(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-crud", **{k: FULL_SERVICE[k] for k in ("products", "apis")})
    created, etag = apim.subscription.create_or_update(
        RG,
        "apim-crud",
        "new-sub",
        SubscriptionCreateParameters(scope="/products/starter", display_name="New", state="active"),
        cls=with_etag,
    )
    assert created.scope == service_id("apim-crud") + "/products/starter"
    assert created.state == "active"
    assert created.created_date is not None
    assert created.primary_key is None
    kinds = [e["eventType"] for e in twin.control("GET", "/_twin/events")[1]["value"]]
    assert "Microsoft.ApiManagement.SubscriptionCreated" in kinds
    apim_event = events(twin, "Microsoft.ApiManagement.SubscriptionCreated")[-1]
    assert apim_event["topic"] == service_id("apim-crud")
    assert apim_event["subject"] == "/subscriptions/new-sub"

    with pytest.raises(HttpResponseError, match="PreconditionFailed"):
        apim.subscription.update(RG, "apim-crud", "new-sub", '"stale"', SubscriptionUpdateParameters(state="suspended"))
    updated = apim.subscription.update(
        RG, "apim-crud", "new-sub", etag, SubscriptionUpdateParameters(state="suspended")
    )
    assert updated.state == "suspended"
    assert events(twin, "Microsoft.ApiManagement.SubscriptionUpdated")

    path = service_id("apim-crud") + "/subscriptions/new-sub?api-version=2024-05-01"
    missing = twin.arm("PATCH", path, json={"properties": {"state": "active"}})
    assert missing.status_code == 400
    assert "If-Match" in missing.json()["error"]["message"]
    assert twin.arm("DELETE", path).status_code == 400
    bad_state = twin.arm("PATCH", path, json={"properties": {"state": "paused"}}, headers={"If-Match": "*"})
    assert bad_state.status_code == 400
    bad_scope = twin.arm("PUT", path, json={"properties": {"scope": "/products/nope", "displayName": "x"}})
    assert bad_scope.status_code == 400
    no_name = twin.arm("PUT", path, json={"properties": {"scope": "/apis"}})
    assert no_name.status_code == 400

    apim.subscription.delete(RG, "apim-crud", "new-sub", "*")
    with pytest.raises(ResourceNotFoundError):
        apim.subscription.get(RG, "apim-crud", "new-sub")
    assert events(twin, "Microsoft.ApiManagement.SubscriptionDeleted")[-1]["subject"] == "/subscriptions/new-sub"


# -- tenant access, portal -----------------------------------------------------------------------------


def test_tenant_access_and_git_access(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-tenant", tenant_access={"enabled": True}, git_access={"enabled": False})
    access, etag = apim.tenant_access.get(RG, "apim-tenant", "access", cls=with_etag)
    assert access.enabled is True
    assert apim.tenant_access.get(RG, "apim-tenant", "gitAccess").enabled is False
    secrets_before = apim.tenant_access.list_secrets(RG, "apim-tenant", "access")
    assert secrets_before.primary_key
    assert secrets_before.secondary_key
    with pytest.raises(HttpResponseError, match="PreconditionFailed"):
        apim.tenant_access.update(
            RG, "apim-tenant", "access", '"old"', AccessInformationUpdateParameters(enabled=False)
        )
    apim.tenant_access.update(RG, "apim-tenant", "access", etag, AccessInformationUpdateParameters(enabled=False))
    assert apim.tenant_access.get(RG, "apim-tenant", "access").enabled is False
    apim.tenant_access.regenerate_secondary_key(RG, "apim-tenant", "access")
    after = apim.tenant_access.list_secrets(RG, "apim-tenant", "access")
    assert after.secondary_key != secrets_before.secondary_key
    assert after.primary_key == secrets_before.primary_key
    git_before = apim.tenant_access.list_secrets(RG, "apim-tenant", "gitAccess")
    apim.tenant_access_git.regenerate_primary_key(RG, "apim-tenant", "gitAccess")
    assert apim.tenant_access.list_secrets(RG, "apim-tenant", "gitAccess").primary_key != git_before.primary_key
    path = service_id("apim-tenant") + "/tenant/access?api-version=2024-05-01"
    assert twin.arm("PATCH", path, json={"properties": {"enabled": True}}).status_code == 400
    assert (
        twin.arm("PATCH", path, json={"properties": {"enabled": "yes"}}, headers={"If-Match": "*"}).status_code == 400
    )
    assert "primaryKey" not in twin.arm("GET", path).json()["properties"]


def test_portal_settings_and_basic_auth_config(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(
        twin, "apim-portal", portal={"signup_enabled": True, "signin_enabled": False, "basic_auth_enabled": True}
    )
    signup, etag = apim.sign_up_settings.get(RG, "apim-portal", cls=with_etag)
    assert signup.enabled is True
    apim.sign_up_settings.update(RG, "apim-portal", etag, PortalSignupSettings(enabled=False))  # 204
    assert apim.sign_up_settings.get(RG, "apim-portal").enabled is False
    signin = apim.sign_in_settings.create_or_update(RG, "apim-portal", PortalSigninSettings(enabled=True))
    assert signin.enabled is True
    config, config_etag = apim.portal_config.get(RG, "apim-portal", "default", cls=with_etag)
    assert config.enable_basic_auth is True
    with pytest.raises(HttpResponseError, match="PreconditionFailed"):
        apim.portal_config.update(RG, "apim-portal", "default", '"old"', PortalConfigContract(enable_basic_auth=False))
    changed = apim.portal_config.update(
        RG, "apim-portal", "default", config_etag, PortalConfigContract(enable_basic_auth=False)
    )
    assert changed.enable_basic_auth is False
    assert apim.portal_config.get(RG, "apim-portal", "default").enable_basic_auth is False
    assert [c.name for c in apim.portal_config.list_by_service(RG, "apim-portal")] == ["default"]
    base = service_id("apim-portal")
    assert (
        twin.arm(
            "PATCH", base + "/portalsettings/signup?api-version=2024-05-01", json={"properties": {"enabled": True}}
        ).status_code
        == 400
    )
    assert (
        twin.arm(
            "PATCH",
            base + "/portalconfigs/default?api-version=2024-05-01",
            json={"properties": {"enableBasicAuth": True}},
        ).status_code
        == 400
    )
    assert (
        twin.arm(
            "PUT",
            base + "/portalconfigs/default?api-version=2024-05-01",
            json={"properties": {"enableBasicAuth": True}},
        ).status_code
        == 400
    )
    written = events(twin, "Microsoft.Resources.ResourceWriteSuccess")
    assert any(e["data"]["operationName"] == "Microsoft.ApiManagement/service/portalconfigs/write" for e in written)


def test_identity_providers(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-idp", identity_providers=FULL_SERVICE["identity_providers"])
    aad = apim.identity_provider.get(RG, "apim-idp", "aad")
    assert aad.client_id == "aad-client"
    assert aad.client_secret is None
    assert apim.identity_provider.list_secrets(RG, "apim-idp", "aad").client_secret == "aad-secret"
    created = apim.identity_provider.create_or_update(
        RG, "apim-idp", "google", IdentityProviderCreateContract(client_id="g-id", client_secret="g-secret")
    )
    assert created.type_properties_type == "google"
    assert created.client_secret is None
    assert sorted(p.name for p in apim.identity_provider.list_by_service(RG, "apim-idp")) == ["aad", "google"]
    path = service_id("apim-idp") + "/identityProviders/basic?api-version=2024-05-01"
    assert twin.arm("PUT", path, json={"properties": {"clientId": "a", "clientSecret": "b"}}).status_code == 400
    no_secret = service_id("apim-idp") + "/identityProviders/twitter?api-version=2024-05-01"
    assert twin.arm("PUT", no_secret, json={"properties": {"clientId": "a"}}).status_code == 400
    apim.identity_provider.delete(RG, "apim-idp", "google", "*")
    assert [p.name for p in apim.identity_provider.list_by_service(RG, "apim-idp")] == ["aad"]


# -- named values, APIs, backends, diagnostics, loggers, policies -----------------------------------------


def test_named_values_are_lros_and_hide_secrets(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-nv", named_values=FULL_SERVICE["named_values"])
    assert apim.named_value.get(RG, "apim-nv", "plain").value == "hello"
    hidden = apim.named_value.get(RG, "apim-nv", "hidden")
    assert hidden.secret is True
    assert hidden.value is None
    assert apim.named_value.list_value(RG, "apim-nv", "hidden").value == "s3cret"
    created = apim.named_value.begin_create_or_update(
        RG, "apim-nv", "kv", NamedValueCreateContract(
            display_name="kv", secret=True, key_vault={"secret_identifier": "https://kv1.vault.azure.net/secrets/api-key"}
        ), polling_interval=0,
    ).result()  # fmt: skip
    assert created.key_vault.secret_identifier.endswith("/secrets/api-key")
    # No identity on this service: APIM cannot read the vault (see test_twin_named_value_references.py).
    assert created.key_vault.last_status.code == "IdentityNotFound"
    _, etag = apim.named_value.get(RG, "apim-nv", "plain", cls=with_etag)
    updated = apim.named_value.begin_update(
        RG, "apim-nv", "plain", etag, NamedValueUpdateParameters(value="bye"), polling_interval=0
    ).result()
    assert updated.value == "bye"
    assert len(list(apim.named_value.list_by_service(RG, "apim-nv"))) == 3
    base = service_id("apim-nv") + "/namedValues"
    assert (
        twin.arm(
            "PUT", base + "/bad?api-version=2024-05-01", json={"properties": {"displayName": "has space", "value": "x"}}
        ).status_code
        == 400
    )
    assert (
        twin.arm(
            "PUT", base + "/bad?api-version=2024-05-01", json={"properties": {"displayName": "novalue"}}
        ).status_code
        == 400
    )
    assert (
        twin.arm("PATCH", base + "/plain?api-version=2024-05-01", json={"properties": {"value": "x"}}).status_code
        == 400
    )
    apim.named_value.delete(RG, "apim-nv", "plain", "*")
    with pytest.raises(ResourceNotFoundError):
        apim.named_value.get(RG, "apim-nv", "plain")


def test_apis_and_backends(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-apis", **{k: FULL_SERVICE[k] for k in ("apis", "backends")})
    orders, etag = apim.api.get(RG, "apim-apis", "orders", cls=with_etag)
    assert orders.protocols == ["https"]
    assert orders.subscription_required is True
    with pytest.raises(HttpResponseError) as caught:
        apim.api.update(RG, "apim-apis", "orders", etag, ApiUpdateContract(protocols=["ftp"]))
    assert caught.value.status_code == 400
    changed = apim.api.update(RG, "apim-apis", "orders", etag, ApiUpdateContract(protocols=["https", "wss"]))
    assert changed.protocols == ["https", "wss"]
    with pytest.raises(HttpResponseError, match="PreconditionFailed"):
        apim.api.update(RG, "apim-apis", "orders", etag, ApiUpdateContract(subscription_required=False))
    made = apim.api.begin_create_or_update(
        RG, "apim-apis", "echo", ApiCreateOrUpdateParameter(display_name="Echo", path="echo", protocols=["https"]),
        polling_interval=0,
    ).result()  # fmt: skip
    assert made.name == "echo"
    assert made.path == "echo"
    assert sorted(a.name for a in apim.api.list_by_service(RG, "apim-apis")) == ["billing", "echo", "orders"]

    backend, backend_etag = apim.backend.get(RG, "apim-apis", "orders-be", cls=with_etag)
    assert backend.tls.validate_certificate_chain is True
    weak_tls = BackendTlsProperties(validate_certificate_chain=False, validate_certificate_name=False)
    weakened = apim.backend.update(RG, "apim-apis", "orders-be", backend_etag, BackendUpdateParameters(tls=weak_tls))
    assert weakened.tls.validate_certificate_chain is False
    created = apim.backend.create_or_update(
        RG, "apim-apis", "pay", BackendContract(url="https://pay.internal", protocol="http")
    )
    assert created.tls.validate_certificate_name is True
    bad = twin.arm(
        "PUT",
        service_id("apim-apis") + "/backends/x?api-version=2024-05-01",
        json={"properties": {"url": "https://x", "protocol": "ftp"}},
    )
    assert bad.status_code == 400
    apim.backend.delete(RG, "apim-apis", "pay", "*")
    assert [b.name for b in apim.backend.list_by_service(RG, "apim-apis")] == ["orders-be"]


def test_diagnostics_and_loggers(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-diag", **{k: FULL_SERVICE[k] for k in ("loggers", "diagnostics")})
    diag, etag = apim.diagnostic.get(RG, "apim-diag", "azuremonitor", cls=with_etag)
    assert diag.logger_id == service_id("apim-diag") + "/loggers/azuremonitor"
    leaky_settings = {"request": {"headers": ["Ocp-Apim-Subscription-Key"]}}
    leaky = apim.diagnostic.update(
        RG,
        "apim-diag",
        "azuremonitor",
        etag,
        DiagnosticContract(logger_id="/loggers/azuremonitor", frontend=leaky_settings),
    )
    assert leaky.frontend.request.headers == ["Ocp-Apim-Subscription-Key"]
    ai = apim.logger.get(RG, "apim-diag", "ai")
    assert ai.credentials["instrumentationKey"].startswith("{{Logger-Credentials--")
    made = apim.diagnostic.create_or_update(
        RG,
        "apim-diag",
        "applicationinsights",
        DiagnosticContract(logger_id="/loggers/ai", sampling={"sampling_type": "fixed", "percentage": 50}),
    )
    assert made.sampling.percentage == 50
    path = service_id("apim-diag") + "/diagnostics/applicationinsights?api-version=2024-05-01"
    assert twin.arm("PUT", path, json={"properties": {"loggerId": "/loggers/nope"}}).status_code == 400
    assert (
        twin.arm("PUT", path, json={"properties": {"loggerId": "/loggers/ai", "verbosity": "loud"}}).status_code == 400
    )
    assert (
        twin.arm(
            "PUT",
            service_id("apim-diag") + "/diagnostics/other?api-version=2024-05-01",
            json={"properties": {"loggerId": "/loggers/ai"}},
        ).status_code
        == 400
    )
    logger = apim.logger.create_or_update(
        RG,
        "apim-diag",
        "hub",
        LoggerContract(logger_type="azureEventHub", credentials={"name": "h", "connectionString": "Endpoint=sb://x"}),
    )
    assert logger.logger_type == "azureEventHub"
    assert "Endpoint" not in json.dumps(logger.credentials)
    bad_type = twin.arm(
        "PUT",
        service_id("apim-diag") + "/loggers/l2?api-version=2024-05-01",
        json={"properties": {"loggerType": "splunk"}},
    )
    assert bad_type.status_code == 400
    apim.diagnostic.delete(RG, "apim-diag", "applicationinsights", "*")
    apim.logger.delete(RG, "apim-diag", "hub", "*")
    assert sorted(x.name for x in apim.logger.list_by_service(RG, "apim-diag")) == ["ai", "azuremonitor"]


def test_policies_at_every_level(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-pol", **{k: FULL_SERVICE[k] for k in ("products", "apis", "policies")})
    service_policy, etag = apim.policy.get(RG, "apim-pol", "policy", cls=with_etag)
    assert service_policy.value == POLICY
    assert service_policy.format == "xml"
    assert apim.policy.get(RG, "apim-pol", "policy", format="rawxml").format == "rawxml"
    assert apim.api_policy.get(RG, "apim-pol", "orders", "policy").value == POLICY
    assert apim.product_policy.get(RG, "apim-pol", "starter", "policy").value == POLICY
    with pytest.raises(ResourceNotFoundError):
        apim.api_policy.get(RG, "apim-pol", "billing", "policy")
    made = apim.api_policy.create_or_update(RG, "apim-pol", "billing", "policy", PolicyContract(value=POLICY))
    assert made.value == POLICY
    with pytest.raises(HttpResponseError) as caught:
        apim.policy.create_or_update(RG, "apim-pol", "policy", PolicyContract(value="<policies><inbound></policies>"))
    assert caught.value.status_code == 400
    assert caught.value.error.code == "ValidationError"
    with pytest.raises(HttpResponseError):
        apim.policy.create_or_update(RG, "apim-pol", "policy", PolicyContract(value="<inbound />"))
    with pytest.raises(HttpResponseError, match="PreconditionFailed"):
        apim.policy.create_or_update(RG, "apim-pol", "policy", PolicyContract(value=POLICY), if_match='"old"')
    apim.policy.create_or_update(RG, "apim-pol", "policy", PolicyContract(value=POLICY), if_match=etag)
    apim.product_policy.delete(RG, "apim-pol", "starter", "policy", "*")
    with pytest.raises(ResourceNotFoundError):
        apim.product_policy.get(RG, "apim-pol", "starter", "policy")
    assert twin.arm("DELETE", service_id("apim-pol") + "/policies/policy?api-version=2024-05-01").status_code == 400


# -- backup and restore (real blobs in Azurite) -----------------------------------------------------------


def _storage(twin: Any) -> tuple[str, dict[str, str]]:
    storage = twin.server.state.extra.get("storage") or {}
    if "apimrbackups" not in storage:
        pytest.skip("Azurite is not running for this twin (no storage accounts): backup tests need it")
    return "apimrbackups", storage["apimrbackups"]


def test_backup_writes_a_blob_and_restore_brings_the_configuration_back(twin: Any, apim: ApiManagementClient) -> None:
    from azure.storage.blob import BlobServiceClient

    account, info = _storage(twin)
    blobs = BlobServiceClient(
        info["blob_url"],
        credential={"account_name": account, "account_key": info["account_key"]},
        connection_verify=twin.ca_file,
    )
    container = "apim-" + uuid.uuid4().hex[:8]
    blobs.create_container(container)
    seed_service(
        twin,
        "apim-bk",
        **{k: FULL_SERVICE[k] for k in ("identity", "products", "apis", "subscriptions", "named_values")},
    )
    params = ApiManagementServiceBackupRestoreParameters(
        storage_account=account,
        container_name=container,
        backup_name="nightly",
        access_type="SystemAssignedManagedIdentity",
    )
    # Without a data role on the account the identity cannot write: the LRO fails as Azure's does.
    with pytest.raises(HttpResponseError, match="AuthorizationPermissionMismatch"):
        apim.api_management_service.begin_backup(RG, "apim-bk", params, polling_interval=0).result()
    account_id = twin.server.state.extra["storage_ids"][account]
    twin.grant("Storage Blob Data Contributor", account_id, {"managed_identity_of": "apim-bk"})
    backed_up = apim.api_management_service.begin_backup(RG, "apim-bk", params, polling_interval=0).result()
    assert backed_up.name == "apim-bk"
    document = json.loads(blobs.get_blob_client(container, "nightly").download_blob().readall())
    assert any(r["path"] == "/subscriptions/orders-sub" for r in document["resources"])

    apim.subscription.delete(RG, "apim-bk", "orders-sub", "*")
    apim.api_management_service.begin_update(
        RG, "apim-bk", ApiManagementServiceUpdateParameters(custom_properties={HTTP2: "true"}), polling_interval=0
    ).result()
    apim.api_management_service.begin_restore(RG, "apim-bk", params, polling_interval=0).result()
    restored = apim.subscription.list_secrets(RG, "apim-bk", "orders-sub")
    assert restored.primary_key == "p" * 32
    assert apim.named_value.list_value(RG, "apim-bk", "hidden").value == "s3cret"
    # Protocol settings are not part of a backup: the change made after it survives the restore.
    assert apim.api_management_service.get(RG, "apim-bk").custom_properties[HTTP2] == "true"
    assert events(twin, "Microsoft.Resources.ResourceActionSuccess")
    # Learn: a backup expires after 30 days ("Cannot restore: backup expired").
    twin.control("POST", "/_twin/clock/advance", {"days": 31})
    with pytest.raises(HttpResponseError, match="backup expired"):
        apim.api_management_service.begin_restore(RG, "apim-bk", params, polling_interval=0).result()


def test_backup_is_refused_or_fails_as_azure_does(twin: Any, apim: ApiManagementClient) -> None:
    account, info = _storage(twin)
    seed_service(twin, "apim-bk-bad")
    base = service_id("apim-bk-bad") + "/backup?api-version=2024-05-01"
    unknown = twin.arm(
        "POST",
        base,
        json={
            "storageAccount": "nosuch",
            "containerName": "c",
            "backupName": "b",
            "accessType": "AccessKey",
            "accessKey": "k",
        },
    )
    assert unknown.status_code == 400
    assert "nosuch" in unknown.json()["error"]["message"]
    no_identity = twin.arm(
        "POST",
        base,
        json={
            "storageAccount": account,
            "containerName": "c",
            "backupName": "b",
            "accessType": "SystemAssignedManagedIdentity",
        },
    )
    assert no_identity.status_code == 400
    missing = twin.arm("POST", base, json={"storageAccount": account, "backupName": "b"})
    assert missing.status_code == 400
    absent_container = ApiManagementServiceBackupRestoreParameters(
        storage_account=account,
        container_name="absent-container",
        backup_name="b",
        access_type="AccessKey",
        access_key=info["account_key"],
    )
    with pytest.raises(HttpResponseError, match="ContainerNotFound"):
        apim.api_management_service.begin_backup(RG, "apim-bk-bad", absent_container, polling_interval=0).result()
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient(
        info["blob_url"],
        credential={"account_name": account, "account_key": info["account_key"]},
        connection_verify=twin.ca_file,
    ).create_container("bk-bad")
    wrong_key = ApiManagementServiceBackupRestoreParameters(
        storage_account=account,
        container_name="bk-bad",
        backup_name="b",
        access_type="AccessKey",
        access_key=base64.b64encode(b"x" * 64).decode(),
    )
    with pytest.raises(HttpResponseError, match=r"InvalidAuthenticationInfo|AuthenticationFailed|AuthorizationFailure"):
        apim.api_management_service.begin_backup(RG, "apim-bk-bad", wrong_key, polling_interval=0).result()
    with pytest.raises(HttpResponseError, match="BackupNotFound"):
        apim.api_management_service.begin_restore(
            RG,
            "apim-bk-bad",
            ApiManagementServiceBackupRestoreParameters(
                storage_account=account,
                container_name="bk-bad",
                backup_name="never-written",
                access_type="AccessKey",
                access_key=info["account_key"],
            ),
            polling_interval=0,
        ).result()


# -- seeding ----------------------------------------------------------------------------------------------


def test_estate_errors_name_the_place(twin: Any) -> None:
    fragment = {
        "subscriptions": [{"id": SUB, "resource_groups": [{"name": RG, "apim": [{"name": "apim-x", "colour": "red"}]}]}]
    }
    status, body = twin.control("POST", "/_twin/estate", json=fragment)
    assert status == 400
    assert "apim[0]" in body["error"]["message"]
    assert "colour" in body["error"]["message"]
    fragment["subscriptions"][0]["resource_groups"][0]["apim"] = [
        {"name": "apim-x", "subscriptions": [{"sid": "s", "scope": "/products/none"}]}
    ]
    status, body = twin.control("POST", "/_twin/estate", json=fragment)
    assert status == 400
    assert "subscriptions[0].scope" in body["error"]["message"]


def test_service_update_runs_on_the_clock_and_blocks_a_second_change(twin: Any) -> None:
    """Learn, "Manage protocols and ciphers in Azure API Management": such changes can take an
    hour or more and block other infrastructure changes meanwhile. The twin runs a service
    update on its movable clock: GET shows provisioningState Updating and the old settings,
    the operation answers InProgress however often it is polled, a second service change
    gets 409, and once the clock has moved on the update lands."""
    seed_service(twin, "apim-slow")
    path = service_id("apim-slow") + "?api-version=2024-05-01"
    twin.control("PUT", "/_twin/lro", {"service_update_seconds": 3600, "polls": 0})
    started = twin.arm("PATCH", path, json={"properties": {"publicNetworkAccess": "Disabled"}})
    assert started.status_code == 202, started.text
    status_url = started.headers["Azure-AsyncOperation"]
    for _ in range(3):
        assert twin.arm("GET", status_url.split(twin.urls["arm"], 1)[1]).json()["status"] == "InProgress"
    during = twin.arm("GET", path).json()
    assert during["properties"]["provisioningState"] == "Updating"
    assert during["properties"]["publicNetworkAccess"] == "Enabled"
    second = twin.arm("PATCH", path, json={"tags": {"x": "y"}})
    assert second.status_code == 409, second.text
    assert second.json()["error"]["code"] == "Conflict"
    twin.control("POST", "/_twin/clock/advance", {"seconds": 3601})
    assert twin.arm("GET", status_url.split(twin.urls["arm"], 1)[1]).json()["status"] == "Succeeded"
    after = twin.arm("GET", path).json()
    assert after["properties"]["provisioningState"] == "Succeeded"
    assert after["properties"]["publicNetworkAccess"] == "Disabled"
    assert twin.arm("PATCH", path, json={"tags": {"x": "y"}}).status_code == 202


def test_lro_puts_of_apis_and_named_values_carry_an_etag(twin: Any, apim: ApiManagementClient) -> None:
    """Api_CreateOrUpdate (apimapis.json) and NamedValue_CreateOrUpdate (apimnamedvalues.json)
    list an ETag header on their 200 and 201 answers, LROs though they are; the entity keeps
    that ETag once the operation completes, so a client can write again with it."""
    base = seed_service(twin, "apim-etags")
    for path, body in (
        ("/apis/orders", {"properties": {"displayName": "Orders", "path": "orders", "protocols": ["https"]}}),
        ("/namedValues/region", {"properties": {"displayName": "region", "value": "westeurope"}}),
    ):
        created = twin.arm("PUT", f"{base}{path}?api-version=2024-05-01", json=body)
        assert created.status_code == 201, created.text
        etag = created.headers.get("ETag")
        assert etag
        status = created.headers["Azure-AsyncOperation"].removeprefix(twin.urls["arm"])
        for _ in range(20):
            if twin.arm("GET", status).json()["status"] != "InProgress":
                break
        assert twin.arm("GET", f"{base}{path}?api-version=2024-05-01").headers["ETag"] == etag
        again = twin.arm("PUT", f"{base}{path}?api-version=2024-05-01", json=body, headers={"If-Match": etag})
        assert again.status_code == 200, again.text
        assert again.headers.get("ETag")


def test_custom_properties_are_stored_as_sent(twin: Any, apim: ApiManagementClient) -> None:
    """customProperties is a map of strings (ApiManagementServiceBaseProperties.customProperties,
    additionalProperties: string, in apimdeployment.json): APIM keeps the key spelling and value
    casing a client sent; only the switches it resets are its own "True"/"False". A twin that
    normalised them would hide a client comparing them case-sensitively (issue 10, item 4)."""
    seed_service(twin, "apim-casing")
    lower_key = TLS10.lower()
    apim.api_management_service.begin_update(
        RG, "apim-casing", ApiManagementServiceUpdateParameters(custom_properties={lower_key: "FALSE", HTTP2: "tRUE"}),
        polling_interval=0,
    ).result()  # fmt: skip
    stored = apim.api_management_service.get(RG, "apim-casing").custom_properties
    assert stored[lower_key] == "FALSE"
    assert TLS10 not in stored  # one switch, in the client's spelling
    assert stored[HTTP2] == "tRUE"
    assert stored[TLS11] == "False"
    twice = twin.arm(
        "PATCH", service_id("apim-casing") + "?api-version=2024-05-01",
        json={"properties": {"customProperties": {TLS10: "False", lower_key: "False"}}},
    )  # fmt: skip
    assert twice.status_code == 400


@pytest.mark.parametrize(
    ("xml_text", "complaint"),
    [
        ("<policies><inbound><not-a-policy /></inbound></policies>", "Unknown element 'not-a-policy'"),
        ("<policies><inbound><set-headr name='x' /></inbound></policies>", "Unknown element 'set-headr'"),
        (
            "<policies><inbound><choose><when condition='true'><bogus /></when></choose></inbound></policies>",
            "Unknown element 'bogus'",
        ),
        ("<policies><inbound><choose><bogus /></choose></inbound></policies>", "Unknown element 'bogus'"),
        ("<policies><inboud><base /></inboud></policies>", "Unknown section 'inboud'"),
    ],
)
def test_policy_xml_with_an_unknown_policy_element_is_refused(
    twin: Any, apim: ApiManagementClient, xml_text: str, complaint: str
) -> None:
    """Only the documented policy statements (Learn, "API Management policy reference",
    api-management-policies) may stand in a section or a control-flow element; APIM refuses
    the document otherwise (Policy_CreateOrUpdate, apimpolicies.json: 400 ErrorResponse)."""
    seed_service(twin, "apim-polxml")
    with pytest.raises(HttpResponseError) as refused:
        apim.policy.create_or_update(
            RG, "apim-polxml", "policy", PolicyContract(value=xml_text, format="xml")
        )  # fmt: skip
    assert refused.value.status_code == 400
    assert complaint in str(refused.value)


def test_policy_xml_with_documented_elements_and_free_content_is_accepted(twin: Any, apim: ApiManagementClient) -> None:
    seed_service(twin, "apim-polxml")
    good = (
        '<policies><inbound><base /><choose><when condition="@(true)"><set-header name="x" exists-action='
        '"override"><value>1</value></set-header></when><otherwise><rate-limit calls="5" renewal-period="1" />'
        '</otherwise></choose><validate-jwt header-name="Authorization"><openid-config url="https://x/" />'
        '</validate-jwt><retry condition="@(false)" count="1" interval="1"><forward-request /></retry>'
        "</inbound><backend><base /></backend><outbound /><on-error /></policies>"
    )
    apim.policy.create_or_update(RG, "apim-polxml", "policy", PolicyContract(value=good, format="xml"))


# -- API operations and users (what a backup manifest reads) ------------------------------------------------


def test_api_operations_as_the_spec_has_them(twin: Any, apim: ApiManagementClient) -> None:
    """apimapis.json (2024-05-01): ApiOperation_CreateOrUpdate answers 201 then 200, requires
    displayName, method and urlTemplate; ListByApi pages; Delete needs If-Match; an estate
    seeds operations under `apis[].operations`."""
    from azure.mgmt.apimanagement.models import OperationContract

    seed_service(
        twin,
        "apim-ops",
        apis=[{"id": "orders", "path": "orders", "operations": [{"id": "list", "method": "GET", "urlTemplate": "/o"}]}],
    )
    assert [o.name for o in apim.api_operation.list_by_api(RG, "apim-ops", "orders")] == ["list"]
    created = apim.api_operation.create_or_update(
        RG, "apim-ops", "orders", "create", OperationContract(display_name="Create", method="POST", url_template="/o")
    )
    assert created.method == "POST"
    again = twin.arm(
        "PUT",
        service_id("apim-ops") + "/apis/orders/operations/create?api-version=2024-05-01",
        json={"properties": {"displayName": "Create", "method": "POST", "urlTemplate": "/o"}},
    )
    assert again.status_code == 200
    missing = twin.arm(
        "PUT",
        service_id("apim-ops") + "/apis/orders/operations/bad?api-version=2024-05-01",
        json={"properties": {"displayName": "Bad", "method": "GET"}},
    )
    assert missing.status_code == 400
    assert "urlTemplate" in missing.json()["error"]["message"]
    apim.api_operation.delete(RG, "apim-ops", "orders", "create", "*")
    assert [o.name for o in apim.api_operation.list_by_api(RG, "apim-ops", "orders")] == ["list"]
    with pytest.raises(ResourceNotFoundError):
        apim.api_operation.get(RG, "apim-ops", "orders", "create")


def test_users_as_the_spec_has_them(twin: Any, apim: ApiManagementClient) -> None:
    """apimusers.json (2024-05-01): User_CreateOrUpdate requires email, firstName, lastName; a
    password is accepted and never returned."""
    from azure.mgmt.apimanagement.models import UserCreateParameters

    seed_service(
        twin, "apim-users", users=[{"id": "ada", "email": "ada@example.com", "firstName": "Ada", "lastName": "L"}]
    )
    apim.user.create_or_update(
        RG,
        "apim-users",
        "bob",
        UserCreateParameters(email="bob@example.com", first_name="Bob", last_name="B", password="canary-pw-1"),
    )
    listed = twin.arm("GET", service_id("apim-users") + "/users?api-version=2024-05-01")
    assert sorted(u["name"] for u in listed.json()["value"]) == ["ada", "bob"]
    assert "canary-pw-1" not in listed.text
    bad = twin.arm(
        "PUT", service_id("apim-users") + "/users/eve?api-version=2024-05-01", json={"properties": {"email": "e@x.y"}}
    )
    assert bad.status_code == 400
