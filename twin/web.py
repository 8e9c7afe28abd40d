"""What every twin service shares: errors in Azure's shape, the middleware chain (request
log, fault injection, bearer-token check, ARM throttling), api-version checks, JSON bodies.

Services register routes with `add_route(...)`, naming the api-versions each accepts.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from twin.state import LogEntry, TwinState
from twin.tokens import TokenError, TokenIssuer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATE_KEY: web.AppKey[TwinState] = web.AppKey("state", TwinState)
SERVICE_KEY: web.AppKey[str] = web.AppKey("service", str)
ISSUER_KEY: web.AppKey[TokenIssuer] = web.AppKey("issuer", TokenIssuer)
CLAIMS: web.RequestKey[dict[str, Any]] = web.RequestKey("claims", dict)
ROUTE: web.RequestKey[str] = web.RequestKey("route", str)
LRO_FAIL: web.RequestKey[Any] = web.RequestKey("lro_fail", object)
_SLASHES = re.compile(r"/{2,}")
_SUBSCRIPTION_IN_PATH = re.compile(r"^/subscriptions/([^/]+)", re.IGNORECASE)


class ServiceError(Exception):
    """An Azure-shaped error response: `{"error": {"code", "message"}}` with a status."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message, **self.extra}
        return json_response({"error": error}, status=self.status, headers=self.headers)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers or {})


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong."""
    raw = await request.read()
    if not raw:
        if required:
            raise ServiceError(400, "InvalidRequestContent", "The request content was invalid: the body is empty.")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ServiceError(
            400, "InvalidRequestContent", f"The request content was invalid and could not be deserialized: {error}."
        ) from error
    if not isinstance(body, dict):
        raise ServiceError(400, "InvalidRequestContent", "The request content must be a JSON object.")
    return body


@dataclass(frozen=True)
class AuthPolicy:
    """Which audiences a service accepts, and what its 401 says."""

    # A callable is resolved per request: a service's own URL is known only once it listens.
    audiences: Collection[str] | Callable[[], Collection[str]]
    challenge: str | None = None  # WWW-Authenticate value (Key Vault's challenge)
    open_prefixes: tuple[str, ...] = ("/_twin/",)  # paths that need no token
    # ARM's 401 challenge, built from the refusal (its error_description says why).
    challenge_for: Callable[[TokenError], str] | None = None
    # Runs after the token is accepted: raises ServiceError when RBAC refuses the call.
    authorize: Callable[[web.Request], Awaitable[None]] | None = None


VersionError = Callable[[str | None, Collection[str]], ServiceError]


def arm_version_error(given: str | None, allowed: Collection[str]) -> ServiceError:
    if not given:
        return ServiceError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    return ServiceError(
        400,
        "InvalidApiVersionParameter",
        f"The api-version '{given}' is invalid. The supported versions are '{','.join(sorted(allowed))}'.",
    )


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Handler
    versions: Collection[str] | None
    version_error: VersionError


ROUTES_KEY: web.AppKey[list[Route]] = web.AppKey("routes", list)
PARAMS: web.RequestKey[dict[str, str]] = web.RequestKey("params", dict)
# Routes by (segment count, last segment if literal, else ""): a request is matched against
# the few routes of its shape, not all of them (the ARM app has a couple of hundred).
_ShapeIndex = dict[tuple[int, str], list[tuple[int, Route]]]
ROUTE_SHAPES_KEY: web.AppKey[dict[int, _ShapeIndex]] = web.AppKey("route_shapes", dict)


def _segments(path: str) -> list[str]:
    return path.rstrip("/").split("/")


def routes_for(app: web.Application, path: str) -> list[Route]:
    """The routes that can match `path`, in registration order."""
    routes = app[ROUTES_KEY]
    built = app[ROUTE_SHAPES_KEY]
    index = built.get(len(routes))
    if index is None:  # routes are registered before the app serves: built once
        index = {}
        for position, route in enumerate(routes):
            parts = _segments(route.pattern)
            last = parts[-1].lower() if "{" not in parts[-1] else ""
            index.setdefault((len(parts), last), []).append((position, route))
        built.clear()
        built[len(routes)] = index
    parts = _segments(path)
    literal = index.get((len(parts), parts[-1].lower()), [])
    wild = index.get((len(parts), ""), [])
    return [route for _, route in sorted((*literal, *wild), key=lambda entry: entry[0])]


def add_route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    *,
    versions: Collection[str] | None,
    version_error: VersionError = arm_version_error,
) -> None:
    """Register a handler; `{name}` matches one path segment. Paths match case-insensitively,
    as ARM's do. The handler runs only for a known api-version (None: none expected)."""
    regex = re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "/?$", re.IGNORECASE)
    app[ROUTES_KEY].append(Route(method.upper(), path, regex, handler, versions, version_error))


