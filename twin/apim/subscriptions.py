"""APIM subscriptions and their keys (listSecrets, regenerate*Key), and the gateway key check
the control API answers."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from twin.apim.children import _product_apis
from twin.apim.common import (
    SERVICE_TYPE,
    SUBSCRIPTION_FILTER_FIELDS,
    SUBSCRIPTION_STATES,
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
    _new_key,
    _now,
    _parse_time,
    _props,
    _secret,
    _secrets,
    _service,
    _set_keys,
    _str,
    _with_etag,
    apim_event,
)
from twin.arm import WriteContext, write_context
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    json_response,
    params,
    read_json,
    state_of,
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
