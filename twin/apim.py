"""Microsoft.ApiManagement in the twin: services and the sub-resources the product reads and writes.

Routes follow azure-mgmt-apimanagement 5.0.0 (api-version 2024-05-01) and the REST specs:
service GET/PUT/PATCH/DELETE (LROs), lists, subscriptions (with $filter/$top/$skip and keys
only through listSecrets), tenant access, portal settings and the portal config that holds
`enableBasicAuth`, identity providers, named values (LROs), APIs, backends, diagnostics,
loggers, products, policies, backup and restore into real Azurite blobs.

Secrets (subscription keys, tenant keys, secret named values, identity provider client
secrets, logger credentials) live in `state.extra["apim"]["secrets"]`, never in the ARM
bodies other modules can read. Every successful write emits an Event Grid event
(`resource_event`), APIM subscription writes also `Microsoft.ApiManagement.Subscription*`.
The control route `POST /_twin/gateway/check` answers whether a key would pass the gateway.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import uuid
import xml.parsers.expat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from twin import arm, keyvault
from twin.arm import WriteContext, resource_event, write_context
from twin.estate import EstateError, SeedContext
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    add_route,
    int_param,
    json_response,
    page,
    params,
    read_json,
    state_of,
)

# Published Microsoft.ApiManagement api-versions (Azure/azure-rest-api-specs stable/ and preview/).
# The SDK (5.0.0) sends 2024-05-01; the Azure CLI sends 2022-08-01.
APIM_VERSIONS = frozenset(
    {
        "2020-12-01",
        "2021-01-01-preview",
        "2021-04-01-preview",
        "2021-08-01",
        "2021-12-01-preview",
        "2022-04-01-preview",
        "2022-08-01",
        "2022-09-01-preview",
        "2023-03-01-preview",
        "2023-05-01-preview",
        "2023-09-01-preview",
        "2024-05-01",
        "2024-06-01-preview",
    }
)
arm.PROVIDER_VERSIONS["microsoft.apimanagement"] = APIM_VERSIONS

PROVIDER = "Microsoft.ApiManagement"
SERVICE_TYPE = "Microsoft.ApiManagement/service"
SVC = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{service}"
_SERVICE_NAME = re.compile(r"^[a-zA-Z](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?$")
_ENTITY_ID = re.compile(r"^[^*#&+:<>?]+$")
_NAMED_VALUE_DISPLAY = re.compile(r"^[A-Za-z0-9-._]+$")
DEFAULT_PAGE = 100  # APIM's page size when no $top is given

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

SKUS = ("Developer", "Standard", "Premium", "Basic", "Consumption", "Isolated", "BasicV2", "StandardV2")
IDENTITY_TYPES = ("SystemAssigned", "UserAssigned", "SystemAssigned, UserAssigned", "None")
SUBSCRIPTION_STATES = ("suspended", "active", "expired", "submitted", "rejected", "cancelled")
IDENTITY_PROVIDERS = ("facebook", "google", "microsoft", "twitter", "aad", "aadB2C")
PROTOCOLS = ("http", "https", "ws", "wss")
LOGGER_TYPES = ("azureEventHub", "applicationInsights", "azureMonitor")
DIAGNOSTIC_IDS = ("applicationinsights", "azuremonitor")
BACKUP_ACCESS_TYPES = ("AccessKey", "SystemAssignedManagedIdentity", "UserAssignedManagedIdentity")

DEFAULT_SERVICE_POLICY = (
    "<!--\r\n    IMPORTANT:\r\n    - Policy elements can appear only within the <inbound>, <outbound>, <backend> "
    "section elements.\r\n-->\r\n<policies>\r\n  <inbound></inbound>\r\n  <backend>\r\n    <forward-request />\r\n"
    "  </backend>\r\n  <outbound></outbound>\r\n  <on-error></on-error>\r\n</policies>"
)


def _now(state: TwinState) -> datetime:
    return state.clock.now()


def _iso(moment: datetime) -> str:
    return arm.iso(moment)


def _parse_time(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise _invalid(field, f"'{field}' must be an ISO 8601 date-time string.")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise _invalid(field, f"'{field}' is not a valid date-time: '{value}'.") from error
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _new_key() -> str:
    return secrets.token_hex(16)


# -- errors ---------------------------------------------------------------------------------------------


def _invalid(target: str, message: str) -> ServiceError:
    return ServiceError(
        400,
        "ValidationError",
        f"One or more fields contain incorrect values: {message}",
        details=[{"code": "ValidationError", "target": target, "message": message}],
    )


def _not_found(kind: str, name: str) -> ServiceError:
    return ServiceError(404, "ResourceNotFound", f"{kind} '{name}' not found.")


def _enum(value: Any, allowed: tuple[str, ...], field: str, *, case_sensitive: bool = False) -> str:
    if isinstance(value, str):
        for option in allowed:
            if value == option or (not case_sensitive and value.lower() == option.lower()):
                return option
    raise _invalid(field, f"Value '{value}' of '{field}' is invalid. Allowed values: {', '.join(allowed)}.")


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(field, f"'{field}' must be a boolean, got {json.dumps(value)}.")
    return value


def _str(value: Any, field: str, *, min_len: int = 0, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f"'{field}' must be a string.")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise _invalid(field, f"'{field}' must be between {min_len} and {max_len or 'any'} characters long.")
    return value


def _props(body: dict[str, Any]) -> dict[str, Any]:
    props = body.get("properties", {})
    if props is None:
        return {}
    if not isinstance(props, dict):
        raise _invalid("properties", "'properties' must be an object.")
    return props


def _etag_matches(given: str, etag: str) -> bool:
    def bare(tag: str) -> str:
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        return tag.strip('"')

    return any(bare(part) == bare(etag) for part in given.split(","))


def _check_if_match(request: web.Request, resource: Resource | None, *, required: bool) -> None:
    given = request.headers.get("If-Match")
    if given is None or not given.strip():
        if required:
            # [unverified code] APIM rejects conditional writes without If-Match with 400.
            raise ServiceError(
                400,
                "IfMatchHeaderMissing",
                "The If-Match header is required for this operation. Use the entity tag (ETag) returned by GET, "
                "or '*' to apply the change unconditionally.",
            )
        return
    if given.strip() == "*":
        return
    if resource is None or not _etag_matches(given, resource.etag):
        raise ServiceError(
            412,
            "PreconditionFailed",
            "The entity state (ETag) given in If-Match does not match the current state of the entity.",
        )


# -- private state --------------------------------------------------------------------------------------


def _secrets(state: TwinState) -> dict[str, dict[str, Any]]:
    apim: dict[str, Any] = state.extra.setdefault("apim", {})
    found: dict[str, dict[str, Any]] = apim.setdefault("secrets", {})
    return found


def _secret(state: TwinState, resource_id: str) -> dict[str, Any]:
    return _secrets(state).setdefault(norm(resource_id), {})


def _drop_secrets_under(state: TwinState, resource_id: str, *, include_self: bool) -> None:
    key = norm(resource_id)
    store = _secrets(state)
    for k in [k for k in store if k.startswith(key + "/") or (include_self and k == key)]:
        del store[k]


def _set_keys(state: TwinState, resource_id: str, primary: str | None, secondary: str | None) -> None:
    """Set (or generate) both keys; each key's creation time comes from the twin clock."""
    entry = _secret(state, resource_id)
    now = _iso(_now(state))
    for slot, value in (("primary", primary), ("secondary", secondary)):
        if value is not None or f"{slot}Key" not in entry:
            entry[f"{slot}Key"] = value if value is not None else _new_key()
            entry[f"{slot}KeyCreated"] = now


# -- events ---------------------------------------------------------------------------------------------


def apim_event(service_id: str, resource_uri: str, event_type: str, at: datetime) -> dict[str, Any]:
    """A `Microsoft.ApiManagement.*` event: topic the service, subject the entity below it."""
    subject = resource_uri[len(service_id) :] if norm(resource_uri).startswith(norm(service_id)) else resource_uri
    return {
        "id": str(uuid.uuid4()),
        "topic": service_id,
        "subject": subject,
        "eventType": f"Microsoft.ApiManagement.{event_type}",
        "eventTime": _iso(at),
        "data": {"resourceUri": resource_uri},
        "dataVersion": "1",
        "metadataVersion": "1",
    }


def _emit(state: TwinState, ctx: WriteContext, resource_uri: str, kind: str, action: str | None = None) -> None:
    state.emit(resource_event(ctx, resource_uri=resource_uri, kind=kind, action=action, at=_now(state)))


# -- lookups --------------------------------------------------------------------------------------------


