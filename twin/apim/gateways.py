"""Self-hosted gateways: the entity, its two keys (listKeys, regenerateKey), the tokens made
from them (generateToken), the management plane's token check and the near-expiry event.

Shapes from specification/apimanagement/resource-manager/Microsoft.ApiManagement/stable/
2024-05-01/apimgateways.json and definitions.json:

- `PUT/GET/PATCH/DELETE .../gateways/{gatewayId}` (GatewayContract: `properties.locationData`
  with a required `name`, `properties.description`), through the generic child collections;
- `POST .../gateways/{gatewayId}/listKeys` -> 200 GatewayKeysContract `{primary, secondary}`
  with the entity's ETag;
- `POST .../gateways/{gatewayId}/regenerateKey`, body GatewayKeyRegenerationRequestContract
  `{keyType: primary|secondary}` (required) -> 204; it invalidates every token made with it;
- `POST .../gateways/{gatewayId}/generateToken`, body GatewayTokenRequestContract
  `{keyType, expiry}` (both required; "Maximum token expiry time is set to 30 days") -> 200
  GatewayTokenContract `{value}`.

The token is `GatewayKey {gatewayId}&{expiry yyyyMMddHHmm}&{signature}`, the signature an
HMAC-SHA512 of `{gatewayId}\\n{expiry}` under the key (the layout self-hosted gateway
configuration shows; [unverified detail] the exact signature input: only the twin checks it).
A token is accepted while it has not expired and its signature matches one of the gateway's
CURRENT keys, so regenerating a key refuses every token made from it.

Control routes (no ARM auth, as the other `/_twin` ones):
- `POST /_twin/gateway/token-check` `{token}` -> `{valid, gateway, reason}`: would the
  management plane accept this token from a self-hosted gateway? Each check is a heartbeat:
  the twin remembers the last token each gateway presented.
- `POST /_twin/gateway/expiry-scan` -> `{events}`: like APIM, raise
  `Microsoft.ApiManagement.GatewayTokenNearExpiry` for each gateway whose last presented
  token expires within 7 days (once per token). Data (Event Grid's APIM schema,
  ApiManagementGatewayTokenNearExpiryEventData): `gatewayInfo {gatewayId, instanceId}`,
  `tokenInfo {expiredAtUtc}`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from twin.apim.common import (
    _child,
    _emit,
    _enum,
    _invalid,
    _iso,
    _new_key,
    _now,
    _parse_time,
    _secret,
    _secrets,
    _service,
    _str,
    _with_etag,
    apim_event,
)
from twin.arm import write_context
from twin.state import Resource, TwinState, norm
from twin.web import ServiceError, json_response, params, read_json, state_of

GATEWAY_TYPE = "Microsoft.ApiManagement/service/gateways"
KEY_TYPES = ("primary", "secondary")
MAX_TOKEN_DAYS = 30
NEAR_EXPIRY = timedelta(days=7)
TOKEN_PREFIX = "GatewayKey "


def gateway_builder(
    state: TwinState, service: Resource, name: str, given: dict[str, Any], current: dict[str, Any] | None, patch: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """GatewayContractProperties: locationData (ResourceLocationDataContract, `name` required,
    at most 256; city, district, countryOrRegion at most 256) and description (at most 1000).
    A new gateway gets its two keys."""
    props = dict(current or {}) if patch else {}
    if "locationData" in given or not patch:
        location = given.get("locationData")
        if not isinstance(location, dict):
            raise _invalid("properties.locationData", "'locationData' with a 'name' is required.")
        checked = {"name": _str(location.get("name"), "properties.locationData.name", min_len=1, max_len=256)}
        for field in ("city", "district", "countryOrRegion"):
            if location.get(field) is not None:
                checked[field] = _str(location[field], f"properties.locationData.{field}", max_len=256)
        props["locationData"] = checked
    if "description" in given:
        props["description"] = (
            None if given["description"] is None else _str(given["description"], "properties.description", max_len=1000)
        )
    keys = None if current is not None else {"primary": _new_key(), "secondary": _new_key()}
    return props, keys


def _gateway(request: web.Request) -> tuple[TwinState, Resource]:
    state = state_of(request)
    service = _service(request)
    name = params(request)["gateway"]
    return state, _child(state, service, f"gateways/{name}", "Gateway", name)


async def _key_type(request: web.Request) -> str:
    body = await read_json(request)
    return _enum(body.get("keyType"), KEY_TYPES, "keyType", case_sensitive=False)


async def gateway_keys(request: web.Request) -> web.StreamResponse:
    state, gateway = _gateway(request)
    keys = _secret(state, gateway.id)
    _emit(state, write_context(request), gateway.id, "action", "listKeys")
    return _with_etag({"primary": keys.get("primary"), "secondary": keys.get("secondary")}, gateway)


async def regenerate_gateway_key(request: web.Request) -> web.StreamResponse:
    state, gateway = _gateway(request)
    slot = await _key_type(request)
    _secret(state, gateway.id)[slot] = _new_key()
    state.store.put(gateway.id, gateway.body)  # the entity changed: a new ETag
    _emit(state, write_context(request), gateway.id, "action", "regenerateKey")
    return web.Response(status=204)


def _expiry_text(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M")


def _signature(key: str, gateway: str, expiry: str) -> str:
    digest = hmac.new(key.encode(), f"{gateway}\n{expiry}".encode(), hashlib.sha512).digest()
    return base64.b64encode(digest).decode()


async def generate_gateway_token(request: web.Request) -> web.StreamResponse:
    state, gateway = _gateway(request)
    body = await read_json(request)
    slot = _enum(body.get("keyType"), KEY_TYPES, "keyType", case_sensitive=False)
    if body.get("expiry") is None:
        raise _invalid("expiry", "'expiry' is required.")
    expiry = _parse_time(body.get("expiry"), "expiry")
    now = _now(state)
    if expiry <= now:
        raise _invalid("expiry", "'expiry' must be in the future.")
    if expiry > now + timedelta(days=MAX_TOKEN_DAYS):
        raise _invalid("expiry", f"Maximum token expiry time is {MAX_TOKEN_DAYS} days.")
    name = gateway.body["name"]
    stamp = _expiry_text(expiry)
    key = str(_secret(state, gateway.id)[slot])
    _emit(state, write_context(request), gateway.id, "action", "generateToken")
    return json_response({"value": f"{TOKEN_PREFIX}{name}&{stamp}&{_signature(key, name, stamp)}"})


# -- the management plane's view (control API) -------------------------------------------------------


def _heartbeats(state: TwinState) -> dict[str, dict[str, Any]]:
    apim: dict[str, Any] = state.extra.setdefault("apim", {})
    found: dict[str, dict[str, Any]] = apim.setdefault("gateway_heartbeats", {})
    return found


def token_check(state: TwinState, token: str) -> dict[str, Any]:
    """Would the management plane accept `token` from a self-hosted gateway?"""
    if not token.startswith(TOKEN_PREFIX) or token.count("&") != 2:
        return {"valid": False, "gateway": None, "reason": "not a gateway token"}
    name, stamp, signature = token[len(TOKEN_PREFIX) :].split("&")
    matches = [r for r in state.store.by_type(GATEWAY_TYPE) if str(r.body.get("name", "")).lower() == name.lower()]
    if not matches:
        return {"valid": False, "gateway": name, "reason": "no such gateway"}
    try:
        expiry = datetime.strptime(stamp, "%Y%m%d%H%M").replace(tzinfo=_now(state).tzinfo)
    except ValueError:
        return {"valid": False, "gateway": name, "reason": "unreadable expiry"}
    for gateway in matches:
        keys = _secrets(state).get(norm(gateway.id), {})
        signed = any(
            isinstance(keys.get(slot), str)
            and hmac.compare_digest(_signature(keys[slot], gateway.body["name"], stamp).encode(), signature.encode())
            for slot in KEY_TYPES
        )
        if not signed:
            continue
        _heartbeats(state)[norm(gateway.id)] = {"id": gateway.id, "expiry": _iso(expiry)}
        if expiry <= _now(state):
            return {"valid": False, "gateway": gateway.id, "reason": "token has expired"}
        return {"valid": True, "gateway": gateway.id, "reason": "ok"}
    return {"valid": False, "gateway": name, "reason": "signed by no current key of the gateway"}


async def token_check_route(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    token = body.get("token")
    if not isinstance(token, str):
        raise ServiceError(400, "InvalidRequest", "token (a string) is required.")
    return json_response(token_check(state_of(request), token))


def near_expiry_events(state: TwinState) -> list[dict[str, Any]]:
    """GatewayTokenNearExpiry for each gateway whose last presented token is within 7 days of
    expiry, once per (gateway, expiry)."""
    now = _now(state)
    apim: dict[str, Any] = state.extra.setdefault("apim", {})
    raised: set[str] = apim.setdefault("gateway_expiry_raised", set())
    events = []
    for key, beat in sorted(_heartbeats(state).items()):
        expiry = _parse_time(beat["expiry"], "expiry")
        mark = f"{key}|{beat['expiry']}"
        if mark in raised or not (now < expiry <= now + NEAR_EXPIRY) or state.store.get(beat["id"]) is None:
            continue
        raised.add(mark)
        gateway_id = beat["id"]
        service_id = gateway_id.rsplit("/gateways/", 1)[0]
        event = apim_event(service_id, gateway_id, "GatewayTokenNearExpiry", now)
        event["data"] = {
            "gatewayInfo": {"gatewayId": gateway_id, "instanceId": str(uuid.uuid5(uuid.NAMESPACE_URL, gateway_id))},
            "tokenInfo": {"expiredAtUtc": beat["expiry"]},
        }
        state.emit(event)
        events.append(event)
    return events


async def expiry_scan_route(request: web.Request) -> web.StreamResponse:
    return json_response({"events": near_expiry_events(state_of(request))})
