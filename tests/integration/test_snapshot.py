"""`read_snapshot` against the twin through the product's own client factory: what each rule
family needs is read, each request once, and no secret value ends up in the snapshot."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.inventory import InstanceRef, instance_ref
from shared.model import PolicyScope, Snapshot
from shared.rules._workspaces import workspace_view
from shared.settings import load_settings
from shared.snapshot import read_snapshot
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
RG = "rg-apim-prod"
NAME = "apim-drift"
SERVICE_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{NAME}"
OTHER_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/apim-drift2"
WORKSPACE_ID = (
    f"/subscriptions/{SUB}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights/workspaces/law"
)
VAULT = "kv-ledger"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
TLS10 = GW + "Security.Protocols.Tls10"
POLICY = "<policies><inbound><base /></inbound><backend><base /></backend><outbound><base /></outbound></policies>"
HASH_KEY = b"k" * 32
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
KV_REF = "https://kv-apps.vault.azure.net/secrets/db-connection"

# Canary values: none may appear in a snapshot, the log or an exception.
KEY_A_PRIMARY = "canary0primary0a0" + "1" * 15
KEY_A_SECONDARY = "canary0secondary0a" + "2" * 14
KEY_B_PRIMARY = "canary0primary0b0" + "3" * 15
KEY_B_SECONDARY = "canary0secondary0b" + "4" * 14
KEY_UNTRACKED = "canary0untracked0" + "5" * 15
KEY_SUSPENDED = "canary0suspended0" + "6" * 15
NAMED_VALUE_SECRET = "canary-named-value-secret-7777"
VAULT_ONLY_SECRET = "canary-vault-only-secret-8888"
OTHER_INSTANCE_SECRET = "canary-other-instance-9999"
CANARIES = (
    KEY_A_PRIMARY,
    KEY_A_SECONDARY,
    KEY_B_PRIMARY,
    KEY_B_SECONDARY,
    KEY_UNTRACKED,
    KEY_SUSPENDED,
    NAMED_VALUE_SECRET,
    VAULT_ONLY_SECRET,
    OTHER_INSTANCE_SECRET,
)


def sub_id(sid: str, service_id: str = SERVICE_ID) -> str:
    return f"{service_id}/subscriptions/{sid}"


def ledger_secret(name: str, value: str, subscription: str, slot: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "tags": {"apim-subscription-id": subscription, "apim-key-slot": slot},
        **extra,
    }


DRIFTED: dict[str, Any] = {
    "name": NAME,
    "sku": {"name": "Premium", "capacity": 1},
    "tags": {"env": "prod"},
    "properties": {"publicNetworkAccess": "Enabled", "customProperties": {TLS10: "true"}},
    "tenant_access": {"enabled": True},
    "git_access": {"enabled": False},
    "portal": {"signup_enabled": True, "basic_auth_enabled": True},
    "identity_providers": [{"type": "aad", "clientId": "aad-client", "signinTenant": "contoso"}],
    "apis": [
        {"id": "legacy", "displayName": "Legacy", "path": "legacy", "protocols": ["http", "https"],
         "serviceUrl": "http://legacy.internal"},
        {"id": "orders", "displayName": "Orders", "path": "orders", "protocols": ["https"]},
        {"id": "orders-rev2", "displayName": "Orders", "path": "orders-r2", "isCurrent": False, "apiRevision": "2"},
    ],
    "products": [{"id": "starter", "displayName": "Starter", "apis": ["orders"], "subscriptionRequired": False}],
    "named_values": [
        {"id": "db-password", "displayName": "db-password", "value": NAMED_VALUE_SECRET, "secret": True},
        {"id": "db-connection", "displayName": "db-connection", "keyVault": {"secretIdentifier": KV_REF}},
    ],
    "backends": [
        {"id": "legacy-be", "url": "https://legacy.internal", "protocol": "http",
         "tls": {"validateCertificateChain": False, "validateCertificateName": False}},
    ],
    "loggers": [{"id": "azuremonitor", "loggerType": "azureMonitor"}],
    "diagnostics": [
        {"id": "azuremonitor", "loggerId": "/loggers/azuremonitor",
         "sampling": {"samplingType": "fixed", "percentage": 100},
         "frontend": {"request": {"headers": ["Authorization", "X-Request-Id"]}}},
    ],
    "subscriptions": [
        {"sid": "tracked-a", "scope": "/apis", "primaryKey": KEY_A_PRIMARY, "secondaryKey": KEY_A_SECONDARY},
        {"sid": "tracked-b", "scope": "/products/starter", "primaryKey": KEY_B_PRIMARY,
         "secondaryKey": KEY_B_SECONDARY, "expirationDate": "2027-01-01T00:00:00Z"},
        {"sid": "untracked", "scope": "/apis/orders", "primaryKey": KEY_UNTRACKED},
        {"sid": "paused", "scope": "/apis", "state": "suspended", "primaryKey": KEY_SUSPENDED},
    ],
    "policies": {"service": POLICY, "apis": {"legacy": POLICY}, "products": {"starter": POLICY}},
}  # fmt: skip


def estate(*services: dict[str, Any], secrets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    group: dict[str, Any] = {"name": RG, "location": "westeurope", "apim": list(services)}
    if secrets is not None:
        group["key_vaults"] = [{"name": VAULT, "secrets": secrets}]
    return {
        "subscriptions": [
            {
                "id": SUB,
                "resource_groups": [
                    {"name": "rg-monitoring", "location": "westeurope", "workspaces": [{"name": "law"}]},
                    group,
                ],
            }
        ]
    }


def seed_drifted(twin: TwinHandle) -> str:
    secrets = [
        ledger_secret("apim-drift-tracked-a", KEY_A_PRIMARY, sub_id("tracked-a"), "primary", created_days_ago=10),
        # Upper-case tag id and slot: the ledger matches ids case-insensitively.
        ledger_secret("apim-drift-tracked-b", KEY_B_PRIMARY, sub_id("tracked-b").upper(), "Primary"),
        ledger_secret("apim-drift-paused", KEY_SUSPENDED, sub_id("paused"), "primary"),
        ledger_secret("apim-drift2-x", OTHER_INSTANCE_SECRET, sub_id("x", OTHER_ID), "primary"),
        {"name": "unrelated", "value": VAULT_ONLY_SECRET, "tags": {"team": "platform"}},
    ]
    fragment = estate(DRIFTED, {"name": "apim-drift2"}, secrets=secrets)
    fragment["subscriptions"][0]["resource_groups"][1]["diagnostic_settings"] = [
        {
            "resource": SERVICE_ID,
            "name": "to-law",
            "properties": {
                "workspaceId": WORKSPACE_ID,
                "logAnalyticsDestinationType": "Dedicated",
                "logs": [{"category": "GatewayLogs", "enabled": True}],
            },
        }
    ]
    twin.seed(fragment)
    return twin.urls[f"vault:{VAULT}"]


@asynccontextmanager
async def product_factory(twin: TwinHandle, **settings: str) -> AsyncIterator[ClientFactory]:
    """The composition root as a deployment builds it (a Custom cloud from the twin's env)."""
    built = ClientFactory(load_settings({**twin.env, **settings}))
    try:
        yield built
    finally:
        await built.aclose()
        built.close()


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The product reads APIMR_* through shared.settings; azure-identity reads AZURE_* itself.
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


def ref_of(service_id: str = SERVICE_ID) -> InstanceRef:
    ref = instance_ref(service_id, "westeurope", {"env": "prod"})
    assert ref is not None
    return ref


async def snapshot_of(factory: ClientFactory, vault_url: str | None, ref: InstanceRef | None = None) -> Snapshot:
    return await read_snapshot(factory, ref or ref_of(), key_vault_url=vault_url, hash_key=HASH_KEY, now=NOW)


def keyed(value: str) -> str:
    return hmac.new(HASH_KEY, value.encode(), hashlib.sha256).hexdigest()


def arm_log(twin: TwinHandle) -> list[dict[str, Any]]:
    status, body = twin.control("GET", "/_twin/log?service=arm")
    assert status == 200, body
    return list(body["entries"])


# estates/test.yaml's platform-operator (API Management Service Contributor).
OPERATOR_CLIENT_ID = "0b5e0c1a-0000-4000-8000-00000000c002"

# -- the drifted instance, part by part ---------------------------------------------------------


async def test_drifted_instance_maps_to_the_snapshot_rules_read(twin: TwinHandle) -> None:
    vault_url = seed_drifted(twin)
    # A key regenerated out of band: APIM's primary of tracked-b no longer matches the vault.
    # An operator does it (the product's role has no regenerate action: the twin enforces RBAC).
    operator = twin.token(twin.urls["arm"], client_id=OPERATOR_CLIENT_ID)
    regenerated = twin.arm(
        "POST", f"{SERVICE_ID}/subscriptions/tracked-b/regeneratePrimaryKey?api-version=2024-05-01", token=operator
    )
    assert regenerated.status_code == 204, regenerated.text
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url) as factory:
        snap = await snapshot_of(factory, vault_url)

    assert snap.unreadable == ()
    assert snap.read_at == NOW
    service = snap.service
    assert service.id == SERVICE_ID
    assert (service.subscription_id, service.resource_group, service.name) == (SUB, RG, NAME)
    assert service.sku_name == "Premium"
    assert service.sku_capacity == 1
    assert service.etag
    assert dict(service.tags) == {"env": "prod"}
    assert service.public_network_access == "Enabled"
    assert service.virtual_network_type == "None"
    assert service.platform_version == "stv2"
    assert service.provisioning_state == "Succeeded"
    assert service.created_at is not None
    assert datetime.fromisoformat(service.created_at).tzinfo is not None
    raw = twin.arm("GET", SERVICE_ID + "?api-version=2024-05-01").json()
    assert dict(service.custom_properties) == raw["properties"]["customProperties"]  # exactly as returned
    assert service.custom_properties[TLS10] == "true"  # as the estate sent it

    assert snap.tenant_access is not None
    assert snap.tenant_access.enabled is True
    assert snap.tenant_access.id.endswith("/tenant/access")
    assert snap.tenant_access.etag
    assert snap.git_access is not None
    assert snap.git_access.enabled is False
    assert snap.portal.signup_enabled is True
    assert snap.portal.signin_enabled is False
    assert snap.portal.basic_auth_enabled is True
    assert snap.portal.portal_config_id == f"{SERVICE_ID}/portalconfigs/default"
    assert snap.portal.portal_config_etag
    assert [(p.type, p.id) for p in snap.identity_providers] == [("aad", f"{SERVICE_ID}/identityProviders/aad")]

    apis = {a.name: a for a in snap.apis}
    assert set(apis) == {"legacy", "orders"}  # the non-current revision is left out
    assert apis["legacy"].protocols == ("http", "https")
    assert apis["legacy"].service_url == "http://legacy.internal"
    assert apis["orders"].protocols == ("https",)
    assert apis["orders"].subscription_required is True
    assert apis["orders"].is_current is True
    assert apis["orders"].subscription_key_header == "Ocp-Apim-Subscription-Key"
    assert apis["orders"].api_type == "http"

    named = {n.name: n for n in snap.named_values}
    assert named["db-password"].secret is True
    assert named["db-password"].key_vault_secret_id is None
    assert named["db-connection"].secret is True
    assert named["db-connection"].key_vault_secret_id == KV_REF
    # No identity on this drifted instance: APIM cannot read the reference (twin issue 10, item 2).
    assert named["db-connection"].key_vault_last_status_code == "IdentityNotFound"
    status_time = named["db-connection"].key_vault_last_status_time
    assert status_time is not None
    assert status_time.tzinfo == UTC

    [backend] = snap.backends
    assert (backend.name, backend.url, backend.protocol) == ("legacy-be", "https://legacy.internal", "http")
    assert backend.validate_certificate_chain is False
    assert backend.validate_certificate_name is False
    assert backend.has_credentials is False

    [product] = snap.products
    assert (product.name, product.state, product.subscription_required) == ("starter", "published", False)
    assert product.api_ids == ("orders",)

    policies = {(p.scope, p.owner): p for p in snap.policies}
    assert set(policies) == {(PolicyScope.SERVICE, ""), (PolicyScope.PRODUCT, "starter"), (PolicyScope.API, "legacy")}
    assert policies[(PolicyScope.API, "legacy")].xml == POLICY
    assert snap.policy(PolicyScope.API, "orders") is None  # 404: no policy at that scope, not unreadable

    [diagnostic] = snap.apim_diagnostics
    assert diagnostic.name == "azuremonitor"
    assert diagnostic.frontend_request_headers == ("Authorization", "X-Request-Id")
    assert diagnostic.backend_request_headers == ()
    assert diagnostic.sampling_percentage == 100
    assert diagnostic.logger_id is not None
    assert diagnostic.logger_id.lower() == f"{SERVICE_ID}/loggers/azuremonitor".lower()
    assert [(lg.name, lg.logger_type) for lg in snap.loggers] == [("azuremonitor", "azureMonitor")]

    [setting] = snap.diagnostic_settings
    assert setting.name == "to-law"
    assert setting.workspace_id == WORKSPACE_ID
    assert setting.destination_type == "Dedicated"
    assert [(log.category, log.category_group, log.enabled) for log in setting.logs] == [("GatewayLogs", None, True)]

    subs = {s.sid: s for s in snap.subscriptions}
    assert set(subs) == {"master", "tracked-a", "tracked-b", "untracked", "paused"}
    assert subs["paused"].state == "suspended"
    assert subs["tracked-b"].scope == f"{SERVICE_ID}/products/starter"
    assert subs["tracked-b"].expiration_date == datetime(2027, 1, 1, tzinfo=UTC)
    created = subs["tracked-a"].created_date
    assert created is not None
    assert created.tzinfo == UTC

    # The key ledger: this instance's tagged secrets only, values reduced to keyed hashes.
    ledger = {k.secret_name: k for k in snap.key_ledger}
    assert set(ledger) == {"apim-drift-tracked-a", "apim-drift-tracked-b", "apim-drift-paused"}
    tracked_a = ledger["apim-drift-tracked-a"]
    assert tracked_a.subscription_id == sub_id("tracked-a")
    assert tracked_a.slot == "primary"
    assert tracked_a.value_hash == keyed(KEY_A_PRIMARY)
    assert tracked_a.enabled is True
    assert tracked_a.created.tzinfo == UTC
    assert (NOW - tracked_a.created).days >= 0
    assert tracked_a.secret_id.startswith(f"{vault_url}/secrets/apim-drift-tracked-a/")
    assert ledger["apim-drift-tracked-b"].slot == "primary"
    # Tagged in upper case; spelled as APIM spells the subscription's id.
    assert ledger["apim-drift-tracked-b"].subscription_id == sub_id("tracked-b")

    # listSecrets only for tracked, active subscriptions: tracked-a and tracked-b.
    hashes = {h.subscription_id: h for h in snap.key_hashes}
    assert set(hashes) == {sub_id("tracked-a"), sub_id("tracked-b")}
    assert hashes[sub_id("tracked-a")].primary == tracked_a.value_hash
    assert hashes[sub_id("tracked-a")].secondary == keyed(KEY_A_SECONDARY)
    assert hashes[sub_id("tracked-b")].primary != ledger["apim-drift-tracked-b"].value_hash  # regenerated
    assert hashes[sub_id("tracked-b")].secondary == keyed(KEY_B_SECONDARY)
    secrets_calls = sorted(e["path"] for e in arm_log(twin) if e["path"].endswith("/listSecrets"))
    assert secrets_calls == [
        f"{SERVICE_ID}/subscriptions/tracked-a/listSecrets",
        f"{SERVICE_ID}/subscriptions/tracked-b/listSecrets",
    ]


