"""Microsoft Sentinel incidents (Microsoft.SecurityInsights) on a Log Analytics workspace.

`/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.OperationalInsights/workspaces/
{ws}/providers/Microsoft.SecurityInsights/incidents[/{incidentId}]`: PUT (201 created / 200
updated), GET, DELETE (200, or 204 when absent), and the list.

As the service does: properties.title, severity (High|Medium|Low|Informational) and status
(New|Active|Closed) are required (enum values match case-insensitively and come back in
their canonical case); closing needs a classification (Undetermined|TruePositive|
BenignPositive|FalsePositive); optimistic concurrency by the body's `etag` (stale: 409
Conflict "Newer version of resource ... exists. Data was not saved", as Sentinel answers)
and by an `If-Match` header (stale: 412 PreconditionFailed; `If-None-Match: *` on an
existing incident: 412). The service assigns incidentNumber (per workspace) and
createdTimeUtc / lastModifiedTimeUtc from the twin clock. The workspace must exist.

List: `$filter` of `properties/<field> <eq|ne|gt|ge|lt|le> <'string'|number|datetime>`
joined by `and`; `$orderby` of `properties/<field> [asc|desc]`, comma separated; `$top`
(1..1000); nextLink carries `$skipToken`. Anything else in those parameters: 400.
Default order: incidentNumber ascending.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from twin.arm import (
    PROVIDER_VERSIONS,
    emit_resource_event,
    iso,
    provider_version_error,
    resource_group_or_404,
    resource_not_found,
    subscription_or_404,
)
from twin.state import TwinState
from twin.web import ServiceError, add_route, json_response, params, read_json, state_of

VERSIONS = frozenset(
    {
        "2020-01-01",
        "2021-04-01",
        "2021-10-01",
        "2022-08-01",
        "2022-11-01",
        "2023-02-01",
        "2023-11-01",
        "2024-03-01",
        "2024-09-01",
        "2025-03-01",
        "2025-06-01",
        "2025-09-01",
    }
)
INCIDENT_TYPE = "Microsoft.SecurityInsights/Incidents"
WORKSPACE_TYPE = "microsoft.operationalinsights/workspaces"
MAX_TOP = 1000
SEVERITIES = ("High", "Medium", "Low", "Informational")
STATUSES = ("New", "Active", "Closed")
CLASSIFICATIONS = ("Undetermined", "TruePositive", "BenignPositive", "FalsePositive")
CLASSIFICATION_REASONS = ("SuspiciousActivity", "SuspiciousButExpected", "IncorrectAlertLogic", "InaccurateData")
OWNER_TYPES = ("Unknown", "User", "Group")
_WRITABLE = (
    "title",
    "description",
    "severity",
    "status",
    "classification",
    "classificationReason",
    "classificationComment",
    "owner",
    "labels",
    "firstActivityTimeUtc",
    "lastActivityTimeUtc",
)

WORKSPACE_PATH = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.OperationalInsights/workspaces/{ws}"
INCIDENTS_PATH = WORKSPACE_PATH + "/providers/Microsoft.SecurityInsights/incidents"


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "BadRequest", message)


def _workspace_id(request: web.Request) -> str:
    p = params(request)
    group = f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}"
    return f"{group}/providers/Microsoft.OperationalInsights/workspaces/{p['ws']}"


def _workspace_or_404(request: web.Request) -> str:
    state = state_of(request)
    p = params(request)
    subscription_or_404(state, p["sub"])
    resource_group_or_404(state, p["sub"], p["rg"])
    workspace = _workspace_id(request)
    found = state.store.get(workspace)
    if found is None or str(found.body.get("type", "")).lower() != WORKSPACE_TYPE:
        raise resource_not_found("Microsoft.OperationalInsights/workspaces", p["ws"], p["rg"])
    return found.id


def _incident_id(workspace: str, incident: str) -> str:
    return f"{workspace}/providers/{INCIDENT_TYPE}/{incident}"


def _incidents(state: TwinState, workspace: str) -> list[dict[str, Any]]:
    return [r.body for r in state.store.children(f"{workspace}/providers/Microsoft.SecurityInsights", "incidents")]


def _bare(etag: str) -> str:
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _enum(value: Any, allowed: tuple[str, ...], field: str) -> str:
    if isinstance(value, str):
        for option in allowed:
            if option.lower() == value.lower():
                return option
    raise _bad(f"The value '{value}' of '{field}' is invalid. Allowed values: {', '.join(allowed)}.")


def _datetime(value: Any, field: str) -> str | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as error:
        raise _bad(f"'{field}' must be a date-time, got '{value}'.") from error
    if parsed.tzinfo is None:
        raise _bad(f"'{field}' must carry a time zone (e.g. 'Z'), got '{value}'.")
    return iso(parsed)


def validate(props: Any) -> dict[str, Any]:
    """The writable properties, checked and normalised as the service does."""
    if not isinstance(props, dict):
        raise _bad("The incident 'properties' are required.")
    title = props.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _bad("The incident 'properties.title' is required.")
    if props.get("severity") is None:
        raise _bad("The incident 'properties.severity' is required.")
    if props.get("status") is None:
        raise _bad("The incident 'properties.status' is required.")
    out: dict[str, Any] = {
        "title": title,
        "description": props.get("description"),
        "severity": _enum(props["severity"], SEVERITIES, "properties.severity"),
        "status": _enum(props["status"], STATUSES, "properties.status"),
    }
    for field, allowed in (("classification", CLASSIFICATIONS), ("classificationReason", CLASSIFICATION_REASONS)):
        if props.get(field) is not None:
            out[field] = _enum(props[field], allowed, f"properties.{field}")
    if props.get("classificationComment") is not None:
        out["classificationComment"] = str(props["classificationComment"])
    if out["status"] == "Closed" and out.get("classification") is None:
        raise _bad("The incident classification is required when the incident status is 'Closed'.")
    owner = props.get("owner") or {}
    if not isinstance(owner, dict):
        raise _bad("'properties.owner' must be an object.")
    out["owner"] = {
        "objectId": owner.get("objectId"),
        "email": owner.get("email"),
        "assignedTo": owner.get("assignedTo"),
        "userPrincipalName": owner.get("userPrincipalName"),
        "ownerType": _enum(owner.get("ownerType", "Unknown"), OWNER_TYPES, "properties.owner.ownerType"),
    }
    labels = props.get("labels") or []
    if not isinstance(labels, list):
        raise _bad("'properties.labels' must be an array.")
    out["labels"] = []
    for i, label in enumerate(labels):
        if not isinstance(label, dict) or not isinstance(label.get("labelName"), str) or not label["labelName"]:
            raise _bad(f"'properties.labels[{i}].labelName' is required.")
        out["labels"].append({"labelName": label["labelName"], "labelType": "User"})
    out["firstActivityTimeUtc"] = _datetime(props.get("firstActivityTimeUtc"), "properties.firstActivityTimeUtc")
    out["lastActivityTimeUtc"] = _datetime(props.get("lastActivityTimeUtc"), "properties.lastActivityTimeUtc")
    return out


def _check_preconditions(request: web.Request, existing_etag: str | None, body_etag: Any, name: str) -> None:
    if_match = request.headers.get("If-Match")
    if if_match is not None and (
        existing_etag is None or (if_match.strip() != "*" and _bare(if_match) != _bare(existing_etag))
    ):
        raise ServiceError(
            412, "PreconditionFailed", f"The If-Match condition ({if_match}) does not match incident '{name}'."
        )
    if request.headers.get("If-None-Match", "").strip() == "*" and existing_etag is not None:
        raise ServiceError(412, "PreconditionFailed", f"The incident '{name}' already exists (If-None-Match: *).")
    stale_body = isinstance(body_etag, str) and body_etag.strip() not in ("", "*")
    if existing_etag is not None and stale_body and _bare(str(body_etag)) != _bare(existing_etag):
        raise ServiceError(409, "Conflict", f"Newer version of resource '{name}' exists. Data was not saved")


# -- handlers --------------------------------------------------------------------------------


async def put_incident(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    workspace = _workspace_or_404(request)
    name = params(request)["incident"]
    body = await read_json(request)
    resource_id = _incident_id(workspace, name)
    existing = state.store.get(resource_id)
    _check_preconditions(request, existing.etag if existing else None, body.get("etag"), name)
    props = validate(body.get("properties"))
    now = iso(state.clock.now())
    if existing is None:
        numbers: dict[str, int] = state.extra.setdefault("sentinel_incident_numbers", {})
        number = numbers.get(workspace.lower(), 0) + 1
        numbers[workspace.lower()] = number
        created = now
    else:
        number = int(existing.body["properties"]["incidentNumber"])
        created = str(existing.body["properties"]["createdTimeUtc"])
    full = {
        **props,
        "lastModifiedTimeUtc": now,
        "createdTimeUtc": created,
        "incidentNumber": number,
        "additionalData": {
            "alertsCount": 0,
            "bookmarksCount": 0,
            "commentsCount": 0,
            "alertProductNames": [],
            "tactics": [],
            "techniques": [],
        },
        "relatedAnalyticRuleIds": [],
        "incidentUrl": f"https://portal.azure.com/#asset/Microsoft_Azure_Security_Insights/Incident{resource_id}",
        "providerName": "Azure Sentinel",
        "providerIncidentId": str(number),
    }
    stored = {"id": resource_id, "name": name, "etag": "", "type": INCIDENT_TYPE, "properties": full}
    resource = state.store.put(resource_id, stored)
    stored["etag"] = resource.etag
    emit_resource_event(request, resource_id, "write")
    return json_response(stored, status=201 if existing is None else 200, headers={"ETag": resource.etag})


async def get_incident(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    workspace = _workspace_or_404(request)
    name = params(request)["incident"]
    found = state.store.get(_incident_id(workspace, name))
    if found is None:
        raise ServiceError(404, "NotFound", f"Incident '{name}' was not found.")
    return json_response(found.body, headers={"ETag": found.etag})


async def delete_incident(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    workspace = _workspace_or_404(request)
    name = params(request)["incident"]
    resource_id = _incident_id(workspace, name)
    existing = state.store.get(resource_id)
    if_match = request.headers.get("If-Match")
    if (
        if_match is not None
        and existing is not None
        and if_match.strip() != "*"
        and _bare(if_match) != _bare(existing.etag)
    ):
        raise ServiceError(412, "PreconditionFailed", f"The If-Match condition ({if_match}) does not match.")
    gone = state.store.delete(resource_id)
    if gone is not None:
        emit_resource_event(request, gone.id, "delete")
    return web.Response(status=200 if gone is not None else 204)


# -- list: $filter, $orderby, $top, $skipToken -------------------------------------------------

_FILTER_TERM = re.compile(
    r"^\s*properties/(?P<field>[A-Za-z]+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
    r"(?P<value>'(?:[^']|'')*'|-?\d+|\d{4}-\d{2}-\d{2}T[0-9:.]+(?:Z|[+-]\d{2}:\d{2}))\s*$"
)
_FILTERABLE = {
    "title",
    "description",
    "severity",
    "status",
    "classification",
    "classificationReason",
    "incidentNumber",
    "createdTimeUtc",
    "lastModifiedTimeUtc",
    "firstActivityTimeUtc",
    "lastActivityTimeUtc",
    "providerName",
    "providerIncidentId",
}
_ORDER_TERM = re.compile(r"^\s*properties/(?P<field>[A-Za-z]+)(?:\s+(?P<dir>asc|desc))?\s*$")


def _comparable(field: str, raw: Any) -> Any:
    if raw is None:
        return None
    if field == "incidentNumber":
        return int(raw)
    if field.endswith("TimeUtc"):
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return str(raw).lower()


def _parse_filter(text: str) -> list[tuple[str, str, Any]]:
    terms = []
    for part in re.split(r"\s+and\s+", text.strip()):
        match = _FILTER_TERM.match(part)
        if match is None:
            raise _bad(
                f"Invalid $filter clause '{part}': the twin supports properties/<field> eq|ne|gt|ge|lt|le <value> "
                "joined by 'and'."
            )
        field = match.group("field")
        if field not in _FILTERABLE:
            raise _bad(f"Invalid $filter: 'properties/{field}' cannot be filtered on.")
        value = match.group("value")
        literal = value[1:-1].replace("''", "'") if value.startswith("'") else value
        try:
            terms.append((field, match.group("op"), _comparable(field, literal)))
        except ValueError as error:
            raise _bad(f"Invalid $filter value {value} for properties/{field}.") from error
    return terms


def _matches(props: dict[str, Any], terms: list[tuple[str, str, Any]]) -> bool:
    for field, op, value in terms:
        actual = _comparable(field, props.get(field))
        if op == "eq":
            ok = actual == value
        elif op == "ne":
            ok = actual != value
        elif actual is None:
            ok = False
        else:
            ok = {"gt": actual > value, "ge": actual >= value, "lt": actual < value, "le": actual <= value}[op]
        if not ok:
            return False
    return True


def _sort_key(field: str) -> Callable[[dict[str, Any]], Any]:
    def key(item: dict[str, Any]) -> Any:
        return _comparable(field, item["properties"][field])

    return key


def _order(items: list[dict[str, Any]], text: str | None) -> list[dict[str, Any]]:
    out = sorted(items, key=lambda i: int(i["properties"]["incidentNumber"]))
    if not text:
        return out
    keys = []
    for part in text.split(","):
        match = _ORDER_TERM.match(part)
        if match is None or match.group("field") not in _FILTERABLE:
            raise _bad(f"Invalid $orderby clause '{part.strip()}': use properties/<field> [asc|desc].")
        keys.append((match.group("field"), match.group("dir") == "desc"))
    for field, descending in reversed(keys):
        present = [i for i in out if i["properties"].get(field) is not None]
        absent = [i for i in out if i["properties"].get(field) is None]
        present.sort(key=_sort_key(field), reverse=descending)
        out = present + absent
    return out


async def list_incidents(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    workspace = _workspace_or_404(request)
    items = _incidents(state, workspace)
    known = {"api-version", "$filter", "$orderby", "$top", "$skipToken"}
    unknown = [k for k in request.query if k not in known]
    if unknown:
        raise _bad(f"Unsupported query parameters: {', '.join(unknown)}.")
    if request.query.get("$filter"):
        terms = _parse_filter(request.query["$filter"])
        items = [i for i in items if _matches(i["properties"], terms)]
    items = _order(items, request.query.get("$orderby"))
    top_raw = request.query.get("$top")
    top = MAX_TOP
    if top_raw is not None:
        try:
            top = int(top_raw)
        except ValueError as error:
            raise _bad(f"'$top' must be an integer, got '{top_raw}'.") from error
        if not 1 <= top <= MAX_TOP:
            raise _bad(f"'$top' must be between 1 and {MAX_TOP}, got {top}.")
    skip = 0
    if request.query.get("$skipToken"):
        try:
            skip = int(base64.urlsafe_b64decode(request.query["$skipToken"].encode()).decode())
        except ValueError as error:
            raise _bad("The $skipToken is invalid.") from error
    window = items[skip : skip + top]
    body: dict[str, Any] = {"value": window}
    if skip + len(window) < len(items):
        query = [(k, v) for k, v in request.query.items() if k != "$skipToken"]
        query.append(("$skipToken", base64.urlsafe_b64encode(str(skip + len(window)).encode()).decode()))
        body["nextLink"] = f"{state.urls['arm']}{request.path}?{urlencode(query)}"
    return json_response(body)


def setup(app: web.Application) -> None:
    PROVIDER_VERSIONS["microsoft.securityinsights"] = VERSIONS
    # A well-formed api-version the provider does not serve: ARM's NoRegisteredProviderFound.
    unserved = provider_version_error("incidents")
    add_route(app, "GET", INCIDENTS_PATH, list_incidents, versions=VERSIONS, version_error=unserved)
    add_route(app, "GET", INCIDENTS_PATH + "/{incident}", get_incident, versions=VERSIONS, version_error=unserved)
    add_route(app, "PUT", INCIDENTS_PATH + "/{incident}", put_incident, versions=VERSIONS, version_error=unserved)
    add_route(app, "DELETE", INCIDENTS_PATH + "/{incident}", delete_incident, versions=VERSIONS, version_error=unserved)
