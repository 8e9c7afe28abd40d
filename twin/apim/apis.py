"""APIs and policies (service, API and product scope)."""

from __future__ import annotations

import xml.parsers.expat
from typing import Any

from aiohttp import web

from twin import arm
from twin.apim.common import (
    _ALL_OPS,
    PROTOCOLS,
    _bool,
    _check_if_match,
    _child,
    _deep,
    _emit,
    _entity_name,
    _enum,
    _filtered,
    _invalid,
    _list,
    _not_found,
    _props,
    _service,
    _str,
    _with_etag,
)
from twin.apim.named_values import _accept_child_put
from twin.arm import write_context
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    json_response,
    params,
    read_json,
    state_of,
)

# -- APIs -------------------------------------------------------------------------------------------------

API_TYPE = "Microsoft.ApiManagement/service/apis"


def _api_props(given: dict[str, Any], current: dict[str, Any] | None, *, patch: bool) -> dict[str, Any]:
    props: dict[str, Any] = (
        dict(current or {})
        if patch
        else {
            "apiRevision": "1",
            "isCurrent": True,
            "subscriptionRequired": True,
            "protocols": ["https"],
            "type": "http",
            "subscriptionKeyParameterNames": {"header": "Ocp-Apim-Subscription-Key", "query": "subscription-key"},
            "authenticationSettings": {"oAuth2AuthenticationSettings": [], "openidAuthenticationSettings": []},
        }
    )
    if not patch:
        if given.get("value") is not None or given.get("format") is not None:
            raise ServiceError(400, "ValidationError", "API import (value/format) is not supported by the twin.")
        for required in ("displayName", "path"):
            if given.get(required) is None:
                raise _invalid(f"properties.{required}", f"'{required}' is required.")
    if "displayName" in given:
        props["displayName"] = _str(given["displayName"], "properties.displayName", min_len=1, max_len=300)
    if "path" in given:
        props["path"] = _str(given["path"], "properties.path", max_len=400)
    if "serviceUrl" in given:
        props["serviceUrl"] = (
            None
            if given["serviceUrl"] is None
            else _str(given["serviceUrl"], "properties.serviceUrl", min_len=1, max_len=2000)
        )
    if "protocols" in given:
        protocols = given["protocols"]
        if not isinstance(protocols, list) or not protocols:
            raise _invalid("properties.protocols", "'protocols' must be a non-empty list.")
        props["protocols"] = [_enum(p, PROTOCOLS, "properties.protocols", case_sensitive=True) for p in protocols]
    if "subscriptionRequired" in given:
        props["subscriptionRequired"] = _bool(given["subscriptionRequired"], "properties.subscriptionRequired")
    if "type" in given:
        props["type"] = _enum(
            given["type"],
            ("http", "soap", "websocket", "graphql", "odata", "grpc"),
            "properties.type",
            case_sensitive=True,
        )
    if "subscriptionKeyParameterNames" in given:
        names = given["subscriptionKeyParameterNames"]
        if not isinstance(names, dict):
            raise _invalid("properties.subscriptionKeyParameterNames", "must be an object {header, query}.")
        props["subscriptionKeyParameterNames"] = names
    for field in (
        "description",
        "authenticationSettings",
        "apiVersion",
        "apiVersionSetId",
        "apiRevisionDescription",
        "apiVersionDescription",
        "termsOfServiceUrl",
        "contact",
        "license",
        "isCurrent",
        "apiRevision",
    ):
        if field in given:
            props[field] = given[field]
    return props