def params(request: web.Request) -> dict[str, str]:
    """The `{name}` segments of the matched route."""
    found: dict[str, str] = request[PARAMS]
    return found


def clean_path(request: web.Request) -> str:
    """The path with repeated slashes collapsed, as Azure's front doors treat it."""
    return _SLASHES.sub("/", request.path)


async def _dispatch(request: web.Request) -> web.StreamResponse:
    methods = set()
    path = clean_path(request)
    for route in routes_for(request.app, path):
        match = route.regex.match(path)
        if match is None:
            continue
        if route.method != request.method:
            methods.add(route.method)
            continue
        request[ROUTE] = route.pattern
        request[PARAMS] = match.groupdict()
        if route.versions is not None:
            given = request.query.get("api-version")
            if given not in route.versions:
                raise route.version_error(given, route.versions)
        return await route.handler(request)
    if methods:
        raise ServiceError(
            405, "MethodNotAllowed", f"The requested method {request.method} is not allowed for {request.path}."
        )
    raise web.HTTPNotFound()


def _route_label(request: web.Request) -> str:
    label: str = request.get(ROUTE, "(unmatched)")
    return label


def make_app(state: TwinState, service: str, issuer: TokenIssuer, auth: AuthPolicy | None) -> web.Application:
    """An aiohttp app with the twin's middleware chain for one service."""

    @web.middleware
    async def log_and_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
        state.settle_due_operations()
        started = time.time()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        except ServiceError as error:
            response = error.response()
            status = error.status
        except web.HTTPNotFound:
            response = ServiceError(
                404,
                "NotFound" if service != "arm" else "InvalidResourceType",
                f"No route for {request.method} {request.path} in the twin's {service} service.",
            ).response()
            status = 404
        except ConnectionResetError:
            raise
        request_id = str(uuid.uuid4())
        response.headers.setdefault("x-ms-request-id", request_id)
        response.headers.setdefault(
            "x-ms-correlation-request-id", request.headers.get("x-ms-correlation-request-id", request_id)
        )
        if not request.path.startswith("/_twin/"):
            claims = request.get(CLAIMS) or {}
            match = _SUBSCRIPTION_IN_PATH.match(request.path)
            state.log.append(
                LogEntry(
                    at=started,
                    service=service,
                    method=request.method,
                    path=request.path,
                    query=request.query_string,
                    route=_route_label(request),
                    status=status,
                    principal=claims.get("appid"),
                    subscription=match.group(1).lower() if match else None,
                    connection=state.connection_of(request.transport),
                )
            )
        return response

    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_twin/"):
            return await handler(request)
        latency = state.latency.get(service)
        if latency:
            await asyncio.sleep(latency)
        fault = state.take_fault(service, request.method, request.path)
        if fault is None or fault.action in ("lro_fail", "lro_cancel", "partial"):
            if fault is not None:
                request[LRO_FAIL] = fault
            return await handler(request)
        if fault.action == "delay":
            await asyncio.sleep(fault.delay)
            return await handler(request)
        if fault.action == "hang":
            # The request reaches the front door and goes no further: the client waits,
            # then the connection drops. Tests kill a client mid-write with it.
            await asyncio.sleep(fault.delay)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("fault injected: hung, then dropped")
        if fault.action == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("fault injected: connection reset")
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        raise ServiceError(fault.status, fault.code, f"Fault injected by the twin ({fault.id}).", headers=headers)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or clean_path(request).startswith(auth.open_prefixes):
            return await handler(request)
        try:
            audiences = auth.audiences() if callable(auth.audiences) else auth.audiences
            request[CLAIMS] = dict(issuer.verify(request.headers.get("Authorization"), audiences))
        except TokenError as error:
            headers = {"WWW-Authenticate": auth.challenge} if auth.challenge else {}
            if auth.challenge_for is not None:
                headers = {"WWW-Authenticate": auth.challenge_for(error)}
            if not request.headers.get("Authorization") and auth.challenge:
                # Key Vault's challenge: a bare 401 that tells the client where to get a token.
                return json_response(
                    {
                        "error": {
                            "code": "Unauthorized",
                            "message": "AKV10000: Request is missing a Bearer or PoP token.",
                        }
                    },
                    status=401,
                    headers=headers,
                )
            raise ServiceError(401, error.code, error.message, headers=headers) from error
        if auth.authorize is not None:
            await auth.authorize(request)
        return await handler(request)

    @web.middleware
    async def throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
        if service != "arm" or request.path.startswith("/_twin/"):
            return await handler(request)
        kind = "read" if request.method in ("GET", "HEAD") else "delete" if request.method == "DELETE" else "write"
        match = _SUBSCRIPTION_IN_PATH.match(request.path)
        scope = match.group(1).lower() if match else "tenant"
        principal = str((request.get(CLAIMS) or {}).get("oid", "-"))
        bucket = state.throttle.bucket(scope, principal, kind)
        header = f"x-ms-ratelimit-remaining-{'subscription' if match else 'tenant'}-{kind}s"
        # With throttling on, the twin counts every request as Azure does and refuses an empty
        # bucket. Off, it is a subscription with room to spare: nothing is counted and every
        # answer reports a full bucket, so a client pacing by the header never waits (tests
        # about something else would otherwise wait on a limit they never exceed in Azure).
        if not state.throttle.enabled:
            try:
                response = await handler(request)
            except ServiceError as error:
                error.headers = {**error.headers, header: str(int(bucket.capacity))}
                raise
            response.headers[header] = str(int(bucket.capacity))
            return response
        allowed, wait = bucket.take()
        if not allowed:
            seconds = max(1, math.ceil(wait))
            raise ServiceError(
                429,
                "SubscriptionRequestsThrottled" if match else "TenantRequestsThrottled",
                f"Number of {kind} requests for {'subscription' if match else 'tenant'} '{scope}' and "
                f"principal '{principal}' exceeded the limit. Please try again after '{seconds}' seconds.",
                headers={"Retry-After": str(seconds), header: "0"},
            )
        # ARM's front door counts and reports on every answer, errors (a 404, a 409) included.
        try:
            response = await handler(request)
        except ServiceError as error:
            error.headers = {**error.headers, header: str(int(bucket.tokens))}
            raise
        response.headers[header] = str(int(bucket.tokens))
        return response

    app = web.Application(middlewares=[log_and_shape, faults, authenticate, throttle], client_max_size=64 * 1024**2)
    app[STATE_KEY] = state
    app[SERVICE_KEY] = service
    app[ISSUER_KEY] = issuer
    app[ROUTES_KEY] = []
    app[ROUTE_SHAPES_KEY] = {}
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def state_of(request: web.Request) -> TwinState:
    return request.app[STATE_KEY]


