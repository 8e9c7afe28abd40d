"""Azure Monitor diagnostic settings (Microsoft.Insights) on any ARM resource.

`{resourceUri}/providers/Microsoft.Insights/diagnosticSettings/{name}`: GET / PUT / DELETE,
and the list (`{value}`, never a nextLink). Settings live in `state.store` as extension
resources under their target, so deleting the target removes them.

What is checked, as Azure Monitor does: the target exists (ARM's 404s); at least one
destination; each log entry names exactly one of category / categoryGroup and says
`enabled`; categories known for the target type (APIM, Key Vault, Log Analytics; other
types accept any category); metrics only "AllMetrics"; logAnalyticsDestinationType null,
"Dedicated" or "AzureDiagnostics"; workspaceId an ARM id of an existing workspace; at most
5 settings per resource; one destination may not receive the same category from two
settings of one resource (409).

Estate section `diagnostic_settings: [{resource: <ARM id>, name, properties}]`; other
seeders may call `seed_setting(state, resource_id, name, properties)`.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from twin import rbac
from twin.arm import (
    PROVIDER_VERSIONS,
    emit_resource_event,
    provider_version_error,
    resource_group_or_404,
    resource_not_found,
    subscription_or_404,
)
from twin.estate import EstateError, SeedContext, register_seeder
from twin.state import TwinState
from twin.web import ServiceError, add_route, json_response, params, read_json, state_of

VERSIONS = frozenset({"2021-05-01-preview", "2017-05-01-preview"})
# categoryGroup and marketplacePartnerId arrived with 2021-05-01-preview.
_GROUPS_SINCE = "2021-05-01-preview"
SETTING_TYPE = "Microsoft.Insights/diagnosticSettings"
WORKSPACE_TYPE = "microsoft.operationalinsights/workspaces"
MAX_SETTINGS = 5

# Log categories and category groups per target type (lowercase type). Types not listed
# accept any category name: the twin does not know their catalogue.
LOG_CATEGORIES: dict[str, frozenset[str]] = {
    "microsoft.apimanagement/service": frozenset(
        {"GatewayLogs", "WebSocketConnectionLogs", "DeveloperPortalAuditLogs", "GatewayLlmLogs"}
    ),
    "microsoft.keyvault/vaults": frozenset({"AuditEvent", "AzurePolicyEvaluationDetails"}),
    "microsoft.operationalinsights/workspaces": frozenset({"Audit", "SummaryLogs"}),
}
CATEGORY_GROUPS = frozenset({"allLogs", "audit"})
METRIC_CATEGORIES = frozenset({"AllMetrics"})
DESTINATION_TYPES = ("Dedicated", "AzureDiagnostics")
DESTINATIONS = ("workspaceId", "storageAccountId", "eventHubAuthorizationRuleId", "marketplacePartnerId")

_TARGET = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/(?P<ns>[^/]+)/(?P<rest>.+)$",
    re.IGNORECASE,
)
_ARM_ID = re.compile(r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/[^/]+/[^/]+/[^/]+(/[^/]+/[^/]+)*$", re.I)
_SETTING_NAME = re.compile(r"^[^<>*%&:\\?+/#|]{1,260}$")

# Depths of resource ids the routes cover: a resource under a provider, and its children
# down to two more levels (e.g. storageAccounts/x/blobServices/default).
_TARGET_PATTERNS = (
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{t1}/{n1}",
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{t1}/{n1}/{t2}/{n2}",
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{t1}/{n1}/{t2}/{n2}/{t3}/{n3}",
)


class InsightsError(ServiceError):
    """An error Microsoft.Insights itself answers: the flat `{code, message}` of the spec's
    ErrorResponse (diagnosticsSettings_API.json, 2021-05-01-preview), not ARM's
    `{"error": {...}}`. ARM's own answers in front of it (api-version, auth, throttling,
    subscription, resource group, linked ids) keep ARM's shape."""

    def response(self) -> web.Response:
        return json_response({"code": self.code, "message": self.message}, status=self.status, headers=self.headers)


def _bad(message: str) -> ServiceError:
    return InsightsError(400, "BadRequest", message)


def _target_id(request: web.Request) -> str:
    """The resourceUri part of the request path (everything before /providers/Microsoft.Insights)."""
    path = request.path.rstrip("/")
    cut = path.lower().rfind("/providers/microsoft.insights/diagnosticsettings")
    return path[:cut]


def _resource_type(resource_id: str) -> str:
    """`Microsoft.ApiManagement/service` (children: `.../service/apis`) from an ARM id."""
    match = _TARGET.match(resource_id)
    if match is None:
        return ""
    parts = match.group("rest").split("/")
    return "/".join([match.group("ns"), *parts[0::2]])


