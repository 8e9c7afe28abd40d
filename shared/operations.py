"""Long-running HTTP API operations (a scan, an apply), in Azure Table storage.

The API answers 202 with the operation's URL and runs the work in the background; the
caller polls the operation until its status is `succeeded` (the result holds the report)
or `failed` (the error says why). Kept in the product's storage account, so any Function
instance answers the poll, not only the one that ran the work.

Layout (one table, default "operations"): PartitionKey = the operation id (a UUID),
RowKey "op": kind, instance_id, status, created_at, updated_at, caller (oid, appid),
error, and the result JSON split into `result_0`, `result_1`, ... (a Table string property
holds at most 64 KiB; an entity 1 MiB). Results are the product's own reports: paths,
statuses and diffs, never secret values (plans never hold any).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.errors import NotFoundError, PermanentError
from shared.tables import TableStore, storage_error, utc_of

DEFAULT_TABLE = "operations"
ROW = "op"
CHUNK_CHARS = 30_000  # UTF-16: 60 KB, inside a string property's 64 KiB
MAX_CHUNKS = 16  # 16 * 60 KB stays under an entity's 1 MiB
_OPERATION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class OperationStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class OperationKind(StrEnum):
    SCAN = "scan"
    APPLY = "apply"
    BACKUP = "backup"
    RESTORE_TEST = "restore_test"
    ROTATE = "rotate"  # key rotation through the Key Vault ledger


@dataclass(frozen=True)
class Operation:
    id: str
    kind: OperationKind
    instance_id: str
    status: OperationStatus
    created_at: datetime
    updated_at: datetime
    caller_oid: str
    caller_appid: str
    result: Any = None  # JSON value once succeeded
    error: str | None = None  # once failed

    def public(self) -> dict[str, Any]:
        """What the API answers for this operation."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "instance": self.instance_id,
            "status": self.status.value,
            "created": self.created_at.isoformat(),
            "updated": self.updated_at.isoformat(),
            "caller": {"oid": self.caller_oid, "appid": self.caller_appid},
            "result": self.result,
            "error": self.error,
        }


def _chunks(result: Any) -> dict[str, Any]:
    text = json.dumps(result, separators=(",", ":"))
    parts = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    if len(parts) > MAX_CHUNKS:
        raise PermanentError(
            f"the operation's result is too large to keep ({len(text)} characters, at most {CHUNK_CHARS * MAX_CHUNKS})"
        )
    return {"result_parts": len(parts), **{f"result_{i}": part for i, part in enumerate(parts)}}


def _operation(entity: TableEntity) -> Operation:
    try:
        result = None
        parts = int(entity.get("result_parts") or 0)
        if parts:
            result = json.loads("".join(str(entity[f"result_{i}"]) for i in range(parts)))
        return Operation(
            id=str(entity["PartitionKey"]),
            kind=OperationKind(entity["kind"]),
            instance_id=str(entity["instance_id"]),
            status=OperationStatus(entity["status"]),
            created_at=utc_of(entity["created_at"]),
            updated_at=utc_of(entity["updated_at"]),
            caller_oid=str(entity.get("caller_oid", "")),
            caller_appid=str(entity.get("caller_appid", "")),
            result=result,
            error=str(entity["error"]) if entity.get("error") else None,
        )
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"operation row {entity.get('PartitionKey')!r} is malformed ({exc!r})") from exc


class OperationsStore(TableStore):
    """Create an operation (`start`), finish it (`succeed`/`fail`), read it (`get`)."""

    kind = "operations"

    def __init__(
        self,
        tables: AsyncTableServiceClient,
        table_name: str = DEFAULT_TABLE,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(tables, table_name)
        self._clock = clock

    async def start(self, kind: OperationKind, instance_id: str, *, caller_oid: str, caller_appid: str) -> Operation:
        now = self._clock()
        operation = Operation(
            id=str(uuid.uuid4()),
            kind=kind,
            instance_id=instance_id,
            status=OperationStatus.RUNNING,
            created_at=now,
            updated_at=now,
            caller_oid=caller_oid,
            caller_appid=caller_appid,
        )
        table = await self._client()
        try:
            await table.create_entity(
                {
                    "PartitionKey": operation.id,
                    "RowKey": ROW,
                    "kind": kind.value,
                    "instance_id": instance_id,
                    "status": operation.status.value,
                    "created_at": now,
                    "updated_at": now,
                    "caller_oid": caller_oid,
                    "caller_appid": caller_appid,
                }
            )
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record an operation") from exc
        return operation

    async def _finish(self, operation_id: str, fields: dict[str, Any]) -> Operation:
        table = await self._client()
        try:
            await table.upsert_entity(
                {"PartitionKey": operation_id, "RowKey": ROW, "updated_at": self._clock(), **fields},
                mode=UpdateMode.MERGE,
            )
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="finish an operation") from exc
        return await self.get(operation_id)

    async def succeed(self, operation_id: str, result: Any) -> Operation:
        return await self._finish(operation_id, {"status": OperationStatus.SUCCEEDED.value, **_chunks(result)})

    async def fail(self, operation_id: str, error: str) -> Operation:
        return await self._finish(operation_id, {"status": OperationStatus.FAILED.value, "error": error[:4000]})

    async def get(self, operation_id: str) -> Operation:
        if not _OPERATION_ID.match(operation_id):
            raise NotFoundError(f"no operation {operation_id!r}")
        table = await self._client()
        try:
            entity = await table.get_entity(operation_id, ROW)
        except ResourceNotFoundError as exc:
            raise NotFoundError(f"no operation {operation_id!r}") from exc
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an operation") from exc
        return _operation(entity)