async def test_no_secret_value_reaches_the_snapshot_or_the_log(
    twin: TwinHandle, caplog: pytest.LogCaptureFixture
) -> None:
    vault_url = seed_drifted(twin)
    caplog.set_level(logging.DEBUG)
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url) as factory:
        snap = await snapshot_of(factory, vault_url)
        regenerated = factory.apim(SUB).subscription.list_secrets(RG, NAME, "tracked-b")
    dump = repr(snap)
    for canary in (*CANARIES, str(regenerated.primary_key)):
        assert canary not in dump
        assert canary not in caplog.text
    # Named values are listed, never read with listValue.
    assert not [e for e in arm_log(twin) if e["path"].endswith("/listValue")]
    assert snap.key_ledger  # the hashes are there, so the values were read and dropped


async def test_a_failed_part_is_unreadable_and_the_rest_is_read(twin: TwinHandle) -> None:
    vault_url = seed_drifted(twin)
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": "diagnosticSettings", "status": 403, "code": "AuthorizationFailed", "times": 0},
    )
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": f"/service/{NAME}/apis$", "status": 503, "code": "ServiceUnavailable", "times": 0},
    )
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": "/tenant/gitAccess$", "status": 403, "code": "AuthorizationFailed", "times": 0},
    )
    retry = {"APIMR_RETRY_TOTAL": "1", "APIMR_RETRY_BACKOFF_FACTOR": "0"}
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url, **retry) as factory:
        snap = await snapshot_of(factory, vault_url)
    assert snap.unreadable == (
        "apis: 503 ServiceUnavailable",
        "diagnostic_settings: 403 AuthorizationFailed",
        "git_access: 403 AuthorizationFailed",
    )
    assert not snap.readable("diagnostic_settings")
    assert not snap.readable("apis")
    assert snap.readable("tenant_access")
    assert snap.apis == ()
    assert snap.diagnostic_settings == ()
    assert snap.git_access is None
    assert snap.tenant_access is not None
    assert snap.tenant_access.enabled is True
    assert len(snap.subscriptions) == 5
    assert len(snap.key_hashes) == 2
    # A failed API list means no API policy was asked for.
    assert not [e for e in arm_log(twin) if "/apis/" in e["path"] and e["path"].endswith("/policies/policy")]


