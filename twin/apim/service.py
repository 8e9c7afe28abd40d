"""The APIM service resource: GET/PUT/PATCH/DELETE (LROs), lists, customProperties, identity,
and what Azure creates inside a new service."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from twin import arm
from twin.apim.apis import _policy_body
from twin.apim.certificates import service_ca_certificates, service_hostnames
from twin.apim.common import (
    _SERVICE_NAME,
    APIM_VERSIONS,
    IDENTITY_TYPES,
    PROVIDER,
    SERVICE_TYPE,
    SKUS,
    _base,
    _bool,
    _check_if_match,
    _deep,
    _drop_secrets_under,
    _emit,
    _enum,
    _invalid,
    _iso,
    _now,
    _parse_time,
    _props,
    _service,
    _service_id,
    _set_keys,
    _str,
    _with_etag,
)
from twin.apim.portal import _portal_setting_body, _tenant_body
from twin.apim.subscriptions import _subscription_body
from twin.arm import write_context
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    json_response,
    page,
    params,
    read_json,
    state_of,
)

# -- customProperties: the protocol/cipher switches ----------------------------------------------------

_GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
# Reset on any PUT/PATCH that carries customProperties without them: default True for services
# created on or before 2018-04-01, else False.
DATED_KEYS = tuple(
    _GW + suffix
    for suffix in (
        "Security.Protocols.Tls10",
        "Security.Protocols.Tls11",
        "Security.Protocols.Ssl30",
        "Security.Backend.Protocols.Tls10",
        "Security.Backend.Protocols.Tls11",
        "Security.Backend.Protocols.Ssl30",
        "Security.Ciphers.TripleDes168",
    )
)
HTTP2_KEY = _GW + "Protocols.Server.Http2"  # default False
# Individually disabled ciphers: default True (enabled), shown only once set.
CIPHER_KEYS = tuple(
    _GW + "Security.Ciphers." + name
    for name in (
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
)
_KNOWN_CUSTOM = {k.lower(): k for k in (*DATED_KEYS, HTTP2_KEY, *CIPHER_KEYS)}
_LEGACY_CUTOFF = datetime(2018, 4, 1, 23, 59, 59, tzinfo=UTC)
DEFAULT_SERVICE_POLICY = (
    "<!--\r\n    IMPORTANT:\r\n    - Policy elements can appear only within the <inbound>, <outbound>, <backend> "
    "section elements.\r\n-->\r\n<policies>\r\n  <inbound></inbound>\r\n  <backend>\r\n    <forward-request />\r\n"
    "  </backend>\r\n  <outbound></outbound>\r\n  <on-error></on-error>\r\n</policies>"
)

# -- the service ----------------------------------------------------------------------------------------


def _created_legacy(created: str | None) -> bool:
    if not created:
        return False
    return _parse_time(created, "createdAtUtc") <= _LEGACY_CUTOFF


def default_custom_properties(created_at: str | None) -> dict[str, str]:
    dated = "True" if _created_legacy(created_at) else "False"
    values = dict.fromkeys(DATED_KEYS, dated)
    values[HTTP2_KEY] = "False"
    return values


def merge_custom_properties(
    given: Any, created_at: str | None, *, field: str = "properties.customProperties"
) -> dict[str, str]:
    """What Azure stores for a customProperties map: the given switches as sent (key spelling
    and value casing kept: it is a map of strings, and a client that compares them
    case-sensitively must fail here as it would against Azure), and every switch left out
    reset to its default, spelled as Azure answers ("True"/"False"), so a partial map silently
    re-enables what it omits. A switch given twice in different casings is refused."""
    if not isinstance(given, dict):
        raise _invalid(field, f"'{field}' must be an object of strings.")
    result = default_custom_properties(created_at)
    seen: dict[str, str] = {}
    for key, value in given.items():
        canonical = _KNOWN_CUSTOM.get(str(key).lower())
        if canonical is None:
            raise _invalid(f"{field}.{key}", f"'{key}' is not a supported custom property.")
        if not isinstance(value, str) or value.lower() not in ("true", "false"):
            raise _invalid(
                f"{field}.{key}", f"The value of '{key}' must be 'true' or 'false', got {json.dumps(value)}."
            )
        if canonical in seen:
            raise _invalid(f"{field}.{key}", f"'{key}' is given twice (as '{seen[canonical]}' too).")
        seen[canonical] = str(key)
        result.pop(canonical, None)
        result[str(key)] = value
    return result


def _identity(
    value: Any, existing: dict[str, Any] | None, tenant_id: str, field: str = "identity"
) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(field, "'identity' must be an object.")
    kind = _enum(value.get("type"), IDENTITY_TYPES, f"{field}.type", case_sensitive=False)
    if kind == "None":
        return {"type": "None"}
    result: dict[str, Any] = {"type": kind}
    old = existing or {}
    if "SystemAssigned" in kind:
        result["principalId"] = old.get("principalId") or str(uuid.uuid4())
        result["tenantId"] = tenant_id
    if "UserAssigned" in kind:
        assigned = value.get("userAssignedIdentities")
        if not isinstance(assigned, dict) or not assigned:
            raise _invalid(f"{field}.userAssignedIdentities", "UserAssigned identity needs userAssignedIdentities.")
        previous = old.get("userAssignedIdentities") or {}
        result["userAssignedIdentities"] = {}
        for ident_id in assigned:
            if not re.match(
                r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft.ManagedIdentity/userAssignedIdentities/[^/]+$",
                ident_id,
                re.IGNORECASE,
            ):
                raise _invalid(f"{field}.userAssignedIdentities", f"'{ident_id}' is not a user-assigned identity id.")
            prior = previous.get(ident_id) or {}
            seeded = assigned[ident_id] if isinstance(assigned[ident_id], dict) else {}
            result["userAssignedIdentities"][ident_id] = {
                "principalId": seeded.get("principalId") or prior.get("principalId") or str(uuid.uuid4()),
                "clientId": seeded.get("clientId") or prior.get("clientId") or str(uuid.uuid4()),
            }
    return result


def _sku(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid("sku", "'sku' is required (name and capacity).")
    name = _enum(value.get("name"), SKUS, "sku.name")
    capacity = value.get("capacity")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise _invalid("sku.capacity", "'sku.capacity' is required: a whole number.")
    if name == "Consumption" and capacity != 0:
        raise _invalid("sku.capacity", "Consumption services have capacity 0.")
    if name != "Consumption" and capacity < 1:
        raise _invalid("sku.capacity", f"{name} services need capacity >= 1.")
    return {"name": name, "capacity": capacity}


def _service_properties(
    given: dict[str, Any], current: dict[str, Any], *, replace: bool, created_at: str
) -> dict[str, Any]:
    """Validate and merge service properties (PUT replaces the writable ones, PATCH merges)."""
    props = dict(current)
    if "publisherEmail" in given or replace:
        props["publisherEmail"] = _str(given.get("publisherEmail"), "properties.publisherEmail", min_len=1, max_len=100)
    if "publisherName" in given or replace:
        props["publisherName"] = _str(given.get("publisherName"), "properties.publisherName", min_len=1, max_len=100)
    if "notificationSenderEmail" in given:
        props["notificationSenderEmail"] = _str(
            given["notificationSenderEmail"], "properties.notificationSenderEmail", max_len=100
        )
    if "publicNetworkAccess" in given or replace:
        value = given.get("publicNetworkAccess")
        props["publicNetworkAccess"] = (
            "Enabled" if value is None else _enum(value, ("Enabled", "Disabled"), "properties.publicNetworkAccess")
        )
    if "virtualNetworkType" in given or replace:
        value = given.get("virtualNetworkType")
        props["virtualNetworkType"] = (
            "None" if value is None else _enum(value, ("None", "External", "Internal"), "properties.virtualNetworkType")
        )
    if "virtualNetworkConfiguration" in given:
        props["virtualNetworkConfiguration"] = given["virtualNetworkConfiguration"]
    if props.get("virtualNetworkType") in ("External", "Internal") and not (
        props.get("virtualNetworkConfiguration") or {}
    ).get("subnetResourceId"):
        raise _invalid(
            "properties.virtualNetworkConfiguration",
            "A VNet-integrated service needs virtualNetworkConfiguration.subnetResourceId.",
        )
    if "customProperties" in given or replace:
        props["customProperties"] = merge_custom_properties(given.get("customProperties") or {}, created_at)
    if "apiVersionConstraint" in given:
        constraint = given["apiVersionConstraint"] or {}
        if not isinstance(constraint, dict):
            raise _invalid("properties.apiVersionConstraint", "'apiVersionConstraint' must be an object.")
        minimum = constraint.get("minApiVersion")
        if (
            minimum is not None
            and minimum not in APIM_VERSIONS
            and not re.match(r"^\d{4}-\d{2}-\d{2}(-preview)?$", str(minimum))
        ):
            raise _invalid("properties.apiVersionConstraint.minApiVersion", f"'{minimum}' is not an api-version.")
        props["apiVersionConstraint"] = {"minApiVersion": minimum}
    if "disableGateway" in given:
        props["disableGateway"] = _bool(given["disableGateway"], "properties.disableGateway")
    if "natGatewayState" in given:
        props["natGatewayState"] = _enum(
            given["natGatewayState"], ("Enabled", "Disabled"), "properties.natGatewayState"
        )
    for passthrough in (
        "additionalLocations",
        "enableClientCertificate",
        "publicIpAddressId",
        "developerPortalStatus",
        "legacyPortalStatus",
        "configurationApi",
    ):
        if passthrough in given:
            props[passthrough] = given[passthrough]
    return props


def _new_service_body(
    state: TwinState, resource_id: str, name: str, location: str, sku: dict[str, Any], created_at: str
) -> dict[str, Any]:
    host = name.lower()
    region = re.sub(r"\s+", "", location).lower()
    return {
        "id": resource_id,
        "name": name,
        "type": SERVICE_TYPE,
        "tags": {},
        "location": location,
        "sku": sku,
        "systemData": {
            "createdBy": "twin",
            "createdByType": "Application",
            "createdAt": created_at,
            "lastModifiedBy": "twin",
            "lastModifiedByType": "Application",
            "lastModifiedAt": created_at,
        },
        "properties": {
            "publisherEmail": "",
            "publisherName": "",
            "notificationSenderEmail": "apimgmt-noreply@mail.windowsazure.com",
            "provisioningState": "Succeeded",
            "targetProvisioningState": "",
            "createdAtUtc": created_at,
            "gatewayUrl": f"https://{host}.azure-api.net",
            "gatewayRegionalUrl": f"https://{host}-{region}-01.regional.azure-api.net",
            "portalUrl": f"https://{host}.portal.azure-api.net",
            "developerPortalUrl": f"https://{host}.developer.azure-api.net",
            "managementApiUrl": f"https://{host}.management.azure-api.net",
            "scmUrl": f"https://{host}.scm.azure-api.net",
            "hostnameConfigurations": [
                {
                    "type": "Proxy",
                    "hostName": f"{host}.azure-api.net",
                    "negotiateClientCertificate": False,
                    "defaultSslBinding": True,
                    "certificateSource": "BuiltIn",
                }
            ],
            "publicIPAddresses": [f"20.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"],
            "privateIPAddresses": None,
            "publicNetworkAccess": "Enabled",
            "virtualNetworkType": "None",
            "customProperties": default_custom_properties(created_at),
            "certificates": None,
            "disableGateway": False,
            "natGatewayState": "Disabled",
            "apiVersionConstraint": {"minApiVersion": None},
            "platformVersion": "stv2",
            "privateEndpointConnections": None,
            "developerPortalStatus": "Enabled",
            "legacyPortalStatus": "Disabled",
        },
    }


def _create_defaults(state: TwinState, service: Resource) -> None:
    """What Azure creates inside a new service: the master subscription, tenant access
    entities, portal settings and config, the default global policy."""
    sid = service.id
    created = service.body["properties"]["createdAtUtc"]
    master = f"{sid}/subscriptions/master"
    state.store.put(
        master,
        _subscription_body(
            master,
            "master",
            {
                "ownerId": f"{sid}/users/1",
                "scope": f"{sid}/",
                "displayName": "Built-in all-access subscription",
                "state": "active",
                "createdDate": created,
                "startDate": created,
                "allowTracing": False,
            },
        ),
    )
    _set_keys(state, master, None, None)
    for access, principal in (("access", "integration"), ("gitAccess", "git")):
        rid = f"{sid}/tenant/{access}"
        state.store.put(rid, _tenant_body(rid, access, principal, enabled=False))
        _set_keys(state, rid, None, None)
    for kind in ("signin", "signup"):
        rid = f"{sid}/portalsettings/{kind}"
        state.store.put(rid, _portal_setting_body(rid, kind, {"enabled": kind == "signup"}))
    rid = f"{sid}/portalconfigs/default"
    state.store.put(
        rid,
        {
            "id": rid,
            "type": "Microsoft.ApiManagement/service/portalconfigs",
            "name": "default",
            "properties": {
                "enableBasicAuth": True,
                "signin": {"require": False},
                "signup": {"termsOfService": {"text": "", "requireConsent": False}},
                "delegation": {
                    "delegateRegistration": False,
                    "delegateSubscription": False,
                    "delegationUrl": None,
                    "validationKey": None,
                },
                "csp": {"mode": "disabled", "reportUri": [], "allowedSources": []},
                "cors": {"allowedOrigins": []},
            },
        },
    )
    rid = f"{sid}/policies/policy"
    state.store.put(rid, _policy_body(rid, "Microsoft.ApiManagement/service/policies", DEFAULT_SERVICE_POLICY))


def _service_children(state: TwinState, service_id: str) -> list[Resource]:
    return state.store.descendants(service_id)


def _render_service(resource: Resource) -> dict[str, Any]:
    body = _deep(resource.body)
    body["etag"] = resource.etag
    return body


async def get_service(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    return _with_etag(_render_service(service), service)


async def list_services_in_group(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = params(request)
    arm.resource_group_or_404(state, p["sub"], p["rg"])
    parent = f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/{PROVIDER}"
    items = [_render_service(r) for r in state.store.children(parent, "service") if r.body.get("type") == SERVICE_TYPE]
    return json_response(page(items, request, top=None, skip=0, base_url=_base(state)))


async def list_services(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    sub = params(request)["sub"]
    arm.subscription_or_404(state, sub)
    prefix = norm(f"/subscriptions/{sub}") + "/"
    items = [
        _render_service(r)
        for r in state.store.by_type(SERVICE_TYPE)
        if norm(r.id).startswith(prefix) and r.body.get("type") == SERVICE_TYPE
    ]
    return json_response(page(items, request, top=None, skip=0, base_url=_base(state)))


def _apply_service_update(
    state: TwinState, body: dict[str, Any], update: dict[str, Any], *, replace: bool
) -> dict[str, Any]:
    """The service body after a PUT (replace) or PATCH (merge) `update`; raises ServiceError."""
    result = _deep(body)
    created = result["properties"]["createdAtUtc"]
    if "sku" in update or replace:
        result["sku"] = _sku(update.get("sku"))
    if "tags" in update or replace:
        tags = update.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise _invalid("tags", "'tags' must be an object of strings.")
        result["tags"] = tags
    if "identity" in update or replace:
        identity = _identity(update.get("identity"), body.get("identity"), state.tenant_id)
        if identity is None:
            result.pop("identity", None)
        else:
            result["identity"] = identity
    if "zones" in update:
        result["zones"] = update["zones"]
    given = _props(update)
    result["properties"] = _service_properties(given, result["properties"], replace=replace, created_at=created)
    # Certificates are read as Azure reads them (twin/apim/certificates.py); data and passwords
    # are write-only and never kept.
    if "hostnameConfigurations" in given:
        result["properties"]["hostnameConfigurations"] = service_hostnames(
            state, result, given["hostnameConfigurations"], body["properties"].get("hostnameConfigurations")
        )
    if "certificates" in given:
        result["properties"]["certificates"] = service_ca_certificates(
            given["certificates"], body["properties"].get("certificates")
        )
    result["systemData"]["lastModifiedAt"] = _iso(_now(state))
    return result


async def put_service(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = params(request)
    arm.resource_group_or_404(state, p["sub"], p["rg"])
    name = p["service"]
    if not (1 <= len(name) <= 50) or not _SERVICE_NAME.match(name):
        raise ServiceError(400, "InvalidResourceName", f"The resource name '{name}' is invalid for {SERVICE_TYPE}.")
    body = await read_json(request)
    if not isinstance(body.get("location"), str) or not body["location"]:
        raise _invalid("location", "'location' is required.")
    resource_id = _service_id(p["sub"], p["rg"], name)
    existing = state.store.get(resource_id)
    _check_if_match(request, existing, required=False)
    ctx = write_context(request)
    if existing is not None:
        _refuse_while_updating(state, existing)
        if re.sub(r"\s", "", str(body["location"])).lower() != re.sub(r"\s", "", existing.body["location"]).lower():
            raise ServiceError(400, "LocationMismatch", "The location of an existing service cannot change.")
        updated = _apply_service_update(state, existing.body, body, replace=True)
        updated["properties"]["provisioningState"] = "Updating"
        shown = _mark_updating(state, existing) if state.lro.service_update_seconds > 0 else existing

        def finish_update() -> dict[str, Any]:
            updated["properties"]["provisioningState"] = "Succeeded"
            done = state.store.put(resource_id, updated)
            _emit(state, ctx, done.id, "write")
            return _render_service(done)

        return arm.start_operation(
            request,
            resource_id=resource_id,
            status_parent=existing.id,
            on_complete=finish_update,
            status=200,
            body=updated | {"etag": shown.etag},
            clock_seconds=state.lro.service_update_seconds,
        )
    created_at = _iso(_now(state))
    skeleton = _new_service_body(state, resource_id, name, str(body["location"]), {}, created_at)
    created = _apply_service_update(state, skeleton, body, replace=True)
    created["properties"]["provisioningState"] = "Activating"
    created["properties"]["targetProvisioningState"] = "Succeeded"
    resource = state.store.put(resource_id, created)
    _create_defaults(state, resource)

    def finish_create() -> dict[str, Any]:
        current = state.store.get(resource_id)
        if current is None:
            return {}
        current.body["properties"]["provisioningState"] = "Succeeded"
        current.body["properties"]["targetProvisioningState"] = ""
        done = state.store.put(resource_id, current.body)
        _emit(state, ctx, done.id, "write")
        return _render_service(done)

    return arm.start_operation(
        request,
        resource_id=resource_id,
        status_parent=resource_id,
        on_complete=finish_create,
        status=201,
        body=_render_service(resource),
    )


def _refuse_while_updating(state: TwinState, service: Resource) -> None:
    """APIM runs one infrastructure change at a time: a second one while an update runs is
    refused with 409 (Learn, "Manage protocols and ciphers": changes can take an hour or
    more and block other changes meanwhile). [unverified code/message]"""
    if state.running_operation(service.id) is not None:
        raise ServiceError(
            409,
            "Conflict",
            f"The API Management service '{service.body.get('name')}' is being updated; another operation is in "
            "progress. Try again once it has finished.",
        )


def _mark_updating(state: TwinState, service: Resource) -> Resource:
    """While an update runs, GET shows provisioningState Updating and the old settings."""
    current = _deep(service.body)
    current["properties"]["provisioningState"] = "Updating"
    return state.store.put(service.id, current)


async def patch_service(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    # ApiManagementService_Update declares no If-Match: Azure does not evaluate it on the
    # service PATCH, so neither does the twin unless a test asks (lro.enforce_service_if_match).
    if state.lro.enforce_service_if_match:
        _check_if_match(request, service, required=False)
    _refuse_while_updating(state, service)
    body = await read_json(request)
    if (
        "location" in body
        and re.sub(r"\s", "", str(body["location"])).lower() != re.sub(r"\s", "", service.body["location"]).lower()
    ):
        raise ServiceError(400, "LocationMismatch", "The location of an existing service cannot change.")
    updated = _apply_service_update(state, service.body, body, replace=False)
    ctx = write_context(request)
    resource_id = service.id
    long_update = state.lro.service_update_seconds > 0
    if long_update:
        _mark_updating(state, service)

    def finish() -> dict[str, Any]:
        # A change made by somebody else while this update ran would be lost here in Azure
        # too; the twin refuses service writes meanwhile (409), so none can be.
        updated["properties"]["provisioningState"] = "Succeeded"
        done = state.store.put(resource_id, updated)
        _emit(state, ctx, done.id, "write")
        return _render_service(done)

    return arm.start_operation(
        request,
        resource_id=resource_id,
        status_parent=resource_id,
        on_complete=finish,
        clock_seconds=state.lro.service_update_seconds,
    )


async def delete_service(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = params(request)
    arm.resource_group_or_404(state, p["sub"], p["rg"])
    service = state.store.get(_service_id(p["sub"], p["rg"], p["service"]))
    if service is None:
        return web.Response(status=204)
    ctx = write_context(request)
    resource_id = service.id

    def finish() -> dict[str, Any] | None:
        state.store.delete(resource_id)
        _drop_secrets_under(state, resource_id, include_self=True)
        _emit(state, ctx, resource_id, "delete")
        return None

    return arm.start_operation(
        request, resource_id=resource_id, status_parent=resource_id, on_complete=finish, style="location"
    )
