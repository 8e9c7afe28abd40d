"""Azure Resource Graph: `POST /providers/Microsoft.ResourceGraph/resources`.

Rows are the tracked resources in `state.store` (ids `/subscriptions/../resourceGroups/../
providers/{ns}/{type}/{name}`; child and extension resources are not in the `resources`
table), restricted to the request's subscriptions (all subscriptions when none are given).
As in Resource Graph, `type`, `location` and `resourceGroup` come back lowercase.

Table `resourcecontainers` holds the subscriptions (type microsoft.resources/subscriptions,
id `/subscriptions/{id}`, name the display name) and their resource groups (type
microsoft.resources/subscriptions/resourcegroups), as Resource Graph's table of the same
name does (learn.microsoft.com/azure/governance/resource-graph/reference/supported-tables-resources).
Both tables answer only for the request's subscriptions that exist in the twin: a
subscription the twin does not have is left out without an error, as Resource Graph leaves
out subscriptions the caller cannot read ("without at least read permissions to the Azure
object or object group, results aren't returned",
learn.microsoft.com/azure/governance/resource-graph/overview#permissions-in-azure-resource-graph).

The query language is the small subset the product sends, parsed here (not full KQL):

    resources | resourcecontainers
    | where <cond> [and <cond> ...]        (any number of where clauses)
    | project <column>, <column>, ...      (optional, last)

where <cond> is `<field> <op> <value>`: field one of id, name, type, kind, location,
resourceGroup, subscriptionId, tenantId, managedBy, `tags['k']`, `tags["k"]` or `tags.k`;
op one of == != =~ !~ (value: a quoted string) or in, in~, !in, !in~ (value: a parenthesised
list of quoted strings). Column names are case-sensitive, as in KQL. Anything else is a 400
`BadRequest` naming the part the twin does not support.

Paging: options.$top (1..1000, default 1000 rows a page), $skip, $skipToken (opaque, bound to
the query and scopes). Without an `id` column a result cannot be paged: the rest is cut off
and `resultTruncated` is "true". Quota: 15 queries per 5 s per principal
(x-ms-user-quota-remaining, x-ms-user-quota-resets-after); over it, 429 RateLimiting when
the twin's throttling is enabled.

Estate section `graph_resources: [{id | name+type, type, location?, tags?, properties?,
sku?, identity?, kind?}]`: puts plain resources into the store (any type), for tests that
need resources no other twin module serves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from twin import rbac
from twin.arm import PROVIDER_VERSIONS, provider_version_error
from twin.estate import EstateError, SeedContext, register_seeder
from twin.state import TwinState
from twin.web import CLAIMS, ServiceError, add_route, json_response, read_json, state_of

VERSIONS = frozenset(
    {"2019-04-01", "2020-04-01-preview", "2021-03-01", "2021-06-01-preview", "2022-10-01", "2024-04-01"}
)
MAX_TOP = 1000
QUOTA = 15
QUOTA_WINDOW = 5.0
COLUMNS = (
    "id",
    "name",
    "type",
    "tenantId",
    "kind",
    "location",
    "resourceGroup",
    "subscriptionId",
    "managedBy",
    "sku",
    "plan",
    "properties",
    "tags",
    "identity",
    "zones",
    "extendedLocation",
)
_FILTER_FIELDS = ("id", "name", "type", "kind", "location", "resourceGroup", "subscriptionId", "tenantId", "managedBy")
_COLUMN_TYPES = {
    "sku": "object",
    "plan": "object",
    "properties": "object",
    "tags": "object",
    "identity": "object",
    "zones": "object",
    "extendedLocation": "object",
}
_TRACKED = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/[^/]+/[^/]+/[^/]+$", re.IGNORECASE)


class QueryError(Exception):
    """The query uses something the twin's Resource Graph does not support (or is malformed)."""


