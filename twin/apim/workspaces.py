"""APIM workspaces and the resources inside them: APIs, products (and their API links),
subscriptions, named values, backends, and policies at workspace, product and API scope.

Shapes and paths follow the REST specs, stable 2024-05-01 (`apimworkspaces.json`:
Workspace_*, WorkspacePolicy_*, WorkspaceApi*, WorkspaceProduct*, WorkspaceProductApiLink_*,
WorkspaceSubscription_*, WorkspaceNamedValue_*; `apimworkspacebackends.json`:
WorkspaceBackend_*; the contracts in `definitions.json`), as azure-mgmt-apimanagement 5.0.0
sends them. A workspace child is validated as its service-level twin is (the same
builders), stored under the workspace's id with the workspace ARM type, and answered with
an ETag; PATCH and DELETE need If-Match as in the spec. Product-API relations are the
`apiLinks` resources (`ProductApiLinkContract`, properties.apiId the full API id), not the
service level's `products/{id}/apis/{apiId}`.

The RBAC action of each route is derived from its path (`twin/rbac.py`), e.g.
Microsoft.ApiManagement/service/workspaces/apis/read. Not served: operations, revisions,
diagnostics, loggers, certificates, groups, tags and the key actions (listSecrets,
regenerate*, listValue, refreshSecret) of workspace resources; the product does not read them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from twin.apim.apis import _api_props, _policy_body, validate_policy_xml
from twin.apim.children import _backend, _product
from twin.apim.common import (
    _ALL_OPS,
    SUBSCRIPTION_STATES,
    _check_if_match,
    _deep,
    _drop_secrets_under,
    _emit,
    _entity_name,
    _enum,
    _filtered,
    _invalid,
    _iso,
    _list,
    _not_found,
    _now,
    _parse_time,
    _props,
    _secret,
    _service,
    _set_keys,
    _str,
    _with_etag,
)
from twin.apim.named_values import _named_value
from twin.apim.subscriptions import _full_scope
from twin.arm import write_context
from twin.state import Resource, TwinState
from twin.web import ServiceError, json_response, params, read_json, state_of

WORKSPACE_TYPE = "Microsoft.ApiManagement/service/workspaces"

Build = Callable[[TwinState, Resource, str, dict[str, Any], dict[str, Any] | None, bool], dict[str, Any]]


def _api(
    state: TwinState, ws: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> dict[str, Any]:
    return _api_props(given, current, patch=patch)


def _backend_props(
    state: TwinState, ws: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> dict[str, Any]:
    return _backend(state, ws, name, given, current, patch)[0]


def _product_props(
    state: TwinState, ws: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> dict[str, Any]:
    return _product(state, ws, name, given, current, patch)[0]


def _named_value_props(
    state: TwinState, ws: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> dict[str, Any]:
    resource_id = f"{ws.id}/namedValues/{name}"
    props, value = _named_value(state, resource_id, name, given, current, patch=patch)
    # The twin does not read workspace Key Vault references: lastStatus stays unset (null)
    # unless an estate states it, never a pretended success.
    if value is not None:
        _secret(state, resource_id)["value"] = value
    return props


def _subscription_props(
    state: TwinState, ws: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> dict[str, Any]:
    """SubscriptionCreateParameterProperties: scope and displayName required on create; keys
    generated when not given and kept with the secrets, never in the body."""
    created = _iso(_now(state))
    props: dict[str, Any] = dict(current or {}) if patch else {"state": "submitted", "createdDate": created}
    if "scope" in given or not patch:
        props["scope"] = _full_scope(state, ws, given.get("scope"))
    if "displayName" in given or not patch:
        props["displayName"] = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=100)
    if "state" in given:
        props["state"] = _enum(given["state"], SUBSCRIPTION_STATES, "properties.state", case_sensitive=True)
    if props.get("state") == "active":
        props.setdefault("startDate", created)
    if "allowTracing" in given:
        props["allowTracing"] = bool(given["allowTracing"])
    for field in ("expirationDate", "createdDate", "startDate"):
        if given.get(field) is not None:
            props[field] = _iso(_parse_time(given[field], f"properties.{field}"))
    for slot in ("primaryKey", "secondaryKey"):
        if given.get(slot) is not None:
            _str(given[slot], f"properties.{slot}", min_len=1, max_len=256)
    _set_keys(state, f"{ws.id}/subscriptions/{name}", given.get("primaryKey"), given.get("secondaryKey"))
    return props


@dataclass(frozen=True)
class Kind:
    segment: str  # URL segment under the workspace
    label: str  # for messages
    type: str  # ARM type
    build: Build
    filter_fields: tuple[str, ...] = ("name", "displayName")


KINDS: dict[str, Kind] = {
    k.segment.lower(): k
    for k in (
        Kind("apis", "API", f"{WORKSPACE_TYPE}/apis", _api, ("name", "displayName", "path", "serviceUrl")),
        Kind("products", "Product", f"{WORKSPACE_TYPE}/products", _product_props),
        Kind("backends", "Backend", f"{WORKSPACE_TYPE}/backends", _backend_props, ("name", "title", "url")),
        Kind("namedValues", "Named value", f"{WORKSPACE_TYPE}/namedValues", _named_value_props),
        Kind(
            "subscriptions",
            "Subscription",
            f"{WORKSPACE_TYPE}/subscriptions",
            _subscription_props,
            ("name", "displayName", "scope", "state"),
        ),
    )
}


# -- workspaces ------------------------------------------------------------------------------------


def _workspace_props(given: dict[str, Any], current: dict[str, Any] | None, *, patch: bool) -> dict[str, Any]:
    """WorkspaceContractProperties: displayName required (definitions.json), description optional."""
    props = dict(current or {}) if patch else {}
    if "displayName" in given or not patch:
        props["displayName"] = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=300)
    if "description" in given:
        props["description"] = None if given["description"] is None else _str(given["description"], "description")
    return props


def store_workspace(state: TwinState, service: Resource, name: str, props: dict[str, Any]) -> Resource:
    name = _entity_name(name, "workspaceId")
    resource_id = f"{service.id}/workspaces/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": WORKSPACE_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body)


def _workspace(request: web.Request) -> Resource:
    state = state_of(request)
    service = _service(request)
    name = params(request)["ws"]
    found = state.store.get(f"{service.id}/workspaces/{name}")
    if found is None or found.body.get("type") != WORKSPACE_TYPE:
        raise _not_found("Workspace", name)
    return found


async def list_workspaces(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = [
        (
            {k: str(r.body["properties"].get(k) or "") for k in ("displayName", "description")}
            | {"name": r.body["name"]},
            r.body,
        )
        for r in state.store.children(service.id, "workspaces")
    ]
    fields: dict[str, tuple[str, ...]] = {"name": _ALL_OPS, "displayName": _ALL_OPS, "description": _ALL_OPS}
    return _list(request, _filtered(request, rows, fields))


async def get_workspace(request: web.Request) -> web.StreamResponse:
    found = _workspace(request)
    return _with_etag(found.body, found)


async def put_workspace(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["ws"]
    existing = state.store.get(f"{service.id}/workspaces/{name}")
    _check_if_match(request, existing, required=False)
    props = _workspace_props(_props(await read_json(request)), None, patch=False)
    resource = store_workspace(state, service, name, props)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource, status=200 if existing else 201)


async def patch_workspace(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    found = _workspace(request)
    _check_if_match(request, found, required=True)
    props = _workspace_props(_props(await read_json(request)), found.body["properties"], patch=True)
    resource = store_workspace(state, service, found.body["name"], props)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


async def delete_workspace(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    found = state.store.get(f"{service.id}/workspaces/{params(request)['ws']}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)  # children go with it, as in APIM
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


# -- workspace children ----------------------------------------------------------------------------


def _kind(request: web.Request) -> Kind:
    # /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{n}/workspaces/{ws}/{kind}
    return KINDS[request.path.lower().split("/")[11]]


def _render(state: TwinState, kind: Kind, resource: Resource) -> dict[str, Any]:
    body = _deep(resource.body)
    if kind.segment == "namedValues":
        props = body["properties"]
        if not props.get("secret") and "keyVault" not in props:
            props["value"] = _secret(state, resource.id).get("value")
    return body


def upsert_workspace_child(
    state: TwinState, ws: Resource, kind: Kind, name: str, given: dict[str, Any], *, patch: bool
) -> tuple[Resource, bool]:
    """Validate and store one workspace child; (resource, created). Raises ServiceError."""
    name = _entity_name(name, kind.segment)
    resource_id = f"{ws.id}/{kind.segment}/{name}"
    existing = state.store.get(resource_id)
    props = kind.build(state, ws, name, given, existing.body["properties"] if existing else None, patch)
    body = {
        "id": existing.id if existing else resource_id,
        "type": kind.type,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body), existing is None


async def list_workspace_children(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    ws = _workspace(request)
    kind = _kind(request)
    rows = [
        (
            {"name": r.body["name"]}
            | {f: str(r.body["properties"].get(f) or "") for f in kind.filter_fields if f != "name"},
            _render(state, kind, r),
        )
        for r in state.store.children(ws.id, kind.segment)
    ]
    return _list(request, _filtered(request, rows, dict.fromkeys(kind.filter_fields, _ALL_OPS)))


def _existing_child(state: TwinState, ws: Resource, kind: Kind, name: str) -> Resource:
    found = state.store.get(f"{ws.id}/{kind.segment}/{name}")
    if found is None:
        raise _not_found(kind.label, name)
    return found


async def get_workspace_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    ws = _workspace(request)
    kind = _kind(request)
    found = _existing_child(state, ws, kind, params(request)["name"])
    return _with_etag(_render(state, kind, found), found)


async def put_workspace_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    ws = _workspace(request)
    kind = _kind(request)
    name = params(request)["name"]
    _check_if_match(request, state.store.get(f"{ws.id}/{kind.segment}/{name}"), required=False)
    resource, created = upsert_workspace_child(state, ws, kind, name, _props(await read_json(request)), patch=False)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(_render(state, kind, resource), resource, status=201 if created else 200)


async def patch_workspace_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    ws = _workspace(request)
    kind = _kind(request)
    found = _existing_child(state, ws, kind, params(request)["name"])
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    resource, _ = upsert_workspace_child(state, ws, kind, found.body["name"], given, patch=True)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(_render(state, kind, resource), resource)


async def delete_workspace_child(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    ws = _workspace(request)
    kind = _kind(request)
    found = state.store.get(f"{ws.id}/{kind.segment}/{params(request)['name']}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


# -- product API links -----------------------------------------------------------------------------

API_LINK_TYPE = f"{WORKSPACE_TYPE}/products/apiLinks"


def link_api(state: TwinState, ws: Resource, product: Resource, link: str, api_id: Any) -> tuple[Resource, bool]:
    """ProductApiLinkContractProperties: apiId (required) is the full id of an API of the workspace."""
    if not isinstance(api_id, str) or not api_id:
        raise _invalid("properties.apiId", "'apiId' is required.")
    match = re.fullmatch(re.escape(ws.id) + r"/apis/([^/]+)", api_id.rstrip("/"), re.IGNORECASE)
    api = state.store.get(f"{ws.id}/apis/{match.group(1)}") if match else None
    if api is None:
        raise _invalid("properties.apiId", f"'{api_id}' is not an API of workspace '{ws.body['name']}'.")
    link = _entity_name(link, "apiLinkId")
    resource_id = f"{product.id}/apiLinks/{link}"
    existing = state.store.get(resource_id)
    body = {"id": resource_id, "type": API_LINK_TYPE, "name": link, "properties": {"apiId": api.id}}
    return state.store.put(resource_id, body), existing is None


def _product_of(request: web.Request) -> tuple[TwinState, Resource, Resource]:
    state = state_of(request)
    ws = _workspace(request)
    return state, ws, _existing_child(state, ws, KINDS["products"], params(request)["product"])


async def list_api_links(request: web.Request) -> web.StreamResponse:
    state, _, product = _product_of(request)
    rows = [({"name": r.body["name"]}, r.body) for r in state.store.children(product.id, "apiLinks")]
    return _list(request, _filtered(request, rows, {"name": _ALL_OPS}))


async def get_api_link(request: web.Request) -> web.StreamResponse:
    state, _, product = _product_of(request)
    name = params(request)["link"]
    found = state.store.get(f"{product.id}/apiLinks/{name}")
    if found is None:
        raise _not_found("Product API link", name)
    return _with_etag(found.body, found)


async def put_api_link(request: web.Request) -> web.StreamResponse:
    state, ws, product = _product_of(request)
    given = _props(await read_json(request))
    resource, created = link_api(state, ws, product, params(request)["link"], given.get("apiId"))
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource, status=201 if created else 200)


# -- policies at workspace, workspace API and workspace product scope -----------------------------


def _policy_target(request: web.Request) -> tuple[TwinState, str, str]:
    state = state_of(request)
    ws = _workspace(request)
    p = params(request)
    if p.get("policy", "policy").lower() != "policy":
        raise _invalid("policyId", f"Policy id must be 'policy', not '{p['policy']}'.")
    if "api" in p:
        parent = _existing_child(state, ws, KINDS["apis"], p["api"])
        return state, f"{parent.id}/policies/policy", f"{WORKSPACE_TYPE}/apis/policies"
    if "product" in p:
        parent = _existing_child(state, ws, KINDS["products"], p["product"])
        return state, f"{parent.id}/policies/policy", f"{WORKSPACE_TYPE}/products/policies"
    return state, f"{ws.id}/policies/policy", f"{WORKSPACE_TYPE}/policies"


def _policy_format(request: web.Request) -> str:
    fmt = request.query.get("format", "xml")
    if fmt not in ("xml", "rawxml"):
        raise ServiceError(400, "InvalidParameter", f"'format' must be xml or rawxml, got '{fmt}'.")
    return fmt


def _rendered_policy(resource: Resource, fmt: str) -> dict[str, Any]:
    body = _deep(resource.body)
    body["properties"]["format"] = fmt
    return body


async def list_workspace_policies(request: web.Request) -> web.StreamResponse:
    state, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    items = [_rendered_policy(found, "xml")] if found else []
    return json_response({"value": items, "count": len(items)})


async def get_workspace_policy(request: web.Request) -> web.StreamResponse:
    state, resource_id, _ = _policy_target(request)
    fmt = _policy_format(request)
    found = state.store.get(resource_id)
    if found is None:
        raise _not_found("Policy", "policy")
    return _with_etag(_rendered_policy(found, fmt), found)


async def put_workspace_policy(request: web.Request) -> web.StreamResponse:
    state, resource_id, resource_type = _policy_target(request)
    existing = state.store.get(resource_id)
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    fmt = _enum(given.get("format", "xml"), ("xml", "rawxml"), "properties.format", case_sensitive=True)
    value = validate_policy_xml(given.get("value"))
    resource = state.store.put(resource_id, _policy_body(resource_id, resource_type, value, fmt))
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(_rendered_policy(resource, fmt), resource, status=200 if existing else 201)


async def delete_workspace_policy(request: web.Request) -> web.StreamResponse:
    state, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


def workspace_routes(svc: str) -> list[tuple[str, str, Callable[[web.Request], Any]]]:
    """(method, path, handler) for everything above, under the service path `svc`."""
    ws = svc + "/workspaces/{ws}"
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("GET", svc + "/workspaces", list_workspaces),
        ("GET", ws, get_workspace),
        ("PUT", ws, put_workspace),
        ("PATCH", ws, patch_workspace),
        ("DELETE", ws, delete_workspace),
    ]
    for kind in KINDS.values():
        base = f"{ws}/{kind.segment}"
        routes += [
            ("GET", base, list_workspace_children),
            ("GET", base + "/{name}", get_workspace_child),
            ("PUT", base + "/{name}", put_workspace_child),
            ("PATCH", base + "/{name}", patch_workspace_child),
            ("DELETE", base + "/{name}", delete_workspace_child),
        ]
    routes += [
        ("GET", ws + "/products/{product}/apiLinks", list_api_links),
        ("GET", ws + "/products/{product}/apiLinks/{link}", get_api_link),
        ("PUT", ws + "/products/{product}/apiLinks/{link}", put_api_link),
    ]
    for prefix in (ws, ws + "/apis/{api}", ws + "/products/{product}"):
        routes += [
            ("GET", prefix + "/policies", list_workspace_policies),
            ("GET", prefix + "/policies/{policy}", get_workspace_policy),
            ("PUT", prefix + "/policies/{policy}", put_workspace_policy),
            ("DELETE", prefix + "/policies/{policy}", delete_workspace_policy),
        ]
    return routes
