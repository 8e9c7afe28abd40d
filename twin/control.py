"""The control API for tests and the demo, under `/_twin/` on the ARM port (no token).

Reset, estate merge, state dump, request log and counters, faults, throttling, clock,
LRO pacing, and minting odd tokens (expired, wrong audience) for strictness tests.
Other modules add their own control routes (gateway key check, events, expiry scan).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import timedelta
from typing import Any

from aiohttp import web

from twin.estate import EstateError, apply_estate
from twin.state import Fault
from twin.tokens import Principal
from twin.web import ISSUER_KEY, ServiceError, add_route, json_response, read_json, state_of


async def reset(request: web.Request) -> web.StreamResponse:
    state_of(request).reset()
    return web.Response(status=204)


async def merge_estate(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await read_json(request)
    try:
        apply_estate(state, body, source="fragment")
    except EstateError as error:
        raise ServiceError(400, "InvalidEstate", str(error)) from error
    if state.after_seed is not None:
        await state.after_seed()
    return json_response({"urls": state.urls})


async def dump_state(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response(
        {
            "tenant_id": state.tenant_id,
            "now": state.clock.now().isoformat(),
            "urls": state.urls,
            "subscriptions": list(state.subscriptions.values()),
            "resources": [{"id": r.id, "etag": r.etag, "body": r.body} for r in state.store.resources.values()],
        },
    )


async def get_log(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = request.query.get("service")
    entries = [dataclasses.asdict(e) for e in state.log if service in (None, e.service)]
    return json_response({"entries": entries, "counters": state.counters()})


async def clear_log(request: web.Request) -> web.StreamResponse:
    state_of(request).log.clear()
    return web.Response(status=204)


async def counters(request: web.Request) -> web.StreamResponse:
    return json_response(state_of(request).counters())


_FAULT_FIELDS = {f.name for f in dataclasses.fields(Fault)} - {"id"}


async def add_fault(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    unknown = set(body) - _FAULT_FIELDS
    if unknown:
        raise ServiceError(
            400, "InvalidFault", f"unknown fault fields {sorted(unknown)}; allowed {sorted(_FAULT_FIELDS)}"
        )
    actions = ("status", "reset", "delay", "hang", "lro_fail", "lro_cancel", "partial")
    if body.get("action", "status") not in actions:
        raise ServiceError(400, "InvalidFault", f"action must be one of {', '.join(actions)}")
    if "path" not in body:
        raise ServiceError(400, "InvalidFault", "path (a regex over the request path) is required")
    fault = Fault(id=uuid.uuid4().hex[:8], service=body.pop("service", "*"), path=body.pop("path"), **body)
    state_of(request).faults.append(fault)
    return json_response(dataclasses.asdict(fault), status=201)


async def list_faults(request: web.Request) -> web.StreamResponse:
    """The faults still armed (one with `times` left disappears once it has fired)."""
    return json_response({"faults": [dataclasses.asdict(f) for f in state_of(request).faults]})


async def clear_faults(request: web.Request) -> web.StreamResponse:
    state_of(request).faults.clear()
    return web.Response(status=204)


async def set_throttle(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    state = state_of(request)
    scale = body.get("scale", 1.0)
    if not isinstance(scale, int | float) or scale <= 0:
        raise ServiceError(400, "InvalidThrottle", "scale must be a positive number")
    state.throttle.enabled = bool(body.get("enabled", True))
    state.throttle.scale = float(scale)
    state.throttle.buckets.clear()
    return json_response({"enabled": state.throttle.enabled, "scale": state.throttle.scale})


async def get_clock(request: web.Request) -> web.StreamResponse:
    return json_response({"now": state_of(request).clock.now().isoformat()})


async def advance_clock(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    try:
        delta = timedelta(
            days=float(body.get("days", 0)), hours=float(body.get("hours", 0)), seconds=float(body.get("seconds", 0))
        )
    except (TypeError, ValueError) as error:
        raise ServiceError(400, "InvalidClock", "days, hours and seconds must be numbers") from error
    if delta < timedelta():
        raise ServiceError(400, "InvalidClock", "the clock only moves forward")
    state = state_of(request)
    state.clock.advance(delta)
    return json_response({"now": state.clock.now().isoformat()})


async def set_lro(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    state = state_of(request)
    polls = body.get("polls", state.lro.polls)
    if not isinstance(polls, int) or polls < 0:
        raise ServiceError(400, "InvalidLro", "polls must be a whole number >= 0")
    style = body.get("style", state.lro.style)
    if style not in (None, "async", "location", "both"):
        raise ServiceError(400, "InvalidLro", "style must be async, location, both or null")
    service_update = body.get("service_update_seconds", state.lro.service_update_seconds)
    if isinstance(service_update, bool) or not isinstance(service_update, int | float) or service_update < 0:
        raise ServiceError(400, "InvalidLro", "service_update_seconds must be a number >= 0")
    enforce = body.get("enforce_service_if_match", state.lro.enforce_service_if_match)
    if not isinstance(enforce, bool):
        raise ServiceError(400, "InvalidLro", "enforce_service_if_match must be true or false")
    state.lro.polls = polls
    state.lro.service_update_seconds = float(service_update)
    state.lro.enforce_service_if_match = enforce
    state.lro.retry_after = str(body.get("retry_after", state.lro.retry_after))
    state.lro.style = style
    return json_response(dataclasses.asdict(state.lro))


async def set_latency(request: web.Request) -> web.StreamResponse:
    """Seconds added to every answer of a service (arm, login, logs, keyvault): a latency model."""
    body = await read_json(request, required=False)
    state = state_of(request)
    bad = {k: v for k, v in body.items() if not isinstance(v, int | float) or v < 0 or v > 30}
    if bad:
        raise ServiceError(400, "InvalidLatency", f"latency must be 0..30 seconds per service, got {bad}")
    state.latency.clear()
    state.latency.update({k: float(v) for k, v in body.items()})
    return json_response(state.latency)


async def mint_token(request: web.Request) -> web.StreamResponse:
    """A token with chosen audience, lifetime (may be negative: expired) and extra claims.

    Options: `client_id` (a principal of the estate; default the product's), `roles` (app
    roles, as Entra puts the roles granted to the calling app), `version` ("1.0" default or
    "2.0": the v2 issuer and `azp` instead of `appid`), `unsigned` (`alg: none`),
    `foreign_key` (signed by a key the JWKS does not list), `claims` (override any claim:
    a wrong `iss` or `tid`, a missing one with null)."""
    body = await read_json(request)
    state = state_of(request)
    client_id = body.get("client_id") or next(iter(state.principals))
    principal = state.principal(client_id) or Principal(client_id, str(uuid.uuid4()), "unknown")
    if "roles" in body:
        principal = dataclasses.replace(principal, roles=tuple(str(r) for r in body["roles"]))
    version = str(body.get("version", "1.0"))
    if version not in ("1.0", "2.0"):
        raise ServiceError(400, "InvalidRequest", f"version must be '1.0' or '2.0', got {version!r}")
    issuer = request.app[ISSUER_KEY]
    claims: dict[str, Any] = dict(body.get("claims", {}))
    lifetime = int(body.get("lifetime", 3600))
    if lifetime <= 0:
        # An already expired token: issued and valid in the past.
        now = int(time.time())
        claims.setdefault("iat", now - 7200)
        claims.setdefault("nbf", now - 7200)
        claims["exp"] = now + lifetime
    token = issuer.mint(
        principal,
        str(body["audience"]),
        lifetime=lifetime,
        v2_issuer=issuer.v2_issuer(state.urls["login"]) if version == "2.0" else None,
        unsigned=bool(body.get("unsigned", False)),
        foreign_key=bool(body.get("foreign_key", False)),
        **claims,
    )
    return json_response({"access_token": token})


async def rotate_signing_key(request: web.Request) -> web.StreamResponse:
    """Sign new tokens with a new key (Entra rolls its keys); the JWKS keeps the old ones."""
    return json_response({"kid": request.app[ISSUER_KEY].rotate()})


def setup(app: web.Application) -> None:
    add_route(app, "POST", "/_twin/reset", reset, versions=None)
    add_route(app, "POST", "/_twin/estate", merge_estate, versions=None)
    add_route(app, "GET", "/_twin/state", dump_state, versions=None)
    add_route(app, "GET", "/_twin/log", get_log, versions=None)
    add_route(app, "DELETE", "/_twin/log", clear_log, versions=None)
    add_route(app, "GET", "/_twin/counters", counters, versions=None)
    add_route(app, "POST", "/_twin/faults", add_fault, versions=None)
    add_route(app, "DELETE", "/_twin/faults", clear_faults, versions=None)
    add_route(app, "GET", "/_twin/faults", list_faults, versions=None)
    add_route(app, "PUT", "/_twin/throttle", set_throttle, versions=None)
    add_route(app, "GET", "/_twin/clock", get_clock, versions=None)
    add_route(app, "POST", "/_twin/clock/advance", advance_clock, versions=None)
    add_route(app, "PUT", "/_twin/lro", set_lro, versions=None)
    add_route(app, "POST", "/_twin/token", mint_token, versions=None)
    add_route(app, "POST", "/_twin/signing-key/rotate", rotate_signing_key, versions=None)
    add_route(app, "PUT", "/_twin/latency", set_latency, versions=None)