async def list_apis(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = []
    for r in state.store.children(service.id, "apis"):
        p = r.body["properties"]
        rows.append(
            (
                {
                    "name": r.body["name"],
                    "displayName": str(p.get("displayName") or ""),
                    "description": str(p.get("description") or ""),
                    "serviceUrl": str(p.get("serviceUrl") or ""),
                    "path": str(p.get("path") or ""),
                    "isCurrent": str(p.get("isCurrent")).lower(),
                },
                r.body,
            )
        )
    fields = {
        "name": _ALL_OPS,
        "displayName": _ALL_OPS,
        "description": _ALL_OPS,
        "serviceUrl": _ALL_OPS,
        "path": _ALL_OPS,
        "isCurrent": ("eq",),
    }
    return _list(request, _filtered(request, rows, fields))


async def get_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = _child(state, service, f"apis/{api_id}", "API", api_id)
    return _with_etag(found.body, found)


def store_api(state: TwinState, service: Resource, name: str, props: dict[str, Any]) -> Resource:
    resource_id = f"{service.id}/apis/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": API_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body)


async def put_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = _entity_name(params(request)["api"], "apiId")
    existing = state.store.get(f"{service.id}/apis/{name}")
    _check_if_match(request, existing, required=False)
    props = _api_props(_props(await read_json(request)), None, patch=False)
    return _accept_child_put(
        request,
        service,
        f"apis/{name}",
        API_TYPE,
        props,
        created=existing is None,
        store=lambda: store_api(state, service, name, props).body,
    )


async def patch_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = _child(state, service, f"apis/{api_id}", "API", api_id)
    _check_if_match(request, found, required=True)
    props = _api_props(_props(await read_json(request)), found.body["properties"], patch=True)
    resource = store_api(state, service, found.body["name"], props)
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource)


async def delete_api(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    found = state.store.get(f"{service.id}/apis/{api_id}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    ctx = write_context(request)
    resource_id = found.id

    def finish() -> None:
        state.store.delete(resource_id)
        for linked in state.extra.get("apim", {}).get("product_apis", {}).values():
            linked[:] = [a for a in linked if norm(a) != norm(resource_id)]
        _emit(state, ctx, resource_id, "delete")

    return arm.start_operation(request, resource_id=resource_id, status_parent=service.id, on_complete=finish)


# -- operations (apimapis.json: ApiOperation_ListByApi / Get / CreateOrUpdate 200|201 / Delete 200|204) ----

OPERATION_TYPE = "Microsoft.ApiManagement/service/apis/operations"


def _operation_props(given: dict[str, Any]) -> dict[str, Any]:
    """OperationContractProperties: displayName, method and urlTemplate are required."""
    props: dict[str, Any] = {"templateParameters": [], "responses": []}
    props["displayName"] = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=300)
    props["method"] = _str(given.get("method"), "properties.method", min_len=1)
    props["urlTemplate"] = _str(given.get("urlTemplate"), "properties.urlTemplate", min_len=1, max_len=1000)
    for field in ("description", "templateParameters", "request", "responses", "policies"):
        if field in given:
            props[field] = given[field]
    return props


def store_operation(state: TwinState, api: Resource, name: str, props: dict[str, Any]) -> Resource:
    resource_id = f"{api.id}/operations/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": OPERATION_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body)