# -- the query subset ------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>!in~|!in\b|in~|\bin\b|==|!=|=~|!~)
      | (?P<punct>[|(),\[\].])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<other>\S+)
    )""",
    re.VERBOSE,
)


@dataclass
class Condition:
    field: str  # a column, or "tags.<key>"
    op: str
    values: list[str]

    def test(self, row: dict[str, Any]) -> bool:
        if self.field.startswith("tags."):
            tags = row.get("tags") or {}
            actual = tags.get(self.field[5:])
        else:
            actual = row.get(self.field)
        if actual is None:
            # KQL: a missing value compares as empty; only negations can be true.
            actual = ""
        text = str(actual)
        insensitive = self.op in ("=~", "!~", "in~", "!in~")
        hit = text.lower() in [v.lower() for v in self.values] if insensitive else text in self.values
        return not hit if self.op.startswith("!") else hit


TABLES = ("resources", "resourcecontainers")


@dataclass
class Query:
    table: str = "resources"
    conditions: list[Condition] = field(default_factory=list)
    project: list[str] | None = None

    def columns(self) -> list[str]:
        return list(self.project) if self.project is not None else list(COLUMNS)


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise QueryError("unexpected end of query")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        _kind, text = self.take()
        if text != value:
            raise QueryError(f"expected '{value}' but found '{text}'")

    def rest(self) -> str:
        return " ".join(text for _, text in self.tokens[self.pos :])

    def parse(self) -> Query:
        kind, text = self.take()
        if kind != "word" or text.lower() not in TABLES:
            raise QueryError(f"the table '{text}' is not supported (only {', '.join(repr(t) for t in TABLES)})")
        query = Query(table=text.lower())
        while self.peek() is not None:
            self.expect("|")
            kind, op = self.take()
            if query.project is not None:
                raise QueryError(f"the operator '{op}' after 'project' is not supported")
            if op == "where":
                query.conditions.extend(self.conditions())
            elif op == "project":
                query.project = self.projection()
            else:
                raise QueryError(f"the operator '{op}' is not supported (only 'where' and 'project')")
        return query

    def conditions(self) -> list[Condition]:
        found = [self.condition()]
        while (token := self.peek()) is not None and token[1] != "|":
            _kind, text = self.take()
            if text != "and":
                raise QueryError(f"'{text} {self.rest()}' is not supported (conditions join with 'and' only)")
            found.append(self.condition())
        return found

    def condition(self) -> Condition:
        name = self.field()
        kind, op = self.take()
        if kind != "op":
            raise QueryError(f"the operator '{op}' is not supported (use ==, !=, =~, !~, in, in~, !in, !in~)")
        if op.lstrip("!").startswith("in"):
            self.expect("(")
            values = []
            while True:
                kind, text = self.take()
                if kind != "string":
                    raise QueryError(f"'{text}' is not supported in an 'in' list (quoted strings only)")
                values.append(_unquote(text))
                kind, text = self.take()
                if text == ")":
                    break
                if text != ",":
                    raise QueryError(f"expected ',' or ')' but found '{text}'")
            return Condition(name, op, values)
        kind, text = self.take()
        if kind != "string":
            raise QueryError(f"the value '{text}' is not supported (quoted strings only)")
        return Condition(name, op, [_unquote(text)])

    def field(self) -> str:
        kind, text = self.take()
        if kind != "word":
            raise QueryError(f"'{text}' is not a column")
        if text == "tags":
            kind, punct = self.take()
            if punct == ".":
                kind, key = self.take()
                if kind != "word":
                    raise QueryError(f"'tags.{key}' is not supported")
                return f"tags.{key}"
            if punct == "[":
                kind, key = self.take()
                if kind != "string":
                    raise QueryError(f"'tags[{key}]' is not supported (a quoted key is needed)")
                self.expect("]")
                return f"tags.{_unquote(key)}"
            raise QueryError(f"'tags {punct}' is not supported (use tags['key'] or tags.key)")
        if text not in _FILTER_FIELDS:
            if text.lower() in [f.lower() for f in (*_FILTER_FIELDS, *COLUMNS)]:
                raise QueryError(
                    f"Failed to resolve scalar expression named '{text}' (column names are case-sensitive)"
                )
            raise QueryError(f"filtering on '{text}' is not supported")
        return text

    def projection(self) -> list[str]:
        columns = []
        while True:
            kind, text = self.take()
            if kind != "word" or text not in COLUMNS:
                raise QueryError(f"projecting '{text}' is not supported (columns: {', '.join(COLUMNS)})")
            if text in columns:
                raise QueryError(f"the column '{text}' is projected twice")
            columns.append(text)
            token = self.peek()
            if token is None or token[1] == "|":
                return columns
            self.expect(",")


def parse_query(text: str) -> Query:
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the query is empty")
    return _Parser(text).parse()


# -- rows ------------------------------------------------------------------------------------


def _row(state: TwinState, resource_id: str, body: dict[str, Any]) -> dict[str, Any] | None:
    match = _TRACKED.match(resource_id)
    if match is None or not body.get("type"):
        return None
    return {
        "id": resource_id,
        "name": body.get("name") or resource_id.rsplit("/", 1)[-1],
        "type": str(body["type"]).lower(),
        "tenantId": state.tenant_id,
        "kind": body.get("kind") or "",
        "location": str(body.get("location") or "").lower().replace(" ", ""),
        "resourceGroup": match.group(2).lower(),
        "subscriptionId": match.group(1),
        "managedBy": body.get("managedBy") or "",
        "sku": body.get("sku"),
        "plan": body.get("plan"),
        "properties": body.get("properties"),
        "tags": body.get("tags") or {},
        "identity": body.get("identity"),
        "zones": body.get("zones"),
        "extendedLocation": body.get("extendedLocation"),
    }


def _container(state: TwinState, sub_id: str, rtype: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        tenantId=state.tenant_id, kind="", location="", resourceGroup="", managedBy="", tags={}, subscriptionId=sub_id
    )
    row.update(type=rtype, **values)
    return row


def _containers(state: TwinState) -> list[dict[str, Any]]:
    """The subscriptions and resource groups, as Resource Graph's resourcecontainers table has them."""
    rows = []
    for sub in state.subscriptions.values():
        sub_id = sub["subscriptionId"]
        rows.append(
            _container(
                state,
                sub_id,
                "microsoft.resources/subscriptions",
                id=f"/subscriptions/{sub_id}",
                name=sub.get("displayName") or sub_id,
                properties={"state": "Enabled"},
            )
        )
        for group in sub["resourceGroups"].values():
            rows.append(
                _container(
                    state,
                    sub_id,
                    "microsoft.resources/subscriptions/resourcegroups",
                    id=f"/subscriptions/{sub_id}/resourceGroups/{group['name']}",
                    name=group["name"],
                    location=str(group.get("location") or "").lower().replace(" ", ""),
                    resourceGroup=str(group["name"]).lower(),
                    tags=dict(group.get("tags") or {}),
                    properties={"provisioningState": "Succeeded"},
                )
            )
    return rows