def _service_id(sub: str, rg: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{PROVIDER}/service/{name}"


def _service(request: web.Request) -> Resource:
    state = state_of(request)
    p = params(request)
    group = arm.resource_group_or_404(state, p["sub"], p["rg"])
    service = state.store.get(_service_id(p["sub"], p["rg"], p["service"]))
    if service is None or service.body.get("type") != SERVICE_TYPE:
        raise arm.resource_not_found(SERVICE_TYPE, p["service"], group["name"])
    return service


def _child(state: TwinState, service: Resource, path: str, kind: str, name: str) -> Resource:
    found = state.store.get(f"{service.id}/{path}")
    if found is None:
        raise _not_found(kind, name)
    return found


def _entity_name(value: str, field: str) -> str:
    if not value or len(value) > 256 or not _ENTITY_ID.match(value):
        raise _invalid(field, f"'{value}' is not a valid identifier (1-256 characters, none of *#&+:<>?).")
    return value


def _with_etag(body: dict[str, Any], resource: Resource, *, status: int = 200) -> web.Response:
    return json_response(body, status=status, headers={"ETag": resource.etag})


def _base(state: TwinState) -> str:
    return state.urls["arm"]


def _list(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    top = int_param(request, "$top", minimum=1)
    skip = int_param(request, "$skip", minimum=0) or 0
    return json_response(page(items, request, top=top or DEFAULT_PAGE, skip=skip, base_url=_base(state_of(request))))


# -- OData $filter ------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_./]*)|(?P<num>-?\d+))"
)
_COMPARE = ("eq", "ne", "gt", "ge", "lt", "le")
_FUNCS = ("substringof", "contains", "startswith", "endswith")
Predicate = Callable[[dict[str, str]], bool]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _filter_error(f"cannot parse $filter near '{text[pos : pos + 20]}'")
        kind = match.lastgroup or ""
        value = match.group(kind)
        out.append((kind, value[1:-1].replace("''", "'") if kind == "str" else value))
        pos = match.end()
    return out


def _filter_error(message: str) -> ServiceError:
    return ServiceError(400, "InvalidFilterQuery", f"Invalid $filter: {message}.")


def _is_word(token: tuple[str, str] | None, word: str) -> bool:
    return token is not None and token[0] == "word" and token[1].lower() == word


def compile_filter(text: str, fields: dict[str, tuple[str, ...]]) -> Predicate:
    """An OData `$filter` over string fields; `fields` maps each field to its allowed operators."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        nonlocal pos
        token = peek()
        if token is None or (kind and token[0] != kind) or (value and token[1].lower() != value):
            raise _filter_error(f"expected {value or kind} at position {pos}")
        pos += 1
        return token

    def field_name(name: str, op: str) -> str:
        for known, ops in fields.items():
            if known.lower() == name.lower():
                if op not in ops:
                    raise _filter_error(f"operator '{op}' is not supported for field '{known}'")
                return known
        raise _filter_error(f"field '{name}' is not supported (supported: {', '.join(fields)})")

    def term() -> Predicate:
        token = peek()
        if token == ("punct", "("):
            take()
            inner = expression()
            take("punct", ")")
            return inner
        name = take("word")[1]
        if name.lower() in _FUNCS:
            func = name.lower()
            take("punct", "(")
            if func == "substringof":
                literal = take("str")[1]
                take("punct", ",")
                field = field_name(take("word")[1], func)
            else:
                field = field_name(take("word")[1], func)
                take("punct", ",")
                literal = take("str")[1]
            take("punct", ")")
            needle = literal.lower()
            if func in ("substringof", "contains"):
                return lambda row: needle in row.get(field, "").lower()
            if func == "startswith":
                return lambda row: row.get(field, "").lower().startswith(needle)
            return lambda row: row.get(field, "").lower().endswith(needle)
        op_token = take("word")
        op = op_token[1].lower()
        if op not in _COMPARE:
            raise _filter_error(f"operator '{op_token[1]}' is not supported")
        field = field_name(name, op)
        literal_token = peek()
        if literal_token is None or literal_token[0] not in ("str", "num"):
            raise _filter_error(f"a literal is expected after '{name} {op}'")
        take()
        value = literal_token[1].lower()
        compare: dict[str, Callable[[str, str], bool]] = {
            "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b,
            "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b,
        }
        check = compare[op]
        return lambda row: check(row.get(field, "").lower(), value)

    def conjunction() -> Predicate:
        left = term()
        while _is_word(peek(), "and"):
            take()
            right = term()
            left = (lambda a, b: lambda row: a(row) and b(row))(left, right)
        return left

    def expression() -> Predicate:
        left = conjunction()
        while _is_word(peek(), "or"):
            take()
            right = conjunction()
            left = (lambda a, b: lambda row: a(row) or b(row))(left, right)
        return left

    predicate = expression()
    if pos != len(tokens):
        raise _filter_error(f"unexpected '{tokens[pos][1]}'")
    return predicate


_ALL_OPS = (*_COMPARE, *_FUNCS)
SUBSCRIPTION_FILTER_FIELDS: dict[str, tuple[str, ...]] = {
    "name": _ALL_OPS,
    "displayName": _ALL_OPS,
    "stateComment": _ALL_OPS,
    "ownerId": _ALL_OPS,
    "scope": _ALL_OPS,
    "userId": _ALL_OPS,
    "productId": _ALL_OPS,
    "state": ("eq",),
}


def _filtered(
    request: web.Request, rows: list[tuple[dict[str, str], dict[str, Any]]], fields: dict[str, tuple[str, ...]]
) -> list[dict[str, Any]]:
    text = request.query.get("$filter")
    if not text:
        return [body for _, body in rows]
    predicate = compile_filter(text, fields)
    return [body for row, body in rows if predicate(row)]


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
    """What Azure stores for a customProperties map: the given switches, and every switch left
    out reset to its default (so a partial map silently re-enables what it omits)."""
    if not isinstance(given, dict):
        raise _invalid(field, f"'{field}' must be an object of strings.")
    result = default_custom_properties(created_at)
    for key, value in given.items():
        canonical = _KNOWN_CUSTOM.get(str(key).lower())
        if canonical is None:
            raise _invalid(f"{field}.{key}", f"'{key}' is not a supported custom property.")
        if not isinstance(value, str) or value.lower() not in ("true", "false"):
            raise _invalid(
                f"{field}.{key}", f"The value of '{key}' must be 'true' or 'false', got {json.dumps(value)}."
            )
        result[canonical] = "True" if value.lower() == "true" else "False"
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
        "hostnameConfigurations",
        "additionalLocations",
        "certificates",
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
    prefix = norm(service_id) + "/"
    return [r for k, r in state.store.resources.items() if k.startswith(prefix)]


def _deep(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(value))
    return copied


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
    prefix = norm(f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/{PROVIDER}/service") + "/"
    items = [
        _render_service(r)
        for k, r in state.store.resources.items()
        if k.startswith(prefix) and "/" not in k[len(prefix) :] and r.body.get("type") == SERVICE_TYPE
    ]
    return json_response(page(items, request, top=None, skip=0, base_url=_base(state)))


async def list_services(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    sub = params(request)["sub"]
    arm.subscription_or_404(state, sub)
    prefix = norm(f"/subscriptions/{sub}") + "/"
    items = [
        _render_service(r)
        for k, r in state.store.resources.items()
        if k.startswith(prefix) and r.body.get("type") == SERVICE_TYPE
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
    result["properties"] = _service_properties(
        _props(update), result["properties"], replace=replace, created_at=created
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


# -- subscriptions ------------------------------------------------------------------------------------

SUBSCRIPTION_TYPE = "Microsoft.ApiManagement/service/subscriptions"


def _subscription_body(resource_id: str, sid: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"id": resource_id, "type": SUBSCRIPTION_TYPE, "name": sid, "properties": props}


def _full_scope(state: TwinState, service: Resource, scope: Any, field: str = "properties.scope") -> str:
    """The stored (full ARM id) form of a scope; the API or product it names must exist."""
    if not isinstance(scope, str) or not scope:
        raise _invalid(field, "'scope' is required: '/apis', '/apis/{apiId}' or '/products/{productId}'.")
    sid = service.id
    relative = scope
    if norm(scope).startswith(norm(sid)):
        relative = scope[len(sid) :]
    relative = relative.rstrip("/") if relative not in ("/", "") else "/"
    if relative == "/":
        return f"{sid}/"
    match = re.fullmatch(r"/(apis|products)(?:/([^/]+))?", relative, re.IGNORECASE)
    if match is None or (match.group(1).lower() == "products" and not match.group(2)):
        raise _invalid(
            field, f"Scope '{scope}' is invalid: use '/apis', '/apis/{{apiId}}' or '/products/{{productId}}'."
        )
    kind = match.group(1).lower()
    if match.group(2) is None:
        return f"{sid}/apis"
    target = state.store.get(f"{sid}/{kind}/{match.group(2)}")
    if target is None:
        raise _invalid(field, f"Scope '{scope}' names {kind[:-1]} '{match.group(2)}', which does not exist.")
    return target.id


def _owner(service: Resource, owner: Any, field: str = "properties.ownerId") -> str | None:
    if owner is None:
        return None
    if not isinstance(owner, str):
        raise _invalid(field, "'ownerId' must be a string.")
    relative = owner[len(service.id) :] if norm(owner).startswith(norm(service.id)) else owner
    match = re.fullmatch(r"/users/([^/]+)", relative, re.IGNORECASE)
    if match is None:
        raise _invalid(field, f"'{owner}' is not a user id ('/users/{{userId}}').")
    return f"{service.id}/users/{match.group(1)}"


def _subscription_row(body: dict[str, Any]) -> dict[str, str]:
    props = body["properties"]
    owner = str(props.get("ownerId") or "")
    scope = str(props.get("scope") or "")
    user = re.search(r"/users/([^/]+)$", owner, re.IGNORECASE)
    product = re.search(r"/products/([^/]+)$", scope, re.IGNORECASE)
    return {
        "name": body["name"],
        "displayName": str(props.get("displayName") or ""),
        "stateComment": str(props.get("stateComment") or ""),
        "ownerId": owner,
        "scope": scope,
        "userId": user.group(1) if user else "",
        "productId": product.group(1) if product else "",
        "state": str(props.get("state") or ""),
    }


def _validate_key(value: Any, field: str) -> str | None:
    if value is None:
        return None
    return _str(value, field, min_len=1, max_len=256)


def _subscription_event(
    state: TwinState, ctx: WriteContext, service_id: str, resource_id: str, what: str, kind: str
) -> None:
    _emit(state, ctx, resource_id, kind)
    state.emit(apim_event(service_id, resource_id, f"Subscription{what}", _now(state)))


async def list_subscriptions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = [(_subscription_row(r.body), r.body) for r in state.store.children(service.id, "subscriptions")]
    return _list(request, _filtered(request, rows, SUBSCRIPTION_FILTER_FIELDS))


async def get_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    sid = params(request)["sid"]
    found = _child(state, service, f"subscriptions/{sid}", "Subscription", sid)
    return _with_etag(found.body, found)


def _check_query_flags(request: web.Request) -> None:
    notify = request.query.get("notify")
    if notify is not None and notify.lower() not in ("true", "false"):
        raise ServiceError(400, "InvalidParameter", f"'notify' must be true or false, got '{notify}'.")
    app_type = request.query.get("appType")
    if app_type is not None and app_type not in ("portal", "developerPortal"):
        raise ServiceError(400, "InvalidParameter", f"'appType' must be portal or developerPortal, got '{app_type}'.")


async def put_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    sid = _entity_name(params(request)["sid"], "sid")
    _check_query_flags(request)
    resource_id = f"{service.id}/subscriptions/{sid}"
    existing = state.store.get(resource_id)
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    now = _iso(_now(state))
    props: dict[str, Any] = {
        "ownerId": _owner(service, given.get("ownerId")),
        "scope": _full_scope(state, service, given.get("scope")),
        "displayName": _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=100),
        "state": _enum(given.get("state", "submitted"), SUBSCRIPTION_STATES, "properties.state", case_sensitive=True),
        "createdDate": existing.body["properties"]["createdDate"] if existing else now,
        "allowTracing": _bool(given.get("allowTracing", False), "properties.allowTracing"),
    }
    if props["state"] == "active":
        props["startDate"] = (existing.body["properties"].get("startDate") if existing else None) or now
    primary = _validate_key(given.get("primaryKey"), "properties.primaryKey")
    secondary = _validate_key(given.get("secondaryKey"), "properties.secondaryKey")
    resource = state.store.put(resource_id, _subscription_body(existing.id if existing else resource_id, sid, props))
    _set_keys(state, resource.id, primary, secondary)
    _subscription_event(
        state, write_context(request), service.id, resource.id, "Updated" if existing else "Created", "write"
    )
    return _with_etag(resource.body, resource, status=200 if existing else 201)


async def patch_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    sid = params(request)["sid"]
    found = _child(state, service, f"subscriptions/{sid}", "Subscription", sid)
    _check_if_match(request, found, required=True)
    _check_query_flags(request)
    given = _props(await read_json(request))
    props = dict(found.body["properties"])
    now = _iso(_now(state))
    if "ownerId" in given:
        props["ownerId"] = _owner(service, given["ownerId"])
    if "scope" in given:
        props["scope"] = _full_scope(state, service, given["scope"])
    if "displayName" in given:
        props["displayName"] = _str(given["displayName"], "properties.displayName", min_len=1, max_len=100)
    if "expirationDate" in given:
        props["expirationDate"] = (
            None
            if given["expirationDate"] is None
            else _iso(_parse_time(given["expirationDate"], "properties.expirationDate"))
        )
    if "stateComment" in given:
        props["stateComment"] = given["stateComment"]
    if "allowTracing" in given:
        props["allowTracing"] = _bool(given["allowTracing"], "properties.allowTracing")
    if "state" in given:
        new_state = _enum(given["state"], SUBSCRIPTION_STATES, "properties.state", case_sensitive=True)
        if new_state == "active" and not props.get("startDate"):
            props["startDate"] = now
        if new_state in ("cancelled", "expired", "rejected") and props.get("state") != new_state:
            props["endDate"] = now
        props["state"] = new_state
    primary = _validate_key(given.get("primaryKey"), "properties.primaryKey")
    secondary = _validate_key(given.get("secondaryKey"), "properties.secondaryKey")
    resource = state.store.put(found.id, {**found.body, "properties": props})
    if primary is not None or secondary is not None:
        _set_keys(state, resource.id, primary, secondary)
    _subscription_event(state, write_context(request), service.id, resource.id, "Updated", "write")
    return _with_etag(resource.body, resource)


async def delete_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    sid = params(request)["sid"]
    found = state.store.get(f"{service.id}/subscriptions/{sid}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _subscription_event(state, write_context(request), service.id, found.id, "Deleted", "delete")
    return web.Response(status=200)


def _regenerate(slot: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        state = state_of(request)
        service = _service(request)
        sid = params(request)["sid"]
        found = _child(state, service, f"subscriptions/{sid}", "Subscription", sid)
        _set_keys(
            state, found.id, _new_key() if slot == "primary" else None, _new_key() if slot == "secondary" else None
        )
        state.store.put(found.id, found.body)  # the entity changed: a new ETag
        _emit(state, write_context(request), found.id, "action", f"regenerate{slot.capitalize()}Key")
        return web.Response(status=204)

    return handler


async def subscription_secrets(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    sid = params(request)["sid"]
    found = _child(state, service, f"subscriptions/{sid}", "Subscription", sid)
    entry = _secret(state, found.id)
    _emit(state, write_context(request), found.id, "action", "listSecrets")
    return _with_etag({"primaryKey": entry.get("primaryKey"), "secondaryKey": entry.get("secondaryKey")}, found)


# -- tenant access ------------------------------------------------------------------------------------

ACCESS_NAMES = {"access": "access", "gitaccess": "gitAccess"}


def _tenant_body(resource_id: str, name: str, principal: str, *, enabled: bool) -> dict[str, Any]:
    return {
        "id": resource_id,
        "type": "Microsoft.ApiManagement/service/tenant",
        "name": name,
        "properties": {"principalId": principal, "enabled": enabled},
    }


def _tenant(request: web.Request) -> tuple[TwinState, Resource, Resource]:
    state = state_of(request)
    service = _service(request)
    name = ACCESS_NAMES.get(params(request)["access"].lower())
    if name is None:
        raise _not_found("Tenant access", params(request)["access"])
    return state, service, _child(state, service, f"tenant/{name}", "Tenant access", name)


async def list_tenant(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    items = [r.body for r in state.store.children(service.id, "tenant")]
    return json_response({"value": items, "count": len(items)})


async def get_tenant(request: web.Request) -> web.StreamResponse:
    _, _, found = _tenant(request)
    return _with_etag(found.body, found)


async def write_tenant(request: web.Request) -> web.StreamResponse:
    state, _, found = _tenant(request)
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    props = dict(found.body["properties"])
    if "enabled" in given:
        props["enabled"] = _bool(given["enabled"], "properties.enabled")
    if request.method == "PUT":
        primary = _validate_key(given.get("primaryKey"), "properties.primaryKey")
        secondary = _validate_key(given.get("secondaryKey"), "properties.secondaryKey")
        if primary or secondary:
            _set_keys(state, found.id, primary, secondary)
        if "principalId" in given:
            props["principalId"] = given["principalId"]
    resource = state.store.put(found.id, {**found.body, "properties": props})
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


async def tenant_secrets(request: web.Request) -> web.StreamResponse:
    state, _, found = _tenant(request)
    entry = _secret(state, found.id)
    _emit(state, write_context(request), found.id, "action", "listSecrets")
    body = {
        "id": found.body["properties"]["principalId"],
        "principalId": found.body["properties"]["principalId"],
        "primaryKey": entry.get("primaryKey"),
        "secondaryKey": entry.get("secondaryKey"),
        "enabled": found.body["properties"]["enabled"],
    }
    return _with_etag(body, found)


def _tenant_regenerate(slot: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        state, _, found = _tenant(request)
        _set_keys(
            state, found.id, _new_key() if slot == "primary" else None, _new_key() if slot == "secondary" else None
        )
        state.store.put(found.id, found.body)
        _emit(state, write_context(request), found.id, "action", f"regenerate{slot.capitalize()}Key")
        return web.Response(status=204)

    return handler


# -- portal settings and portal config ---------------------------------------------------------------


def _portal_setting_body(resource_id: str, kind: str, props: dict[str, Any]) -> dict[str, Any]:
    body_props: dict[str, Any] = {"enabled": bool(props.get("enabled", False))}
    if kind == "signup":
        body_props["termsOfService"] = props.get("termsOfService") or {
            "enabled": False,
            "text": "",
            "consentRequired": False,
        }
    return {
        "id": resource_id,
        "type": "Microsoft.ApiManagement/service/portalsettings",
        "name": kind,
        "properties": body_props,
    }


def _portal_kind(request: web.Request) -> str:
    return "signin" if request.path.lower().endswith("/signin") else "signup"


async def list_portal_settings(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    items = [r.body for r in state.store.children(service.id, "portalsettings")]
    return json_response({"value": items, "count": len(items)})


async def get_portal_setting(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    kind = _portal_kind(request)
    found = _child(state, service, f"portalsettings/{kind}", "Portal settings", kind)
    return _with_etag(found.body, found)


def _portal_setting_props(kind: str, given: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    props = dict(current)
    if "enabled" in given:
        props["enabled"] = _bool(given["enabled"], "properties.enabled")
    if kind == "signup" and "termsOfService" in given:
        terms = given["termsOfService"]
        if not isinstance(terms, dict):
            raise _invalid("properties.termsOfService", "'termsOfService' must be an object.")
        merged = dict(props.get("termsOfService") or {})
        for flag in ("enabled", "consentRequired"):
            if flag in terms:
                merged[flag] = _bool(terms[flag], f"properties.termsOfService.{flag}")
        if "text" in terms:
            merged["text"] = terms["text"]
        props["termsOfService"] = merged
    return props


async def write_portal_setting(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    kind = _portal_kind(request)
    found = _child(state, service, f"portalsettings/{kind}", "Portal settings", kind)
    patch = request.method == "PATCH"
    _check_if_match(request, found, required=patch)
    given = _props(await read_json(request))
    base = found.body["properties"] if patch else _portal_setting_body(found.id, kind, {})["properties"]
    resource = state.store.put(found.id, {**found.body, "properties": _portal_setting_props(kind, given, base)})
    _emit(state, write_context(request), resource.id, "write")
    if patch:
        return web.Response(status=204)
    return _with_etag(resource.body, resource)


async def list_portal_configs(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    items = [r.body for r in state.store.children(service.id, "portalconfigs")]
    return json_response({"value": items})


async def get_portal_config(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    pid = params(request)["pid"]
    found = _child(state, service, f"portalconfigs/{pid}", "Portal config", pid)
    return _with_etag(found.body, found)


def _portal_config_props(given: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    props = _deep(current)
    if "enableBasicAuth" in given:
        props["enableBasicAuth"] = _bool(given["enableBasicAuth"], "properties.enableBasicAuth")
    if "signin" in given:
        signin = given["signin"] or {}
        if "require" in signin:
            props["signin"] = {"require": _bool(signin["require"], "properties.signin.require")}
    if "signup" in given:
        terms = (given["signup"] or {}).get("termsOfService")
        if terms is not None:
            merged = dict((props.get("signup") or {}).get("termsOfService") or {})
            if "requireConsent" in terms:
                merged["requireConsent"] = _bool(
                    terms["requireConsent"], "properties.signup.termsOfService.requireConsent"
                )
            if "text" in terms:
                merged["text"] = terms["text"]
            props["signup"] = {"termsOfService": merged}
    if "csp" in given:
        csp = given["csp"] or {}
        if "mode" in csp:
            _enum(csp["mode"], ("enabled", "disabled", "reportOnly"), "properties.csp.mode", case_sensitive=True)
        props["csp"] = {**(props.get("csp") or {}), **csp}
    for passthrough in ("delegation", "cors"):
        if passthrough in given:
            props[passthrough] = {**(props.get(passthrough) or {}), **(given[passthrough] or {})}
    return props


async def write_portal_config(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    pid = _entity_name(params(request)["pid"], "portalConfigId")
    resource_id = f"{service.id}/portalconfigs/{pid}"
    found = state.store.get(resource_id)
    if found is None and request.method == "PATCH":
        raise _not_found("Portal config", pid)
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    current = found.body["properties"] if found is not None else {}
    body = {
        "id": found.id if found else resource_id,
        "type": "Microsoft.ApiManagement/service/portalconfigs",
        "name": pid,
        "properties": _portal_config_props(given, current),
    }
    resource = state.store.put(resource_id, body)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


# -- generic child collections (identity providers, backends, diagnostics, loggers, products) ---------

Builder = Callable[
    [TwinState, Resource, str, dict[str, Any], dict[str, Any] | None, bool],
    tuple[dict[str, Any], dict[str, Any] | None],
]


@dataclass(frozen=True)
class Collection:
    segment: str  # URL segment under the service
    kind: str  # for messages
    type: str  # ARM type
    build: Builder  # (state, service, name, given props, current props or None, patch) -> (props, secrets or None)
    names: tuple[str, ...] | None = None  # allowed ids (case-insensitive)


def _identity_provider(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    props = dict(current or {})
    kind = _enum(name, IDENTITY_PROVIDERS, "identityProviderName", case_sensitive=False)
    if "type" in given and _enum(given["type"], IDENTITY_PROVIDERS, "properties.type") != kind:
        raise _invalid("properties.type", f"'properties.type' must match the identity provider name '{kind}'.")
    props["type"] = kind
    if not patch:
        props = {"type": kind}
        for required in ("clientId", "clientSecret"):
            if not given.get(required):
                raise _invalid(f"properties.{required}", f"'{required}' is required.")
    for field in (
        "clientId",
        "signinTenant",
        "authority",
        "signupPolicyName",
        "signinPolicyName",
        "profileEditingPolicyName",
        "passwordResetPolicyName",
        "clientLibrary",
    ):
        if field in given:
            props[field] = _str(given[field], f"properties.{field}", min_len=1)
    if "allowedTenants" in given:
        tenants = given["allowedTenants"]
        if not isinstance(tenants, list) or len(tenants) > 32 or not all(isinstance(t, str) for t in tenants):
            raise _invalid("properties.allowedTenants", "'allowedTenants' must be a list of up to 32 strings.")
        props["allowedTenants"] = tenants
    if kind == "aadB2C" and not patch and not props.get("signinPolicyName"):
        raise _invalid("properties.signinPolicyName", "aadB2C needs 'signinPolicyName'.")
    secret = given.get("clientSecret")
    return props, ({"clientSecret": _str(secret, "properties.clientSecret", min_len=1)} if secret else None)


def _backend(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    props = dict(current or {}) if patch else {}
    if not patch:
        for required in ("url", "protocol"):
            if given.get(required) is None:
                raise _invalid(f"properties.{required}", f"'{required}' is required.")
    if "url" in given:
        url = _str(given["url"], "properties.url", min_len=1, max_len=2000)
        if not re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
            raise _invalid("properties.url", f"'{url}' is not an absolute URL.")
        props["url"] = url
    if "protocol" in given:
        props["protocol"] = _enum(given["protocol"], ("http", "soap"), "properties.protocol", case_sensitive=True)
    for field, max_len in (("title", 300), ("description", 2000), ("resourceId", 2000)):
        if field in given:
            props[field] = (
                None if given[field] is None else _str(given[field], f"properties.{field}", min_len=1, max_len=max_len)
            )
    if "tls" in given or not patch:
        tls = given.get("tls") or {}
        if not isinstance(tls, dict):
            raise _invalid("properties.tls", "'tls' must be an object.")
        merged = (
            {"validateCertificateChain": True, "validateCertificateName": True}
            if not patch
            else dict(props.get("tls") or {"validateCertificateChain": True, "validateCertificateName": True})
        )
        for flag in ("validateCertificateChain", "validateCertificateName"):
            if flag in tls:
                merged[flag] = _bool(tls[flag], f"properties.tls.{flag}")
        props["tls"] = merged
    if "credentials" in given:
        creds = given["credentials"]
        if creds is not None:
            if not isinstance(creds, dict):
                raise _invalid("properties.credentials", "'credentials' must be an object.")
            for listing in ("certificate", "certificateIds"):
                if listing in creds and (not isinstance(creds[listing], list) or len(creds[listing]) > 32):
                    raise _invalid(f"properties.credentials.{listing}", f"'{listing}' must be a list of up to 32.")
            auth = creds.get("authorization")
            if auth is not None and (not isinstance(auth, dict) or not auth.get("scheme") or not auth.get("parameter")):
                raise _invalid(
                    "properties.credentials.authorization", "'authorization' needs 'scheme' and 'parameter'."
                )
        props["credentials"] = creds
    for passthrough in ("proxy", "properties", "circuitBreaker", "pool", "type"):
        if passthrough in given:
            props[passthrough] = given[passthrough]
    return props, None


def _logger(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    props = dict(current or {}) if patch else {}
    if "loggerType" in given or not patch:
        props["loggerType"] = _enum(given.get("loggerType"), LOGGER_TYPES, "properties.loggerType", case_sensitive=True)
    if "description" in given:
        props["description"] = (
            None if given["description"] is None else _str(given["description"], "properties.description", max_len=256)
        )
    if "isBuffered" in given:
        props["isBuffered"] = _bool(given["isBuffered"], "properties.isBuffered")
    props.setdefault("isBuffered", True)
    if "resourceId" in given:
        props["resourceId"] = given["resourceId"]
    secret: dict[str, Any] | None = None
    creds = given.get("credentials")
    if creds is not None:
        if not isinstance(creds, dict) or not all(isinstance(v, str) for v in creds.values()):
            raise _invalid("properties.credentials", "'credentials' must be an object of strings.")
        secret = {"credentials": creds}
        props["credentials"] = {k: "{{Logger-Credentials--" + uuid.uuid4().hex[:24] + "}}" for k in creds}
    kind = props["loggerType"]
    if not patch:
        if kind == "applicationInsights" and not (
            creds and ("instrumentationKey" in creds or "connectionString" in creds)
        ):
            raise _invalid(
                "properties.credentials", "applicationInsights loggers need instrumentationKey or connectionString."
            )
        if kind == "azureEventHub" and not (
            (creds and "connectionString" in creds) or (creds and "endpointAddress" in creds)
        ):
            raise _invalid(
                "properties.credentials", "azureEventHub loggers need connectionString (or endpointAddress)."
            )
        if kind == "azureMonitor":
            if name.lower() != "azuremonitor":
                raise _invalid("loggerId", "An azureMonitor logger must be named 'azuremonitor'.")
            props.pop("credentials", None)
            secret = None
    return props, secret


def _diagnostic(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    props = dict(current or {}) if patch else {}
    if "loggerId" in given or not patch:
        logger = given.get("loggerId")
        if not isinstance(logger, str) or not logger:
            raise _invalid("properties.loggerId", "'loggerId' is required.")
        relative = logger[len(service.id) :] if norm(logger).startswith(norm(service.id)) else logger
        match = re.fullmatch(r"/loggers/([^/]+)", relative, re.IGNORECASE)
        target = state.store.get(f"{service.id}/loggers/{match.group(1)}") if match else None
        if target is None:
            raise _invalid("properties.loggerId", f"Logger '{logger}' not found.")
        props["loggerId"] = target.id
    if "alwaysLog" in given:
        props["alwaysLog"] = (
            None
            if given["alwaysLog"] is None
            else _enum(given["alwaysLog"], ("allErrors",), "properties.alwaysLog", case_sensitive=True)
        )
    if "sampling" in given:
        sampling = given["sampling"]
        if sampling is not None:
            if not isinstance(sampling, dict):
                raise _invalid("properties.sampling", "'sampling' must be an object.")
            _enum(sampling.get("samplingType"), ("fixed",), "properties.sampling.samplingType", case_sensitive=True)
            pct = sampling.get("percentage")
            if pct is not None and (not isinstance(pct, int | float) or isinstance(pct, bool) or not 0 <= pct <= 100):
                raise _invalid("properties.sampling.percentage", "'percentage' must be between 0 and 100.")
        props["sampling"] = sampling
    for side in ("frontend", "backend"):
        if side in given:
            settings = given[side]
            if settings is not None:
                if not isinstance(settings, dict):
                    raise _invalid(f"properties.{side}", f"'{side}' must be an object.")
                for message in ("request", "response"):
                    part = settings.get(message)
                    if part is None:
                        continue
                    headers = part.get("headers")
                    if headers is not None and (
                        not isinstance(headers, list) or not all(isinstance(h, str) for h in headers)
                    ):
                        raise _invalid(f"properties.{side}.{message}.headers", "'headers' must be a list of strings.")
                    size = (part.get("body") or {}).get("bytes")
                    if size is not None and (not isinstance(size, int) or size < 0 or size > 8192):
                        raise _invalid(f"properties.{side}.{message}.body.bytes", "'bytes' must be between 0 and 8192.")
            props[side] = settings
    if "logClientIp" in given:
        props["logClientIp"] = _bool(given["logClientIp"], "properties.logClientIp")
    if "httpCorrelationProtocol" in given:
        props["httpCorrelationProtocol"] = _enum(
            given["httpCorrelationProtocol"],
            ("None", "Legacy", "W3C"),
            "properties.httpCorrelationProtocol",
            case_sensitive=True,
        )
    if "verbosity" in given:
        props["verbosity"] = _enum(
            given["verbosity"], ("verbose", "information", "error"), "properties.verbosity", case_sensitive=True
        )
    if "operationNameFormat" in given:
        props["operationNameFormat"] = _enum(
            given["operationNameFormat"], ("Name", "Url"), "properties.operationNameFormat", case_sensitive=True
        )
    if "metrics" in given:
        props["metrics"] = _bool(given["metrics"], "properties.metrics")
    return props, None


def _product(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    props = dict(current or {}) if patch else {"subscriptionRequired": True, "state": "notPublished"}
    if "displayName" in given or not patch:
        props["displayName"] = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=300)
    if "description" in given:
        props["description"] = given["description"]
    if "terms" in given:
        props["terms"] = given["terms"]
    for flag in ("subscriptionRequired", "approvalRequired"):
        if flag in given:
            props[flag] = _bool(given[flag], f"properties.{flag}")
    if "subscriptionsLimit" in given:
        props["subscriptionsLimit"] = given["subscriptionsLimit"]
    if "state" in given:
        props["state"] = _enum(given["state"], ("notPublished", "published"), "properties.state", case_sensitive=True)
    return props, None


COLLECTIONS: dict[str, Collection] = {
    "identityproviders": Collection(
        "identityProviders",
        "Identity provider",
        "Microsoft.ApiManagement/service/identityProviders",
        _identity_provider,
        names=IDENTITY_PROVIDERS,
    ),
    "backends": Collection("backends", "Backend", "Microsoft.ApiManagement/service/backends", _backend),
    "loggers": Collection("loggers", "Logger", "Microsoft.ApiManagement/service/loggers", _logger),
    "diagnostics": Collection(
        "diagnostics", "Diagnostic", "Microsoft.ApiManagement/service/diagnostics", _diagnostic, names=DIAGNOSTIC_IDS
    ),
    "products": Collection("products", "Product", "Microsoft.ApiManagement/service/products", _product),
}
_COLLECTION_FILTER_FIELDS: dict[str, tuple[str, ...]] = {
    "name": _ALL_OPS,
    "displayName": _ALL_OPS,
    "title": _ALL_OPS,
    "url": _ALL_OPS,
    "description": _ALL_OPS,
    "loggerType": ("eq",),
    "resourceId": _ALL_OPS,
    "state": ("eq",),
}


def _collection(request: web.Request) -> Collection:
    return COLLECTIONS[request.path.lower().split("/")[9]]


def _check_name(coll: Collection, name: str) -> str:
    if coll.names is not None:
        for allowed in coll.names:
            if allowed.lower() == name.lower():
                return allowed
        raise _invalid(
            coll.segment, f"'{name}' is not a valid {coll.kind.lower()} id (allowed: {', '.join(coll.names)})."
        )
    return _entity_name(name, coll.segment)


def upsert_child(
    state: TwinState, service: Resource, coll: Collection, name: str, given: dict[str, Any], *, patch: bool
) -> tuple[Resource, bool]:
    """Validate and store one child; returns (resource, created). Raises ServiceError."""
    name = _check_name(coll, name)
    resource_id = f"{service.id}/{coll.segment}/{name}"
    existing = state.store.get(resource_id)
    props, secret = coll.build(state, service, name, given, existing.body["properties"] if existing else None, patch)
    body = {
        "id": existing.id if existing else resource_id,
        "type": coll.type,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    resource = state.store.put(resource_id, body)
    if secret is not None:
        _secret(state, resource.id).update(secret)
    return resource, existing is None


async def list_children(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    coll = _collection(request)
    rows = []
    for r in state.store.children(service.id, coll.segment):
        row = {
            "name": r.body["name"],
            **{k: str(v) for k, v in r.body["properties"].items() if isinstance(v, str | bool | int)},
        }
        rows.append((row, r.body))
    return _list(request, _filtered(request, rows, _COLLECTION_FILTER_FIELDS))


async def get_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    coll = _collection(request)
    name = params(request)["name"]
    found = _child(state, service, f"{coll.segment}/{name}", coll.kind, name)
    return _with_etag(found.body, found)


async def put_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    coll = _collection(request)
    name = params(request)["name"]
    _check_if_match(request, state.store.get(f"{service.id}/{coll.segment}/{name}"), required=False)
    given = _props(await read_json(request))
    resource, created = upsert_child(state, service, coll, name, given, patch=False)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource, status=201 if created else 200)


async def patch_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    coll = _collection(request)
    name = params(request)["name"]
    found = _child(state, service, f"{coll.segment}/{name}", coll.kind, name)
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    resource, _ = upsert_child(state, service, coll, name, given, patch=True)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


async def delete_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    coll = _collection(request)
    name = params(request)["name"]
    found = state.store.get(f"{service.id}/{coll.segment}/{name}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    if coll.segment == "loggers":
        users = [
            d
            for d in state.store.children(service.id, "diagnostics")
            if norm(str(d.body["properties"].get("loggerId"))) == norm(found.id)
        ]
        if users:
            raise ServiceError(409, "Conflict", f"Logger '{name}' is used by diagnostic '{users[0].body['name']}'.")
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


async def identity_provider_secrets(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["name"]
    found = _child(state, service, f"identityProviders/{name}", "Identity provider", name)
    _emit(state, write_context(request), found.id, "action", "listSecrets")
    return _with_etag({"clientSecret": _secret(state, found.id).get("clientSecret")}, found)


async def list_product_apis(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    pid = params(request)["name"]
    product = _child(state, service, f"products/{pid}", "Product", pid)
    linked = {norm(a) for a in _product_apis(state, product)}
    items = [r.body for r in state.store.children(service.id, "apis") if norm(r.id) in linked]
    return _list(request, items)


def _product_apis(state: TwinState, product: Resource) -> list[str]:
    apis: list[str] = state.extra.setdefault("apim", {}).setdefault("product_apis", {}).setdefault(norm(product.id), [])
    return apis


async def link_product_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    pid = params(request)["name"]
    api_id = params(request)["api"]
    product = _child(state, service, f"products/{pid}", "Product", pid)
    api = _child(state, service, f"apis/{api_id}", "API", api_id)
    linked = _product_apis(state, product)
    created = norm(api.id) not in {norm(a) for a in linked}
    if created:
        linked.append(api.id)
    _emit(state, write_context(request), f"{product.id}/apis/{api.body['name']}", "write")
    return json_response(api.body, status=201 if created else 200)


# -- named values ----------------------------------------------------------------------------------------

NAMED_VALUE_TYPE = "Microsoft.ApiManagement/service/namedValues"


def _named_value(
    state: TwinState, resource_id: str, name: str, given: dict[str, Any], current: dict[str, Any] | None, *, patch: bool
) -> tuple[dict[str, Any], str | None]:
    """(properties, value) after validation. The value is kept with the secrets, never in the body."""
    props: dict[str, Any] = dict(current or {}) if patch else {"secret": False, "tags": []}
    if "displayName" in given or not patch:
        display = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=256)
        if not _NAMED_VALUE_DISPLAY.match(display):
            raise _invalid("properties.displayName", "'displayName' may hold only letters, digits, '-', '.' and '_'.")
        props["displayName"] = display
    if "secret" in given:
        props["secret"] = _bool(given["secret"], "properties.secret")
    if "tags" in given:
        tags = given["tags"] or []
        if not isinstance(tags, list) or len(tags) > 32 or not all(isinstance(t, str) for t in tags):
            raise _invalid("properties.tags", "'tags' must be a list of up to 32 strings.")
        props["tags"] = tags
    value: str | None = None
    if "value" in given and given["value"] is not None:
        value = _str(given["value"], "properties.value", min_len=1 if patch else 0, max_len=4096)
        props.pop("keyVault", None)
    vault = given.get("keyVault")
    if vault is not None:
        if not isinstance(vault, dict):
            raise _invalid("properties.keyVault", "'keyVault' must be an object.")
        identifier = vault.get("secretIdentifier")
        if not isinstance(identifier, str) or not re.match(
            r"^https://[^/]+/secrets/[^/]+(/[0-9a-fA-F]{32})?/?$", identifier
        ):
            raise _invalid("properties.keyVault.secretIdentifier", "'secretIdentifier' must be a Key Vault secret URL.")
        if value is not None:
            raise _invalid("properties.value", "A named value has either 'value' or 'keyVault', not both.")
        props["keyVault"] = {
            "secretIdentifier": identifier,
            "identityClientId": vault.get("identityClientId"),
            "lastStatus": vault.get("lastStatus")
            or {"code": "Success", "message": None, "timeStampUtc": _iso(_now(state))},
        }
        props["secret"] = True
    if not patch and value is None and "keyVault" not in props:
        raise _invalid("properties.value", "Either 'value' or 'keyVault' is required.")
    props["provisioningState"] = "Succeeded"
    return props, value


def _render_named_value(state: TwinState, resource: Resource) -> dict[str, Any]:
    body = _deep(resource.body)
    if not body["properties"].get("secret") and "keyVault" not in body["properties"]:
        body["properties"]["value"] = _secret(state, resource.id).get("value")
    return body


def store_named_value(
    state: TwinState, service: Resource, name: str, props: dict[str, Any], value: str | None
) -> Resource:
    resource_id = f"{service.id}/namedValues/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": NAMED_VALUE_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    resource = state.store.put(resource_id, body)
    if value is not None:
        _secret(state, resource.id)["value"] = value
    elif "keyVault" in props:
        _secret(state, resource.id).pop("value", None)
    return resource


async def list_named_values(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = []
    for r in state.store.children(service.id, "namedValues"):
        rows.append(
            (
                {
                    "name": r.body["name"],
                    "displayName": r.body["properties"]["displayName"],
                    "tags": ",".join(r.body["properties"].get("tags") or []),
                },
                _render_named_value(state, r),
            )
        )
    fields = {"name": _ALL_OPS, "displayName": _ALL_OPS, "tags": ("eq", "contains", "substringof")}
    items = _filtered(request, rows, fields)
    refresh_failed = request.query.get("isKeyVaultRefreshFailed")
    if refresh_failed is not None:
        if refresh_failed.lower() not in ("true", "false"):
            raise ServiceError(400, "InvalidParameter", "'isKeyVaultRefreshFailed' must be true or false.")
        wanted = refresh_failed.lower() == "true"
        items = [i for i in items if _refresh_failed(i) == wanted]
    return _list(request, items)


def _refresh_failed(body: dict[str, Any]) -> bool:
    status = (body["properties"].get("keyVault") or {}).get("lastStatus") or {}
    return "keyVault" in body["properties"] and status.get("code", "Success") != "Success"


async def get_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    return _with_etag(_render_named_value(state, found), found)


def _accept_child_put(
    request: web.Request,
    service: Resource,
    child: str,
    resource_type: str,
    props: dict[str, Any],
    *,
    created: bool,
    store: Callable[[], dict[str, Any]],
) -> web.Response:
    """A sub-resource PUT that APIM runs as a long-running operation: answer 201/200 with the
    pending body; `store` applies it (and the write event is raised) when it completes."""
    state = state_of(request)
    ctx = write_context(request)
    resource_id = f"{service.id}/{child}"

    def finish() -> dict[str, Any]:
        body = store()
        _emit(state, ctx, resource_id, "write")
        return body

    pending: dict[str, Any] = {
        "id": resource_id,
        "type": resource_type,
        "name": child.rsplit("/", 1)[-1],
        "properties": {**props, "provisioningState": "InProgress"},
    }
    return arm.start_operation(
        request,
        resource_id=resource_id,
        status_parent=service.id,
        on_complete=finish,
        status=201 if created else 200,
        body=pending,
    )


async def put_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = _entity_name(params(request)["nv"], "namedValueId")
    existing = state.store.get(f"{service.id}/namedValues/{name}")
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    props, value = _named_value(state, f"{service.id}/namedValues/{name}", name, given, None, patch=False)
    return _accept_child_put(
        request,
        service,
        f"namedValues/{name}",
        NAMED_VALUE_TYPE,
        props,
        created=existing is None,
        store=lambda: _render_named_value(state, store_named_value(state, service, name, props, value)),
    )


async def patch_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    props, value = _named_value(state, found.id, name, given, found.body["properties"], patch=True)
    ctx = write_context(request)

    def finish() -> dict[str, Any]:
        resource = store_named_value(state, service, found.body["name"], props, value)
        _emit(state, ctx, resource.id, "write")
        return _render_named_value(state, resource)

    return arm.start_operation(request, resource_id=found.id, status_parent=service.id, on_complete=finish)


async def delete_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = state.store.get(f"{service.id}/namedValues/{name}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


async def named_value_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    _emit(state, write_context(request), found.id, "action", "listValue")
    vault = found.body["properties"].get("keyVault") or {}
    if vault.get("secretIdentifier"):
        # APIM serves a Key Vault named value from its cached copy of the secret.
        value = keyvault.resolve_secret_identifier(state, vault["secretIdentifier"])
        return _with_etag({"value": value}, found)
    return _with_etag({"value": _secret(state, found.id).get("value")}, found)


async def refresh_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    if "keyVault" not in found.body["properties"]:
        raise ServiceError(400, "ValidationError", f"Named value '{name}' is not a Key Vault reference.")
    ctx = write_context(request)
    resource_id = found.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        if current is None:
            return {}
        current.body["properties"]["keyVault"]["lastStatus"] = {
            "code": "Success",
            "message": None,
            "timeStampUtc": _iso(_now(state)),
        }
        done = state.store.put(resource_id, current.body)
        _emit(state, ctx, resource_id, "action", "refreshSecret")
        return _render_named_value(state, done)

    return arm.start_operation(request, resource_id=resource_id, status_parent=service.id, on_complete=finish)


# -- APIs -------------------------------------------------------------------------------------------------

API_TYPE = "Microsoft.ApiManagement/service/apis"


def _api_props(given: dict[str, Any], current: dict[str, Any] | None, *, patch: bool) -> dict[str, Any]:
    props: dict[str, Any] = (
        dict(current or {})
        if patch
        else {
            "apiRevision": "1",
            "isCurrent": True,
            "subscriptionRequired": True,
            "protocols": ["https"],
            "type": "http",
            "subscriptionKeyParameterNames": {"header": "Ocp-Apim-Subscription-Key", "query": "subscription-key"},
            "authenticationSettings": {"oAuth2AuthenticationSettings": [], "openidAuthenticationSettings": []},
        }
    )
    if not patch:
        if given.get("value") is not None or given.get("format") is not None:
            raise ServiceError(400, "ValidationError", "API import (value/format) is not supported by the twin.")
        for required in ("displayName", "path"):
            if given.get(required) is None:
                raise _invalid(f"properties.{required}", f"'{required}' is required.")
    if "displayName" in given:
        props["displayName"] = _str(given["displayName"], "properties.displayName", min_len=1, max_len=300)
    if "path" in given:
        props["path"] = _str(given["path"], "properties.path", max_len=400)
    if "serviceUrl" in given:
        props["serviceUrl"] = (
            None
            if given["serviceUrl"] is None
            else _str(given["serviceUrl"], "properties.serviceUrl", min_len=1, max_len=2000)
        )
    if "protocols" in given:
        protocols = given["protocols"]
        if not isinstance(protocols, list) or not protocols:
            raise _invalid("properties.protocols", "'protocols' must be a non-empty list.")
        props["protocols"] = [_enum(p, PROTOCOLS, "properties.protocols", case_sensitive=True) for p in protocols]
    if "subscriptionRequired" in given:
        props["subscriptionRequired"] = _bool(given["subscriptionRequired"], "properties.subscriptionRequired")
    if "type" in given:
        props["type"] = _enum(
            given["type"],
            ("http", "soap", "websocket", "graphql", "odata", "grpc"),
            "properties.type",
            case_sensitive=True,
        )
    if "subscriptionKeyParameterNames" in given:
        names = given["subscriptionKeyParameterNames"]
        if not isinstance(names, dict):
            raise _invalid("properties.subscriptionKeyParameterNames", "must be an object {header, query}.")
        props["subscriptionKeyParameterNames"] = names
    for field in (
        "description",
        "authenticationSettings",
        "apiVersion",
        "apiVersionSetId",
        "apiRevisionDescription",
        "apiVersionDescription",
        "termsOfServiceUrl",
        "contact",
        "license",
        "isCurrent",
        "apiRevision",
    ):
        if field in given:
            props[field] = given[field]
    return props


async def list_apis(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = []
    for r in state.store.children(service.id, "apis"):
        p = r.body["properties"]
        rows.append(
            (
                {
                    "name": r.body["name"],
                    "displayName": str(p.get("displayName") or ""),
                    "description": str(p.get("description") or ""),
                    "serviceUrl": str(p.get("serviceUrl") or ""),
                    "path": str(p.get("path") or ""),
                    "isCurrent": str(p.get("isCurrent")).lower(),
                },
                r.body,
            )
        )
    fields = {
        "name": _ALL_OPS,
        "displayName": _ALL_OPS,
        "description": _ALL_OPS,
        "serviceUrl": _ALL_OPS,
        "path": _ALL_OPS,
        "isCurrent": ("eq",),
    }
    return _list(request, _filtered(request, rows, fields))


async def get_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = _child(state, service, f"apis/{api_id}", "API", api_id)
    return _with_etag(found.body, found)


def store_api(state: TwinState, service: Resource, name: str, props: dict[str, Any]) -> Resource:
    resource_id = f"{service.id}/apis/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": API_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body)


async def put_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = _entity_name(params(request)["api"], "apiId")
    existing = state.store.get(f"{service.id}/apis/{name}")
    _check_if_match(request, existing, required=False)
    props = _api_props(_props(await read_json(request)), None, patch=False)
    return _accept_child_put(
        request,
        service,
        f"apis/{name}",
        API_TYPE,
        props,
        created=existing is None,
        store=lambda: store_api(state, service, name, props).body,
    )


async def patch_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = _child(state, service, f"apis/{api_id}", "API", api_id)
    _check_if_match(request, found, required=True)
    props = _api_props(_props(await read_json(request)), found.body["properties"], patch=True)
    resource = store_api(state, service, found.body["name"], props)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


async def delete_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = state.store.get(f"{service.id}/apis/{api_id}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    ctx = write_context(request)
    resource_id = found.id

    def finish() -> None:
        state.store.delete(resource_id)
        for linked in state.extra.get("apim", {}).get("product_apis", {}).values():
            linked[:] = [a for a in linked if norm(a) != norm(resource_id)]
        _emit(state, ctx, resource_id, "delete")

    return arm.start_operation(request, resource_id=resource_id, status_parent=service.id, on_complete=finish)


# -- policies ----------------------------------------------------------------------------------------------


def _policy_body(resource_id: str, resource_type: str, value: str, fmt: str = "xml") -> dict[str, Any]:
    return {"id": resource_id, "type": resource_type, "name": "policy", "properties": {"value": value, "format": fmt}}


def validate_policy_xml(value: Any, field: str = "properties.value") -> str:
    """A policy document must be well-formed XML whose root is <policies>."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(field, "'value' is required: the policy XML.")
    parser = xml.parsers.expat.ParserCreate()
    roots: list[str] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        if not roots:
            roots.append(name)

    def no_entities(*_: Any) -> None:
        raise ServiceError(400, "ValidationError", "Entity declarations are not allowed in policy XML.")

    parser.StartElementHandler = start
    parser.EntityDeclHandler = no_entities
    try:
        parser.Parse(value, True)
    except xml.parsers.expat.ExpatError as error:
        raise ServiceError(
            400,
            "ValidationError",
            f"The policy XML is not well-formed: {xml.parsers.expat.errors.messages[error.code]} "
            f"(line {error.lineno}, column {error.offset}).",
        ) from error
    if roots != ["policies"]:
        raise ServiceError(
            400,
            "ValidationError",
            f"The root element of a policy must be 'policies', not '{roots[0] if roots else ''}'.",
        )
    return value


def _policy_target(request: web.Request) -> tuple[TwinState, Resource, str, str]:
    """(state, service, policy resource id, ARM type) for the service, an API or a product."""
    state = state_of(request)
    service = _service(request)
    p = params(request)
    if p.get("policy", "policy").lower() != "policy":
        raise _invalid("policyId", f"Policy id must be 'policy', not '{p['policy']}'.")
    if "api" in p:
        parent = _child(state, service, f"apis/{p['api']}", "API", p["api"])
        return state, service, f"{parent.id}/policies/policy", "Microsoft.ApiManagement/service/apis/policies"
    if "product" in p:
        parent = _child(state, service, f"products/{p['product']}", "Product", p["product"])
        return state, service, f"{parent.id}/policies/policy", "Microsoft.ApiManagement/service/products/policies"
    return state, service, f"{service.id}/policies/policy", "Microsoft.ApiManagement/service/policies"


def _render_policy(resource: Resource, fmt: str) -> dict[str, Any]:
    body = _deep(resource.body)
    body["properties"]["format"] = fmt
    return body


async def list_policies(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    items = [_render_policy(found, "xml")] if found else []
    return json_response({"value": items, "count": len(items)})


async def get_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    fmt = request.query.get("format", "xml")
    if fmt not in ("xml", "rawxml"):
        raise ServiceError(400, "InvalidParameter", f"'format' must be xml or rawxml, got '{fmt}'.")
    found = state.store.get(resource_id)
    if found is None:
        raise _not_found("Policy", "policy")
    return _with_etag(_render_policy(found, fmt), found)


async def put_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, resource_type = _policy_target(request)
    existing = state.store.get(resource_id)
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    fmt = given.get("format", "xml")
    if fmt in ("xml-link", "rawxml-link"):
        raise ServiceError(
            400, "ValidationError", f"Policy format '{fmt}' (fetching a URL) is not supported by the twin."
        )
    fmt = _enum(fmt, ("xml", "rawxml"), "properties.format", case_sensitive=True)
    value = validate_policy_xml(given.get("value"))
    resource = state.store.put(
        resource_id, _policy_body(existing.id if existing else resource_id, resource_type, value, fmt)
    )
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(_render_policy(resource, fmt), resource, status=200 if existing else 201)


async def delete_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


# -- backup and restore -------------------------------------------------------------------------------------

BACKUP_FORMAT = "apim-twin-backup/1"


def backup_document(state: TwinState, service: Resource) -> dict[str, Any]:
    """The configuration a backup holds: every sub-resource with its secrets (not the
    protocol/cipher settings, VNet, identity or Azure Monitor diagnostic settings)."""
    prefix = len(service.id)
    resources = []
    for child in _service_children(state, service.id):
        entry: dict[str, Any] = {"path": child.id[prefix:], "body": child.body}
        secret = _secrets(state).get(norm(child.id))
        if secret:
            entry["secrets"] = secret
        resources.append(entry)
    links = {
        k[len(norm(service.id)) :]: [a[prefix:] for a in v]
        for k, v in state.extra.get("apim", {}).get("product_apis", {}).items()
        if k.startswith(norm(service.id) + "/")
    }
    return {
        "format": BACKUP_FORMAT,
        "service": {
            "id": service.id,
            "name": service.body["name"],
            "sku": service.body["sku"],
            "location": service.body["location"],
        },
        "takenAt": _iso(_now(state)),
        "resources": resources,
        "productApis": links,
    }


def restore_document(state: TwinState, service: Resource, document: dict[str, Any]) -> None:
    """Replace the service's whole configuration (subscriptions included) with a backup's."""
    for child in _service_children(state, service.id):
        state.store.resources.pop(norm(child.id), None)
    _drop_secrets_under(state, service.id, include_self=False)
    links = state.extra.setdefault("apim", {}).setdefault("product_apis", {})
    for key in [k for k in links if k.startswith(norm(service.id) + "/")]:
        del links[key]
    old_id = str(document["service"]["id"])
    for entry in document.get("resources", []):
        rid = service.id + entry["path"]
        # References inside the configuration (scopes, owners, logger ids) move to this service.
        text = re.sub(re.escape(old_id), lambda _: service.id, json.dumps(entry["body"]), flags=re.IGNORECASE)
        body = json.loads(text)
        body["id"] = rid
        state.store.put(rid, body)
        if entry.get("secrets"):
            _secrets(state)[norm(rid)] = dict(entry["secrets"])
    for path, apis in (document.get("productApis") or {}).items():
        links[norm(service.id) + path] = [service.id + a for a in apis]


def _storage_account(state: TwinState, name: Any) -> dict[str, str]:
    accounts: dict[str, dict[str, str]] = state.extra.get("storage") or {}
    if not isinstance(name, str) or name not in accounts:
        raise _invalid(
            "storageAccount",
            f"Storage account '{name}' was not found (known to the twin: {', '.join(sorted(accounts)) or 'none'}).",
        )
    return accounts[name]


def _backup_request(
    state: TwinState, service: Resource, body: dict[str, Any]
) -> tuple[dict[str, str], str, str, str | None]:
    for required in ("storageAccount", "containerName", "backupName"):
        if not isinstance(body.get(required), str) or not body[required]:
            raise _invalid(required, f"'{required}' is required.")
    account = _storage_account(state, body["storageAccount"])
    access = _enum(body.get("accessType", "AccessKey"), BACKUP_ACCESS_TYPES, "accessType", case_sensitive=True)
    identity = service.body.get("identity") or {}
    key: str | None
    if access == "AccessKey":
        key = body.get("accessKey")
        if not isinstance(key, str) or not key:
            raise _invalid("accessKey", "'accessKey' is required when accessType is AccessKey.")
    elif access == "SystemAssignedManagedIdentity":
        if "SystemAssigned" not in str(identity.get("type", "")):
            raise ServiceError(400, "InvalidParameters", "The service has no system-assigned managed identity.")
        key = account["account_key"]  # the twin stands in for the identity's RBAC grant
    else:
        client_id = body.get("clientId")
        assigned = identity.get("userAssignedIdentities") or {}
        if not client_id or not any(v.get("clientId") == client_id for v in assigned.values()):
            raise ServiceError(
                400, "InvalidParameters", f"The service has no user-assigned identity with client id '{client_id}'."
            )
        key = account["account_key"]
    return account, body["containerName"], body["backupName"], key


def _blob_client(state: TwinState, account_name: str, account: dict[str, str], key: str) -> Any:
    from azure.storage.blob.aio import BlobServiceClient

    return BlobServiceClient(
        account_url=account["blob_url"],
        credential={"account_name": account_name, "account_key": key},
        connection_verify=state.extra.get("ca_file") or True,
    )


def _storage_code(error: Exception, fallback: str) -> str:
    code = getattr(error, "error_code", None)
    return str(getattr(code, "value", code) or fallback)


def _fail_operation(state: TwinState, response: web.Response, code: str, message: str) -> None:
    """Make the operation `response` started end Failed (the request was accepted; the work fails)."""
    op_id = response.headers["Location"].split("/operationresults/", 1)[1].split("?", 1)[0]
    op = state.operations[op_id]
    op.outcome = "Failed"
    op.error = {"code": code, "message": message}


async def backup_service(request: web.Request) -> web.StreamResponse:
    from azure.core.exceptions import AzureError, HttpResponseError

    state = state_of(request)
    service = _service(request)
    body = await read_json(request)
    account, container, blob, key = _backup_request(state, service, body)
    document = backup_document(state, service)
    failure: tuple[str, str] | None = None
    try:
        async with _blob_client(state, body["storageAccount"], account, key or "") as client:
            await client.get_container_client(container).upload_blob(
                blob, json.dumps(document).encode(), overwrite=True
            )
    except HttpResponseError as error:
        failure = (
            _storage_code(error, "BackupFailed"),
            f"Backup to {body['storageAccount']}/{container}/{blob} failed: {error.reason}",
        )
    except (AzureError, ValueError) as error:
        failure = ("BackupFailed", f"Backup failed: {type(error).__name__}")
    ctx = write_context(request)
    resource_id = service.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        _emit(state, ctx, resource_id, "action", "backup")
        return _render_service(current) if current else {}

    response = arm.start_operation(request, resource_id=resource_id, status_parent=resource_id, on_complete=finish)
    if failure is not None:
        _fail_operation(state, response, *failure)
    return response


async def restore_service(request: web.Request) -> web.StreamResponse:
    from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

    state = state_of(request)
    service = _service(request)
    body = await read_json(request)
    account, container, blob, key = _backup_request(state, service, body)
    document: dict[str, Any] | None = None
    failure: tuple[str, str] | None = None
    try:
        async with _blob_client(state, body["storageAccount"], account, key or "") as client:
            downloader = await client.get_container_client(container).download_blob(blob)
            document = json.loads(await downloader.readall())
    except ResourceNotFoundError:
        failure = ("BackupNotFound", f"Backup '{blob}' was not found in {body['storageAccount']}/{container}.")
    except HttpResponseError as error:
        failure = (_storage_code(error, "RestoreFailed"), f"Restore failed: {error.reason}")
    except (AzureError, ValueError) as error:
        failure = ("RestoreFailed", f"Restore failed: {type(error).__name__}")
    if document is not None and (not isinstance(document, dict) or document.get("format") != BACKUP_FORMAT):
        failure, document = ("InvalidBackup", f"'{blob}' is not an API Management backup."), None
    if document is not None and document["service"]["sku"]["name"] != service.body["sku"]["name"]:
        raise ServiceError(
            400,
            "InvalidParameters",
            f"A {document['service']['sku']['name']} backup cannot be restored into a "
            f"{service.body['sku']['name']} service.",
        )
    ctx = write_context(request)
    resource_id = service.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        if current is None:
            return {}
        if document is not None:
            restore_document(state, current, document)
        done = state.store.put(resource_id, current.body)
        _emit(state, ctx, resource_id, "action", "restore")
        return _render_service(done)

    response = arm.start_operation(request, resource_id=resource_id, status_parent=resource_id, on_complete=finish)
    if failure is not None:
        _fail_operation(state, response, *failure)
    return response


# -- gateway key check (control API) ------------------------------------------------------------------


def gateway_check(state: TwinState, service_id: str, key: str, api_id: str | None) -> dict[str, Any]:
    """Would the gateway accept `key`? Valid for the current primary or secondary key of an
    active, unexpired subscription whose scope covers the API (all APIs, that API, or a
    product that contains it)."""
    service = state.store.get(service_id)
    if service is None or service.body.get("type") != SERVICE_TYPE:
        raise ServiceError(404, "ResourceNotFound", f"Service '{service_id}' not found.")
    now = _now(state)
    for sub in state.store.children(service.id, "subscriptions"):
        entry = _secrets(state).get(norm(sub.id), {})
        matches = any(
            isinstance(entry.get(slot), str) and hmac.compare_digest(entry[slot].encode(), key.encode())
            for slot in ("primaryKey", "secondaryKey")
        )
        if not matches:
            continue
        props = sub.body["properties"]
        name = sub.body["name"]
        if props.get("state") != "active":
            return {"valid": False, "subscription": name, "reason": f"subscription is {props.get('state')}"}
        expiry = props.get("expirationDate")
        if expiry and _parse_time(expiry, "expirationDate") <= now:
            return {"valid": False, "subscription": name, "reason": "subscription has expired"}
        if api_id is None or _scope_covers(state, service, str(props.get("scope", "")), api_id):
            return {"valid": True, "subscription": name, "reason": "ok"}
        return {"valid": False, "subscription": name, "reason": f"scope does not cover API '{api_id}'"}
    return {"valid": False, "subscription": None, "reason": "no subscription has this key"}


def _scope_covers(state: TwinState, service: Resource, scope: str, api_id: str) -> bool:
    relative = norm(scope)[len(norm(service.id)) :] if norm(scope).startswith(norm(service.id)) else norm(scope)
    if relative in ("", "/", "/apis"):
        return True
    if relative == f"/apis/{api_id.lower()}":
        return True
    if relative.startswith("/products/"):
        product = state.store.get(service.id + relative)
        if product is None:
            return False
        return any(norm(a).endswith(f"/apis/{api_id.lower()}") for a in _product_apis(state, product))
    return False


async def gateway_check_route(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    service_id, key = body.get("service_id"), body.get("key")
    if not isinstance(service_id, str) or not isinstance(key, str):
        raise ServiceError(400, "InvalidRequest", "service_id and key (strings) are required.")
    api_id = body.get("api_id")
    return json_response(gateway_check(state_of(request), service_id, key, api_id if isinstance(api_id, str) else None))


# -- seeding --------------------------------------------------------------------------------------------------

_SEED_KEYS = {
    "name",
    "sku",
    "location",
    "tags",
    "identity",
    "properties",
    "publisher_email",
    "publisher_name",
    "subscriptions",
    "tenant_access",
    "git_access",
    "portal",
    "identity_providers",
    "named_values",
    "apis",
    "backends",
    "diagnostics",
    "loggers",
    "policies",
    "products",
    "created_at",
}


def _seed_call(where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ServiceError as error:
        detail = "; ".join(d.get("message", "") for d in error.extra.get("details", [])) or error.message
        raise EstateError(f"{where}: {detail}") from error


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    """Seed APIM services (estate section `apim`) and their configuration."""
    for i, item in enumerate(items):
        where = f"apim[{i}]"
        if not isinstance(item, dict):
            raise EstateError(f"{where}: expected a mapping")
        unknown = set(item) - _SEED_KEYS
        if unknown:
            raise EstateError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_SEED_KEYS))})")
        name = item.get("name")
        if not isinstance(name, str) or not _SERVICE_NAME.match(name) or len(name) > 50:
            raise EstateError(f"{where}.name: a service name (letters, digits, hyphens; 1-50) is required")
        _seed_service(state, ctx, item, f"{where}({name})")


