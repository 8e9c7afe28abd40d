"""Microsoft.ApiManagement in the twin: services and the sub-resources the product reads and writes.

Routes follow azure-mgmt-apimanagement 5.0.0 (api-version 2024-05-01) and the REST specs:
service GET/PUT/PATCH/DELETE (LROs), lists, subscriptions (with $filter/$top/$skip and keys
only through listSecrets), tenant access, portal settings and the portal config that holds
`enableBasicAuth`, identity providers, named values (LROs), APIs, backends, diagnostics,
loggers, products, policies, workspaces and their children (`workspaces.py`), backup and
restore into real Azurite blobs.

Secrets (subscription keys, tenant keys, secret named values, identity provider client
secrets, logger credentials) live in `state.extra["apim"]["secrets"]`, never in the ARM
bodies other modules can read. Every successful write emits an Event Grid event
(`resource_event`), APIM subscription writes also `Microsoft.ApiManagement.Subscription*`.
The control route `POST /_twin/gateway/check` answers whether a key would pass the gateway;
self-hosted gateways, their keys and tokens are `twin/apim/gateways.py` (with the control
routes `/_twin/gateway/token-check` and `/_twin/gateway/expiry-scan`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from twin import arm
from twin.apim.apis import (
    delete_api,
    delete_operation,
    delete_policy,
    get_api,
    get_operation,
    get_policy,
    list_apis,
    list_operations,
    list_policies,
    patch_api,
    put_api,
    put_operation,
    put_policy,
    validate_policy_xml,
)
from twin.apim.backup import backup_document, backup_service, restore_service
from twin.apim.certificates import (
    delete_certificate,
    get_certificate,
    list_certificates,
    put_certificate,
    refresh_certificate,
)
from twin.apim.children import (
    COLLECTIONS,
    delete_child,
    get_child,
    identity_provider_secrets,
    link_product_api,
    list_children,
    list_product_apis,
    patch_child,
    put_child,
)
from twin.apim.common import APIM_VERSIONS, SVC, apim_event, compile_filter
from twin.apim.gateways import (
    expiry_scan_route,
    gateway_keys,
    generate_gateway_token,
    regenerate_gateway_key,
    token_check,
    token_check_route,
)
from twin.apim.named_values import (
    delete_named_value,
    get_named_value,
    list_named_values,
    named_value_value,
    patch_named_value,
    put_named_value,
    refresh_named_value,
)
from twin.apim.portal import (
    _tenant_regenerate,
    get_portal_config,
    get_portal_setting,
    get_tenant,
    list_portal_configs,
    list_portal_settings,
    list_tenant,
    tenant_secrets,
    write_portal_config,
    write_portal_setting,
    write_tenant,
)
from twin.apim.seeding import seed
from twin.apim.service import (
    default_custom_properties,
    delete_service,
    get_service,
    list_services,
    list_services_in_group,
    merge_custom_properties,
    patch_service,
    put_service,
)
from twin.apim.subscriptions import (
    _regenerate,
    delete_subscription,
    gateway_check,
    gateway_check_route,
    get_subscription,
    list_subscriptions,
    patch_subscription,
    put_subscription,
    subscription_secrets,
)
from twin.apim.workspaces import workspace_routes
from twin.arm import WriteContext, resource_event, write_context
from twin.web import add_route

# -- routes ------------------------------------------------------------------------------------------------------


def _head(handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    """HEAD (getEntityTag): the GET's status and ETag, no body."""

    async def head(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        etag = response.headers.get("ETag")
        return web.Response(status=response.status, headers={"ETag": etag} if etag else {})

    return head


def setup(app: web.Application) -> None:
    v = APIM_VERSIONS

    unserved = arm.provider_version_error("service")

    def route(method: str, path: str, handler: Callable[[web.Request], Any]) -> None:
        add_route(app, method, path, handler, versions=v, version_error=unserved)
        if method == "GET" and path.endswith("}") and path != SVC:
            add_route(app, "HEAD", path, _head(handler), versions=v, version_error=unserved)

    route("GET", "/subscriptions/{sub}/providers/Microsoft.ApiManagement/service", list_services)
    route(
        "GET",
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service",
        list_services_in_group,
    )
    route("GET", SVC, get_service)
    route("PUT", SVC, put_service)
    route("PATCH", SVC, patch_service)
    route("DELETE", SVC, delete_service)
    route("POST", SVC + "/backup", backup_service)
    route("POST", SVC + "/restore", restore_service)

    route("GET", SVC + "/subscriptions", list_subscriptions)
    route("GET", SVC + "/subscriptions/{sid}", get_subscription)
    route("PUT", SVC + "/subscriptions/{sid}", put_subscription)
    route("PATCH", SVC + "/subscriptions/{sid}", patch_subscription)
    route("DELETE", SVC + "/subscriptions/{sid}", delete_subscription)
    route("POST", SVC + "/subscriptions/{sid}/regeneratePrimaryKey", _regenerate("primary"))
    route("POST", SVC + "/subscriptions/{sid}/regenerateSecondaryKey", _regenerate("secondary"))
    route("POST", SVC + "/subscriptions/{sid}/listSecrets", subscription_secrets)

    route("GET", SVC + "/tenant", list_tenant)
    route("GET", SVC + "/tenant/{access}", get_tenant)
    route("PUT", SVC + "/tenant/{access}", write_tenant)
    route("PATCH", SVC + "/tenant/{access}", write_tenant)
    route("POST", SVC + "/tenant/{access}/listSecrets", tenant_secrets)
    route("POST", SVC + "/tenant/{access}/regeneratePrimaryKey", _tenant_regenerate("primary"))
    route("POST", SVC + "/tenant/{access}/regenerateSecondaryKey", _tenant_regenerate("secondary"))
    route("POST", SVC + "/tenant/{access}/git/regeneratePrimaryKey", _tenant_regenerate("primary"))
    route("POST", SVC + "/tenant/{access}/git/regenerateSecondaryKey", _tenant_regenerate("secondary"))

    route("GET", SVC + "/portalsettings", list_portal_settings)
    for kind in ("signin", "signup"):
        route("GET", SVC + f"/portalsettings/{kind}", get_portal_setting)
        route("PUT", SVC + f"/portalsettings/{kind}", write_portal_setting)
        route("PATCH", SVC + f"/portalsettings/{kind}", write_portal_setting)
    route("GET", SVC + "/portalconfigs", list_portal_configs)
    route("GET", SVC + "/portalconfigs/{pid}", get_portal_config)
    route("PUT", SVC + "/portalconfigs/{pid}", write_portal_config)
    route("PATCH", SVC + "/portalconfigs/{pid}", write_portal_config)

    for coll in COLLECTIONS.values():
        base = SVC + "/" + coll.segment
        route("GET", base, list_children)
        route("GET", base + "/{name}", get_child)
        route("PUT", base + "/{name}", put_child)
        route("PATCH", base + "/{name}", patch_child)
        route("DELETE", base + "/{name}", delete_child)
    route("POST", SVC + "/identityProviders/{name}/listSecrets", identity_provider_secrets)
    route("POST", SVC + "/gateways/{gateway}/listKeys", gateway_keys)
    route("POST", SVC + "/gateways/{gateway}/regenerateKey", regenerate_gateway_key)
    route("POST", SVC + "/gateways/{gateway}/generateToken", generate_gateway_token)
    route("GET", SVC + "/products/{name}/apis", list_product_apis)
    route("PUT", SVC + "/products/{name}/apis/{api}", link_product_api)

    route("GET", SVC + "/certificates", list_certificates)
    route("GET", SVC + "/certificates/{name}", get_certificate)
    route("PUT", SVC + "/certificates/{name}", put_certificate)
    route("DELETE", SVC + "/certificates/{name}", delete_certificate)
    route("POST", SVC + "/certificates/{name}/refreshSecret", refresh_certificate)

    route("GET", SVC + "/namedValues", list_named_values)
    route("GET", SVC + "/namedValues/{nv}", get_named_value)
    route("PUT", SVC + "/namedValues/{nv}", put_named_value)
    route("PATCH", SVC + "/namedValues/{nv}", patch_named_value)
    route("DELETE", SVC + "/namedValues/{nv}", delete_named_value)
    route("POST", SVC + "/namedValues/{nv}/listValue", named_value_value)
    route("POST", SVC + "/namedValues/{nv}/refreshSecret", refresh_named_value)

    route("GET", SVC + "/apis", list_apis)
    route("GET", SVC + "/apis/{api}", get_api)
    route("PUT", SVC + "/apis/{api}", put_api)
    route("PATCH", SVC + "/apis/{api}", patch_api)
    route("DELETE", SVC + "/apis/{api}", delete_api)
    route("GET", SVC + "/apis/{api}/operations", list_operations)
    route("GET", SVC + "/apis/{api}/operations/{op}", get_operation)
    route("PUT", SVC + "/apis/{api}/operations/{op}", put_operation)
    route("DELETE", SVC + "/apis/{api}/operations/{op}", delete_operation)

    for prefix in (SVC, SVC + "/apis/{api}", SVC + "/products/{product}"):
        route("GET", prefix + "/policies", list_policies)
        route("GET", prefix + "/policies/{policy}", get_policy)
        route("PUT", prefix + "/policies/{policy}", put_policy)
        route("DELETE", prefix + "/policies/{policy}", delete_policy)

    for method, path, handler in workspace_routes(SVC):
        route(method, path, handler)

    add_route(app, "POST", "/_twin/gateway/check", gateway_check_route, versions=None)
    add_route(app, "POST", "/_twin/gateway/token-check", token_check_route, versions=None)
    add_route(app, "POST", "/_twin/gateway/expiry-scan", expiry_scan_route, versions=None)


__all__ = [
    "APIM_VERSIONS",
    "WriteContext",
    "apim_event",
    "backup_document",
    "compile_filter",
    "default_custom_properties",
    "gateway_check",
    "merge_custom_properties",
    "resource_event",
    "seed",
    "setup",
    "token_check",
    "validate_policy_xml",
    "write_context",
]
