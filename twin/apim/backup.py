"""Backup and restore of a service into real Azurite blobs (LROs)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from twin import arm, rbac
from twin.apim.common import (
    BACKUP_ACCESS_TYPES,
    _drop_secrets_under,
    _emit,
    _enum,
    _invalid,
    _iso,
    _now,
    _secrets,
    _service,
)
from twin.apim.service import _render_service, _service_children
from twin.arm import write_context
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
    read_json,
    state_of,
)

# -- backup and restore -------------------------------------------------------------------------------------

BACKUP_FORMAT = "apim-twin-backup/1"


def backup_document(state: TwinState, service: Resource) -> dict[str, Any]:
    """The configuration a backup holds: every sub-resource with its secrets (not the
    protocol/cipher settings, VNet, identity or Azure Monitor diagnostic settings)."""
    prefix = len(service.id)
    resources = []
    for child in _service_children(state, service.id):
        entry: dict[str, Any] = {"path": child.id[prefix:], "body": child.body}
        secret = _secrets(state).get(norm(child.id))
        if secret:
            entry["secrets"] = secret
        resources.append(entry)
    links = {
        k[len(norm(service.id)) :]: [a[prefix:] for a in v]
        for k, v in state.extra.get("apim", {}).get("product_apis", {}).items()
        if k.startswith(norm(service.id) + "/")
    }
    return {
        "format": BACKUP_FORMAT,
        "service": {
            "id": service.id,
            "name": service.body["name"],
            "sku": service.body["sku"],
            "location": service.body["location"],
        },
        "takenAt": _iso(_now(state)),
        "resources": resources,
        "productApis": links,
    }


def restore_document(state: TwinState, service: Resource, document: dict[str, Any]) -> None:
    """Replace the service's whole configuration (subscriptions included) with a backup's."""
    for child in _service_children(state, service.id):
        state.store.delete(child.id)
    _drop_secrets_under(state, service.id, include_self=False)
    links = state.extra.setdefault("apim", {}).setdefault("product_apis", {})
    for key in [k for k in links if k.startswith(norm(service.id) + "/")]:
        del links[key]
    old_id = str(document["service"]["id"])
    for entry in document.get("resources", []):
        rid = service.id + entry["path"]
        # References inside the configuration (scopes, owners, logger ids) move to this service.
        text = re.sub(re.escape(old_id), lambda _: service.id, json.dumps(entry["body"]), flags=re.IGNORECASE)
        body = json.loads(text)
        body["id"] = rid
        state.store.put(rid, body)
        if entry.get("secrets"):
            _secrets(state)[norm(rid)] = dict(entry["secrets"])
    for path, apis in (document.get("productApis") or {}).items():
        links[norm(service.id) + path] = [service.id + a for a in apis]


def _storage_account(state: TwinState, name: Any) -> dict[str, str]:
    accounts: dict[str, dict[str, str]] = state.extra.get("storage") or {}
    if not isinstance(name, str) or name not in accounts:
        raise _invalid(
            "storageAccount",
            f"Storage account '{name}' was not found (known to the twin: {', '.join(sorted(accounts)) or 'none'}).",
        )
    return accounts[name]


def _backup_request(
    state: TwinState, service: Resource, body: dict[str, Any], action: str
) -> tuple[dict[str, str], str, str, str | None]:
    """The account, container, blob and the key the twin writes with; key None: the managed
    identity named is not authorized on the container (the LRO then fails, as Azure's does)."""
    for required in ("storageAccount", "containerName", "backupName"):
        if not isinstance(body.get(required), str) or not body[required]:
            raise _invalid(required, f"'{required}' is required.")
    account = _storage_account(state, body["storageAccount"])
    access = _enum(body.get("accessType", "AccessKey"), BACKUP_ACCESS_TYPES, "accessType", case_sensitive=True)
    identity = service.body.get("identity") or {}
    key: str | None
    if access == "AccessKey":
        key = body.get("accessKey")
        if not isinstance(key, str) or not key:
            raise _invalid("accessKey", "'accessKey' is required when accessType is AccessKey.")
    elif access == "SystemAssignedManagedIdentity":
        if "SystemAssigned" not in str(identity.get("type", "")):
            raise ServiceError(400, "InvalidParameters", "The service has no system-assigned managed identity.")
        principal = str(identity.get("principalId") or "")
        key = account["account_key"] if _identity_may(state, principal, body, action) else None
    else:
        client_id = body.get("clientId")
        assigned = identity.get("userAssignedIdentities") or {}
        found = [v for v in assigned.values() if client_id and v.get("clientId") == client_id]
        if not found:
            raise ServiceError(
                400, "InvalidParameters", f"The service has no user-assigned identity with client id '{client_id}'."
            )
        principal = str(found[0].get("principalId") or "")
        key = account["account_key"] if _identity_may(state, principal, body, action) else None
    return account, body["containerName"], body["backupName"], key


# Storage's answer to an OAuth caller whose roles lack the data action (Azure Storage error
# codes: AuthorizationPermissionMismatch, 403) [unverified: how APIM words the failed LRO].
NOT_AUTHORIZED = (
    "AuthorizationPermissionMismatch",
    "This request is not authorized to perform this operation using this permission.",
)
BLOB_WRITE = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write"
BLOB_READ = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"


def _identity_may(state: TwinState, principal_id: str, body: dict[str, Any], action: str) -> bool:
    """Whether the instance's managed identity may `action` blobs in the container, by Azure
    RBAC on the storage account (Storage Blob Data Contributor grants read and write), as
    Learn's backup article requires ("Assign the identity the Storage Blob Data Contributor
    role, scoped to the storage account"). An account without an `id` in the estate cannot
    be granted anything; `rbac: off` lets any identity in."""
    if not rbac.enabled(state):
        return True
    account_id = (state.extra.get("storage_ids") or {}).get(body["storageAccount"])
    if not principal_id or account_id is None:
        return False
    scope = f"{account_id}/blobServices/default/containers/{body['containerName']}"
    return rbac.allowed(state, principal_id, action, scope, data=True)


BACKUP_LIFETIME = timedelta(days=30)


def _expired(state: TwinState, document: dict[str, Any]) -> bool:
    try:
        taken = datetime.fromisoformat(str(document.get("takenAt")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return _now(state) - taken > BACKUP_LIFETIME


class _Skip(Exception):
    """No storage call: the identity may not (the failure is already set)."""


def _blob_client(state: TwinState, account_name: str, account: dict[str, str], key: str) -> Any:
    from azure.storage.blob.aio import BlobServiceClient

    return BlobServiceClient(
        account_url=account["blob_url"],
        credential={"account_name": account_name, "account_key": key},
        connection_verify=state.extra.get("ca_file") or True,
    )


def _storage_code(error: Exception, fallback: str) -> str:
    code = getattr(error, "error_code", None)
    return str(getattr(code, "value", code) or fallback)


def _fail_operation(state: TwinState, response: web.Response, code: str, message: str) -> None:
    """Make the operation `response` started end Failed (the request was accepted; the work fails)."""
    op_id = response.headers["Location"].split("/operationresults/", 1)[1].split("?", 1)[0]
    op = state.operations[op_id]
    op.outcome = "Failed"
    op.error = {"code": code, "message": message}


async def backup_service(request: web.Request) -> web.StreamResponse:
    from azure.core.exceptions import AzureError, HttpResponseError

    state = state_of(request)
    service = _service(request)
    body = await read_json(request)
    account, container, blob, key = _backup_request(state, service, body, BLOB_WRITE)
    document = backup_document(state, service)
    failure: tuple[str, str] | None = None if key is not None else NOT_AUTHORIZED
    try:
        if failure is not None:
            raise _Skip
        async with _blob_client(state, body["storageAccount"], account, key or "") as client:
            await client.get_container_client(container).upload_blob(
                blob, json.dumps(document).encode(), overwrite=True
            )
    except HttpResponseError as error:
        failure = (
            _storage_code(error, "BackupFailed"),
            f"Backup to {body['storageAccount']}/{container}/{blob} failed: {error.reason}",
        )
    except (AzureError, ValueError) as error:
        failure = ("BackupFailed", f"Backup failed: {type(error).__name__}")
    except _Skip:
        pass
    ctx = write_context(request)
    resource_id = service.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        _emit(state, ctx, resource_id, "action", "backup")
        return _render_service(current) if current else {}

    response = arm.start_operation(request, resource_id=resource_id, status_parent=resource_id, on_complete=finish)
    if failure is not None:
        _fail_operation(state, response, *failure)
    return response


async def restore_service(request: web.Request) -> web.StreamResponse:
    from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

    state = state_of(request)
    service = _service(request)
    body = await read_json(request)
    account, container, blob, key = _backup_request(state, service, body, BLOB_READ)
    document: dict[str, Any] | None = None
    failure: tuple[str, str] | None = None if key is not None else NOT_AUTHORIZED
    try:
        if failure is not None:
            raise _Skip
        async with _blob_client(state, body["storageAccount"], account, key or "") as client:
            downloader = await client.get_container_client(container).download_blob(blob)
            document = json.loads(await downloader.readall())
    except ResourceNotFoundError:
        failure = ("BackupNotFound", f"Backup '{blob}' was not found in {body['storageAccount']}/{container}.")
    except HttpResponseError as error:
        failure = (_storage_code(error, "RestoreFailed"), f"Restore failed: {error.reason}")
    except (AzureError, ValueError) as error:
        failure = ("RestoreFailed", f"Restore failed: {type(error).__name__}")
    except _Skip:
        pass
    if document is not None and (not isinstance(document, dict) or document.get("format") != BACKUP_FORMAT):
        failure, document = ("InvalidBackup", f"'{blob}' is not an API Management backup."), None
    if document is not None and _expired(state, document):
        # Learn: "Each backup expires after 30 days. If you attempt to restore a backup after the
        # 30-day expiration period has expired, the restore will fail with a Cannot restore:
        # backup expired message." [unverified: the error code]
        failure, document = ("BackupExpired", "Cannot restore: backup expired"), None
    if document is not None and document["service"]["sku"]["name"] != service.body["sku"]["name"]:
        raise ServiceError(
            400,
            "InvalidParameters",
            f"A {document['service']['sku']['name']} backup cannot be restored into a "
            f"{service.body['sku']['name']} service.",
        )
    ctx = write_context(request)
    resource_id = service.id

    def finish() -> dict[str, Any]:
        current = state.store.get(resource_id)
        if current is None:
            return {}
        if document is not None:
            restore_document(state, current, document)
        done = state.store.put(resource_id, current.body)
        _emit(state, ctx, resource_id, "action", "restore")
        return _render_service(done)

    response = arm.start_operation(request, resource_id=resource_id, status_parent=resource_id, on_complete=finish)
    if failure is not None:
        _fail_operation(state, response, *failure)
    return response
