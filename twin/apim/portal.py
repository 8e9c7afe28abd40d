"""Tenant access (`/tenant/access`, `/tenant/gitAccess`) and the developer portal: portal
settings (sign-in, sign-up) and the portal config that holds `enableBasicAuth`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from twin.apim.common import (
    _bool,
    _check_if_match,
    _child,
    _deep,
    _emit,
    _entity_name,
    _enum,
    _invalid,
    _new_key,
    _not_found,
    _props,
    _secret,
    _service,
    _set_keys,
    _with_etag,
)
from twin.apim.subscriptions import _validate_key
from twin.arm import write_context
from twin.state import Resource, TwinState
from twin.web import (
    json_response,
    params,
    read_json,
    state_of,
)

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