async def list_operations(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    api_id = params(request)["api"]
    api = _child(state, service, f"apis/{api_id}", "API", api_id)
    rows = [
        (
            {
                "name": r.body["name"],
                "displayName": str(r.body["properties"].get("displayName") or ""),
                "method": str(r.body["properties"].get("method") or ""),
                "urlTemplate": str(r.body["properties"].get("urlTemplate") or ""),
                "description": str(r.body["properties"].get("description") or ""),
            },
            r.body,
        )
        for r in state.store.children(api.id, "operations")
    ]
    fields: dict[str, tuple[str, ...]] = {
        "name": _ALL_OPS,
        "displayName": _ALL_OPS,
        "method": _ALL_OPS,
        "urlTemplate": _ALL_OPS,
        "description": _ALL_OPS,
    }
    return _list(request, _filtered(request, rows, fields))


async def get_operation(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    p = params(request)
    api = _child(state, service, f"apis/{p['api']}", "API", p["api"])
    found = state.store.get(f"{api.id}/operations/{p['op']}")
    if found is None:
        raise _not_found("Operation", p["op"])
    return _with_etag(found.body, found)


async def put_operation(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    p = params(request)
    api = _child(state, service, f"apis/{p['api']}", "API", p["api"])
    name = _entity_name(p["op"], "operationId")
    existing = state.store.get(f"{api.id}/operations/{name}")
    _check_if_match(request, existing, required=False)
    resource = store_operation(state, api, name, _operation_props(_props(await read_json(request))))
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource, status=201 if existing is None else 200)


async def delete_operation(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    p = params(request)
    api = _child(state, service, f"apis/{p['api']}", "API", p["api"])
    found = state.store.get(f"{api.id}/operations/{p['op']}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


# -- policies ----------------------------------------------------------------------------------------------


def _policy_body(resource_id: str, resource_type: str, value: str, fmt: str = "xml") -> dict[str, Any]:
    return {"id": resource_id, "type": resource_type, "name": "policy", "properties": {"value": value, "format": fmt}}


# The policy statements Learn's "API Management policy reference" (api-management-policies)
# documents, by element name, plus <base> and <include-fragment>. APIM refuses a policy
# document with any other element where a statement goes, as the portal's editor shows.
POLICY_ELEMENTS = frozenset(
    {
        # rate limiting and quotas
        "rate-limit", "rate-limit-by-key", "quota", "quota-by-key", "limit-concurrency",
        "azure-openai-token-limit", "llm-token-limit",
        # authentication and authorization
        "check-header", "get-authorization-context", "ip-filter", "validate-azure-ad-token", "validate-jwt",
        "validate-client-certificate", "authentication-basic", "authentication-certificate",
        "authentication-managed-identity",
        # content validation
        "validate-content", "validate-parameters", "validate-headers", "validate-status-code",
        "validate-odata-request", "validate-graphql-request",
        # content safety
        "llm-content-safety",
        # routing
        "forward-request", "set-backend-service", "proxy",
        # caching
        "cache-lookup", "cache-store", "cache-lookup-value", "cache-store-value", "cache-remove-value",
        "azure-openai-semantic-cache-lookup", "azure-openai-semantic-cache-store",
        "llm-semantic-cache-lookup", "llm-semantic-cache-store",
        # transformation
        "set-method", "set-status", "set-variable", "set-body", "set-header", "set-query-parameter",
        "rewrite-uri", "json-to-xml", "xml-to-json", "find-and-replace", "redirect-content-urls",
        "xsl-transform", "mock-response", "return-response",
        # cross-domain
        "cors", "jsonp", "cross-domain",
        # integration and external communication
        "send-request", "send-one-way-request", "log-to-eventhub", "publish-to-dapr", "invoke-dapr-binding",
        # logging and metrics
        "trace", "emit-metric", "azure-openai-emit-token-metric", "llm-emit-token-metric",
        # GraphQL resolvers
        "http-data-source", "sql-data-source", "cosmosdb-data-source", "publish-event",
        # policy control and flow
        "choose", "retry", "wait", "include-fragment", "base",
    }
)  # fmt: skip
POLICY_SECTIONS = ("inbound", "backend", "outbound", "on-error")
# Elements whose children are statements again (the rest hold policy-specific settings).
_STATEMENT_CONTAINERS = frozenset({*POLICY_SECTIONS, "when", "otherwise", "retry", "wait", "limit-concurrency"})


def validate_policy_xml(value: Any, field: str = "properties.value") -> str:
    """A policy document must be well-formed XML whose root is <policies>, holding only the
    sections, each holding only documented policy statements (POLICY_ELEMENTS)."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(field, "'value' is required: the policy XML.")
    parser = xml.parsers.expat.ParserCreate()
    roots: list[str] = []
    stack: list[str] = []
    unknown: list[str] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        if not roots:
            roots.append(name)
        parent = stack[-1] if stack else None
        where = f"line {parser.CurrentLineNumber}, column {parser.CurrentColumnNumber + 1}"
        if not unknown and parent == "policies" and len(stack) == 1 and name not in POLICY_SECTIONS:
            unknown.append(f"Error in element 'policies' on {where}: Unknown section '{name}'.")
        elif not unknown and parent in _STATEMENT_CONTAINERS and name not in POLICY_ELEMENTS:
            unknown.append(f"Error in element '{parent}' on {where}: Unknown element '{name}'.")
        elif not unknown and parent == "choose" and name not in ("when", "otherwise"):
            unknown.append(f"Error in element 'choose' on {where}: Unknown element '{name}'.")
        stack.append(name)

    def end(name: str) -> None:
        stack.pop()

    def no_entities(*_: Any) -> None:
        raise ServiceError(400, "ValidationError", "Entity declarations are not allowed in policy XML.")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.EntityDeclHandler = no_entities
    try:
        parser.Parse(value, True)
    except xml.parsers.expat.ExpatError as error:
        raise ServiceError(
            400,
            "ValidationError",
            f"The policy XML is not well-formed: {xml.parsers.expat.errors.messages[error.code]} "
            f"(line {error.lineno}, column {error.offset}).",
        ) from error
    if roots != ["policies"]:
        raise ServiceError(
            400,
            "ValidationError",
            f"The root element of a policy must be 'policies', not '{roots[0] if roots else ''}'.",
        )
    if unknown:
        raise _invalid("representation", unknown[0])
    return value


def _policy_target(request: web.Request) -> tuple[TwinState, Resource, str, str]:
    """(state, service, policy resource id, ARM type) for the service, an API or a product."""
    state = state_of(request)
    service = _service(request)
    p = params(request)
    if p.get("policy", "policy").lower() != "policy":
        raise _invalid("policyId", f"Policy id must be 'policy', not '{p['policy']}'.")
    if "api" in p:
        parent = _child(state, service, f"apis/{p['api']}", "API", p["api"])
        return state, service, f"{parent.id}/policies/policy", "Microsoft.ApiManagement/service/apis/policies"
    if "product" in p:
        parent = _child(state, service, f"products/{p['product']}", "Product", p["product"])
        return state, service, f"{parent.id}/policies/policy", "Microsoft.ApiManagement/service/products/policies"
    return state, service, f"{service.id}/policies/policy", "Microsoft.ApiManagement/service/policies"


def _render_policy(resource: Resource, fmt: str) -> dict[str, Any]:
    body = _deep(resource.body)
    body["properties"]["format"] = fmt
    return body


async def list_policies(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    items = [_render_policy(found, "xml")] if found else []
    return json_response({"value": items, "count": len(items)})


async def get_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    fmt = request.query.get("format", "xml")
    if fmt not in ("xml", "rawxml"):
        raise ServiceError(400, "InvalidParameter", f"'format' must be xml or rawxml, got '{fmt}'.")
    found = state.store.get(resource_id)
    if found is None:
        raise _not_found("Policy", "policy")
    return _with_etag(_render_policy(found, fmt), found)


async def put_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, resource_type = _policy_target(request)
    existing = state.store.get(resource_id)
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    fmt = given.get("format", "xml")
    if fmt in ("xml-link", "rawxml-link"):
        raise ServiceError(
            400, "ValidationError", f"Policy format '{fmt}' (fetching a URL) is not supported by the twin."
        )
    fmt = _enum(fmt, ("xml", "rawxml"), "properties.format", case_sensitive=True)
    value = validate_policy_xml(given.get("value"))
    resource = state.store.put(
        resource_id, _policy_body(existing.id if existing else resource_id, resource_type, value, fmt)
    )
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(_render_policy(resource, fmt), resource, status=200 if existing else 201)


async def delete_policy(request: web.Request) -> web.StreamResponse:
    state, _, resource_id, _ = _policy_target(request)
    found = state.store.get(resource_id)
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)