GRAPH_ACTION = "Microsoft.ResourceGraph/resources/read"


def readable(state: TwinState, object_id: str | None, row: dict[str, Any]) -> bool:
    """Whether the caller sees a row: read access to the row's resource ("without at least read
    permissions to the Azure object or object group, results aren't returned", Resource Graph
    overview, "Permissions in Azure Resource Graph"), and `Microsoft.ResourceGraph/resources/read`
    ("Submit a query on resources within specified subscriptions", Azure permissions for
    Management and governance) at the row's scope (Reader's `*/read` holds it). The docs do not
    say how Resource Graph treats a caller without the latter; the twin leaves those rows out,
    never a 403, so a role that forgets it shows as resources missing.

    The rule holds for container rows too: a subscription row needs
    `Microsoft.Resources/subscriptions/read` on the subscription, a resource group row
    `.../resourceGroups/read` on the group. (ARM's own subscription list is kinder: it shows a
    subscription to whoever holds any role in it, `arm.list_subscriptions`.)"""
    if not rbac.allowed(state, object_id, GRAPH_ACTION, str(row["id"])):
        return False
    return rbac.allowed(state, object_id, f"{row['type']}/read", str(row["id"]))


def rows_for(
    state: TwinState, subscriptions: list[str] | None, query: Query, *, caller: str | None = None
) -> list[dict[str, Any]]:
    """The rows of the query; with `caller` (an object id) only those it may read (RBAC)."""
    wanted = {s.lower() for s in subscriptions} if subscriptions else set(state.subscriptions)
    if query.table == "resourcecontainers":
        candidates = _containers(state)
    else:
        candidates = [
            row
            for resource in state.store.resources.values()
            if (row := _row(state, resource.id, resource.body)) is not None
        ]
    out = [
        row
        for row in candidates
        if row["subscriptionId"].lower() in wanted
        and all(c.test(row) for c in query.conditions)
        and (caller is None or readable(state, caller, row))
    ]
    out.sort(key=lambda r: str(r["id"]).lower())
    return out


