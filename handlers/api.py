"""The HTTP API (FastAPI), served by function_app.py through `func.AsgiFunctionApp`.

An adapter like function_app.py: it authenticates the caller, validates input, calls
handlers/manual.py and renders JSON. Routes live under `/api` (the Functions host's
routePrefix; the ASGI function is the catch-all `api/{*route}`):

    GET  /api/instances                                         Read
    GET  /api/instances/{subscription}/{resourceGroup}/{name}/findings[?fresh=true]   Read
    POST /api/instances/{subscription}/{resourceGroup}/{name}/scans          Operate  -> 202
    POST /api/instances/{subscription}/{resourceGroup}/{name}/remediations   Operate (Admin to force)
         {"dry_run": true}  -> 200, the plan;  {"dry_run": false} -> 202
    GET  /api/operations/{id}                                   Read
    GET  /api/openapi.json                                      Read

An instance is named by subscription, resource group and name (not a URL-encoded ARM id:
the Functions host and azure.functions' ASGI bridge decode `%2F` before the app sees the
path, so an encoded id would arrive as many segments).

Auth: the host checks the function key (AuthLevel.FUNCTION); every route here also needs
an Entra ID bearer token (shared/entra.py) — 401 with `WWW-Authenticate` when it is
missing or not acceptable, 403 when its roles do not allow the request. Errors are JSON
`{"error": {"code", "message"}}`: 403 out of scope, 404 unknown, 413 body over
`MAX_BODY_BYTES`, 422 naming the field, 503 not configured or a transient failure; never
a stack trace.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handlers.context import AppContext
from handlers.manual import (
    BackgroundWork,
    ForbiddenError,
    InvalidRequestError,
    ManualDeps,
    RemediationAsk,
    apply,
    authorize,
    backup_now,
    check_rules,
    instance_findings,
    list_instances,
    locate,
    plan,
    restore_test_now,
    scan_instance,
    start,
)
from handlers.rotate_keys import RotateKeysRequest, rotate_keys, rotation_json
from shared import __version__
from shared.entra import AuthError, Caller, Role
from shared.errors import NotFoundError, OutOfScopeError, RemediatorError, SettingsError, TransientError
from shared.inventory import InstanceRef
from shared.journal import Trigger, TriggerKind
from shared.operations import Operation, OperationKind
from shared.policy import PolicyError

LOG = logging.getLogger("apim_remediator.api")

MAX_BODY_BYTES = 16 * 1024
REALM = "apim-remediator"
POLL_AFTER_SECONDS = "2"

SubscriptionId = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="subscription id (GUID)",
    ),
]
ResourceGroup = Annotated[str, Path(pattern=r"^[-\w._()]{1,90}$", description="resource group name")]
ServiceName = Annotated[
    str, Path(pattern=r"^[a-zA-Z](?:[a-zA-Z0-9-]{0,48}[a-zA-Z0-9])?$", description="APIM service name")
]
RuleIds = Annotated[list[Annotated[str, Field(max_length=20)]], Field(max_length=64)]


class RemediationBody(BaseModel):
    """A remediation request: a plan unless `dry_run` is false."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(True, description="true (default): answer with the plan; false: apply (202)")
    rule_ids: RuleIds = Field(default_factory=list, description="narrow to these rules; empty: every rule")
    force_rule_ids: RuleIds = Field(
        default_factory=list,
        description="Remediator.Admin only: apply these rules although the policy keeps them in detect mode",
    )


class KeyRotationBody(BaseModel):
    """A key rotation request: a plan unless `dry_run` is false."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(True, description="true (default): answer with the plan; false: rotate (202)")
    subscriptions: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=1000,
        description="APIM subscriptions (names or ARM ids); empty: what KEY-002/003/004 flag",
    )
    stale: bool = Field(False, description="only keys past their maximum age or expiry (KEY-003)")
    revoke: bool = Field(False, description="Remediator.Admin only: a leaked key; rotate, then regenerate the old one")
    grace_seconds: float = Field(0.0, ge=0, le=3600, description="with revoke: how long the old key keeps working")


class NotConfigured(RemediatorError):
    """The API's settings (or the policy) are missing or broken: 503; the log says what."""


def _app_context(app: FastAPI) -> AppContext:
    try:
        context: AppContext = app.state.context()
    except (SettingsError, PolicyError) as error:
        LOG.error("the HTTP API is misconfigured: %s", error)
        raise NotConfigured() from error
    return context


async def authenticated(request: Request) -> Caller:
    """The caller of every route: a valid bearer token (AuthError -> 401)."""
    try:
        validator = _app_context(request.app).token_validator()
    except SettingsError as error:
        LOG.error("the HTTP API is not configured: %s", error)
        raise NotConfigured() from error
    return await validator.validate(request.headers.get("authorization"))


def _needs(role: Role) -> Callable[[Caller], Awaitable[Caller]]:
    async def check(who: Annotated[Caller, Depends(authenticated)]) -> Caller:
        if not who.has(role):
            raise ForbiddenError(f"this request needs the {role.value} role")
        return who

    return check