def _seed_service(state: TwinState, ctx: SeedContext, item: dict[str, Any], where: str) -> None:
    resource_id = _service_id(ctx.subscription_id, ctx.resource_group, item["name"])
    if state.store.get(resource_id) is not None:
        state.store.delete(resource_id)
        _drop_secrets_under(state, resource_id, include_self=True)
    props = dict(item.get("properties") or {})
    created_at = str(item.get("created_at") or props.pop("createdAtUtc", None) or _iso(_now(state)))
    _seed_call(f"{where}.created_at", _parse_time, created_at, "created_at")
    props.setdefault("publisherEmail", item.get("publisher_email", "apim-admin@contoso.example"))
    props.setdefault("publisherName", item.get("publisher_name", "Contoso"))
    request_body = {
        "sku": item.get("sku") or {"name": "Developer", "capacity": 1},
        "tags": item.get("tags") or {},
        "identity": item.get("identity"),
    }
    readonly = {
        k: props.pop(k)
        for k in (
            "privateEndpointConnections",
            "platformVersion",
            "provisioningState",
            "publicIPAddresses",
            "privateIPAddresses",
        )
        if k in props
    }
    request_body["properties"] = props
    skeleton = _new_service_body(
        state, resource_id, item["name"], str(item.get("location") or ctx.location), {}, created_at
    )
    body = _seed_call(where, _apply_service_update, state, skeleton, request_body, replace=True)
    body["properties"].update(readonly)
    body["systemData"]["createdAt"] = created_at
    service = state.store.put(resource_id, body)
    _create_defaults(state, service)
    for section, seeder in (
        ("products", _seed_products),
        ("apis", _seed_apis),
        ("loggers", _seed_collection("loggers")),
        ("diagnostics", _seed_collection("diagnostics")),
        ("backends", _seed_collection("backends")),
        ("identity_providers", _seed_identity_providers),
        ("named_values", _seed_named_values),
        ("subscriptions", _seed_subscriptions),
        ("policies", _seed_policies),
    ):
        if section in item and item[section] is not None:
            seeder(state, service, item[section], f"{where}.{section}")
    for section, access in (("tenant_access", "access"), ("git_access", "gitAccess")):
        if section in item:
            value = item[section] or {}
            rid = f"{service.id}/tenant/{access}"
            resource = state.store.get(rid)
            assert resource is not None
            resource.body["properties"]["enabled"] = _seed_call(
                f"{where}.{section}.enabled", _bool, value.get("enabled", False), "enabled"
            )
            _set_keys(state, rid, value.get("primaryKey"), value.get("secondaryKey"))
    if "portal" in item:
        _seed_portal(state, service, item["portal"] or {}, f"{where}.portal")