# -- the endpoint ----------------------------------------------------------------------------


def _bad_query(message: str) -> ServiceError:
    return ServiceError(
        400,
        "BadRequest",
        f"Query is invalid: {message}.",
        details=[
            {
                "code": "InvalidQuery",
                "message": "Query is invalid. Please refer to the documentation for the Azure Resource Graph "
                "service and fix the error before retrying.",
            },
            {"code": "UnsupportedQuery", "message": message},
        ],
    )


def _token_for(query: str, scopes: list[str], skip: int, top: int) -> str:
    digest = hashlib.sha256((query + "\n" + ",".join(sorted(s.lower() for s in scopes))).encode()).hexdigest()[:16]
    raw = json.dumps({"skip": skip, "top": top, "q": digest}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _read_token(token: Any, query: str, scopes: list[str]) -> tuple[int, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(str(token).encode()))
        skip, top, digest = int(data["skip"]), int(data["top"]), str(data["q"])
    except (ValueError, KeyError, TypeError) as error:
        raise ServiceError(400, "BadRequest", "The $skipToken is invalid.") from error
    expected = json.loads(base64.urlsafe_b64decode(_token_for(query, scopes, 0, 0)))["q"]
    if digest != expected:
        raise ServiceError(
            400, "BadRequest", "The $skipToken does not belong to this query and scope: send the same query and scopes."
        )
    return skip, top


def _quota(request: web.Request) -> dict[str, str]:
    state = state_of(request)
    principal = str((request.get(CLAIMS) or {}).get("oid", "-"))
    windows: dict[str, list[float]] = state.extra.setdefault("graph_quota", {})
    now = time.monotonic()
    window = windows.get(principal)
    if window is None or now - window[0] >= QUOTA_WINDOW:
        window = [now, 0.0]
        windows[principal] = window
    resets = max(0.0, QUOTA_WINDOW - (now - window[0]))
    reset_text = f"00:00:{resets:06.3f}"
    if window[1] >= QUOTA and state.throttle.enabled:
        raise ServiceError(
            429,
            "RateLimiting",
            "Please provide below info when asking for support: the user quota of Resource Graph queries is "
            f"exhausted; retry after {resets:.1f} seconds.",
            headers={
                "x-ms-user-quota-remaining": "0",
                "x-ms-user-quota-resets-after": reset_text,
                "Retry-After": str(max(1, int(resets + 0.999))),
            },
        )
    window[1] += 1
    return {
        "x-ms-user-quota-remaining": str(max(0, QUOTA - int(window[1]))),
        "x-ms-user-quota-resets-after": reset_text,
    }


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ServiceError(400, "BadRequest", "'options' must be an object.")
    unknown = set(options) - {
        "$top",
        "$skip",
        "$skipToken",
        "resultFormat",
        "allowPartialScopes",
        "authorizationScopeFilter",
    }
    if unknown:
        raise ServiceError(400, "BadRequest", f"Unknown query options {sorted(unknown)}.")
    top = options.get("$top")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_TOP):
        raise ServiceError(400, "BadRequest", f"'$top' must be an integer between 1 and {MAX_TOP}, got {top!r}.")
    skip = options.get("$skip")
    if skip is not None and (not isinstance(skip, int) or isinstance(skip, bool) or skip < 0):
        raise ServiceError(400, "BadRequest", f"'$skip' must be an integer >= 0, got {skip!r}.")
    fmt = options.get("resultFormat", "objectArray")
    if fmt not in ("objectArray", "table"):
        raise ServiceError(400, "BadRequest", f"'resultFormat' must be 'objectArray' or 'table', got {fmt!r}.")
    return options


