"""The production `InstanceSource`: inventory and snapshots through the client factory.

Translates Azure SDK failures into the product's transient/permanent errors so handlers
never see SDK exception types.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, datetime

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from shared.azure import ClientFactory
from shared.backup_store import BackupStore
from shared.errors import PermanentError, RemediatorError, TransientError
from shared.inventory import InstanceRef, describe_failure, discover, locate
from shared.model import Snapshot
from shared.settings import Settings
from shared.snapshot import read_snapshot


def translate(error: AzureError, what: str) -> TransientError | PermanentError:
    """An SDK error as the product's: 429/5xx/network are transient, the rest permanent.

    Without an HTTP answer the message names the host the transport could not reach and
    why (e.g. "ConnectionRefusedError: connection refused"), never the request's query.
    """
    status = getattr(error, "status_code", None)
    code = getattr(getattr(error, "error", None), "code", None) or type(error).__name__
    if isinstance(error, ServiceRequestError | ServiceResponseError) and status is None:
        return TransientError(f"{what}: {describe_failure(error)}")
    if isinstance(error, ServiceRequestError | ServiceResponseError) or status in (408, 429, 500, 502, 503, 504):
        return TransientError(f"{what}: {status or 'no response'} {code}")
    if isinstance(error, ResourceNotFoundError):
        return PermanentError(f"{what}: not found ({code})")
    if isinstance(error, ClientAuthenticationError | HttpResponseError):
        return PermanentError(f"{what}: {status} {code}")
    return PermanentError(f"{what}: {code}")


class AzureInstanceSource:
    def __init__(self, factory: ClientFactory, settings: Settings, *, parts: frozenset[str] | None = None) -> None:
        """`parts`: read only these optional snapshot parts (`read_plan.parts_needed`); None: all."""
        self.factory = factory
        self.settings = settings
        self.parts = parts
        # Keyed hashes compare secrets without holding them; the key lives and dies with
        # the process, so a hash in a snapshot is useless anywhere else.
        self.hash_key = secrets.token_bytes(32)

    async def discover(self) -> tuple[InstanceRef, ...]:
        try:
            return await discover(self.factory, self.settings)
        except AzureError as error:
            raise translate(error, "listing APIM instances") from error

    async def locate(self, instance_id: str) -> InstanceRef | None:
        try:
            return await locate(self.factory, self.settings, instance_id)
        except AzureError as error:
            raise translate(error, f"reading {instance_id}") from error

    async def read(self, ref: InstanceRef) -> Snapshot:
        try:
            snapshot = await read_snapshot(
                self.factory,
                ref,
                key_vault_url=self.settings.key_vault_url,
                hash_key=self.hash_key,
                now=datetime.now(UTC),
                parts=self.parts,
            )
        except AzureError as error:
            raise translate(error, f"reading {ref.id}") from error
        return await self._with_backups(snapshot)

    async def _with_backups(self, snapshot: Snapshot) -> Snapshot:
        """The backup records (BAK rules) from the product's own table, not from ARM."""
        if self.settings.backup is None:
            note = "backups: not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)"
            return replace(snapshot, not_configured=tuple(sorted((*snapshot.not_configured, note))))
        try:
            status = await BackupStore(self.factory.table_service_async()).status(snapshot.service.id)
        except RemediatorError as error:
            return replace(snapshot, unreadable=tuple(sorted((*snapshot.unreadable, f"backups: {error}"))))
        return replace(snapshot, backups=status)
