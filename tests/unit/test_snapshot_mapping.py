"""The pure parts of inventory and snapshot: SDK models (built from Azure's JSON, as the SDK
builds them from a response) to snapshot parts, the ledger tags, the scope filter."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from azure.keyvault.secrets import SecretProperties
from azure.keyvault.secrets._generated.models import SecretItem
from azure.mgmt.apimanagement import models as m
from azure.mgmt.monitor.v2021_05_01_preview import models as monitor_models

from shared.inventory import InstanceRef, graph_query, in_scope, instance_ref, select
from shared.model import PolicyScope
from shared.settings import PUBLIC_CLOUDS, CloudName, ScopeSettings, Settings, StorageSettings
from shared.snapshot import (
    align_ledger,
    current_apis,
    keyed_hash,
    ledger_entry,
    map_api,
    map_backend,
    map_diagnostic,
    map_diagnostic_setting,
    map_logger,
    map_named_value,
    map_policy,
    map_portal,
    map_product,
    map_service,
    map_subscription,
    map_tracked_key,
    text,
    utc,
)

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
SERVICE_ID = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/apim-a"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."


def ref(service_id: str = SERVICE_ID, **tags: str) -> InstanceRef:
    found = instance_ref(service_id, "West Europe", tags)
    assert found is not None
    return found


def service_json(**properties: Any) -> dict[str, Any]:
    return {
        "id": SERVICE_ID,
        "name": "apim-a",
        "type": "Microsoft.ApiManagement/service",
        "location": "West Europe",
        "etag": "AAAAAAFx",
        "tags": {"env": "prod"},
        "sku": {"name": "Premium", "capacity": 2},
        "properties": {
            "publisherEmail": "a@contoso.example",
            "publisherName": "Contoso",
            "createdAtUtc": "2019-01-02T03:04:05.1234567Z",
            "provisioningState": "Succeeded",
            **properties,
        },
    }


# -- small helpers --------------------------------------------------------------------------------


def test_text_takes_the_value_of_sdk_enums() -> None:
    # str() of the SDK's (str, Enum) members is "SkuType.PREMIUM" on Python 3.11.
    assert text(m.SkuType.PREMIUM) == "Premium"
    assert text("x") == "x"
    assert text(None) is None


def test_utc_makes_every_datetime_aware_utc() -> None:
    assert utc(datetime(2026, 1, 1, 12)) == datetime(2026, 1, 1, 12, tzinfo=UTC)
    shifted = utc(datetime(2026, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))))
    assert shifted == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert shifted is not None
    assert shifted.tzinfo == UTC
    assert utc(None) is None


def test_keyed_hash_depends_on_the_key_and_is_not_the_value() -> None:
    one = keyed_hash(b"a" * 32, "secret-value")
    assert one == keyed_hash(b"a" * 32, "secret-value")
    assert one != keyed_hash(b"b" * 32, "secret-value")
    assert "secret-value" not in one
    assert len(one) == 64


# -- the service ----------------------------------------------------------------------------------


def test_service_keeps_custom_properties_exactly_as_returned() -> None:
    custom = {GW + "Security.Protocols.Tls10": "True", GW + "Security.Protocols.Tls11": "false", "Other": "TRUE"}
    model = m.ApiManagementServiceResource.deserialize(
        service_json(
            customProperties=custom,
            publicNetworkAccess="Disabled",
            virtualNetworkType="Internal",
            virtualNetworkConfiguration={"subnetResourceId": "/subnets/apim"},
            apiVersionConstraint={"minApiVersion": "2021-08-01"},
            platformVersion="stv2",
            privateEndpointConnections=[
                {
                    "id": SERVICE_ID + "/privateEndpointConnections/pe1",
                    "name": "pe1",
                    "properties": {"privateLinkServiceConnectionState": {"status": "Approved"}},
                }
            ],
        )
        | {"identity": {"type": "SystemAssigned", "principalId": "p", "tenantId": "t"}}
    )
    service = map_service(model, ref())
    assert dict(service.custom_properties) == custom
    assert (service.subscription_id, service.resource_group) == (SUB, "rg-apim-prod")
    assert (service.sku_name, service.sku_capacity, service.etag) == ("Premium", 2, "AAAAAAFx")
    assert service.identity_type == "SystemAssigned"
    assert service.public_network_access == "Disabled"
    assert service.virtual_network_type == "Internal"
    assert service.subnet_id == "/subnets/apim"
    assert service.min_api_version == "2021-08-01"
    assert service.platform_version == "stv2"
    assert [(p.name, p.status) for p in service.private_endpoints] == [("pe1", "Approved")]
    assert service.created_at is not None
    assert datetime.fromisoformat(service.created_at).tzinfo == UTC
    assert service.location == "West Europe"


def test_service_properties_azure_left_out_stay_none() -> None:
    service = map_service(m.ApiManagementServiceResource.deserialize(service_json()), ref())
    assert service.identity_type is None
    assert service.public_network_access is None
    assert service.virtual_network_type is None
    assert service.subnet_id is None
    assert service.min_api_version is None
    assert service.private_endpoints == ()
    assert dict(service.custom_properties) == {}


# -- sub-resources --------------------------------------------------------------------------------


def test_subscription_dates_are_aware_utc_and_keys_are_never_mapped() -> None:
    model = m.SubscriptionContract.deserialize(
        {
            "id": SERVICE_ID + "/subscriptions/s1",
            "name": "s1",
            "properties": {
                "scope": "/apis",
                "state": "active",
                "displayName": "S1",
                "createdDate": "2025-01-01T00:00:00Z",
                "expirationDate": "2026-01-01T02:00:00+02:00",
                "primaryKey": "never-in-a-snapshot",
                "allowTracing": True,
            },
        }
    )
    sub = map_subscription(model)
    assert (sub.sid, sub.scope, sub.state, sub.allow_tracing) == ("s1", "/apis", "active", True)
    assert sub.created_date == datetime(2025, 1, 1, tzinfo=UTC)
    assert sub.expiration_date == datetime(2026, 1, 1, tzinfo=UTC)
    assert "never-in-a-snapshot" not in repr(sub)


def test_named_values_never_carry_the_value() -> None:
    plain = m.NamedValueContract.deserialize(
        {"id": "/nv/plain", "name": "plain", "properties": {"displayName": "plain", "value": "visible-value"}}
    )
    vault = m.NamedValueContract.deserialize(
        {
            "id": "/nv/kv",
            "name": "kv",
            "properties": {
                "displayName": "kv",
                "secret": True,
                "tags": ["a"],
                "keyVault": {
                    "secretIdentifier": "https://kv.vault.azure.net/secrets/x",
                    "lastStatus": {"code": "Forbidden", "message": "no access", "timeStampUtc": "2026-01-01T00:00:00Z"},
                },
            },
        }
    )
    mapped_plain = map_named_value(plain)
    assert mapped_plain.secret is False
    assert mapped_plain.key_vault_secret_id is None
    assert "visible-value" not in repr(mapped_plain)
    mapped = map_named_value(vault)
    assert mapped.key_vault_secret_id == "https://kv.vault.azure.net/secrets/x"
    assert (mapped.key_vault_last_status_code, mapped.key_vault_last_status_message) == ("Forbidden", "no access")
    assert mapped.key_vault_last_status_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert mapped.tags == ("a",)


def api_json(name: str, **properties: Any) -> dict[str, Any]:
    return {"id": f"{SERVICE_ID}/apis/{name}", "name": name, "properties": {"path": name, **properties}}


def test_only_current_api_revisions_count() -> None:
    models = [
        m.ApiContract.deserialize(api_json("a", isCurrent=True)),
        m.ApiContract.deserialize(api_json("a;rev=2", isCurrent=False)),
        m.ApiContract.deserialize(api_json("b")),  # no isCurrent: counts as current
    ]
    assert [a.name for a in current_apis(models)] == ["a", "b"]


def test_api_mapping() -> None:
    api = map_api(
        m.ApiContract.deserialize(
            api_json(
                "orders",
                protocols=["http", "https"],
                subscriptionRequired=False,
                type="soap",
                subscriptionKeyParameterNames={"header": "X-Key", "query": "key"},
            )
        )
    )
    assert api.protocols == ("http", "https")
    assert api.subscription_required is False
    assert api.api_type == "soap"
    assert (api.subscription_key_header, api.subscription_key_query) == ("X-Key", "key")
    bare = map_api(m.ApiContract.deserialize(api_json("bare")))
    assert (bare.protocols, bare.subscription_required, bare.is_current) == ((), None, None)


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        (None, False),
        ({}, False),
        ({"certificateIds": []}, False),
        ({"certificateIds": ["/certificates/c1"]}, True),
        ({"header": {"x-api-key": ["{{key}}"]}}, True),
        ({"authorization": {"scheme": "Basic", "parameter": "{{p}}"}}, True),
    ],
)
def test_backend_credentials(credentials: dict[str, Any] | None, expected: bool) -> None:
    body: dict[str, Any] = {"url": "https://b", "protocol": "http"}
    if credentials is not None:
        body["credentials"] = credentials
    backend = map_backend(m.BackendContract.deserialize({"id": "/b/1", "name": "1", "properties": body}))
    assert backend.has_credentials is expected
    assert backend.validate_certificate_chain is None  # no tls block: Azure did not say


def test_backend_tls_flags() -> None:
    backend = map_backend(
        m.BackendContract.deserialize(
            {
                "id": "/b/1",
                "name": "1",
                "properties": {
                    "url": "https://b",
                    "protocol": "http",
                    "tls": {"validateCertificateChain": False, "validateCertificateName": True},
                },
            }
        )
    )
    assert (backend.validate_certificate_chain, backend.validate_certificate_name) == (False, True)


def test_product_policy_logger_and_portal() -> None:
    product = map_product(
        m.ProductContract.deserialize(
            {"id": "/p/starter", "name": "starter", "properties": {"displayName": "S", "state": "published"}}
        ),
        [m.ApiContract.deserialize(api_json("orders")), m.ApiContract.deserialize(api_json("billing"))],
    )
    assert (product.state, product.subscription_required, product.api_ids) == ("published", None, ("orders", "billing"))
    policy = map_policy(
        m.PolicyContract.deserialize({"id": "/p/policy", "properties": {"value": "<policies/>", "format": "xml"}}),
        PolicyScope.PRODUCT,
        "starter",
    )
    assert (policy.scope, policy.owner, policy.xml) == (PolicyScope.PRODUCT, "starter", "<policies/>")
    logger = map_logger(
        m.LoggerContract.deserialize(
            {
                "id": "/l/ai",
                "name": "ai",
                "properties": {"loggerType": "applicationInsights", "credentials": {"instrumentationKey": "ikey-x"}},
            }
        )
    )
    assert (logger.logger_type, logger.resource_id) == ("applicationInsights", None)
    assert "ikey-x" not in repr(logger)
    portal = map_portal(None, m.PortalSigninSettings.deserialize({"properties": {"enabled": True}}), None)
    assert (portal.signup_enabled, portal.signin_enabled, portal.basic_auth_enabled) == (None, True, None)


def test_diagnostic_headers_per_side() -> None:
    diagnostic = map_diagnostic(
        m.DiagnosticContract.deserialize(
            {
                "id": "/d/azuremonitor",
                "name": "azuremonitor",
                "properties": {
                    "loggerId": "/loggers/azuremonitor",
                    "frontend": {"request": {"headers": ["Authorization"]}, "response": {"headers": ["Set-Cookie"]}},
                    "backend": {"request": {"headers": ["Ocp-Apim-Subscription-Key"]}},
                },
            }
        )
    )
    assert diagnostic.frontend_request_headers == ("Authorization",)
    assert diagnostic.frontend_response_headers == ("Set-Cookie",)
    assert diagnostic.backend_request_headers == ("Ocp-Apim-Subscription-Key",)
    assert diagnostic.backend_response_headers == ()
    assert diagnostic.sampling_percentage is None


def test_diagnostic_sides_as_json_keep_body_and_data_masking() -> None:
    frontend = {
        "request": {
            "headers": ["Authorization"],
            "body": {"bytes": 512},
            "dataMasking": {"queryParams": [{"value": "sig", "mode": "Hide"}]},
        },
        "response": {"body": {"bytes": 0}},
    }
    diagnostic = map_diagnostic(
        m.DiagnosticContract.deserialize(
            {
                "id": "/d/azuremonitor",
                "name": "azuremonitor",
                "properties": {"loggerId": "/loggers/azuremonitor", "frontend": frontend},
            }
        )
    )
    assert diagnostic.frontend_json is not None
    assert json.loads(diagnostic.frontend_json) == frontend  # Azure's wire names, nothing lost
    assert diagnostic.frontend_json == json.dumps(frontend, sort_keys=True)
    assert diagnostic.backend_json is None


def test_diagnostic_setting_mapping() -> None:
    model = monitor_models.DiagnosticSettingsResource.deserialize(
        {
            "id": SERVICE_ID + "/providers/microsoft.insights/diagnosticSettings/to-law",
            "name": "to-law",
            "properties": {
                "workspaceId": "/workspaces/law",
                "logs": [{"categoryGroup": "allLogs", "enabled": True}, {"category": "GatewayLogs", "enabled": False}],
            },
        }
    )
    setting = map_diagnostic_setting(model)
    assert setting.workspace_id == "/workspaces/law"
    assert setting.destination_type is None  # AzureDiagnostics mode
    assert [(lg.category, lg.category_group, lg.enabled) for lg in setting.logs] == [
        (None, "allLogs", True),
        ("GatewayLogs", None, False),
    ]


# -- the key ledger -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"apim-subscription-id": SERVICE_ID + "/subscriptions/s1", "apim-key-slot": "primary"},
         (SERVICE_ID + "/subscriptions/s1", "primary")),
        ({"APIM-Subscription-Id": SERVICE_ID.upper() + "/SUBSCRIPTIONS/S1", "APIM-KEY-SLOT": " Secondary "},
         (SERVICE_ID.upper() + "/SUBSCRIPTIONS/S1", "secondary")),
        ({"apim-subscription-id": SERVICE_ID + "/subscriptions/s1"}, (SERVICE_ID + "/subscriptions/s1", "")),
        ({"apim-subscription-id": SERVICE_ID + "2/subscriptions/s1", "apim-key-slot": "primary"}, None),
        ({"apim-subscription-id": SERVICE_ID + "/subscriptions/", "apim-key-slot": "primary"}, None),
        ({"apim-subscription-id": SERVICE_ID + "/subscriptions/s1/x", "apim-key-slot": "primary"}, None),
        ({"apim-key-slot": "primary"}, None),
        (None, None),
    ],
)  # fmt: skip
def test_ledger_entries_belong_to_this_instance(tags: dict[str, str] | None, expected: tuple[str, str] | None) -> None:
    assert ledger_entry(tags, SERVICE_ID) == expected


def _props(secret_id: str, attributes: dict[str, Any]) -> SecretProperties:
    """SecretProperties from Key Vault's JSON, parsed as the SDK's list does."""
    item = SecretItem({"id": secret_id, "attributes": attributes})
    return SecretProperties._from_secret_item(item)


def test_tracked_key_prefers_the_current_version() -> None:
    listed = _props("https://kv.vault.azure.net/secrets/k1", {"created": 1_700_000_000, "enabled": True})
    current = _props(
        "https://kv.vault.azure.net/secrets/k1/0123456789abcdef0123456789abcdef",
        {"created": 1_700_000_100, "exp": 1_800_000_000, "enabled": True},
    )
    key = map_tracked_key(listed, current, SERVICE_ID + "/subscriptions/s1", "primary", "hash")
    assert key is not None
    assert key.secret_id.endswith("/k1/0123456789abcdef0123456789abcdef")
    assert key.secret_name == "k1"
    assert key.created == datetime.fromtimestamp(1_700_000_100, UTC)
    assert key.expires == datetime.fromtimestamp(1_800_000_000, UTC)
    assert (key.enabled, key.value_hash) == (True, "hash")


def test_tracked_key_from_the_list_item_alone() -> None:
    listed = _props("https://kv.vault.azure.net/secrets/k1", {"created": 1_700_000_000, "enabled": False})
    key = map_tracked_key(listed, None, SERVICE_ID + "/subscriptions/s1", "primary", None)
    assert key is not None
    assert (key.secret_id, key.enabled, key.value_hash) == ("https://kv.vault.azure.net/secrets/k1", False, None)
    no_date = _props("https://kv.vault.azure.net/secrets/k1", {"enabled": True})
    assert map_tracked_key(no_date, None, SERVICE_ID + "/subscriptions/s1", "primary", None) is None


# -- inventory ------------------------------------------------------------------------------------


def test_instance_ref_parses_the_arm_id() -> None:
    found = ref(SERVICE_ID.replace(SUB, SUB.upper()), env="prod")
    assert found.subscription_id == SUB
    assert (found.resource_group, found.name, found.location) == ("rg-apim-prod", "apim-a", "westeurope")
    assert dict(found.tags) == {"env": "prod"}
    assert (
        instance_ref(f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv", "", {}) is None
    )
    assert instance_ref(SERVICE_ID + "/apis/x", "", {}) is None


def test_graph_query_filters_type_and_resource_groups_with_quoting() -> None:
    assert graph_query(ScopeSettings()) == (
        "resources | where type =~ 'microsoft.apimanagement/service' "
        "| project id, name, type, location, resourceGroup, subscriptionId, tags, sku"
    )
    query = graph_query(ScopeSettings(resource_groups=("rg-a", "o'brien")))
    assert "| where resourceGroup in~ ('rg-a', 'o\\'brien') |" in query


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (ScopeSettings(), True),
        (ScopeSettings(resource_groups=("rg-apim-prod",)), True),
        (ScopeSettings(resource_groups=("rg-other",)), False),
        (ScopeSettings(tags=(("ENV", "prod"),)), True),
        (ScopeSettings(tags=(("env", "Prod"),)), False),  # values are case-sensitive
        (ScopeSettings(tags=(("env", "prod"), ("owner", "a"))), False),  # every tag must match
        (ScopeSettings(tags=(("env", ""),)), False),
    ],
)
def test_scope_filter(scope: ScopeSettings, expected: bool) -> None:
    target = instance_ref(SERVICE_ID.replace("rg-apim-prod", "RG-Apim-Prod"), "westeurope", {"Env": "prod"})
    assert target is not None
    assert in_scope(target, scope) is expected


def test_select_keeps_one_per_id_sorted_in_configured_subscriptions() -> None:
    settings = Settings(
        cloud=PUBLIC_CLOUDS[CloudName.AZURE_CLOUD], subscription_ids=(SUB,), storage=StorageSettings(blob_url="x")
    )
    b = ref(SERVICE_ID.replace("apim-a", "apim-B"))
    a = ref()
    a_again = ref(SERVICE_ID.upper().replace(SUB.upper(), SUB))
    elsewhere = ref(SERVICE_ID.replace(SUB, "00000000-0000-4000-8000-000000000000"))
    assert select([b, a, a_again, elsewhere], settings) == (a, b)


def test_ledger_ids_take_apim_spelling_when_the_subscription_exists() -> None:
    sub = map_subscription(
        m.SubscriptionContract.deserialize(
            {"id": SERVICE_ID + "/subscriptions/s1", "name": "s1", "properties": {"scope": "/apis", "state": "active"}}
        )
    )
    listed = _props("https://kv.vault.azure.net/secrets/k1", {"created": 1_700_000_000, "enabled": True})
    upper = map_tracked_key(listed, None, (SERVICE_ID + "/subscriptions/S1").upper(), "primary", None)
    gone = map_tracked_key(listed, None, SERVICE_ID + "/subscriptions/deleted", "primary", None)
    assert upper is not None
    assert gone is not None
    aligned = align_ledger([upper, gone], [sub])
    assert [k.subscription_id for k in aligned] == [sub.id, SERVICE_ID + "/subscriptions/deleted"]
