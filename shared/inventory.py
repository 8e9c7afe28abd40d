"""Discovery: the APIM instances in the configured scope.

One Resource Graph query across every configured subscription finds them (paged with
$skipToken). When Resource Graph cannot answer (no permission, a query it refuses, an
outage) the product lists services per subscription with the APIM client instead and says
so in the log. Either way the configured scope (resource groups, tags) is applied here
again, so both paths return the same instances.

Resource Graph answers only for subscriptions the caller can read and leaves the others
out without an error, so a missing role would look like a subscription without APIM. A
`resourcecontainers` query first asks which of the configured subscriptions it can see;
one it cannot see, or a result it cut off (`resultTruncated` without a `$skipToken`),
raises `PermanentError` instead of a scan of less than the configured estate. It leaves out
APIM services the same way (no `service/read`, or not ingested yet), so a subscription where
Graph shows none is asked once more with ARM's list, whose 403 names the missing action.

Azure actions: Microsoft.ResourceGraph/resources/read, Microsoft.Resources/subscriptions/read
(Graph's subscription rows), Microsoft.ApiManagement/service/read (Graph's rows, the list for
a subscription Graph shows empty, and the fallback).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions, QueryResponse

from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.model import frozen_map
from shared.settings import ScopeSettings, Settings

if TYPE_CHECKING:
    from azure.mgmt.resourcegraph.aio import ResourceGraphClient

log = logging.getLogger(__name__)

APIM_TYPE = "microsoft.apimanagement/service"
# Resource Graph takes at most 1000 subscriptions a request and returns at most 1000 rows a page.
GRAPH_MAX_SUBSCRIPTIONS = 1000
GRAPH_PAGE = 1000
# Subscriptions asked at once when Resource Graph showed no service in them.
CONFIRM_CONCURRENCY = 8
GRAPH_PAGE_MAX = 1000
_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ApiManagement/service/(?P<name>[^/]+)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class InstanceRef:
    """Where one APIM instance is: enough to read it and to apply the scope."""

    id: str
    name: str
    subscription_id: str
    resource_group: str
    location: str  # normalised: lowercase, no spaces ("westeurope")
    tags: Mapping[str, str] = field(default_factory=frozen_map, hash=False)
    # The pricing tier (sku name, e.g. "Premium"), as the listing reported it; "" when unknown.
    sku: str = field(default="", compare=False)


# -- pure helpers -------------------------------------------------------------------------------


def _kql_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


# Which of the requested subscriptions Resource Graph can see: any container row (the
# subscription, or one of its resource groups) shows the caller can read there.
VISIBILITY_QUERY = (
    "resourcecontainers | where type in~ ('microsoft.resources/subscriptions', "
    "'microsoft.resources/subscriptions/resourcegroups') | project id, subscriptionId"
)


def graph_query(scope: ScopeSettings) -> str:
    """The Resource Graph query for the APIM services in scope.

    Resource groups are filtered in the query; tags are filtered afterwards (`in_scope`),
    because the operator's tag names match case-insensitively and a KQL `tags['x']` lookup
    does not.
    """
    parts = [f"resources | where type =~ {_kql_string(APIM_TYPE)}"]
    if scope.resource_groups:
        groups = ", ".join(_kql_string(g) for g in scope.resource_groups)
        parts.append(f"| where resourceGroup in~ ({groups})")
    parts.append("| project id, name, type, location, resourceGroup, subscriptionId, tags, sku")
    return " ".join(parts)


def _sku_name(sku: Any) -> str:
    """A listing's sku: Resource Graph's object, an SDK model, or nothing."""
    if isinstance(sku, Mapping):
        return str(sku.get("name") or "")
    return str(getattr(sku, "name", "") or "")


def instance_ref(
    resource_id: str, location: str | None, tags: Mapping[str, Any] | None, sku: Any = None
) -> InstanceRef | None:
    """An InstanceRef from an ARM id, or None when the id is not an APIM service's."""
    match = _ID.match(resource_id or "")
    if match is None:
        return None
    return InstanceRef(
        id=resource_id,
        name=match.group("name"),
        subscription_id=match.group("sub").lower(),
        resource_group=match.group("rg"),
        location=re.sub(r"\s+", "", location or "").lower(),
        tags=frozen_map({str(k): str(v) for k, v in (tags or {}).items()}),
        sku=_sku_name(sku),
    )


def in_scope(ref: InstanceRef, scope: ScopeSettings) -> bool:
    """Resource groups compare case-insensitively; every tag name=value must be present
    (names case-insensitive, values case-sensitive, as Azure treats tags)."""
    if scope.resource_groups and ref.resource_group.lower() not in scope.resource_groups:
        return False
    lowered = {name.lower(): value for name, value in ref.tags.items()}
    return all(lowered.get(name.lower()) == value for name, value in scope.tags)