def _seed_list(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EstateError(f"{where}: expected a list of mappings")
    return value


def _seed_id(entry: dict[str, Any], where: str) -> str:
    name = entry.get("id") or entry.get("name")
    if not isinstance(name, str) or not name:
        raise EstateError(f"{where}.id: required")
    return name


def _seed_collection(segment: str) -> Callable[[TwinState, Resource, Any, str], None]:
    def seeder(state: TwinState, service: Resource, value: Any, where: str) -> None:
        coll = COLLECTIONS[segment]
        for j, entry in enumerate(_seed_list(value, where)):
            name = _seed_id(entry, f"{where}[{j}]")
            given = {k: v for k, v in entry.items() if k not in ("id", "name")}
            _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)

    return seeder


def _seed_identity_providers(state: TwinState, service: Resource, value: Any, where: str) -> None:
    coll = COLLECTIONS["identityproviders"]
    for j, entry in enumerate(_seed_list(value, where)):
        name = entry.get("type") or entry.get("id")
        if not isinstance(name, str):
            raise EstateError(f"{where}[{j}].type: required ({', '.join(IDENTITY_PROVIDERS)})")
        given = {"clientSecret": "seeded-client-secret", **{k: v for k, v in entry.items() if k not in ("id",)}}
        _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)


def _seed_products(state: TwinState, service: Resource, value: Any, where: str) -> None:
    coll = COLLECTIONS["products"]
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {
            "displayName": name,
            "state": "published",
            **{k: v for k, v in entry.items() if k not in ("id", "name", "apis", "policy")},
        }
        resource, _ = _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)
        state.extra.setdefault("apim", {}).setdefault("product_apis", {})[norm(resource.id)] = []
        for api in entry.get("apis") or []:
            _product_apis(state, resource).append(f"{service.id}/apis/{api}")