def caller(request: web.Request) -> dict[str, Any]:
    claims = request.get(CLAIMS)
    return dict(claims) if claims else {}


def page(items: list[Any], request: web.Request, *, top: int | None, skip: int, base_url: str) -> dict[str, Any]:
    """ARM paging: `{value, nextLink}` with an absolute nextLink carrying $skip, or no nextLink at the end."""
    window = items[skip : skip + top] if top is not None else items[skip:]
    body: dict[str, Any] = {"value": window, "count": len(items)}
    end = skip + len(window)
    if end < len(items):
        query = [(k, v) for k, v in request.query.items() if k not in ("$skip",)]
        query.append(("$skip", str(end)))
        body["nextLink"] = f"{base_url}{request.path}?{urlencode(query)}"
    return body


def int_param(request: web.Request, name: str, *, minimum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError as error:
        raise ServiceError(400, "InvalidParameter", f"'{name}' must be an integer, got '{raw}'.") from error
    if value < minimum:
        raise ServiceError(400, "InvalidParameter", f"'{name}' must be at least {minimum}, got {value}.")
    return value


def require_fields(body: dict[str, Any], paths: Iterable[str]) -> None:
    """400 naming each missing required field (dotted paths)."""
    missing = []
    for path in paths:
        node: Any = body
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(path)
    if missing:
        raise ServiceError(
            400, "ValidationError", f"One or more fields contain incorrect values: missing {', '.join(missing)}."
        )
