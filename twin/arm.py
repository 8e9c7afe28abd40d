"""ARM's own basics: subscriptions, resource groups, /metadata/endpoints, and the
long-running-operation machinery every provider uses.

LROs: `start_operation` answers 202 with Azure-AsyncOperation and/or Location; the status
URL answers `{"status": "InProgress"}` for `state.lro.polls` reads (or until its deadline),
then Succeeded/Failed/Canceled; the Location URL answers 202 while running, then the result
(200) or 204; a failed operation answers its error there.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from twin.state import Operation, TwinState
from twin.web import (
    LRO_FAIL,
    ServiceError,
    VersionError,
    add_route,
    arm_version_error,
    caller,
    json_response,
    params,
    state_of,
)

# api-versions per provider namespace (lowercase). Provider modules add theirs.
PROVIDER_VERSIONS: dict[str, frozenset[str]] = {}
RESOURCES_VERSIONS = frozenset(
    {
        "2016-06-01",
        "2019-06-01",
        "2019-11-01",
        "2020-01-01",
        "2021-01-01",
        "2021-04-01",
        "2022-09-01",
        "2022-12-01",
        "2024-03-01",
        "2024-07-01",
        "2024-11-01",
        "2025-03-01",
    }
)
METADATA_VERSIONS = frozenset({"2015-01-01", "2018-01-01", "2019-05-01", "2020-06-01", "2022-09-01"})


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def arm_base(state: TwinState) -> str:
    return state.urls["arm"]


_API_VERSION_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}(-[a-z]+)?$")


def provider_version_error(resource_type: str) -> VersionError:
    """ARM's answer to an api-version a resource provider does not serve: a well-formed one it
    does not know (or has retired) is 400 NoRegisteredProviderFound naming the supported ones,
    as ARM answers for provider types (quoted in e.g. Azure/azure-cli#28496); a missing or
    malformed one keeps ARM's own MissingApiVersionParameter / InvalidApiVersionParameter."""

    def error(given: str | None, allowed: Collection[str]) -> ServiceError:
        if not given or not _API_VERSION_FORMAT.match(given):
            return arm_version_error(given, allowed)
        return ServiceError(
            400,
            "NoRegisteredProviderFound",
            f"No registered resource provider found for location 'global' and API version '{given}' for type "
            f"'{resource_type}'. The supported api-versions are '{', '.join(sorted(allowed, reverse=True))}'.",
        )

    return error


def start_operation(
    request: web.Request,
    *,
    resource_id: str,
    status_parent: str,
    on_complete: Callable[[], dict[str, Any] | None],
    style: str = "both",
    status: int = 202,
    body: dict[str, Any] | None = None,
    clock_seconds: float = 0.0,
) -> web.Response:
    """Begin an LRO whose effect `on_complete` applies when it succeeds.

    `status_parent` is the resource the status URL hangs under (APIM: the service id).
    `style`: "both" (Azure-AsyncOperation + Location), "location" or "async".
    `clock_seconds` > 0: the operation runs that long on the twin's movable clock.
    """
    state = state_of(request)
    op_id = uuid.uuid4().hex
    fault = request.get(LRO_FAIL)
    outcome = "Succeeded" if fault is None else ("Canceled" if fault.action == "lro_cancel" else "Failed")
    error = (
        {
            "code": getattr(fault, "code", "OperationFailed"),
            "message": "The operation failed (fault injected by the twin).",
        }
        if fault is not None
        else None
    )
    state.operations[op_id] = Operation(
        id=op_id,
        resource_id=resource_id,
        polls_left=state.lro.polls,
        outcome=outcome,
        result=None,
        error=error,
        on_complete=on_complete,
        ready_at=state.clock.now() + timedelta(seconds=clock_seconds) if clock_seconds > 0 else None,
        clock=state.clock if clock_seconds > 0 else None,
    )
    version = request.query.get("api-version", "")
    url = f"{arm_base(state)}{status_parent}/operationresults/{op_id}?api-version={version}"
    headers = {"Retry-After": state.lro.retry_after}
    if style in ("both", "async"):
        headers["Azure-AsyncOperation"] = url + "&asyncResponse"
    if style in ("both", "location"):
        headers["Location"] = url
    if body is None:
        return web.Response(status=status, headers=headers)
    return json_response(body, status=status, headers=headers)


async def operation_status(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    namespace = params(request)["namespace"].lower()
    allowed = PROVIDER_VERSIONS.get(namespace)
    version = request.query.get("api-version")
    if allowed is None:
        raise ServiceError(404, "InvalidResourceNamespace", f"The resource namespace '{namespace}' is invalid.")
    if version not in allowed:
        raise arm_version_error(version, allowed)
    op = state.operations.get(params(request)["op_id"])
    if op is None:
        raise ServiceError(404, "OperationNotFound", f"Operation '{params(request)['op_id']}' was not found.")
    status = op.status()
    retry = {"Retry-After": state.lro.retry_after}
    if "asyncResponse" in request.query:
        body: dict[str, Any] = {"id": request.path, "name": op.id, "status": status}
        if status == "Failed" and op.error:
            body["error"] = op.error
        return json_response(body, headers=retry if status == "InProgress" else None)
    if status == "InProgress":
        return web.Response(status=202, headers={**retry, "Location": str(request.url)})
    if status == "Failed":
        raise ServiceError(
            500, str((op.error or {}).get("code", "OperationFailed")), str((op.error or {}).get("message"))
        )
    if status == "Canceled":
        raise ServiceError(409, "OperationCanceled", "The operation was canceled.")
    if op.result is None:
        return web.Response(status=204)
    return json_response(op.result)


# -- subscriptions and resource groups -----------------------------------------------------


def _subscription_body(sub: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    return {
        "id": f"/subscriptions/{sub['subscriptionId']}",
        "subscriptionId": sub["subscriptionId"],
        "tenantId": tenant_id,
        "displayName": sub["displayName"],
        "state": "Enabled",
        "subscriptionPolicies": {
            "locationPlacementId": "Public_2014-09-01",
            "quotaId": "PayAsYouGo_2014-09-01",
            "spendingLimit": "Off",
        },
        "authorizationSource": "RoleBased",
    }


def resource_not_found(resource_type: str, name: str, resource_group: str) -> ServiceError:
    """ARM's 404 for a resource that does not exist, in ARM's words."""
    return ServiceError(
        404,
        "ResourceNotFound",
        f"The Resource '{resource_type}/{name}' under resource group '{resource_group}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def subscription_or_404(state: TwinState, subscription_id: str) -> dict[str, Any]:
    sub = state.subscriptions.get(subscription_id.lower())
    if sub is None:
        raise ServiceError(404, "SubscriptionNotFound", f"The subscription '{subscription_id}' could not be found.")
    return sub


def resource_group_or_404(state: TwinState, subscription_id: str, name: str) -> dict[str, Any]:
    sub = subscription_or_404(state, subscription_id)
    group = sub["resourceGroups"].get(name.lower())
    if group is None:
        raise ServiceError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
    return dict(group)


async def list_subscriptions(request: web.Request) -> web.StreamResponse:
    """Subscriptions - List: those where the caller holds a role at, above or below the
    subscription (learn.microsoft.com/rest/api/resources/subscriptions/list: "Gets all
    subscriptions for a tenant" the caller can access), not a 403."""
    from twin import rbac

    state = state_of(request)
    oid = caller(request).get("oid")
    visible = [
        s
        for s in state.subscriptions.values()
        if rbac.has_any_assignment_under(state, oid, f"/subscriptions/{s['subscriptionId']}")
    ]
    return json_response(
        {
            "value": [_subscription_body(s, state.tenant_id) for s in visible],
            "count": {"type": "Total", "value": len(visible)},
        }
    )


async def get_subscription(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response(_subscription_body(subscription_or_404(state, params(request)["sub"]), state.tenant_id))


def _group_body(sub_id: str, group: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"/subscriptions/{sub_id}/resourceGroups/{group['name']}",
        "name": group["name"],
        "type": "Microsoft.Resources/resourceGroups",
        "location": group["location"],
        "tags": group.get("tags", {}),
        "properties": {"provisioningState": "Succeeded"},
    }


async def list_groups(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    sub = subscription_or_404(state, params(request)["sub"])
    return json_response({"value": [_group_body(sub["subscriptionId"], g) for g in sub["resourceGroups"].values()]})


async def get_group(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    sub = subscription_or_404(state, params(request)["sub"])
    group = resource_group_or_404(state, params(request)["sub"], params(request)["rg"])
    return json_response(_group_body(sub["subscriptionId"], group))


async def metadata_endpoints(request: web.Request) -> web.StreamResponse:
    """What `az cloud register --endpoint-resource-manager` reads."""
    state = state_of(request)
    arm = state.urls["arm"]
    login = state.urls["login"]
    if request.query.get("api-version") == "2015-01-01":
        return json_response(
            {
                "galleryEndpoint": arm + "/",
                "graphEndpoint": arm + "/",
                "portalEndpoint": arm + "/",
                "authentication": {"loginEndpoint": login + "/", "audiences": [arm + "/"]},
            }
        )
    cloud = {
        "name": "AzureTwin",
        "portal": arm,
        "resourceManager": arm + "/",
        "authentication": {
            "loginEndpoint": login + "/",
            "audiences": [arm + "/"],
            "tenant": "common",
            "identityProvider": "AAD",
        },
        "media": arm,
        "graphAudience": arm,
        "graph": arm + "/",
        "gallery": arm + "/",
        "batch": arm + "/",
        "sqlManagement": arm + "/",
        "microsoftGraphResourceId": arm + "/",
        "appInsightsResourceId": arm,
        "appInsightsTelemetryChannelResourceId": arm,
        "attestationResourceId": arm,
        "synapseAnalyticsResourceId": arm,
        "logAnalyticsResourceId": state.urls["logs"],
        "ossrDbmsResourceId": arm,
        "suffixes": {
            "keyVaultDns": "vault.azure.net",
            "storage": "core.windows.net",
            "acrLoginServer": "azurecr.io",
            "sqlServerHostname": "database.windows.net",
        },
    }
    # 2022-09-01 answers this cloud's object (what `az cloud register` reads); the older
    # versions answer the list of clouds (what ARM_CLOUD_METADATA_URL points at).
    if request.query.get("api-version") == "2022-09-01":
        return json_response(cloud)
    return json_response([cloud])


def setup(app: web.Application) -> None:
    add_route(app, "GET", "/subscriptions", list_subscriptions, versions=RESOURCES_VERSIONS)
    add_route(app, "GET", "/subscriptions/{sub}", get_subscription, versions=RESOURCES_VERSIONS)
    add_route(app, "GET", "/subscriptions/{sub}/resourceGroups", list_groups, versions=RESOURCES_VERSIONS)
    add_route(app, "GET", "/subscriptions/{sub}/resourceGroups/{rg}", get_group, versions=RESOURCES_VERSIONS)
    add_route(
        app,
        "GET",
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/{namespace}/{rtype}/{name}/operationresults/{op_id}",
        operation_status,
        versions=None,  # checked against the provider's own versions
    )
    add_route(app, "GET", "/metadata/endpoints", metadata_endpoints, versions=METADATA_VERSIONS)


# -- Event Grid events for ARM writes ----------------------------------------------------------


@dataclass(frozen=True)
class WriteContext:
    """What an Event Grid resource event says about the caller, captured when the request arrived."""

    claims: dict[str, Any]
    method: str
    url: str
    correlation_id: str
    client_request_id: str
    client_ip: str
    tenant_id: str
    # The role assignment that granted the call (twin/rbac.py), as the event's evidence names it.
    granted_by: tuple[str, str, str] | None = None  # (role name, role definition id, assignment scope)


def write_context(request: web.Request) -> WriteContext:
    from twin import rbac

    state = state_of(request)
    decision = request.get(rbac.DECISION)
    granted = (
        (decision.role.name, decision.role.id, str(decision.scope))
        if decision is not None and decision.role is not None
        else None
    )
    return WriteContext(
        granted_by=granted,
        claims=caller(request),
        method=request.method,
        url=str(request.url),
        correlation_id=request.headers.get("x-ms-correlation-request-id", str(uuid.uuid4())),
        client_request_id=request.headers.get("x-ms-client-request-id", ""),
        client_ip=request.remote or "127.0.0.1",
        tenant_id=state.tenant_id,
    )


def emit_resource_event(request: web.Request, resource_uri: str, kind: str, action: str | None = None) -> None:
    """Raise the Microsoft.Resources event Azure raises for a successful write now."""
    state = state_of(request)
    state.emit(
        resource_event(
            write_context(request), resource_uri=resource_uri, kind=kind, action=action, at=state.clock.now()
        )
    )


def _resource_type_of(resource_uri: str) -> str:
    """`Microsoft.ApiManagement/service/subscriptions` from a resource id."""
    parts = resource_uri.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    # The last provider segment: an extension resource (diagnostic settings, Sentinel
    # incidents) is typed by its own provider, not by the resource it hangs under.
    start = len(lowered) - 1 - lowered[::-1].index("providers") + 1
    namespace, rest = parts[start], parts[start + 1 :]
    return "/".join([namespace, *rest[0::2]])


def resource_event(
    ctx: WriteContext, *, resource_uri: str, kind: str, action: str | None = None, at: datetime
) -> dict[str, Any]:
    """A `Microsoft.Resources.Resource{Write|Delete|Action}Success` event in Event Grid schema.

    `kind` is "write", "delete" or "action" (then `action` names it, e.g. regeneratePrimaryKey).
    The topic is the Azure subscription, the subject the resource, as the subscription's
    system topic sends them.
    """
    match = re.match(r"^/subscriptions/([^/]+)(?:/resourceGroups/([^/]+))?", resource_uri, re.IGNORECASE)
    subscription_id = match.group(1) if match else ""
    group = match.group(2) if match and match.group(2) else None
    resource_type = _resource_type_of(resource_uri)
    if kind == "write":
        operation, event_type = f"{resource_type}/write", "Microsoft.Resources.ResourceWriteSuccess"
    elif kind == "delete":
        operation, event_type = f"{resource_type}/delete", "Microsoft.Resources.ResourceDeleteSuccess"
    elif kind == "action" and action:
        operation, event_type = f"{resource_type}/{action}/action", "Microsoft.Resources.ResourceActionSuccess"
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    principal_id = str(ctx.claims.get("oid", ""))
    # The assignment that granted it; with `rbac: off`, a Contributor on the subscription.
    role, role_id, assigned_at = ctx.granted_by or (
        "Contributor",
        "b24988ac-6180-42a0-ab88-20f7382dd24c",
        f"/subscriptions/{subscription_id}",
    )
    data: dict[str, Any] = {
        "authorization": {
            "scope": resource_uri,
            "action": operation,
            "evidence": {
                "role": role,
                "roleAssignmentScope": assigned_at,
                "roleAssignmentId": uuid.uuid5(uuid.NAMESPACE_URL, principal_id + role_id + assigned_at).hex,
                "roleDefinitionId": role_id.replace("-", ""),
                "principalId": principal_id.replace("-", ""),
                "principalType": "ServicePrincipal",
            },
        },
        "claims": {k: v if isinstance(v, str) else json.dumps(v) for k, v in ctx.claims.items()},
        "correlationId": ctx.correlation_id,
        "httpRequest": {
            "clientRequestId": ctx.client_request_id,
            "clientIpAddress": ctx.client_ip,
            "method": ctx.method,
            "url": ctx.url,
        },
        "resourceProvider": resource_type.split("/")[0],
        "resourceUri": resource_uri,
        "operationName": operation,
        "status": "Succeeded",
        "subscriptionId": subscription_id,
        "tenantId": ctx.tenant_id,
    }
    if group:
        data["resourceGroup"] = group
    return {
        "id": str(uuid.uuid4()),
        "topic": f"/subscriptions/{subscription_id}",
        "subject": resource_uri,
        "eventType": event_type,
        "eventTime": iso(at),
        "data": data,
        "dataVersion": "2",
        "metadataVersion": "1",
    }