def _seed_apis(state: TwinState, service: Resource, value: Any, where: str) -> None:
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {
            "displayName": name,
            "path": name,
            **{k: v for k, v in entry.items() if k not in ("id", "name", "products")},
        }
        props = _seed_call(f"{where}[{j}]", _api_props, given, None, patch=False)
        api = store_api(state, service, name, props)
        for pid in entry.get("products") or []:
            product = state.store.get(f"{service.id}/products/{pid}")
            if product is None:
                raise EstateError(f"{where}[{j}].products: product '{pid}' is not seeded")
            _product_apis(state, product).append(api.id)
    # products seeded with `apis:` before the APIs existed: keep only links to real APIs' ids
    for links in state.extra.get("apim", {}).get("product_apis", {}).values():
        for k, link in enumerate(links):
            found = state.store.get(link)
            if found is not None:
                links[k] = found.id


def _seed_named_values(state: TwinState, service: Resource, value: Any, where: str) -> None:
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {"displayName": name, **{k: v for k, v in entry.items() if k not in ("id", "name")}}
        props, nv_value = _seed_call(
            f"{where}[{j}]",
            _named_value,
            state,
            f"{service.id}/namedValues/{name}",
            name,
            given,
            None,
            patch=False,
        )
        store_named_value(state, service, name, props, nv_value)


