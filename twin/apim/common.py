"""What every part of the APIM twin shares: api-versions, names, validation errors, If-Match,
the private secret store, events, lookups, paging and the OData $filter subset."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from twin import arm
from twin.arm import WriteContext, resource_event
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    int_param,
    json_response,
    page,
    params,
    state_of,
)

# Microsoft.ApiManagement api-versions Azure serves: the spec's version folders
# (specification/apimanagement/resource-manager/Microsoft.ApiManagement/{stable,preview}/<version>,
# and the TypeSpec's `Versions` in ApiManagement/main.tsp for the newest) from 2021-08-01 on.
# Every earlier one was retired on 30 September 2023 ("API calls using those API versions will
# fail"), so the twin answers them as ARM answers a version the provider does not serve.
# The SDK (5.0.0) sends 2024-05-01; the Azure CLI sends 2022-08-01.
APIM_VERSIONS = frozenset(
    {
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
        "2024-10-01-preview",
        "2025-03-01-preview",
        "2026-03-01-preview",
    }
)
# Published in the specs, retired by Azure (see above): named so a test can show they fail.
RETIRED_APIM_VERSIONS = frozenset(
    {
        "2016-10-10",
        "2017-03-01",
        "2018-01-01",
        "2018-06-01-preview",
        "2019-01-01",
        "2019-12-01",
        "2019-12-01-preview",
        "2020-06-01-preview",
        "2020-12-01",
        "2021-01-01-preview",
        "2021-04-01-preview",
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


SKUS = ("Developer", "Standard", "Premium", "Basic", "Consumption", "Isolated", "BasicV2", "StandardV2")
IDENTITY_TYPES = ("SystemAssigned", "UserAssigned", "SystemAssigned, UserAssigned", "None")
SUBSCRIPTION_STATES = ("suspended", "active", "expired", "submitted", "rejected", "cancelled")
IDENTITY_PROVIDERS = ("facebook", "google", "microsoft", "twitter", "aad", "aadB2C")
PROTOCOLS = ("http", "https", "ws", "wss")
LOGGER_TYPES = ("azureEventHub", "applicationInsights", "azureMonitor")
DIAGNOSTIC_IDS = ("applicationinsights", "azuremonitor")
BACKUP_ACCESS_TYPES = ("AccessKey", "SystemAssignedManagedIdentity", "UserAssignedManagedIdentity")


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


def _deep(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(value))
    return copied


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
