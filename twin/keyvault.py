"""Key Vault secrets data plane: one HTTPS origin per vault, soft-delete, paging, Event Grid events.

The server makes one app per vault (auth audience `https://vault.azure.net`, the 401
challenge answered by the middleware) and calls `setup_vault(app, name)`. Vault state
lives in `state.extra["vaults"][name]` as plain data:

    {"name", "resource_id", "secrets": {lowercase name: {"name", "versions": [version, ...]}},
     "deleted": {lowercase name: {"name", "versions", "deletedDate", "scheduledPurgeDate"}},
     "emitted": {event key: True}}

A version is `{"version", "value", "contentType", "tags", "enabled", "nbf", "exp", "created",
"updated"}` with times as Unix seconds; the last version in the list is the current one.
Secret names compare case-insensitively, as Key Vault's do. Secret ids use the origin the
client called (`https://127.0.0.1:<port>`), so the SDK's id parsing finds the vault again.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from twin import rbac
from twin.arm import iso
from twin.estate import EstateError, SeedContext, register_seeder
from twin.state import TwinState
from twin.web import ServiceError, add_route, json_response, params, state_of

# What azure-keyvault-secrets 4.12.0 knows (its ApiVersion enum); the Azure CLI sends 7.4.
API_VERSIONS = frozenset({"2026-04-01", "2025-07-01", "7.6", "7.5", "7.4", "7.3", "7.2", "7.1", "7.0", "2016-10-01"})
LATEST_VERSION = "2026-04-01"
NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
VAULT_NAME = re.compile(r"^[a-zA-Z](?!.*--)[a-zA-Z0-9-]{1,22}[a-zA-Z0-9]$")
RECOVERABLE_DAYS = 90
RECOVERY_LEVEL = "Recoverable+Purgeable"
PAGE_DEFAULT = 25
PAGE_MAX = 25
MAX_TAGS = 15
MAX_VALUE_BYTES = 25 * 1024
NEAR_EXPIRY = timedelta(days=30)
EVENT_PREFIX = "Microsoft.KeyVault."
_VAULT_KEY: web.AppKey[str] = web.AppKey("vault_name", str)
_NOT_FOUND_HELP = (
    "If you recently deleted this secret you may be able to recover it using the correct recovery command. "
    "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)


# -- errors in Key Vault's shape --------------------------------------------------------------


def kv_version_error(given: str | None, allowed: Collection[str]) -> ServiceError:
    if not given:
        return ServiceError(400, "BadParameter", "The api-version query parameter is missing.")
    return ServiceError(
        400,
        "BadParameter",
        f"The specified version ({given}) is not recognized. Consider using the latest supported version "
        f"({LATEST_VERSION}).",
    )


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "BadParameter", message)


def _not_found(name: str, version: str | None = None) -> ServiceError:
    what = f"{name}/{version}" if version else name
    return ServiceError(
        404, "SecretNotFound", f"A secret with (name/id) {what} was not found in this key vault. {_NOT_FOUND_HELP}"
    )


def _deleted_not_found() -> ServiceError:
    return ServiceError(404, "SecretNotFound", "Deleted Secret not found")


# -- state helpers ----------------------------------------------------------------------------


def _now(state: TwinState) -> int:
    return int(state.clock.now().timestamp())


def _vaults(state: TwinState) -> dict[str, Any]:
    vaults: dict[str, Any] = state.extra.setdefault("vaults", {})
    return vaults


def _vault(request: web.Request) -> dict[str, Any]:
    state = state_of(request)
    name = request.app[_VAULT_KEY]
    vault: dict[str, Any] | None = _vaults(state).get(name)
    if vault is None:
        # The vault's port outlives a test that seeded it; after a reset the vault is gone.
        raise ServiceError(404, "VaultNotFound", f"The vault '{name}' does not exist in the twin's estate.")
    bind_vault_url(state, name)
    _purge_due(state, vault)
    return vault


def _purge_due(state: TwinState, vault: dict[str, Any]) -> None:
    """Key Vault purges a deleted secret by itself once its scheduled purge date passes."""
    now = _now(state)
    for key in [k for k, d in vault["deleted"].items() if d["scheduledPurgeDate"] <= now]:
        del vault["deleted"][key]


def bind_vault_url(state: TwinState, vault_name: str) -> None:
    """Point the vault's ARM resource (`properties.vaultUri`) at the port the server gave it."""
    vault = _vaults(state).get(vault_name)
    url = state.urls.get(f"vault:{vault_name}")
    if vault is None or url is None:
        return
    resource = state.store.get(vault["resource_id"])
    if resource is not None and resource.body.get("properties", {}).get("vaultUri") != url.rstrip("/") + "/":
        body = dict(resource.body)
        body["properties"] = {**body.get("properties", {}), "vaultUri": url.rstrip("/") + "/"}
        state.store.put(vault["resource_id"], body)


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _vault_url(state: TwinState, vault_name: str) -> str:
    return state.urls.get(f"vault:{vault_name}", f"https://{vault_name}.vault.azure.net").rstrip("/")