async def test_a_failed_workspace_part_is_unreadable_for_that_workspace_only(twin: TwinHandle) -> None:
    workspaces = [{"id": "ws1", "apis": [{"id": "w-api"}]}, {"id": "ws2", "apis": [{"id": "w-api"}]}]
    twin.seed(estate({**DRIFTED, "workspaces": workspaces}))
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": "/workspaces/ws1/apis$", "status": 503, "code": "ServiceUnavailable", "times": 0},
    )
    retry = {"APIMR_RETRY_TOTAL": "1", "APIMR_RETRY_BACKOFF_FACTOR": "0"}
    async with product_factory(twin, **retry) as factory:
        snap = await snapshot_of(factory, None)
    assert snap.unreadable == ("workspaces/ws1/apis: 503 ServiceUnavailable",)
    assert snap.readable("apis")  # the service level's APIs were read
    one, two = snap.workspaces
    assert (one.name, one.apis, two.name, [a.name for a in two.apis]) == ("ws1", (), "ws2", ["w-api"])
    assert not workspace_view(snap, one).readable("apis")
    assert workspace_view(snap, two).readable("apis")


async def test_tiers_without_workspaces_are_not_asked_for_them(twin: TwinHandle) -> None:
    twin.seed(estate({**DRIFTED, "sku": {"name": "Developer", "capacity": 1}}))
    twin.control("DELETE", "/_twin/log")
    async with product_factory(twin) as factory:
        snap = await snapshot_of(factory, None)
    assert snap.workspaces == ()
    assert snap.unreadable == ()
    assert not [e for e in arm_log(twin) if "/workspaces" in e["path"]]


