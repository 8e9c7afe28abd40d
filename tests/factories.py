"""A compliant APIM snapshot to start rule tests from: each test changes one thing.

`compliant()` passes every rule with default parameters (tests/unit/test_rule_catalogue.py
keeps that true); `dataclasses.replace` on it makes the drifted variant.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.model import (
    AccessSetting,
    Api,
    ApimDiagnostic,
    ApimSubscription,
    Backend,
    DiagnosticLog,
    DiagnosticSetting,
    KeyHashes,
    Logger,
    NamedValue,
    Policy,
    PolicyScope,
    Portal,
    PrivateEndpointConnection,
    Product,
    Service,
    Snapshot,
    TrackedKey,
    frozen_map,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SUB = "3f2a1b0c-0000-4000-8000-000000000101"
RG = "rg-apim-prod"
SERVICE_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/apim-good"
WORKSPACE_ID = (
    f"/subscriptions/{SUB}/resourceGroups/rg-monitoring/providers/Microsoft.OperationalInsights/workspaces/law"
)
VAULT = "https://kv-apim.vault.azure.net"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."

SECURE_CUSTOM_PROPERTIES = {
    GW + "Security.Protocols.Tls10": "False",
    GW + "Security.Protocols.Tls11": "False",
    GW + "Security.Protocols.Ssl30": "False",
    GW + "Security.Backend.Protocols.Tls10": "False",
    GW + "Security.Backend.Protocols.Tls11": "False",
    GW + "Security.Backend.Protocols.Ssl30": "False",
    GW + "Security.Ciphers.TripleDes168": "False",
    GW + "Protocols.Server.Http2": "True",
    # The CBC and non-forward-secret suites default to enabled when their key is absent.
    **{
        GW + "Security.Ciphers." + suite: "False"
        for suite in (
            "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
            "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
            "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
            "TLS_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_RSA_WITH_AES_256_CBC_SHA256",
            "TLS_RSA_WITH_AES_128_CBC_SHA256",
            "TLS_RSA_WITH_AES_256_CBC_SHA",
            "TLS_RSA_WITH_AES_128_CBC_SHA",
        )
    },
}

GLOBAL_POLICY = """<policies>
  <inbound>
    <rate-limit-by-key calls="100" renewal-period="60" counter-key="@(context.Subscription.Id)" />
    <base />
  </inbound>
  <backend><forward-request /></backend>
  <outbound />
  <on-error />