def select(refs: Iterable[InstanceRef], settings: Settings) -> tuple[InstanceRef, ...]:
    """In scope and in a configured subscription, one per id, sorted by id."""
    wanted = {s.lower() for s in settings.subscription_ids}
    unique: dict[str, InstanceRef] = {}
    for ref in refs:
        if ref.subscription_id.lower() in wanted and in_scope(ref, settings.scope):
            unique.setdefault(ref.id.lower(), ref)
    return tuple(sorted(unique.values(), key=lambda r: r.id.lower()))


def endpoint_of(url: str) -> str:
    """Host (and port) and path of a URL: never its user info, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{host}{parts.path}"


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what caused it: azure-core's inner_exception, then causes and OS errors."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = (
            getattr(current, "inner_exception", None)
            or getattr(current, "os_error", None)  # aiohttp's connector errors
            or current.__cause__
            or current.__context__
        )
    return seen


def why_no_response(error: BaseException) -> str:
    """The root cause of a request that got no HTTP answer, as "<class>: <short reason>".

    Only the class and fixed texts (the OS's wording of an errno, "timed out", a TLS
    verification reason) are used: the messages of transport errors can carry a URL.
    """
    chain = _chain(error)
    root = chain[-1]
    for cause in reversed(chain):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"{type(cause).__name__}: {cause.verify_message or 'certificate verification failed'}"
        if isinstance(cause, TimeoutError | asyncio.TimeoutError):
            return f"{type(cause).__name__}: timed out"
        if isinstance(cause, OSError) and cause.errno:
            return f"{type(cause).__name__}: {os.strerror(cause.errno).lower()}"
    return type(root).__name__


def _host_of(error: BaseException) -> str | None:
    # aiohttp's connector errors name the host and port they could not reach.
    for cause in _chain(error):
        host, port = getattr(cause, "host", None), getattr(cause, "port", None)
        if isinstance(host, str) and host:
            return f"{host}:{port}" if isinstance(port, int) else host
    return None


_REFUSED_ACTION = re.compile(r"perform action '([A-Za-z0-9./*]+)'")


def describe_failure(error: AzureError, url: str | None = None) -> str:
    """Status and error code of an SDK failure; never its message (which may echo a request).

    Without an HTTP answer: where the request went (`url`'s host and path, else the host
    the transport names) and why ("no response from 127.0.0.1:8443/subscriptions/...
    (ConnectionRefusedError: connection refused)").
    """
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        code = getattr(error.error, "code", None) or error.reason or type(error).__name__
        # Azure's refusal names the action the identity lacks: that one word is safe to show
        # and is what the operator must grant (the last one: a linked check names it second).
        actions = _REFUSED_ACTION.findall(str(getattr(error.error, "message", None) or ""))
        if code in ("AuthorizationFailed", "LinkedAuthorizationFailed") and actions:
            return f"{error.status_code} {code} (needs '{actions[-1]}')"
        return f"{error.status_code} {code}"
    where = endpoint_of(url) if url else _host_of(error)
    return f"no response{f' from {where}' if where else ''} ({type(error).__name__}: {why_no_response(error)})"


# -- discovery ----------------------------------------------------------------------------------


def graph_page(response: QueryResponse) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of one Resource Graph page and the token of the next (None: the last page).

    Raises PermanentError when Resource Graph cut the result off without a way to page on:
    the rows it left out are instances nobody would scan.
    """
    rows: Any = response.data or []  # resultFormat objectArray: a list of row objects
    if not isinstance(rows, list):
        raise PermanentError("Resource Graph answered in table format; objectArray was asked for")
    truncated = str(getattr(response.result_truncated, "value", response.result_truncated)).lower() == "true"
    if truncated and not response.skip_token:
        raise PermanentError(
            f"Resource Graph cut the result off after {len(rows)} of {response.total_records} row(s) "
            "(resultTruncated without a $skipToken); refusing to scan part of the estate as if it were all of it"
        )
    return [dict(row) for row in rows], response.skip_token


async def _graph_rows(
    client: ResourceGraphClient, subscriptions: list[str], query: str, top: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        options = QueryRequestOptions(top=top, skip_token=token, result_format="objectArray")
        response = await client.resources(QueryRequest(subscriptions=subscriptions, query=query, options=options))
        page, token = graph_page(response)
        rows.extend(page)
        if not token:
            return rows


async def _from_graph(factory: ClientFactory, settings: Settings) -> list[InstanceRef]:
    client = factory.resource_graph_async()
    query = graph_query(settings.scope)
    subscriptions = list(settings.subscription_ids)
    refs: list[InstanceRef] = []
    for start in range(0, len(subscriptions), GRAPH_MAX_SUBSCRIPTIONS):
        batch = subscriptions[start : start + GRAPH_MAX_SUBSCRIPTIONS]
        containers = await _graph_rows(client, batch, VISIBILITY_QUERY, GRAPH_PAGE_MAX)
        visible = {str(row.get("subscriptionId") or "").lower() for row in containers}
        unseen = [s for s in batch if s.lower() not in visible]
        if unseen:
            raise PermanentError(
                f"Resource Graph cannot see subscription(s) {', '.join(unseen)} of APIMR_SUBSCRIPTION_IDS: "
                "the product's identity has no read access there (it needs "
                "'Microsoft.ResourceGraph/resources/read' and 'Microsoft.Resources/subscriptions/read'), "
                "or they do not exist. Grant the role (infra/subscription-role.bicep) or remove them from the "
                "setting; scanning the rest would report their instances as clean without having seen them"
            )
        with_rows: set[str] = set()
        for row in await _graph_rows(client, batch, query, GRAPH_PAGE):
            with_rows.add(str(row.get("subscriptionId") or "").lower())
            ref = instance_ref(str(row.get("id") or ""), row.get("location"), row.get("tags"), row.get("sku"))
            if ref is not None:
                refs.append(ref)
        refs.extend(await _confirm_empty(factory, [s for s in batch if s.lower() not in with_rows]))
    return refs


async def _confirm_empty(factory: ClientFactory, subscriptions: list[str]) -> list[InstanceRef]:
    """Ask ARM directly about the subscriptions where Resource Graph showed no APIM service.

    Resource Graph leaves out, without an error, the services the caller may not read
    (`Microsoft.ApiManagement/service/read` missing) and the ones created since its last
    ingestion. ARM's list answers both: a 403 naming the action, or the services Graph has
    not caught up with. Only empty subscriptions are asked, so an estate costs nothing more
    where Graph found services.
    """
    if not subscriptions:
        return []
    gate = asyncio.Semaphore(CONFIRM_CONCURRENCY)

    async def confirm(subscription_id: str) -> list[InstanceRef]:
        async with gate:
            try:
                return await _list_subscription(factory, subscription_id)
            except HttpResponseError as error:
                if error.status_code != 403:
                    raise
                raise PermanentError(
                    f"Resource Graph shows no APIM service in subscription {subscription_id}, and listing "
                    f"them there was refused: {describe_failure(error)}. The product cannot tell an empty "
                    "subscription from one it may not read; grant the role (infra/subscription-role.bicep)"
                ) from None

    found = [ref for refs in await asyncio.gather(*(confirm(s) for s in subscriptions)) for ref in refs]
    if found:
        log.info(
            "%d APIM service(s) that Resource Graph does not show yet were found by listing subscription(s) %s",
            len(found),
            ", ".join(sorted({r.subscription_id for r in found})),
        )
    return found


async def _list_subscription(factory: ClientFactory, subscription_id: str) -> list[InstanceRef]:
    refs: list[InstanceRef] = []
    async for service in factory.apim_async(subscription_id).api_management_service.list():
        ref = instance_ref(str(service.id or ""), service.location, service.tags, service.sku)
        if ref is not None:
            refs.append(ref)
    return refs


async def _from_lists(factory: ClientFactory, settings: Settings) -> list[InstanceRef]:
    results = await asyncio.gather(
        *(_list_subscription(factory, s) for s in settings.subscription_ids), return_exceptions=True
    )
    refs: list[InstanceRef] = []
    for subscription_id, result in zip(settings.subscription_ids, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, AzureError):
                log.error(
                    "listing APIM services in subscription %s failed: %s", subscription_id, describe_failure(result)
                )
            # A sweep that silently skipped a subscription would report a clean estate it never saw.
            raise result
        refs.extend(result)
    return refs


async def locate(factory: ClientFactory, settings: Settings, instance_id: str) -> InstanceRef | None:
    """One instance by its id without listing the estate: one GET of the service.

    None when the id is not an APIM service's, lies outside the configured subscriptions,
    resource groups or tags, or names no service (404). The ref carries the id as ARM spells
    it, as discovery would return it. Other failures propagate as the SDK's errors.
    """
    named = instance_ref(instance_id.rstrip("/"), None, None)
    if named is None or named.subscription_id not in {s.lower() for s in settings.subscription_ids}:
        return None
    groups = settings.scope.resource_groups
    if groups and named.resource_group.lower() not in groups:
        return None  # decided without a call
    apim = factory.apim_async(named.subscription_id)
    try:
        service = await apim.api_management_service.get(named.resource_group, named.name)
    except ResourceNotFoundError:
        return None
    ref = instance_ref(str(service.id or named.id), service.location, service.tags, service.sku)
    found = select([ref], settings) if ref is not None else ()
    return found[0] if found else None


async def discover(factory: ClientFactory, settings: Settings) -> tuple[InstanceRef, ...]:
    """The APIM instances in scope, sorted by id.

    Resource Graph first; if it fails, the APIM list per subscription (every subscription
    must answer: a failure there propagates as the SDK's error).
    """
    if not settings.subscription_ids:
        return ()
    try:
        refs = await _from_graph(factory, settings)
    except AzureError as error:
        log.warning(
            "Resource Graph could not list APIM services (%s); listing them per subscription instead "
            "(%d subscription(s))",
            describe_failure(error),
            len(settings.subscription_ids),
        )
        refs = await _from_lists(factory, settings)
        found = select(refs, settings)
        log.info("found %d APIM instance(s) in scope by listing per subscription", len(found))
        return found
    found = select(refs, settings)
    log.info("found %d APIM instance(s) in scope with Resource Graph", len(found))
    return found