def _name_param(request: web.Request) -> str:
    name = params(request)["name"]
    if not NAME.match(name):
        raise _bad(f"The request URI contains an invalid name: {name}")
    return name


def _secret(vault: dict[str, Any], name: str) -> dict[str, Any]:
    secret = vault["secrets"].get(name.lower())
    if secret is None or not secret["versions"]:
        raise _not_found(name)
    found: dict[str, Any] = secret
    return found


def _version_of(secret: dict[str, Any], name: str, version: str | None) -> dict[str, Any]:
    if not version:
        current: dict[str, Any] = secret["versions"][-1]
        return current
    for record in secret["versions"]:
        if record["version"] == version.lower():
            found: dict[str, Any] = record
            return found
    raise _not_found(name, version)


# -- Key Vault references (APIM named values) -------------------------------------------------


GET_SECRET = "Microsoft.KeyVault/vaults/secrets/getSecret/action"


def can_read_secret(state: TwinState, principal_object_id: str, vault: dict[str, Any], secret: str) -> bool:
    """Whether `principal_object_id` may get secret `secret` of `vault` (a twin vault record).

    The one place that decides it for Key Vault references, by Azure RBAC: an assignment at the
    secret, vault, resource group or subscription scope must grant the data action
    `Microsoft.KeyVault/vaults/secrets/getSecret/action` (the built-in "Key Vault Secrets User"
    does). Sources: Learn, "Provide access to Key Vault keys, certificates, and secrets with
    Azure role-based access control" (data actions, scopes down to a single secret), and
    "Use named values in Azure API Management policies" (Key vault secrets: the instance's
    identity needs Key Vault Secrets User on the vault under RBAC). An estate with `rbac: off`
    lets any identity read, as it lets any caller do anything.
    """
    if not principal_object_id:
        return False
    scope = f"{vault['resource_id']}/secrets/{secret}"
    return rbac.allowed(state, principal_object_id, GET_SECRET, scope, data=True)


@dataclass(frozen=True)
class ReferenceRead:
    """What reading a secret identifier as a given identity gave: the value, or why not."""

    value: str | None
    code: str  # "Success", or the failure APIM records in keyVault.lastStatus.code
    message: str | None


def read_secret_reference(state: TwinState, identifier: str, principal_object_id: str | None) -> ReferenceRead:
    """Read `https://{vault}/secrets/{name}[/{version}]` as the identity `principal_object_id`,
    as APIM does for a Key Vault named value. Failure codes are Key Vault's own where the vault
    answers (SecretNotFound 404, Forbidden 403; a disabled secret is a 403 Forbidden); the
    codes for no identity and no such vault are the twin's [unverified: neither the spec's
    KeyVaultLastAccessStatusContractProperties nor Learn lists APIM's failure codes]."""
    match = re.match(r"^https://([^/]+)/secrets/([^/]+)(?:/([0-9a-fA-F]{32}))?/?$", identifier.strip())
    if match is None:
        return ReferenceRead(None, "BadRequest", f"'{identifier}' is not a Key Vault secret identifier.")
    host, name, version = match.groups()
    if not principal_object_id:
        return ReferenceRead(
            None,
            "IdentityNotFound",
            "The API Management service has no managed identity to access Key Vault with. For more information "
            "please see aka.ms/apimmsi.",
        )
    vault_name = next(
        (key.split(":", 1)[1] for key, url in state.urls.items() if key.startswith("vault:") and url.endswith(host)),
        host.split(".", 1)[0],
    )
    vault = _vaults(state).get(vault_name)
    if vault is None:
        return ReferenceRead(None, "VaultNotFound", f"No such host is known: the key vault '{host}' does not exist.")
    if not can_read_secret(state, principal_object_id, vault, name):
        # Key Vault's own 403 to the identity (twin/rbac.py `key_vault_forbidden`, the body the
        # vault's data plane answers a caller without the role), its message as APIM records it.
        found = state.store.get(vault["resource_id"])
        location = str((found.body if found else {}).get("location", "westeurope"))
        body = rbac.key_vault_forbidden(
            {"oid": principal_object_id},
            f"https://sts.windows.net/{state.tenant_id}/",
            GET_SECRET,
            f"{vault['resource_id']}/secrets/{name}",
            vault_name,
            location,
        )
        return ReferenceRead(None, "Forbidden", body["error"]["message"])
    try:
        record = _version_of(_secret(vault, name), name, version)
    except ServiceError as error:
        return ReferenceRead(None, error.code, error.message)
    if not record.get("enabled", True):
        return ReferenceRead(None, "Forbidden", "Operation get is not allowed on a disabled secret.")
    value = record.get("value")
    return ReferenceRead(str(value) if value is not None else None, "Success", None)