def _target_or_404(state: TwinState, resource_id: str) -> dict[str, Any]:
    match = _TARGET.match(resource_id)
    if match is None:
        raise ServiceError(400, "InvalidResourceId", f"'{resource_id}' is not a valid resource id.")
    subscription_or_404(state, match.group("sub"))
    resource_group_or_404(state, match.group("sub"), match.group("rg"))
    found = state.store.get(resource_id)
    if found is None:
        rtype = _resource_type(resource_id)
        name = "/".join(match.group("rest").split("/")[1::2])
        raise resource_not_found(rtype, name, match.group("rg"))
    return found.body


def _setting_id(target: str, name: str) -> str:
    return f"{target}/providers/{SETTING_TYPE}/{name}"


def _settings_of(state: TwinState, target: str) -> list[dict[str, Any]]:
    provider, kind = SETTING_TYPE.split("/")
    return [r.body for r in state.store.children(f"{target}/providers/{provider}", kind)]


def _check_linked_id(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _ARM_ID.match(value):
        raise ServiceError(
            400,
            "LinkedInvalidPropertyId",
            f"Property id '{value}' at path '{path}' is invalid. Expect fully qualified resource Id that start "
            "with '/subscriptions/{subscriptionId}' or '/providers/{resourceProviderNamespace}/'.",
        )
    return value


def validate(state: TwinState, target: str, target_type: str, props: Any, version: str) -> dict[str, Any]:
    """The settings' properties as Azure stores them, or the ServiceError Azure answers."""
    if not isinstance(props, dict):
        raise _bad("The request content was invalid: 'properties' is required.")
    if not any(props.get(field) for field in DESTINATIONS):
        raise _bad(
            "At least one destination (workspaceId, storageAccountId, eventHubAuthorizationRuleId or "
            "marketplacePartnerId) must be specified for the diagnostic setting."
        )
    if props.get("marketplacePartnerId") and version < _GROUPS_SINCE:
        raise _bad(f"'marketplacePartnerId' is not supported in api-version '{version}'.")
    workspace = props.get("workspaceId")
    if workspace:
        _check_linked_id(workspace, "properties.workspaceId")
        found = state.store.get(workspace)
        if found is None or str(found.body.get("type", "")).lower() != WORKSPACE_TYPE:
            name = workspace.rstrip("/").split("/")[-1]
            group = workspace.split("/")[4]
            raise resource_not_found("Microsoft.OperationalInsights/workspaces", name, group)
    for field in ("storageAccountId", "eventHubAuthorizationRuleId"):
        if props.get(field):
            _check_linked_id(props[field], f"properties.{field}")
    destination_type = props.get("logAnalyticsDestinationType")
    if destination_type is not None and destination_type not in DESTINATION_TYPES:
        raise _bad(
            f"The value '{destination_type}' of 'logAnalyticsDestinationType' is not valid. "
            f"Allowed values: null, {', '.join(DESTINATION_TYPES)}."
        )
    logs = props.get("logs") or []
    metrics = props.get("metrics") or []
    if not isinstance(logs, list) or not isinstance(metrics, list):
        raise _bad("'logs' and 'metrics' must be arrays.")
    known = LOG_CATEGORIES.get(target_type.lower())
    kinds = {"category" if isinstance(e, dict) and e.get("category") is not None else "group" for e in logs}
    if len(kinds) > 1:
        # Azure's answer (Azure/azure-rest-api-specs#22719), whether or not the entries are enabled.
        raise _bad("Diagnostic setting does not support mix of log category and log category group.")
    for i, entry in enumerate(logs):
        if not isinstance(entry, dict):
            raise _bad(f"logs[{i}] must be an object.")
        category, group = entry.get("category"), entry.get("categoryGroup")
        if group is not None and version < _GROUPS_SINCE:
            raise _bad(f"'categoryGroup' is not supported in api-version '{version}'.")
        if (category is None) == (group is None):
            raise _bad(f"logs[{i}]: exactly one of 'category' or 'categoryGroup' must be specified.")
        if not isinstance(entry.get("enabled"), bool):
            raise _bad(f"logs[{i}].enabled is required (true or false).")
        if group is not None and group not in CATEGORY_GROUPS:
            raise _bad(f"Category group '{group}' is not supported.")
        if category is not None and known is not None and category not in known:
            raise _bad(f"Category '{category}' is not supported.")
        _check_retention(entry.get("retentionPolicy"), f"logs[{i}]")
    for i, entry in enumerate(metrics):
        if not isinstance(entry, dict):
            raise _bad(f"metrics[{i}] must be an object.")
        category = entry.get("category")
        if category is not None and category not in METRIC_CATEGORIES:
            raise _bad(
                f"Metric category '{category}' is not supported, supported categories are: "
                f"'{', '.join(sorted(METRIC_CATEGORIES))}'"
            )
        if not isinstance(entry.get("enabled"), bool):
            raise _bad(f"metrics[{i}].enabled is required (true or false).")
        _check_retention(entry.get("retentionPolicy"), f"metrics[{i}]")
    stored: dict[str, Any] = {
        "storageAccountId": props.get("storageAccountId"),
        "serviceBusRuleId": props.get("serviceBusRuleId"),
        "eventHubAuthorizationRuleId": props.get("eventHubAuthorizationRuleId"),
        "eventHubName": props.get("eventHubName"),
        "metrics": [_metric(m) for m in metrics],
        "logs": [_log(entry) for entry in logs],
        "workspaceId": workspace,
        "logAnalyticsDestinationType": destination_type,
    }
    if props.get("marketplacePartnerId"):
        stored["marketplacePartnerId"] = props["marketplacePartnerId"]
    return stored


def _check_retention(policy: Any, where: str) -> None:
    if policy is None:
        return
    if not isinstance(policy, dict) or not isinstance(policy.get("enabled"), bool):
        raise _bad(f"{where}.retentionPolicy.enabled is required (true or false).")
    days = policy.get("days")
    if not isinstance(days, int) or isinstance(days, bool) or days < 0:
        raise _bad(f"{where}.retentionPolicy.days must be an integer >= 0.")


def _retention(policy: Any) -> dict[str, Any]:
    if isinstance(policy, dict):
        return {"enabled": policy["enabled"], "days": policy["days"]}
    return {"enabled": False, "days": 0}


def _log(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"category": entry.get("category"), "categoryGroup": entry.get("categoryGroup")}
    out["enabled"] = entry["enabled"]
    out["retentionPolicy"] = _retention(entry.get("retentionPolicy"))
    return out


def _metric(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"category": entry.get("category"), "enabled": entry["enabled"]}
    if entry.get("timeGrain") is not None:
        out["timeGrain"] = entry["timeGrain"]
    out["retentionPolicy"] = _retention(entry.get("retentionPolicy"))
    return out


def _check_sinks(state: TwinState, target: str, name: str, props: dict[str, Any]) -> None:
    """At most MAX_SETTINGS per resource; a sink gets a category from only one setting."""
    others = [s for s in _settings_of(state, target) if s["name"].lower() != name.lower()]
    if len(others) >= MAX_SETTINGS:
        raise _bad(f"Diagnostic settings count exceeds the limit of {MAX_SETTINGS} for this resource.")
    target_type = _resource_type(target)
    mine = _enabled_categories(props, target_type)
    for other in others:
        for sink in ("workspaceId", "storageAccountId", "eventHubAuthorizationRuleId", "marketplacePartnerId"):
            value = props.get(sink)
            if not value or str(other["properties"].get(sink) or "").lower() != str(value).lower():
                continue
            shared = mine & _enabled_categories(other["properties"], target_type)
            if shared:
                raise InsightsError(
                    409,
                    "Conflict",
                    f"Data sink '{value}' is already used in diagnostic setting '{other['name']}' for category "
                    f"'{sorted(shared)[0]}' for this resource. Data sinks can't be reused in different settings on "
                    "the same category for the same resource.",
                )


# Which categories a group stands for, where the twin knows: allLogs is every log category of
# the type; audit only where Azure Monitor's supported-logs pages list it (for APIM they do not).
AUDIT_CATEGORIES: dict[str, frozenset[str]] = {
    "microsoft.keyvault/vaults": frozenset({"AuditEvent"}),
    "microsoft.operationalinsights/workspaces": frozenset({"Audit"}),
}


def _enabled_categories(props: dict[str, Any], target_type: str = "") -> set[str]:
    """Enabled categories, a group counted as the categories it includes: a category and a
    group that includes it, sent to one destination by two settings, conflict like the same
    category twice (the closest documented rule: a sink may not get a category from two settings)."""
    found = set()
    for entry in props.get("logs") or []:
        if not entry.get("enabled"):
            continue
        group = entry.get("categoryGroup")
        if group is None:
            found.add(str(entry.get("category")))
            continue
        found.add(str(group))
        if group == "allLogs":
            found.update(LOG_CATEGORIES.get(target_type.lower(), ()))
        elif group == "audit":
            found.update(AUDIT_CATEGORIES.get(target_type.lower(), ()))
    for entry in props.get("metrics") or []:
        if entry.get("enabled"):
            found.add(str(entry.get("category")))
    return found


def _body(target: str, name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"id": _setting_id(target, name), "type": SETTING_TYPE, "name": name, "properties": props}


def _check_name(name: str) -> None:
    if not _SETTING_NAME.match(name):
        raise _bad(f"The diagnostic setting name '{name}' is invalid.")


# -- handlers --------------------------------------------------------------------------------


async def get_setting(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    target = _target_id(request)
    _target_or_404(state, target)
    name = params(request)["setting"]
    found = state.store.get(_setting_id(target, name))
    if found is None:
        raise InsightsError(404, "ResourceNotFound", f"The diagnostic setting '{name}' doesn't exist.")
    return json_response(found.body)


async def put_setting(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    target = _target_id(request)
    name = params(request)["setting"]
    _check_name(name)
    body = await read_json(request)
    workspace = (body.get("properties") or {}).get("workspaceId") if isinstance(body.get("properties"), dict) else None
    if isinstance(workspace, str) and workspace.lower().startswith("/subscriptions/"):
        # ARM's linked check before the provider sees the request: the caller must be able to get
        # the workspace's keys (the action named in ARM's LinkedAuthorizationFailed for a
        # diagnostic setting to a workspace, e.g. MicrosoftDocs/azure-docs#80159).
        rbac.require_linked(
            request, SETTING_TYPE + "/write", _setting_id(target, name), rbac.WORKSPACE_KEYS_ACTION, workspace
        )
    target_body = _target_or_404(state, target)
    target_type = str(target_body.get("type") or _resource_type(target))
    props = validate(state, target, target_type, body.get("properties"), request.query["api-version"])
    _check_sinks(state, target, name, props)
    stored = _body(target, name, props)
    state.store.put(stored["id"], stored)
    emit_resource_event(request, stored["id"], "write")
    return json_response(stored)


async def delete_setting(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    target = _target_id(request)
    _target_or_404(state, target)
    gone = state.store.delete(_setting_id(target, params(request)["setting"]))
    if gone is not None:
        emit_resource_event(request, gone.id, "delete")
    return web.Response(status=200 if gone is not None else 204)


async def list_settings(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    target = _target_id(request)
    _target_or_404(state, target)
    return json_response({"value": _settings_of(state, target)})


def setup(app: web.Application) -> None:
    PROVIDER_VERSIONS["microsoft.insights"] = VERSIONS
    for target in _TARGET_PATTERNS:
        base = f"{target}/providers/Microsoft.Insights/diagnosticSettings"
        unserved = provider_version_error("diagnosticSettings")
        add_route(app, "GET", base, list_settings, versions=VERSIONS, version_error=unserved)
        add_route(app, "GET", base + "/{setting}", get_setting, versions=VERSIONS, version_error=unserved)
        add_route(app, "PUT", base + "/{setting}", put_setting, versions=VERSIONS, version_error=unserved)
        add_route(app, "DELETE", base + "/{setting}", delete_setting, versions=VERSIONS, version_error=unserved)


# -- seeding ---------------------------------------------------------------------------------


def seed_setting(state: TwinState, resource_id: str, name: str, properties: dict[str, Any]) -> dict[str, Any]:
    """Put a diagnostic setting on an existing resource, validated as a PUT would be.
    Raises EstateError naming what is wrong."""
    target = resource_id.rstrip("/")
    try:
        _check_name(name)
        target_body = _target_or_404(state, target)
        target_type = str(target_body.get("type") or _resource_type(target))
        props = validate(state, target, target_type, properties, max(VERSIONS))
        _check_sinks(state, target, name, props)
    except ServiceError as error:
        raise EstateError(f"diagnostic setting '{name}' on '{target}': {error.message}") from error
    stored = _body(target, name, props)
    state.store.put(stored["id"], stored)
    return stored


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    for i, item in enumerate(items):
        where = f"[{i}]"
        if not isinstance(item, dict):
            raise EstateError(f"{where}: expected a mapping")
        unknown = set(item) - {"resource", "name", "properties"}
        if unknown:
            raise EstateError(f"{where}: unknown keys {sorted(unknown)} (allowed: name, properties, resource)")
        resource, name, properties = item.get("resource"), item.get("name"), item.get("properties")
        if not isinstance(resource, str) or not resource.startswith("/subscriptions/"):
            raise EstateError(f"{where}.resource: the target's ARM id is required")
        if not isinstance(name, str) or not name:
            raise EstateError(f"{where}.name: required")
        if not isinstance(properties, dict):
            raise EstateError(f"{where}.properties: required (a mapping)")
        try:
            seed_setting(state, resource, name, properties)
        except EstateError as error:
            raise EstateError(f"{where}: {error}") from error


register_seeder("diagnostic_settings", seed)