Reader = Annotated[Caller, Depends(_needs(Role.READ))]
Operator = Annotated[Caller, Depends(_needs(Role.OPERATE))]
Admin = Annotated[Caller, Depends(_needs(Role.ADMIN))]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before anything parses them: by
    Content-Length when declared, else while reading."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(413, "RequestTooLarge", f"the request body is over {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ContainErrors:
    """An exception no handler took (a bug) becomes a JSON 500 with a reference to the log,
    never a stack trace, and is not re-raised: under the Functions host a raised error
    would fail the invocation instead of answering."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            reference = str(uuid.uuid4())
            LOG.exception("unexpected error (reference %s)", reference)
            if not started and scope["type"] == "http":
                message = f"internal error; reference {reference} in the Function App's log"
                await _error(500, "InternalError", message)(scope, receive, send)


def create_api(get_context: Callable[[], AppContext]) -> FastAPI:
    """The API app over one process's AppContext (`get_context`: the composition root's,
    built on first use; a SettingsError or PolicyError from it answers 503)."""
    background = BackgroundWork()
    api = FastAPI(
        title="apim-remediator",
        version=__version__,
        description=__doc__,
        openapi_url=None,  # served below, behind the same authentication as every route
        docs_url=None,
        redoc_url=None,
    )
    api.state.background = background
    api.state.context = get_context

    def app_context() -> AppContext:
        return _app_context(api)

    def deps() -> ManualDeps:
        return app_context().manual_deps()

    async def instance(sub: str, rg: str, name: str) -> tuple[InstanceRef, ManualDeps]:
        found = deps()
        return await locate(sub, rg, name, found), found

    def accepted(request: Request, operation: Operation) -> JSONResponse:
        url = str(request.base_url).rstrip("/") + f"/api/operations/{operation.id}"
        return JSONResponse(
            operation.public() | {"url": url},
            status_code=202,
            headers={"Location": url, "Retry-After": POLL_AFTER_SECONDS},
        )

    @api.get("/api/openapi.json", include_in_schema=False)
    async def openapi(who: Reader) -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.get("/api/instances", summary="APIM instances in scope, with stored finding counts")
    async def get_instances(who: Reader) -> JSONResponse:
        return JSONResponse(await list_instances(deps()))

    @api.get(
        "/api/instances/{subscription_id}/{resource_group}/{name}/findings",
        summary="An instance's findings: stored by the last reconcile, or a fresh read-only scan",
    )
    async def get_findings(
        who: Reader,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
        fresh: Annotated[bool, Query(description="scan now (read-only) instead of the stored findings")] = False,
    ) -> JSONResponse:
        ref, found = await instance(subscription_id, resource_group, name)
        return JSONResponse(await instance_findings(ref, found, fresh=fresh))

    @api.post(
        "/api/instances/{subscription_id}/{resource_group}/{name}/scans",
        status_code=202,
        summary="Start a read-only scan; poll the operation for the result",
    )
    async def post_scan(
        request: Request,
        who: Operator,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
    ) -> JSONResponse:
        ref, found = await instance(subscription_id, resource_group, name)
        operation = await start(
            OperationKind.SCAN, ref, who, lambda: scan_instance(ref, found), found, request.app.state.background
        )
        return accepted(request, operation)

    @api.post(
        "/api/instances/{subscription_id}/{resource_group}/{name}/remediations",
        summary="Plan a remediation (dry run, the default: 200 with the plan) or apply it (202, an operation)",
    )
    async def post_remediation(
        request: Request,
        who: Operator,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
        body: RemediationBody,
    ) -> JSONResponse:
        ask = RemediationAsk(
            dry_run=body.dry_run, rule_ids=tuple(body.rule_ids), force_rule_ids=tuple(body.force_rule_ids)
        )
        policy = app_context().policy
        check_rules(ask, policy)
        authorize(ask, who, policy)
        ref, found = await instance(subscription_id, resource_group, name)
        if ask.dry_run:
            return JSONResponse(await plan(ref, ask, who, found))
        operation = await start(
            OperationKind.APPLY, ref, who, lambda: apply(ref, ask, who, found), found, request.app.state.background
        )
        return accepted(request, operation)

    @api.post(
        "/api/instances/{subscription_id}/{resource_group}/{name}/backups",
        status_code=202,
        summary="Back the instance up now (native Backup LRO, manifest, retention); poll the operation",
    )
    async def post_backup(
        request: Request,
        who: Operator,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
    ) -> JSONResponse:
        ref, found = await instance(subscription_id, resource_group, name)
        jobs = app_context().backup_deps()
        operation = await start(
            OperationKind.BACKUP, ref, who, lambda: backup_now(ref, jobs), found, request.app.state.background
        )
        return accepted(request, operation)

    @api.post(
        "/api/instances/{subscription_id}/{resource_group}/{name}/restore-tests",
        status_code=202,
        summary="Test-restore the latest backup into the designated target (overwrites it: Admin); poll it",
    )
    async def post_restore_test(
        request: Request,
        who: Admin,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
    ) -> JSONResponse:
        ref, found = await instance(subscription_id, resource_group, name)
        jobs = app_context().backup_deps()
        operation = await start(
            OperationKind.RESTORE_TEST,
            ref,
            who,
            lambda: restore_test_now(ref, jobs),
            found,
            request.app.state.background,
        )
        return accepted(request, operation)

    @api.post(
        "/api/instances/{subscription_id}/{resource_group}/{name}/key-rotations",
        summary="Plan key rotations (dry run, the default: 200) or rotate through the Key Vault ledger (202)",
    )
    async def post_key_rotation(
        request: Request,
        who: Operator,
        subscription_id: SubscriptionId,
        resource_group: ResourceGroup,
        name: ServiceName,
        body: KeyRotationBody,
    ) -> JSONResponse:
        if body.revoke and not body.dry_run and not who.has(Role.ADMIN):
            raise ForbiddenError(f"revoking a key (it regenerates the key in use after the grace period) needs the "
                                 f"{Role.ADMIN.value} role")  # fmt: skip
        ref, found = await instance(subscription_id, resource_group, name)
        ask = RotateKeysRequest(
            instance_id=ref.id,
            trigger=Trigger(TriggerKind.HTTP, who.trigger_detail),
            subscriptions=tuple(body.subscriptions),
            stale=body.stale,
            revoke=body.revoke,
            apply=not body.dry_run,
            grace_seconds=body.grace_seconds,
        )
        rotation = app_context().rotation_deps()
        if body.dry_run:
            return JSONResponse(rotation_json(await rotate_keys(ask, rotation)))

        async def work() -> dict[str, Any]:
            return rotation_json(await rotate_keys(ask, rotation))

        operation = await start(OperationKind.ROTATE, ref, who, work, found, request.app.state.background)
        return accepted(request, operation)

    @api.get("/api/operations/{operation_id}", summary="A scan's or an apply's status and, once done, its result")
    async def get_operation(who: Reader, operation_id: Annotated[str, Path(max_length=64)]) -> JSONResponse:
        operation = await deps().operations.get(operation_id)
        return JSONResponse(operation.public())

    _handle_errors(api)
    api.add_middleware(ContainErrors)  # inside: what no handler took becomes a JSON 500
    api.add_middleware(BodyLimit)  # outermost of ours: nothing parses an oversized body
    return api


def _handle_errors(api: FastAPI) -> None:
    @api.exception_handler(AuthError)
    async def unauthenticated(request: Request, error: AuthError) -> JSONResponse:
        return _error(401, "Unauthenticated", error.description, headers={"WWW-Authenticate": error.challenge(REALM)})

    @api.exception_handler(ForbiddenError)
    async def forbidden(request: Request, error: ForbiddenError) -> JSONResponse:
        challenge = f'Bearer realm="{REALM}", error="insufficient_scope"'
        return _error(403, "Forbidden", str(error), headers={"WWW-Authenticate": challenge})

    @api.exception_handler(OutOfScopeError)
    async def out_of_scope(request: Request, error: OutOfScopeError) -> JSONResponse:
        return _error(403, "OutOfScope", str(error))

    @api.exception_handler(NotFoundError)
    async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
        return _error(404, "NotFound", str(error))

    @api.exception_handler(InvalidRequestError)
    async def invalid(request: Request, error: InvalidRequestError) -> JSONResponse:
        return JSONResponse(
            {
                "error": {"code": "InvalidRequest", "message": str(error)},
                "fields": [{"field": error.field, "message": error.message}],
            },
            status_code=422,
        )

    @api.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = [
            # A JSON syntax error's location ends in a character offset: the field is the body.
            {"field": "body", "message": "not valid JSON"}
            if problem.get("type") == "json_invalid"
            else {"field": _field_name(problem.get("loc", ())), "message": str(problem.get("msg", ""))}
            for problem in error.errors()
        ]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "the request is malformed"
        # The caller's input is not echoed back (FastAPI's default does): it may be large or hostile.
        return JSONResponse(
            {"error": {"code": "InvalidRequest", "message": message}, "fields": fields}, status_code=422
        )

    @api.exception_handler(NotConfigured)
    async def not_configured(request: Request, error: NotConfigured) -> JSONResponse:
        return _error(503, "NotConfigured", "the HTTP API is not configured; the Function App's log says what is wrong")

    @api.exception_handler(TransientError)
    async def transient(request: Request, error: TransientError) -> JSONResponse:
        LOG.warning("transient failure: %s", error)
        return _error(503, "TemporarilyUnavailable", str(error), headers={"Retry-After": "10"})

    @api.exception_handler(RemediatorError)
    async def failed(request: Request, error: RemediatorError) -> JSONResponse:
        LOG.error("request failed: %s", error)
        return _error(500, "Failed", str(error))  # the product's own message: names and ids, no secrets

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, "NotFound" if error.status_code == 404 else "HttpError", str(error.detail))


def _field_name(loc: Any) -> str:
    """`body.rule_ids[0]`, `path.name`, `query.fresh` from a validation error's location."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "request"