</policies>"""

API_POLICY = (
    "<policies><inbound><base /></inbound><backend><base /></backend>"
    "<outbound><base /></outbound><on-error><base /></on-error></policies>"
)


def sub_id(sid: str) -> str:
    return f"{SERVICE_ID}/subscriptions/{sid}"


def service(**changes: Any) -> Service:
    base = Service(
        id=SERVICE_ID,
        name="apim-good",
        subscription_id=SUB,
        resource_group=RG,
        location="westeurope",
        sku_name="Premium",
        sku_capacity=1,
        etag='"etag-service"',
        tags=frozen_map({"env": "prod"}),
        identity_type="SystemAssigned",
        public_network_access="Disabled",
        virtual_network_type="None",
        private_endpoints=(
            PrivateEndpointConnection(id=f"{SERVICE_ID}/privateEndpointConnections/pe1", name="pe1", status="Approved"),
        ),
        custom_properties=frozen_map(SECURE_CUSTOM_PROPERTIES),
        min_api_version="2021-08-01",
        platform_version="stv2",
        created_at="2024-01-10T08:00:00Z",
        provisioning_state="Succeeded",
    )
    return replace(base, **changes)


def subscription(sid: str, **changes: Any) -> ApimSubscription:
    base = ApimSubscription(
        id=sub_id(sid),
        sid=sid,
        display_name=sid,
        scope=f"{SERVICE_ID}/products/mobile",
        state="active",
        owner_id=None,
        created_date=NOW - timedelta(days=30),
        expiration_date=NOW + timedelta(days=180),
        allow_tracing=False,
    )
    return replace(base, **changes)


def tracked(sid: str, slot: str = "primary", *, age_days: float = 10, value_hash: str | None = None) -> TrackedKey:
    return TrackedKey(
        secret_id=f"{VAULT}/secrets/apim-good--{sid}/{'0' * 32}",
        secret_name=f"apim-good--{sid}",
        subscription_id=sub_id(sid),
        slot=slot,
        created=NOW - timedelta(days=age_days),
        expires=NOW - timedelta(days=age_days) + timedelta(days=90),
        enabled=True,
        value_hash=value_hash or f"hash-{sid}-{slot}",
    )


def hashes(sid: str) -> KeyHashes:
    return KeyHashes(subscription_id=sub_id(sid), primary=f"hash-{sid}-primary", secondary=f"hash-{sid}-secondary")


def compliant(**changes: Any) -> Snapshot:
    """A snapshot every rule passes with its default parameters."""
    base = Snapshot(
        service=service(),
        read_at=NOW,
        subscriptions=(subscription("orders-mobile"),),
        tenant_access=AccessSetting(id=f"{SERVICE_ID}/tenant/access", enabled=False, etag='"t1"'),
        git_access=AccessSetting(id=f"{SERVICE_ID}/tenant/gitAccess", enabled=False, etag='"g1"'),
        portal=Portal(signup_enabled=False, signin_enabled=True, basic_auth_enabled=False),
        identity_providers=(),
        named_values=(
            NamedValue(
                id=f"{SERVICE_ID}/namedValues/payments-key",
                name="payments-key",
                display_name="payments-key",
                secret=True,
                key_vault_secret_id=f"{VAULT}/secrets/payments-key",
                key_vault_last_status_code="Success",
            ),
            NamedValue(id=f"{SERVICE_ID}/namedValues/region", name="region", display_name="region", secret=False),
        ),
        apis=(
            Api(
                id=f"{SERVICE_ID}/apis/orders",
                name="orders",
                display_name="Orders",
                path="orders",
                protocols=("https",),
                subscription_required=True,
                service_url="https://orders.internal.example",
                api_type="http",
                is_current=True,
            ),
        ),
        backends=(
            Backend(
                id=f"{SERVICE_ID}/backends/orders",
                name="orders",
                url="https://orders.internal.example",
                protocol="http",
                validate_certificate_chain=True,
                validate_certificate_name=True,
                has_credentials=True,
            ),
        ),
        products=(
            Product(
                id=f"{SERVICE_ID}/products/mobile",
                name="mobile",
                state="published",
                subscription_required=True,
                api_ids=("orders",),
            ),
        ),
        policies=(
            Policy(id=f"{SERVICE_ID}/policies/policy", scope=PolicyScope.SERVICE, owner="", xml=GLOBAL_POLICY),
            Policy(
                id=f"{SERVICE_ID}/apis/orders/policies/policy", scope=PolicyScope.API, owner="orders", xml=API_POLICY
            ),
        ),
        apim_diagnostics=(
            ApimDiagnostic(
                id=f"{SERVICE_ID}/diagnostics/azuremonitor",
                name="azuremonitor",
                logger_id=f"{SERVICE_ID}/loggers/azuremonitor",
                frontend_request_headers=("User-Agent",),
                sampling_percentage=100.0,
            ),
        ),
        loggers=(Logger(id=f"{SERVICE_ID}/loggers/azuremonitor", name="azuremonitor", logger_type="azureMonitor"),),
        diagnostic_settings=(
            DiagnosticSetting(
                id=f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/to-law",
                name="to-law",
                workspace_id=WORKSPACE_ID,
                destination_type="Dedicated",
                logs=(DiagnosticLog(category="GatewayLogs", category_group=None, enabled=True),),
            ),
        ),
        key_ledger=(tracked("orders-mobile"),),
        key_hashes=(hashes("orders-mobile"),),
    )
    return replace(base, **changes)