async def test_the_key_ledger_says_when_no_vault_is_configured(twin: TwinHandle) -> None:
    seed_drifted(twin)
    async with product_factory(twin) as factory:
        snap = await snapshot_of(factory, None)
    assert snap.key_ledger == ()
    assert snap.key_hashes == ()
    assert not snap.readable("key_ledger")
    assert not snap.readable("key_hashes")
    assert snap.readable("subscriptions")
    assert not [e for e in arm_log(twin) if e["path"].endswith("/listSecrets")]


async def test_an_unreadable_vault_makes_the_ledger_and_hashes_unreadable(twin: TwinHandle) -> None:
    vault_url = seed_drifted(twin)
    twin.control(
        "POST", "/_twin/faults", {"service": "*", "path": "^/secrets$", "status": 403, "code": "Forbidden", "times": 0}
    )
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url) as factory:
        snap = await snapshot_of(factory, vault_url)
    assert "key_ledger: 403 Forbidden" in snap.unreadable
    assert "key_hashes: 403 Forbidden" in snap.unreadable
    assert not [e for e in arm_log(twin) if e["path"].endswith("/listSecrets")]


async def test_a_disabled_ledger_secret_keeps_its_entry_without_a_hash(twin: TwinHandle) -> None:
    secrets = [
        ledger_secret("apim-drift-tracked-a", KEY_A_PRIMARY, sub_id("tracked-a"), "secondary", enabled=False),
    ]
    twin.seed(estate(DRIFTED, secrets=secrets))
    vault_url = twin.urls[f"vault:{VAULT}"]
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url) as factory:
        snap = await snapshot_of(factory, vault_url)
    [entry] = snap.key_ledger
    assert (entry.enabled, entry.value_hash, entry.slot) == (False, None, "secondary")
    assert snap.unreadable == ()
    assert [h.subscription_id for h in snap.key_hashes] == [sub_id("tracked-a")]