def _seed_subscriptions(state: TwinState, service: Resource, value: Any, where: str) -> None:
    entries: list[dict[str, Any]] = []
    if isinstance(value, dict) and "generate" in value:
        value = [value]
    for j, entry in enumerate(_seed_list(value, where)):
        if "generate" in entry:
            spec = entry["generate"] or {}
            count = spec.get("count")
            if not isinstance(count, int) or count < 0:
                raise EstateError(f"{where}[{j}].generate.count: a whole number is required")
            prefix = str(spec.get("prefix", "gen-"))
            for n in range(count):
                entries.append(
                    {
                        "sid": f"{prefix}{n:05d}",
                        "displayName": f"{spec.get('display_prefix', 'Generated subscription')} {n}",
                        "scope": spec.get("scope", "/apis"),
                        "state": spec.get("state", "active"),
                        "ownerId": spec.get("ownerId"),
                    }
                )
        else:
            entries.append(entry)
    allowed = {
        "sid",
        "name",
        "displayName",
        "scope",
        "state",
        "ownerId",
        "expirationDate",
        "primaryKey",
        "secondaryKey",
        "createdDate",
        "startDate",
        "stateComment",
        "allowTracing",
        "notificationDate",
        "endDate",
    }
    for j, entry in enumerate(entries):
        spot = f"{where}[{j}]"
        unknown = set(entry) - allowed
        if unknown:
            raise EstateError(f"{spot}: unknown keys {sorted(unknown)}")
        sid = entry.get("sid") or entry.get("name")
        if not isinstance(sid, str) or not _ENTITY_ID.match(sid):
            raise EstateError(f"{spot}.sid: required")
        rid = f"{service.id}/subscriptions/{sid}"
        created = str(entry.get("createdDate") or _iso(_now(state)))
        props: dict[str, Any] = {
            "ownerId": _seed_call(f"{spot}.ownerId", _owner, service, entry.get("ownerId")),
            "scope": _seed_call(f"{spot}.scope", _full_scope, state, service, entry.get("scope", "/apis")),
            "displayName": entry.get("displayName", sid),
            "state": _seed_call(
                f"{spot}.state",
                _enum,
                entry.get("state", "active"),
                SUBSCRIPTION_STATES,
                "state",
                case_sensitive=True,
            ),
            "createdDate": created,
            "allowTracing": bool(entry.get("allowTracing", False)),
        }
        if props["state"] == "active":
            props["startDate"] = entry.get("startDate") or created
        for field in ("expirationDate", "stateComment", "notificationDate", "endDate"):
            if entry.get(field) is not None:
                props[field] = (
                    _iso(_seed_call(f"{spot}.{field}", _parse_time, entry[field], field))
                    if field != "stateComment"
                    else entry[field]
                )
        state.store.put(rid, _subscription_body(rid, sid, props))
        _set_keys(state, rid, entry.get("primaryKey"), entry.get("secondaryKey"))


