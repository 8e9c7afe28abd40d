"""Named values (LROs), their secret values (listValue) and Key Vault references (refreshSecret)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from twin import arm, keyvault
from twin.apim.common import (
    _ALL_OPS,
    _NAMED_VALUE_DISPLAY,
    _bool,
    _check_if_match,
    _child,
    _deep,
    _drop_secrets_under,
    _emit,
    _entity_name,
    _filtered,
    _invalid,
    _iso,
    _list,
    _now,
    _props,
    _secret,
    _service,
    _str,
    _with_etag,
)
from twin.arm import write_context
from twin.state import Resource, TwinState, new_etag
from twin.web import (
    ServiceError,
    params,
    read_json,
    state_of,
)

# -- named values ----------------------------------------------------------------------------------------

NAMED_VALUE_TYPE = "Microsoft.ApiManagement/service/namedValues"


def _named_value(
    state: TwinState, resource_id: str, name: str, given: dict[str, Any], current: dict[str, Any] | None, *, patch: bool
) -> tuple[dict[str, Any], str | None]:
    """(properties, value) after validation. The value is kept with the secrets, never in the body."""
    props: dict[str, Any] = dict(current or {}) if patch else {"secret": False, "tags": []}
    if "displayName" in given or not patch:
        display = _str(given.get("displayName"), "properties.displayName", min_len=1, max_len=256)
        if not _NAMED_VALUE_DISPLAY.match(display):
            raise _invalid("properties.displayName", "'displayName' may hold only letters, digits, '-', '.' and '_'.")
        props["displayName"] = display
    if "secret" in given:
        props["secret"] = _bool(given["secret"], "properties.secret")
    if "tags" in given:
        tags = given["tags"] or []
        if not isinstance(tags, list) or len(tags) > 32 or not all(isinstance(t, str) for t in tags):
            raise _invalid("properties.tags", "'tags' must be a list of up to 32 strings.")
        props["tags"] = tags
    value: str | None = None
    if "value" in given and given["value"] is not None:
        value = _str(given["value"], "properties.value", min_len=1 if patch else 0, max_len=4096)
        props.pop("keyVault", None)
    vault = given.get("keyVault")
    if vault is not None:
        if not isinstance(vault, dict):
            raise _invalid("properties.keyVault", "'keyVault' must be an object.")
        identifier = vault.get("secretIdentifier")
        if not isinstance(identifier, str) or not re.match(
            r"^https://[^/]+/secrets/[^/]+(/[0-9a-fA-F]{32})?/?$", identifier
        ):
            raise _invalid("properties.keyVault.secretIdentifier", "'secretIdentifier' must be a Key Vault secret URL.")
        if value is not None:
            raise _invalid("properties.value", "A named value has either 'value' or 'keyVault', not both.")
        client_id = vault.get("identityClientId")
        service = state.store.get(resource_id.rsplit("/namedValues/", 1)[0])
        if client_id is not None and (service is None or _reference_principal(service, client_id) is None):
            # Seen from APIM (Azure/apiops#257): a synchronous 400, not a failed lastStatus.
            raise _invalid(
                "identityClientId",
                f"Can not find Managed Identity with provided IdentityClientId : {client_id}. For more information "
                "please see aka.ms/apimmsi.",
            )
        # lastStatus is read-only: APIM sets it when it reads the secret, on every write that
        # carries the reference (None here: read when stored) and on refreshSecret.
        props["keyVault"] = {"secretIdentifier": identifier, "identityClientId": client_id, "lastStatus": None}
        props["secret"] = True
    if not patch and value is None and "keyVault" not in props:
        raise _invalid("properties.value", "Either 'value' or 'keyVault' is required.")
    props["provisioningState"] = "Succeeded"
    return props, value


def _reference_principal(service: Resource, client_id: str | None) -> str | None:
    """The object id APIM reads Key Vault as: the user-assigned identity with `client_id`, or
    the system-assigned identity when no client id is given; None when there is none."""
    identity = service.body.get("identity") or {}
    if client_id:
        for entry in (identity.get("userAssignedIdentities") or {}).values():
            if str(entry.get("clientId", "")).lower() == client_id.lower():
                return str(entry.get("principalId") or "") or None
        return None
    if "SystemAssigned" in str(identity.get("type", "")):
        return str(identity.get("principalId") or "") or None
    return None


def read_key_vault_reference(state: TwinState, service: Resource, resource: Resource) -> None:
    """Read a Key Vault named value's secret as APIM does (at write time and on refreshSecret):
    record the outcome in `keyVault.lastStatus` and, when it worked, keep the value APIM then
    serves (listValue, policies) until the next read; a failed read keeps the last good value.
    Sources: NamedValue_CreateOrUpdate / NamedValue_RefreshSecret and
    KeyVaultLastAccessStatusContractProperties in the ApiManagement spec (apimnamedvalues.json,
    definitions.json); Learn "Use named values in Azure API Management policies" (the instance's
    managed identity reads the secret; a failed read shows on the named value)."""
    vault = resource.body["properties"].get("keyVault")
    if not vault:
        return
    principal = _reference_principal(service, vault.get("identityClientId"))
    read = keyvault.read_secret_reference(state, vault["secretIdentifier"], principal)
    vault["lastStatus"] = {"code": read.code, "message": read.message, "timeStampUtc": _iso(_now(state))}
    if read.code == "Success":
        _secret(state, resource.id)["value"] = read.value


def _render_named_value(state: TwinState, resource: Resource) -> dict[str, Any]:
    body = _deep(resource.body)
    if not body["properties"].get("secret") and "keyVault" not in body["properties"]:
        body["properties"]["value"] = _secret(state, resource.id).get("value")
    return body


def store_named_value(
    state: TwinState, service: Resource, name: str, props: dict[str, Any], value: str | None
) -> Resource:
    resource_id = f"{service.id}/namedValues/{name}"
    existing = state.store.get(resource_id)
    body = {
        "id": existing.id if existing else resource_id,
        "type": NAMED_VALUE_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    resource = state.store.put(resource_id, body)
    if value is not None:
        _secret(state, resource.id)["value"] = value
    elif "keyVault" in props and props["keyVault"].get("lastStatus") is None:
        _secret(state, resource.id).pop("value", None)
        read_key_vault_reference(state, service, resource)
    return resource


async def list_named_values(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    rows = []
    for r in state.store.children(service.id, "namedValues"):
        rows.append(
            (
                {
                    "name": r.body["name"],
                    "displayName": r.body["properties"]["displayName"],
                    "tags": ",".join(r.body["properties"].get("tags") or []),
                },
                _render_named_value(state, r),
            )
        )
    fields = {"name": _ALL_OPS, "displayName": _ALL_OPS, "tags": ("eq", "contains", "substringof")}
    items = _filtered(request, rows, fields)
    refresh_failed = request.query.get("isKeyVaultRefreshFailed")
    if refresh_failed is not None:
        if refresh_failed.lower() not in ("true", "false"):
            raise ServiceError(400, "InvalidParameter", "'isKeyVaultRefreshFailed' must be true or false.")
        wanted = refresh_failed.lower() == "true"
        items = [i for i in items if _refresh_failed(i) == wanted]
    return _list(request, items)


def _refresh_failed(body: dict[str, Any]) -> bool:
    status = (body["properties"].get("keyVault") or {}).get("lastStatus") or {}
    return "keyVault" in body["properties"] and status.get("code", "Success") != "Success"


async def get_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    return _with_etag(_render_named_value(state, found), found)


def _accept_child_put(
    request: web.Request,
    service: Resource,
    child: str,
    resource_type: str,
    props: dict[str, Any],
    *,
    created: bool,
    store: Callable[[], dict[str, Any]],
) -> web.Response:
    """A sub-resource PUT that APIM runs as a long-running operation: answer 201/200 with the
    pending body and its ETag (the spec lists an ETag header on both, e.g. Api_CreateOrUpdate
    and NamedValue_CreateOrUpdate in apimapis.json / apimnamedvalues.json); `store` applies it
    (and the write event is raised) when it completes, keeping that ETag so a client can use
    the one the PUT answered."""
    state = state_of(request)
    ctx = write_context(request)
    resource_id = f"{service.id}/{child}"
    etag = new_etag()

    def finish() -> dict[str, Any]:
        body = store()
        stored = state.store.get(resource_id)
        if stored is not None:
            stored.etag = etag
        _emit(state, ctx, resource_id, "write")
        return body

    pending: dict[str, Any] = {
        "id": resource_id,
        "type": resource_type,
        "name": child.rsplit("/", 1)[-1],
        "properties": {**props, "provisioningState": "InProgress"},
    }
    response = arm.start_operation(
        request,
        resource_id=resource_id,
        status_parent=service.id,
        on_complete=finish,
        status=201 if created else 200,
        body=pending,
    )
    response.headers["ETag"] = etag
    return response


async def put_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = _entity_name(params(request)["nv"], "namedValueId")
    existing = state.store.get(f"{service.id}/namedValues/{name}")
    _check_if_match(request, existing, required=False)
    given = _props(await read_json(request))
    props, value = _named_value(state, f"{service.id}/namedValues/{name}", name, given, None, patch=False)
    return _accept_child_put(
        request,
        service,
        f"namedValues/{name}",
        NAMED_VALUE_TYPE,
        props,
        created=existing is None,
        store=lambda: _render_named_value(state, store_named_value(state, service, name, props, value)),
    )


async def patch_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    _check_if_match(request, found, required=True)
    given = _props(await read_json(request))
    props, value = _named_value(state, found.id, name, given, found.body["properties"], patch=True)
    ctx = write_context(request)

    def finish() -> dict[str, Any]:
        resource = store_named_value(state, service, found.body["name"], props, value)
        _emit(state, ctx, resource.id, "write")
        return _render_named_value(state, resource)

    return arm.start_operation(request, resource_id=found.id, status_parent=service.id, on_complete=finish)


async def delete_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = state.store.get(f"{service.id}/namedValues/{name}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


async def named_value_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    _emit(state, write_context(request), found.id, "action", "listValue")
    # A Key Vault named value answers with APIM's copy from its last successful read.
    return _with_etag({"value": _secret(state, found.id).get("value")}, found)


async def refresh_named_value(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["nv"]
    found = _child(state, service, f"namedValues/{name}", "Named value", name)
    if "keyVault" not in found.body["properties"]:
        raise ServiceError(400, "ValidationError", f"Named value '{name}' is not a Key Vault reference.")
    ctx = write_context(request)
    resource_id = found.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        if current is None:
            return {}
        read_key_vault_reference(state, service, current)  # again, with today's identity and secret
        done = state.store.put(resource_id, current.body)
        _emit(state, ctx, resource_id, "action", "refreshSecret")
        return _render_named_value(state, done)

    return arm.start_operation(request, resource_id=resource_id, status_parent=service.id, on_complete=finish)