# -- bodies -----------------------------------------------------------------------------------


def _attributes(record: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {"enabled": record["enabled"]}
    if record.get("nbf") is not None:
        attributes["nbf"] = record["nbf"]
    if record.get("exp") is not None:
        attributes["exp"] = record["exp"]
    attributes.update(
        created=record["created"],
        updated=record["updated"],
        recoverableDays=RECOVERABLE_DAYS,
        recoveryLevel=RECOVERY_LEVEL,
    )
    return attributes


def _common(record: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if record.get("contentType") is not None:
        body["contentType"] = record["contentType"]
    body["attributes"] = _attributes(record)
    if record.get("tags"):
        body["tags"] = dict(record["tags"])
    return body


def _bundle(origin: str, name: str, record: dict[str, Any], *, with_value: bool) -> dict[str, Any]:
    """SecretBundle; the value only where Key Vault returns it (get, set, update)."""
    body: dict[str, Any] = {}
    if with_value:
        body["value"] = record["value"]
    body["id"] = f"{origin}/secrets/{name}/{record['version']}"
    body.update(_common(record))
    return body


def _item(origin: str, name: str, record: dict[str, Any], *, with_version: bool) -> dict[str, Any]:
    """SecretItem: no value; the id carries the version only in a versions list."""
    suffix = f"/{record['version']}" if with_version else ""
    return {"id": f"{origin}/secrets/{name}{suffix}", **_common(record)}


def _deleted_extra(origin: str, deleted: dict[str, Any]) -> dict[str, Any]:
    return {
        "recoveryId": f"{origin}/deletedsecrets/{deleted['name']}",
        "deletedDate": deleted["deletedDate"],
        "scheduledPurgeDate": deleted["scheduledPurgeDate"],
    }


# -- request validation -----------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise _bad("The request body is missing.")
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise _bad(f"The request body is not valid JSON: {error}.") from error
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_attributes(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("Property 'attributes' must be an object.")
    checked: dict[str, Any] = {}
    if "enabled" in raw and raw["enabled"] is not None:
        if not isinstance(raw["enabled"], bool):
            raise _bad("Property 'attributes.enabled' must be a boolean.")
        checked["enabled"] = raw["enabled"]
    for field in ("nbf", "exp"):
        if field in raw and raw[field] is not None:
            if not _is_int(raw[field]) or raw[field] < 0:
                raise _bad(f"Property 'attributes.{field}' must be a Unix time in whole seconds.")
            checked[field] = raw[field]
    if "nbf" in checked and "exp" in checked and checked["exp"] <= checked["nbf"]:
        raise _bad("Property 'attributes.exp' must be later than 'attributes.nbf'.")
    return checked


def _check_tags(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise _bad("Property 'tags' must be an object of string values.")
    if len(raw) > MAX_TAGS:
        raise _bad(f"A secret can have at most {MAX_TAGS} tags; {len(raw)} were given.")
    return dict(raw)


def _check_content_type(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _bad("Property 'contentType' must be a string.")
    return raw


def _page_size(request: web.Request) -> int:
    raw = request.query.get("maxresults")
    if raw is None:
        return PAGE_DEFAULT
    try:
        value = int(raw)
    except ValueError as error:
        raise _bad(f"The value '{raw}' of parameter maxresults is not a valid integer.") from error
    if not 1 <= value <= PAGE_MAX:
        raise _bad(f"The value of parameter maxresults must be between 1 and {PAGE_MAX}; got {value}.")
    return value


def _encode_token(marker: str) -> str:
    raw = json.dumps({"NextMarker": marker, "TargetLocation": 0}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        marker = json.loads(raw)["NextMarker"]
    except (binascii.Error, ValueError, KeyError, TypeError) as error:
        raise _bad("The $skiptoken parameter is invalid.") from error
    if not isinstance(marker, str):
        raise _bad("The $skiptoken parameter is invalid.")
    return marker


def _paged(request: web.Request, items: list[tuple[str, dict[str, Any]]]) -> web.Response:
    """Key Vault paging: items sorted by key; nextLink is absolute with $skiptoken and maxresults."""
    size = _page_size(request)
    token = request.query.get("$skiptoken")
    if token is not None:
        marker = _decode_token(token)
        items = [(key, body) for key, body in items if key >= marker]
    window = items[:size]
    next_link: str | None = None
    if len(items) > size:
        query = {
            "api-version": request.query.get("api-version", LATEST_VERSION),
            "$skiptoken": _encode_token(items[size][0]),
            "maxresults": str(size),
        }
        next_link = f"{_origin(request)}{request.path.rstrip('/')}?{urlencode(query, safe='$')}"
    return json_response({"value": [body for _, body in window], "nextLink": next_link})


# -- events -----------------------------------------------------------------------------------


def _event(
    state: TwinState, vault: dict[str, Any], name: str, record: dict[str, Any], kind: str, origin: str
) -> dict[str, Any]:
    """An Event Grid schema event for a secret version (azure-facts.md §4)."""
    return {
        "id": str(uuid.uuid4()),
        "topic": vault["resource_id"],
        "subject": name,
        "eventType": EVENT_PREFIX + kind,
        "eventTime": iso(state.clock.now()),
        "data": {
            "Id": f"{origin}/secrets/{name}/{record['version']}",
            "VaultName": vault["name"],
            "ObjectType": "Secret",
            "ObjectName": name,
            "Version": record["version"],
            "NBF": str(record["nbf"]) if record.get("nbf") is not None else None,
            "EXP": str(record["exp"]) if record.get("exp") is not None else None,
        },
        "dataVersion": "1",
        "metadataVersion": "1",
    }


def expiry_events(state: TwinState) -> list[dict[str, Any]]:
    """Emit SecretNearExpiry / SecretExpired for current versions, once per version and expiry.

    NearExpiry: the current version expires within 30 days of the twin's clock. Expired: it
    has expired. Returns the events emitted by this call.
    """
    now = _now(state)
    emitted: list[dict[str, Any]] = []
    for vault_name, vault in _vaults(state).items():
        _purge_due(state, vault)
        origin = _vault_url(state, vault_name)
        for secret in vault["secrets"].values():
            if not secret["versions"]:
                continue
            current = secret["versions"][-1]
            exp = current.get("exp")
            if exp is None:
                continue
            if exp <= now:
                kind = "SecretExpired"
            elif exp - now <= NEAR_EXPIRY.total_seconds():
                kind = "SecretNearExpiry"
            else:
                continue
            key = f"{kind}:{secret['name'].lower()}/{current['version']}/{exp}"
            if vault["emitted"].get(key):
                continue
            vault["emitted"][key] = True
            event = _event(state, vault, secret["name"], current, kind, origin)
            state.emit(event)
            emitted.append(event)
    return emitted


# -- handlers ---------------------------------------------------------------------------------


async def set_secret(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    vault = _vault(request)
    name = _name_param(request)
    body = await _body(request)
    value = body.get("value")
    if value is None:
        raise _bad("Property 'value' is required.")
    if not isinstance(value, str):
        raise _bad("Property 'value' must be a string.")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise _bad(f"The secret value is larger than the maximum of {MAX_VALUE_BYTES} bytes.")
    attributes = _check_attributes(body.get("attributes"))
    tags = _check_tags(body.get("tags"))
    content_type = _check_content_type(body.get("contentType"))
    key = name.lower()
    if key in vault["deleted"]:
        raise ServiceError(
            409,
            "Conflict",
            f"Secret {vault['deleted'][key]['name']} is currently in a deleted but recoverable state, and its name "
            "cannot be reused; in this state, the secret can only be recovered or purged.",
            innererror={"code": "ObjectIsDeletedButRecoverable"},
        )
    now = _now(state)
    record = {
        "version": uuid.uuid4().hex,
        "value": value,
        "contentType": content_type,
        "tags": tags or {},
        "enabled": attributes.get("enabled", True),
        "nbf": attributes.get("nbf"),
        "exp": attributes.get("exp"),
        "created": now,
        "updated": now,
    }
    secret = vault["secrets"].setdefault(key, {"name": name, "versions": []})
    secret["versions"].append(record)
    origin = _origin(request)
    state.emit(_event(state, vault, secret["name"], record, "SecretNewVersionCreated", origin))
    return json_response(_bundle(origin, secret["name"], record, with_value=True))


async def get_secret(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    name = _name_param(request)
    secret = _secret(vault, name)
    record = _version_of(secret, name, params(request).get("version"))
    if not record["enabled"]:
        raise ServiceError(
            403,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            innererror={"code": "SecretDisabled"},
        )
    return json_response(_bundle(_origin(request), secret["name"], record, with_value=True))


async def update_secret(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    vault = _vault(request)
    name = _name_param(request)
    body = await _body(request)
    secret = _secret(vault, name)
    record = _version_of(secret, name, params(request).get("version"))
    if "value" in body:
        raise _bad("The value of a secret cannot be changed by an update; set a new version instead.")
    attributes = _check_attributes(body.get("attributes"))
    tags = _check_tags(body.get("tags"))
    content_type = _check_content_type(body.get("contentType"))
    nbf, exp = attributes.get("nbf", record.get("nbf")), attributes.get("exp", record.get("exp"))
    if nbf is not None and exp is not None and exp <= nbf:
        raise _bad("Property 'attributes.exp' must be later than 'attributes.nbf'.")
    record.update(attributes)
    if tags is not None:
        record["tags"] = tags
    if content_type is not None:
        record["contentType"] = content_type
    record["updated"] = _now(state)
    return json_response(_bundle(_origin(request), secret["name"], record, with_value=False))


async def list_secrets(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    origin = _origin(request)
    items = sorted(
        (key, _item(origin, secret["name"], secret["versions"][-1], with_version=False))
        for key, secret in vault["secrets"].items()
        if secret["versions"]
    )
    return _paged(request, items)


async def list_versions(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    name = _name_param(request)
    secret = vault["secrets"].get(name.lower())
    if secret is None:
        # Key Vault answers an empty list for a name it does not hold. [unverified]
        return json_response({"value": [], "nextLink": None})
    origin = _origin(request)
    items = [
        (f"{index:08d}", _item(origin, secret["name"], record, with_version=True))
        for index, record in enumerate(secret["versions"])
    ]
    return _paged(request, items)


async def delete_secret(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    vault = _vault(request)
    name = _name_param(request)
    secret = _secret(vault, name)
    key = name.lower()
    now = state.clock.now()
    deleted = {
        "name": secret["name"],
        "versions": secret["versions"],
        "deletedDate": int(now.timestamp()),
        "scheduledPurgeDate": int((now + timedelta(days=RECOVERABLE_DAYS)).timestamp()),
    }
    del vault["secrets"][key]
    vault["deleted"][key] = deleted
    origin = _origin(request)
    body = {
        **_deleted_extra(origin, deleted),
        **_bundle(origin, secret["name"], secret["versions"][-1], with_value=False),
    }
    return json_response(body)


def _deleted(vault: dict[str, Any], name: str) -> dict[str, Any]:
    deleted = vault["deleted"].get(name.lower())
    if deleted is None:
        raise _deleted_not_found()
    found: dict[str, Any] = deleted
    return found


async def get_deleted(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    deleted = _deleted(vault, _name_param(request))
    origin = _origin(request)
    body = {
        **_deleted_extra(origin, deleted),
        **_bundle(origin, deleted["name"], deleted["versions"][-1], with_value=False),
    }
    return json_response(body)


async def list_deleted(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    origin = _origin(request)
    items = sorted(
        (
            key,
            {
                **_deleted_extra(origin, deleted),
                **_item(origin, deleted["name"], deleted["versions"][-1], with_version=False),
            },
        )
        for key, deleted in vault["deleted"].items()
    )
    return _paged(request, items)


async def recover_deleted(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    deleted = _deleted(vault, _name_param(request))
    key = deleted["name"].lower()
    del vault["deleted"][key]
    vault["secrets"][key] = {"name": deleted["name"], "versions": deleted["versions"]}
    return json_response(_bundle(_origin(request), deleted["name"], deleted["versions"][-1], with_value=False))


async def purge_deleted(request: web.Request) -> web.StreamResponse:
    vault = _vault(request)
    deleted = _deleted(vault, _name_param(request))
    del vault["deleted"][deleted["name"].lower()]
    return web.Response(status=204)


async def expiry_scan(request: web.Request) -> web.StreamResponse:
    """Control route: emit the expiry events due at the twin's clock (tests move the clock first)."""
    return json_response({"events": expiry_events(state_of(request))})


def setup_vault(app: web.Application, vault_name: str) -> None:
    """Register the secrets data plane of one vault on its own app (its own origin)."""
    app[_VAULT_KEY] = vault_name

    def route(method: str, path: str, handler: Any) -> None:
        add_route(app, method, path, handler, versions=API_VERSIONS, version_error=kv_version_error)

    route("GET", "/secrets", list_secrets)
    # Before /secrets/{name}/{version}: "versions" would otherwise be read as a version id.
    route("GET", "/secrets/{name}/versions", list_versions)
    route("PUT", "/secrets/{name}", set_secret)
    route("DELETE", "/secrets/{name}", delete_secret)
    route("GET", "/secrets/{name}", get_secret)  # also /secrets/{name}/: the latest version
    route("PATCH", "/secrets/{name}", update_secret)
    route("GET", "/secrets/{name}/{version}", get_secret)
    route("PATCH", "/secrets/{name}/{version}", update_secret)
    route("GET", "/deletedsecrets", list_deleted)
    route("GET", "/deletedsecrets/{name}", get_deleted)
    route("DELETE", "/deletedsecrets/{name}", purge_deleted)
    route("POST", "/deletedsecrets/{name}/recover", recover_deleted)


def setup(app: web.Application) -> None:
    """On the ARM app: the control route that fires due expiry events."""
    add_route(app, "POST", "/_twin/keyvault/expiry-scan", expiry_scan, versions=None)


# -- seeding ----------------------------------------------------------------------------------


def _seed_time(raw: Any, where: str) -> int:
    if isinstance(raw, datetime):
        moment = raw
    elif isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError as error:
            raise EstateError(f"{where}: not an ISO 8601 date-time: {raw!r}") from error
    else:
        raise EstateError(f"{where}: expected an ISO 8601 date-time string, got {type(raw).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _seed_number(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise EstateError(f"{where}: expected a number, got {type(raw).__name__}")
    return float(raw)


_VERSION_FIELDS = {
    "value",
    "tags",
    "content_type",
    "expires_in_days",
    "expires",
    "not_before",
    "enabled",
    "created_days_ago",
}
_SECRET_FIELDS = {"name", "versions"} | _VERSION_FIELDS
_VAULT_FIELDS = {"name", "tags", "secrets"}


def _seed_version(
    state: TwinState, item: Any, where: str, default_age_days: float, allowed: set[str]
) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise EstateError(f"{where}: expected a mapping, got {type(item).__name__}")
    unknown = set(item) - allowed
    if unknown:
        raise EstateError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})"
        )
    value = item.get("value")
    if not isinstance(value, str):
        raise EstateError(f"{where}.value: required (a string)")
    tags = item.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise EstateError(f"{where}.tags: expected a mapping of strings to strings")
    if len(tags) > MAX_TAGS:
        raise EstateError(f"{where}.tags: at most {MAX_TAGS} tags")
    content_type = item.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        raise EstateError(f"{where}.content_type: expected a string")
    enabled = item.get("enabled", True)
    if not isinstance(enabled, bool):
        raise EstateError(f"{where}.enabled: expected true or false")
    now = state.clock.now()
    age = (
        _seed_number(item["created_days_ago"], f"{where}.created_days_ago")
        if "created_days_ago" in item
        else default_age_days
    )
    if age < 0:
        raise EstateError(f"{where}.created_days_ago: must not be negative")
    created = int((now - timedelta(days=age)).timestamp())
    if "expires_in_days" in item and "expires" in item:
        raise EstateError(f"{where}: give expires_in_days or expires, not both")
    exp: int | None = None
    if "expires_in_days" in item:
        days = _seed_number(item["expires_in_days"], f"{where}.expires_in_days")
        exp = int((now + timedelta(days=days)).timestamp())
    elif "expires" in item:
        exp = _seed_time(item["expires"], f"{where}.expires")
    nbf = _seed_time(item["not_before"], f"{where}.not_before") if "not_before" in item else None
    if nbf is not None and exp is not None and exp <= nbf:
        raise EstateError(f"{where}: the expiry must be later than not_before")
    return {
        "version": uuid.uuid4().hex,
        "value": value,
        "contentType": content_type,
        "tags": dict(tags),
        "enabled": enabled,
        "nbf": nbf,
        "exp": exp,
        "created": created,
        "updated": created,
    }


def _vault_resource(state: TwinState, ctx: SeedContext, name: str, tags: dict[str, str]) -> dict[str, Any]:
    resource_id = f"{ctx.group_id}/providers/Microsoft.KeyVault/vaults/{name}"
    return {
        "id": resource_id,
        "name": name,
        "type": "Microsoft.KeyVault/vaults",
        "location": ctx.location,
        "tags": tags,
        "properties": {
            "tenantId": state.tenant_id,
            "sku": {"family": "A", "name": "standard"},
            "accessPolicies": [],
            "enableRbacAuthorization": True,
            "enableSoftDelete": True,
            "softDeleteRetentionInDays": RECOVERABLE_DAYS,
            "enablePurgeProtection": None,
            "publicNetworkAccess": "Enabled",
            # The vault's port is only known once the server made its site: a vault seeded
            # before that carries Azure's URL form until the server fills it in.
            "vaultUri": _vault_url(state, name) + "/",
            "provisioningState": "Succeeded",
        },
    }


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    """Seed the `key_vaults` section of one resource group."""
    vaults = _vaults(state)
    for i, item in enumerate(items):
        where = f"[{i}]"
        if not isinstance(item, dict):
            raise EstateError(f"{where}: expected a mapping, got {type(item).__name__}")
        unknown = set(item) - _VAULT_FIELDS
        if unknown:
            raise EstateError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_VAULT_FIELDS))})"
            )
        name = item.get("name")
        if not isinstance(name, str) or not VAULT_NAME.match(name):
            raise EstateError(
                f"{where}.name: a vault name is 3-24 letters, digits and single hyphens, starting with a letter and "
                f"ending with a letter or digit (got {name!r})"
            )
        tags = item.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise EstateError(f"{where}.tags: expected a mapping of strings to strings")
        resource = _vault_resource(state, ctx, name, dict(tags))
        key = next((k for k in vaults if k.lower() == name.lower()), name)
        existing = vaults.get(key)
        if existing is not None and existing["resource_id"].lower() != resource["id"].lower():
            raise EstateError(f"{where}.name: vault names are global; '{name}' is already in {existing['resource_id']}")
        vault = existing or {"name": name, "resource_id": resource["id"], "secrets": {}, "deleted": {}, "emitted": {}}
        secrets = item.get("secrets", [])
        if not isinstance(secrets, list):
            raise EstateError(f"{where}.secrets: expected a list")
        for j, entry in enumerate(secrets):
            swhere = f"{where}.secrets[{j}]"
            if not isinstance(entry, dict):
                raise EstateError(f"{swhere}: expected a mapping, got {type(entry).__name__}")
            secret_name = entry.get("name")
            if not isinstance(secret_name, str) or not NAME.match(secret_name):
                raise EstateError(f"{swhere}.name: 1-127 letters, digits and hyphens (got {secret_name!r})")
            if secret_name.lower() in vault["secrets"]:
                raise EstateError(f"{swhere}.name: the vault already holds a secret '{secret_name}'")
            older = entry.get("versions", [])
            if not isinstance(older, list):
                raise EstateError(f"{swhere}.versions: expected a list of older versions")
            # Older versions default to one day apart, oldest first, before the current one.
            records = [
                _seed_version(state, old, f"{swhere}.versions[{k}]", float(len(older) - k), _VERSION_FIELDS)
                for k, old in enumerate(older)
            ]
            records.append(_seed_version(state, entry, swhere, 0.0, _SECRET_FIELDS))
            created = [r["created"] for r in records]
            if created != sorted(created):
                raise EstateError(f"{swhere}.versions: older versions must be created before newer ones")
            vault["secrets"][secret_name.lower()] = {"name": secret_name, "versions": records}
        vaults[key] = vault
        if existing is None or state.store.get(resource["id"]) is None:
            state.store.put(resource["id"], resource)


register_seeder("key_vaults", seed)