async def test_other_failures_of_the_service_read_propagate_as_the_sdk_error(twin: TwinHandle) -> None:
    seed_drifted(twin)
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": f"/service/{NAME}$", "status": 403, "code": "AuthorizationFailed", "times": 0},
    )
    async with product_factory(twin) as factory:
        with pytest.raises(HttpResponseError) as caught:
            await snapshot_of(factory, None)
    assert caught.value.status_code == 403  # raised as itself, not wrapped in an exception group


async def test_a_service_that_is_gone_is_a_permanent_error(twin: TwinHandle) -> None:
    async with product_factory(twin) as factory:
        with pytest.raises(PermanentError, match=f"{SERVICE_ID} no longer exists") as caught:
            await snapshot_of(factory, None)
    assert "404" in str(caught.value)


# -- each read once --------------------------------------------------------------------------


async def test_a_scan_reads_each_page_and_each_sub_resource_once(twin: TwinHandle) -> None:
    generated = 150
    service = {
        **DRIFTED,
        "subscriptions": [{"generate": {"count": generated, "prefix": "bulk-"}}, *DRIFTED["subscriptions"]],
        "workspaces": [
            {
                "id": "ws1",
                "apis": [{"id": "w-api"}],
                "products": [{"id": "w-prod", "apis": ["w-api"]}],
                "subscriptions": [{"sid": "w-sub", "scope": "/products/w-prod"}],
                "named_values": [{"id": "w-nv", "value": "plain"}],
                "backends": [{"id": "w-be", "url": "https://w.internal", "protocol": "http"}],
                "policies": {"workspace": POLICY, "apis": {"w-api": POLICY}, "products": {"w-prod": POLICY}},
            }
        ],
    }
    secrets = [ledger_secret("apim-drift-tracked-a", KEY_A_PRIMARY, sub_id("tracked-a"), "primary")]
    twin.seed(estate(service, secrets=secrets))
    vault_url = twin.urls[f"vault:{VAULT}"]
    status, _ = twin.control("DELETE", "/_twin/log")
    assert status == 204
    async with product_factory(twin, APIMR_KEY_VAULT_URL=vault_url) as factory:
        snap = await snapshot_of(factory, vault_url)

    total = generated + len(DRIFTED["subscriptions"]) + 1  # + the built-in master subscription
    assert len(snap.subscriptions) == total
    assert snap.unreadable == ()
    entries = arm_log(twin)
    requests = Counter((e["method"], e["path"], e["query"]) for e in entries)
    assert {request: n for request, n in requests.items() if n > 1} == {}
    page_reads = [e for e in entries if e["method"] == "GET" and e["path"] == f"{SERVICE_ID}/subscriptions"]
    assert len(page_reads) == math.ceil(total / 100) == 2  # APIM's page size is 100
    # Every request is for this instance (no discovery, no other service).
    assert all(e["path"].lower().startswith(SERVICE_ID.lower()) for e in entries)
    # The parts: one request each (paths, ignoring the page query).
    paths = Counter(e["path"].removeprefix(SERVICE_ID) for e in entries)
    assert paths[""] == 1
    for part in (
        "/tenant/access",
        "/tenant/gitAccess",
        "/portalsettings/signup",
        "/portalsettings/signin",
        "/portalconfigs/default",
        "/identityProviders",
        "/namedValues",
        "/apis",
        "/backends",
        "/products",
        "/products/starter/apis",
        "/products/starter/policies/policy",
        "/policies/policy",
        "/apis/legacy/policies/policy",
        "/apis/orders/policies/policy",
        "/diagnostics",
        "/loggers",
        "/certificates",
        "/providers/Microsoft.Insights/diagnosticSettings",
        "/subscriptions/tracked-a/listSecrets",
    ):
        assert paths[part] == 1, part
    assert paths["/subscriptions"] == 2
    workspace_parts = [
        "/workspaces",
        *(
            f"/workspaces/ws1{part}"
            for part in (
                "/apis",
                "/apis/w-api/policies/policy",
                "/products",
                "/products/w-prod/apiLinks",
                "/products/w-prod/policies/policy",
                "/subscriptions",
                "/namedValues",
                "/backends",
                "/policies/policy",
            )
        ),
    ]
    for part in workspace_parts:
        assert paths[part] == 1, part
    assert len(entries) == 1 + 20 + 2 + len(workspace_parts)
    [workspace] = snap.workspaces
    assert [a.name for a in workspace.apis] == ["w-api"]
    assert workspace.products[0].api_ids == ("w-api",)
    assert {p.scope for p in workspace.policies} == {PolicyScope.WORKSPACE, PolicyScope.PRODUCT, PolicyScope.API}


async def test_no_key_vault_url_is_not_configured_not_a_failed_read(twin: TwinHandle) -> None:
    seed_drifted(twin)
    async with product_factory(twin) as factory:
        snap = await snapshot_of(factory, None)
    assert snap.unreadable == ()
    assert snap.not_configured == (
        "key_hashes: not configured (APIMR_KEY_VAULT_URL is not set)",
        "key_ledger: not configured (APIMR_KEY_VAULT_URL is not set)",
    )
    # The rules about the ledger stay silent either way.
    assert not snap.readable("key_ledger")
    assert not snap.readable("key_hashes")