async def query_resources(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await read_json(request)
    headers = _quota(request)
    text = body.get("query")
    if not isinstance(text, str) or not text.strip():
        raise ServiceError(400, "BadRequest", "The 'query' property is required.")
    if body.get("managementGroups"):
        raise _bad_query("management group scopes are not supported by the twin (it has no management groups)")
    if body.get("facets"):
        raise _bad_query("facets are not supported by the twin")
    subscriptions = body.get("subscriptions") or []
    if not isinstance(subscriptions, list) or not all(isinstance(s, str) for s in subscriptions):
        raise ServiceError(400, "BadRequest", "'subscriptions' must be an array of subscription ids.")
    options = _options(body)
    try:
        query = parse_query(text)
    except QueryError as error:
        raise _bad_query(str(error)) from error
    rows = rows_for(state, subscriptions, query, caller=str((request.get(CLAIMS) or {}).get("oid") or ""))
    columns = query.columns()
    top = options.get("$top")
    skip = options.get("$skip")
    if options.get("$skipToken"):
        token_skip, token_top = _read_token(options["$skipToken"], text, subscriptions)
        skip = token_skip if skip is None else skip
        top = token_top if top is None else top
    skip = skip or 0
    size = top or MAX_TOP
    window = rows[skip : skip + size]
    more = skip + len(window) < len(rows)
    response: dict[str, Any] = {"totalRecords": len(rows), "count": len(window), "resultTruncated": "false"}
    if more:
        if "id" in columns:
            response["$skipToken"] = _token_for(text, subscriptions, skip + len(window), size)
        else:
            # Resource Graph cannot page a result without ids: it cuts it off.
            response["resultTruncated"] = "true"
    projected = [{c: r[c] for c in columns} for r in window]
    if options.get("resultFormat", "objectArray") == "table":
        response["data"] = {
            "columns": [{"name": c, "type": _COLUMN_TYPES.get(c, "string")} for c in columns],
            "rows": [[r[c] for c in columns] for r in projected],
        }
    else:
        response["data"] = projected
    response["facets"] = []
    return json_response(response, headers=headers)


def setup(app: web.Application) -> None:
    PROVIDER_VERSIONS["microsoft.resourcegraph"] = VERSIONS
    add_route(
        app,
        "POST",
        "/providers/Microsoft.ResourceGraph/resources",
        query_resources,
        versions=VERSIONS,
        version_error=provider_version_error("resources"),  # ARM's answer for a provider's unserved one
    )


# -- seeding ---------------------------------------------------------------------------------

_TYPE = re.compile(r"^[A-Za-z0-9.]+/[A-Za-z0-9]+$")
_SEED_KEYS = {"id", "name", "type", "location", "tags", "properties", "sku", "identity", "kind", "zones", "managedBy"}


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    for i, item in enumerate(items):
        where = f"[{i}]"
        if not isinstance(item, dict):
            raise EstateError(f"{where}: expected a mapping")
        unknown = set(item) - _SEED_KEYS
        if unknown:
            raise EstateError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_SEED_KEYS))})")
        rtype = item.get("type")
        if not isinstance(rtype, str) or not _TYPE.match(rtype):
            raise EstateError(f"{where}.type: a resource type like 'Microsoft.ApiManagement/service' is required")
        resource_id = item.get("id")
        if resource_id is None:
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise EstateError(f"{where}: 'id' or 'name' is required")
            resource_id = f"{ctx.group_id}/providers/{rtype}/{name}"
        if not isinstance(resource_id, str) or not resource_id.lower().startswith(ctx.group_id.lower() + "/providers/"):
            raise EstateError(f"{where}.id: must be a resource in {ctx.group_id}, got {resource_id!r}")
        match = _TRACKED.match(resource_id)
        if match is None:
            raise EstateError(
                f"{where}.id: '{resource_id}' is not a resource id '.../providers/{{ns}}/{{type}}/{{name}}'"
            )
        id_type = "/".join(resource_id.split("/")[6:8])
        if id_type.lower() != rtype.lower():
            raise EstateError(f"{where}.type: '{rtype}' does not match the id's type '{id_type}'")
        tags = item.get("tags") or {}
        if not isinstance(tags, dict):
            raise EstateError(f"{where}.tags: expected a mapping")
        body: dict[str, Any] = {
            "id": resource_id,
            "name": resource_id.rsplit("/", 1)[-1],
            "type": rtype,
            "location": item.get("location", ctx.location),
            "tags": {str(k): str(v) for k, v in tags.items()},
            "properties": item.get("properties") or {},
        }
        for key in ("sku", "identity", "kind", "zones", "managedBy"):
            if key in item:
                body[key] = item[key]
        state.store.put(resource_id, body)


register_seeder("graph_resources", seed)
