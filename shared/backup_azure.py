"""The production side of backups and test-restores: APIM's native Backup/Restore LROs
through azure-mgmt-apimanagement (with azure-core continuation tokens), the content read a
manifest is made of, and the backup container through azure-storage-blob.

Every client comes from the `ClientFactory`. APIM authenticates to the storage account with
its own managed identity (the Backup/Restore body's accessType); the product reaches the
same container with its own identity to write manifests and prune old backups. An access
key is used only when the operator configured AccessKey, and then it is read from Key Vault
at the moment it is sent and never kept, logged or recorded.

Azure actions: Microsoft.ApiManagement/service/backup/action,
Microsoft.ApiManagement/service/restore/action, Microsoft.ApiManagement/service/read and
service/*/read, Microsoft.Insights/diagnosticSettings/read. Data actions on the backup
account: Storage Blob Data Contributor for the product (manifests, retention) and for each
instance's identity (APIM writes and reads the backup).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.mgmt.apimanagement import models as apim_models

from shared.azure import ClientFactory
from shared.backup import ApiContent, Content, ProductContent, RunKind
from shared.errors import PermanentError, TransientError
from shared.inventory import instance_ref
from shared.settings import BackupAccess, BackupSettings
from shared.snapshot import POLICY_FORMAT, current_apis, text
from shared.source import translate

T = TypeVar("T")
# One poll tick of azure-core waits this long between status reads at most; APIM says
# Retry-After: 60, which azure-core honours over any polling interval.
POLL_INTERVAL = 5.0


@dataclass(frozen=True)
class ServiceFacts:
    """What starting a backup or a restore needs to know about an instance."""

    id: str
    name: str
    sku: str
    tags: dict[str, str]
    system_assigned: bool
    user_assigned_client_ids: tuple[str, ...]


@dataclass(frozen=True)
class LroOutcome:
    status: str  # InProgress | Succeeded | Failed | Canceled
    error_code: str | None = None
    error: str | None = None


def _parts(instance_id: str) -> tuple[str, str, str]:
    ref = instance_ref(instance_id, None, None)
    if ref is None:
        raise PermanentError(f"not an APIM service resource id: {instance_id!r}")
    return ref.subscription_id, ref.resource_group, ref.name


async def _all(pager: AsyncIterable[T]) -> list[T]:
    return [item async for item in pager]


def _sha(value: str | None) -> str | None:
    return hashlib.sha256(value.encode()).hexdigest() if value is not None else None


class AzureBackupApi:
    """`BackupAzure` (handlers/backup.py, handlers/restore_test.py) over the factory's clients."""

    def __init__(self, factory: ClientFactory, settings: BackupSettings, *, poll_interval: float = POLL_INTERVAL):
        self.factory = factory
        self.settings = settings
        self.poll_interval = poll_interval

    async def service(self, instance_id: str) -> ServiceFacts:
        sub, rg, name = _parts(instance_id)
        try:
            model = await self.factory.apim_async(sub).api_management_service.get(rg, name)
        except AzureError as error:
            raise translate(error, f"reading {instance_id}") from error
        identity = model.identity
        kind = text(identity.type) if identity is not None else ""
        assigned = identity.user_assigned_identities if identity is not None else None
        return ServiceFacts(
            id=model.id or instance_id,
            name=model.name or name,
            sku=text(model.sku.name) or "",
            tags=dict(model.tags or {}),
            system_assigned="SystemAssigned" in (kind or ""),
            user_assigned_client_ids=tuple(v.client_id for v in (assigned or {}).values() if v.client_id),
        )

    async def _parameters(
        self, facts: ServiceFacts, blob: str, *, with_key: bool
    ) -> apim_models.ApiManagementServiceBackupRestoreParameters:
        access = self.settings.access
        client_id: str | None = None
        key: str | None = None
        if access is BackupAccess.MANAGED_IDENTITY:
            if facts.system_assigned:
                access = BackupAccess.SYSTEM_ASSIGNED
            elif facts.user_assigned_client_ids:
                access = BackupAccess.USER_ASSIGNED
            else:
                raise PermanentError(
                    f"{facts.id} has no managed identity to reach the backup storage account with "
                    "(enable one and grant it Storage Blob Data Contributor on the account)"
                )
        if access is BackupAccess.USER_ASSIGNED:
            wanted = self.settings.identity_client_id
            ids = facts.user_assigned_client_ids
            if wanted is not None and wanted.lower() not in {i.lower() for i in ids}:
                raise PermanentError(f"{facts.id} carries no user-assigned identity with client id {wanted}")
            if wanted is None and len(ids) != 1:
                raise PermanentError(
                    f"{facts.id} carries {len(ids)} user-assigned identities: name one in "
                    "APIMR_BACKUP_IDENTITY_CLIENT_ID"
                )
            client_id = wanted or ids[0]
        if access is BackupAccess.ACCESS_KEY and with_key:
            key = await self._access_key()
        return apim_models.ApiManagementServiceBackupRestoreParameters(
            storage_account=self.settings.storage_account,
            container_name=self.settings.container,
            backup_name=blob,
            access_type=access.value,
            client_id=client_id,
            access_key=key,
        )

    async def _access_key(self) -> str:
        url = self.settings.access_key_secret
        assert url is not None  # settings require it with AccessKey
        vault, _, rest = url.partition("/secrets/")
        name = rest.split("/", 1)[0]
        try:
            secret = await self.factory.secrets_async(vault).get_secret(name)
        except AzureError as error:
            raise translate(error, f"reading the backup access key secret {name!r}") from error
        if not secret.value:
            raise PermanentError(f"the backup access key secret {name!r} has no value")
        return secret.value

    async def begin(self, kind: RunKind, facts: ServiceFacts, blob: str) -> str:
        """Start the Backup (into `blob`) or the Restore (from `blob`) LRO; its continuation token."""
        sub, rg, name = _parts(facts.id)
        params = await self._parameters(facts, blob, with_key=True)
        operations = self.factory.apim_async(sub).api_management_service
        start = operations.begin_backup if kind is RunKind.BACKUP else operations.begin_restore
        what = f"starting the {kind.value.replace('_', ' ')} of {facts.id}"
        try:
            poller = await start(rg, name, params, polling_interval=self.poll_interval)
        except HttpResponseError as error:
            translated = translate(error, what)
            # ARM's refusal says what is missing (e.g. the action a 403 lacks); the request
            # body (which may hold an access key) is never part of it.
            detail = getattr(getattr(error, "error", None), "message", None)
            if detail:
                raise type(translated)(f"{translated}: {str(detail)[:400]}") from error
            raise translated from error
        except AzureError as error:
            raise translate(error, what) from error
        finally:
            del params  # may hold the access key
        return poller.continuation_token()

    async def poll(self, kind: RunKind, instance_id: str, token: str, *, max_wait: float) -> LroOutcome:
        """Resume the LRO from `token` and wait for it at most `max_wait` seconds."""
        sub, rg, name = _parts(instance_id)
        operations = self.factory.apim_async(sub).api_management_service
        resume = operations.begin_backup if kind is RunKind.BACKUP else operations.begin_restore
        try:
            # With a continuation token the SDK sends nothing but status reads; the body is unused.
            poller = await resume(rg, name, _NO_BODY, continuation_token=token, polling_interval=self.poll_interval)
        except ValueError as error:
            return LroOutcome(
                "Failed", "InvalidContinuationToken", f"the stored continuation token is unusable: {error}"
            )
        try:
            await asyncio.wait_for(poller.result(), timeout=max(max_wait, 0.001))
        except TimeoutError:
            return LroOutcome("InProgress")
        except HttpResponseError as error:
            status = poller.status()
            code = getattr(getattr(error, "error", None), "code", None)
            if status not in ("Failed", "Canceled"):
                if error.status_code in (408, 429) or (error.status_code or 0) >= 500:
                    raise translate(error, f"polling the {kind.value} of {instance_id}") from error
                status = "Failed"
            message = getattr(getattr(error, "error", None), "message", None) or str(error.reason or "")
            return LroOutcome(status, code or f"Operation{status}", str(message)[:500])
        except AzureError as error:
            raise translate(error, f"polling the {kind.value} of {instance_id}") from error
        return LroOutcome("Succeeded")

    async def content(self, instance_id: str) -> tuple[Content, dict[str, Any]]:
        """What the manifest records: the content a backup carries and the settings it does not."""
        sub, rg, name = _parts(instance_id)
        apim = self.factory.apim_async(sub)
        try:
            service = await apim.api_management_service.get(rg, name)
            apis = current_apis(await _all(apim.api.list_by_service(rg, name)))
            products = await _all(apim.product.list_by_service(rg, name))
            named_values = await _all(apim.named_value.list_by_service(rg, name))
            subscriptions = await _all(apim.subscription.list(rg, name))
            users = await _all(apim.user.list_by_service(rg, name))
            service_policy = await self._policy(apim.policy.get(rg, name, "policy", format=POLICY_FORMAT))
            api_content: dict[str, ApiContent] = {}
            for api in apis:
                api_name = api.name or ""
                operations = await _all(apim.api_operation.list_by_api(rg, name, api_name))
                policy = await self._policy(apim.api_policy.get(rg, name, api_name, "policy", format=POLICY_FORMAT))
                api_content[api_name] = ApiContent(
                    path=api.path or "",
                    operations=tuple(sorted(o.name or "" for o in operations)),
                    policy_sha256=_sha(policy),
                )
            product_content: dict[str, ProductContent] = {}
            for product in products:
                pid = product.name or ""
                linked = await _all(apim.product_api.list_by_product(rg, name, pid))
                policy = await self._policy(apim.product_policy.get(rg, name, pid, "policy", format=POLICY_FORMAT))
                product_content[pid] = ProductContent(
                    apis=tuple(sorted(a.name or "" for a in linked)), policy_sha256=_sha(policy)
                )
            diagnostics = await _all(
                self.factory.monitor_async(sub).diagnostic_settings.list(service.id or instance_id)
            )
        except AzureError as error:
            raise translate(error, f"reading the content of {instance_id}") from error
        content = Content(
            apis=api_content,
            products=product_content,
            service_policy_sha256=_sha(service_policy),
            named_values=tuple(sorted(n.name or "" for n in named_values)),
            subscription_count=len(subscriptions),
            user_count=len(users),
        )
        identity = service.identity
        not_in_backup: dict[str, Any] = {
            "customProperties": dict(sorted((service.custom_properties or {}).items())),
            "identity": text(identity.type) if identity is not None else None,
            "publicNetworkAccess": text(service.public_network_access),
            "virtualNetworkType": text(service.virtual_network_type),
            "hostnameConfigurations": len(service.hostname_configurations or ()),
            "certificates": len(service.certificates or ()),
            "diagnosticSettings": sorted(str(d.name) for d in diagnostics),
        }
        return content, not_in_backup

    async def _policy(self, call: Any) -> str | None:
        try:
            model: apim_models.PolicyContract = await call
        except ResourceNotFoundError:
            return None
        return model.value


