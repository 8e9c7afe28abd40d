"""Generic child collections of a service: identity providers, backends, diagnostics, loggers,
products (and product-API links)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from twin.apim.common import (
    _ALL_OPS,
    DIAGNOSTIC_IDS,
    IDENTITY_PROVIDERS,
    LOGGER_TYPES,
    _bool,
    _check_if_match,
    _child,
    _drop_secrets_under,
    _emit,
    _entity_name,
    _enum,
    _filtered,
    _invalid,
    _iso,
    _list,
    _now,
    _props,
    _secret,
    _service,
    _str,
    _with_etag,
)
from twin.apim.gateways import gateway_builder
from twin.arm import write_context
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    json_response,
    params,
    read_json,
    state_of,
)

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


def _user(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """UserCreateParameterProperties (apimusers.json): email, firstName, lastName required on
    create; a password is accepted and never stored or returned, as APIM never returns it."""
    props = (
        dict(current or {}) if patch else {"state": "active", "identities": [], "registrationDate": _iso(_now(state))}
    )
    for field, max_len in (("email", 254), ("firstName", 100), ("lastName", 100)):
        if field in given or not patch:
            props[field] = _str(given.get(field), f"properties.{field}", min_len=1, max_len=max_len)
    if "state" in given:
        props["state"] = _enum(
            given["state"], ("active", "blocked", "pending", "deleted"), "properties.state", case_sensitive=True
        )
    if "note" in given:
        props["note"] = given["note"]
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
    "users": Collection("users", "User", "Microsoft.ApiManagement/service/users", _user),
    "gateways": Collection("gateways", "Gateway", "Microsoft.ApiManagement/service/gateways", gateway_builder),
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