def _seed_policies(state: TwinState, service: Resource, value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise EstateError(f"{where}: expected a mapping {{service, apis, products}}")
    if value.get("service") is not None:
        xml_text = _seed_call(f"{where}.service", validate_policy_xml, value["service"])
        rid = f"{service.id}/policies/policy"
        state.store.put(rid, _policy_body(rid, "Microsoft.ApiManagement/service/policies", xml_text))
    for section, segment, rtype in (
        ("apis", "apis", "Microsoft.ApiManagement/service/apis/policies"),
        ("products", "products", "Microsoft.ApiManagement/service/products/policies"),
    ):
        for name, xml_value in (value.get(section) or {}).items():
            parent = state.store.get(f"{service.id}/{segment}/{name}")
            if parent is None:
                raise EstateError(f"{where}.{section}.{name}: no such {segment[:-1]} is seeded")
            xml_text = _seed_call(f"{where}.{section}.{name}", validate_policy_xml, xml_value)
            rid = f"{parent.id}/policies/policy"
            state.store.put(rid, _policy_body(rid, rtype, xml_text))


def _seed_portal(state: TwinState, service: Resource, value: dict[str, Any], where: str) -> None:
    unknown = set(value) - {"signup_enabled", "signin_enabled", "basic_auth_enabled"}
    if unknown:
        raise EstateError(f"{where}: unknown keys {sorted(unknown)}")
    for key, kind in (("signup_enabled", "signup"), ("signin_enabled", "signin")):
        if key in value:
            resource = state.store.get(f"{service.id}/portalsettings/{kind}")
            assert resource is not None
            resource.body["properties"]["enabled"] = _seed_call(f"{where}.{key}", _bool, value[key], key)
    config = state.store.get(f"{service.id}/portalconfigs/default")
    assert config is not None
    if "basic_auth_enabled" in value:
        config.body["properties"]["enableBasicAuth"] = _seed_call(
            f"{where}.basic_auth_enabled", _bool, value["basic_auth_enabled"], "basic_auth_enabled"
        )
    if "signin_enabled" in value:
        config.body["properties"]["signin"] = {"require": bool(value["signin_enabled"])}


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

    def route(method: str, path: str, handler: Callable[[web.Request], Any]) -> None:
        add_route(app, method, path, handler, versions=v)
        if method == "GET" and path.endswith("}") and path != SVC:
            add_route(app, "HEAD", path, _head(handler), versions=v)

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
    route("GET", SVC + "/products/{name}/apis", list_product_apis)
    route("PUT", SVC + "/products/{name}/apis/{api}", link_product_api)

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

    for prefix in (SVC, SVC + "/apis/{api}", SVC + "/products/{product}"):
        route("GET", prefix + "/policies", list_policies)
        route("GET", prefix + "/policies/{policy}", get_policy)
        route("PUT", prefix + "/policies/{policy}", put_policy)
        route("DELETE", prefix + "/policies/{policy}", delete_policy)

    add_route(app, "POST", "/_twin/gateway/check", gateway_check_route, versions=None)


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
    "validate_policy_xml",
    "write_context",
]