class _NoBody(apim_models.ApiManagementServiceBackupRestoreParameters):
    """The body argument of a resumed poller (the SDK does not send it)."""

    def __init__(self) -> None:
        super().__init__(storage_account="-", container_name="-", backup_name="-")


_NO_BODY = _NoBody()


class AzureBackupBlobs:
    """`BackupBlobs`: the backup container, with the product's own identity."""

    def __init__(self, factory: ClientFactory, settings: BackupSettings) -> None:
        self.factory = factory
        self.settings = settings

    def _container(self) -> Any:
        return self.factory.backup_container_async(self.settings.blob_url, self.settings.container)

    def _what(self, blob: str) -> str:
        return f"{self.settings.storage_account}/{self.settings.container}/{blob}"

    async def ensure_container(self) -> None:
        try:
            await self._container().create_container()
        except ResourceExistsError:
            return
        except AzureError as error:
            raise _storage(error, f"creating container {self.settings.container}") from error

    async def put(self, blob: str, data: str) -> None:
        try:
            await self._container().upload_blob(blob, data.encode(), overwrite=True)
        except AzureError as error:
            raise _storage(error, f"writing {self._what(blob)}") from error

    async def get(self, blob: str) -> bytes | None:
        try:
            downloader = await self._container().download_blob(blob)
            data: bytes = await downloader.readall()
        except ResourceNotFoundError:
            return None
        except AzureError as error:
            raise _storage(error, f"reading {self._what(blob)}") from error
        return data

    async def exists(self, blob: str) -> bool:
        try:
            return bool(await self._container().get_blob_client(blob).exists())
        except AzureError as error:
            raise _storage(error, f"checking {self._what(blob)}") from error

    async def delete(self, blob: str) -> None:
        try:
            await self._container().delete_blob(blob)
        except ResourceNotFoundError:
            return
        except AzureError as error:
            raise _storage(error, f"deleting {self._what(blob)}") from error


def _storage(error: AzureError, what: str) -> TransientError | PermanentError:
    status = getattr(error, "status_code", None)
    code = getattr(error, "error_code", None) or type(error).__name__
    if status is None or status in (408, 429) or status >= 500:
        return TransientError(f"{what}: {status or 'no response'} {code}")
    return PermanentError(f"{what}: {status} {code}")
