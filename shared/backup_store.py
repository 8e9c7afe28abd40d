"""The backup and test-restore records, in Azure Table storage (table "backups").

Layout: PartitionKey = `journal.instance_key(source instance id)`, so one instance's
backups and test-restores are one partition; RowKey = `journal.row_key_for(started_at)`
(newest first). Properties: the `BackupRun` fields. The continuation token is azure-core's
JSON token (no Authorization header, no request body: nothing secret); differences name
APIs, operations and named values, never values.

This table is the intent record of the two LROs the product starts (backup and restore):
a row is written `starting` before the POST, `running` with the token after it, and
finished afterwards (see `shared/backup.py`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from azure.core.exceptions import AzureError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.backup import BackupRun, RunKind, RunStatus, backup_status
from shared.journal import instance_key, row_key_for
from shared.model import BackupStatus
from shared.tables import TableStore, storage_error, utc_of

DEFAULT_TABLE = "backups"
# Table string properties hold at most 32K characters; a longer diff is cut with a marker.
_MAX_TEXT = 30_000


def new_run_id(at: datetime) -> str:
    """Inverted microseconds + a uuid: newest first in the partition, unique."""
    return row_key_for(at)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 20] + "… (cut)"


def _entity(run: BackupRun) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": instance_key(run.instance_id),
        "RowKey": run.run_id,
        "instance_id": run.instance_id,
        "kind": run.kind.value,
        "status": run.status.value,
        "started_at": run.started_at,
        "blob": run.blob,
        "verified": run.verified,
        "pruned": run.pruned,
        "correlation_id": run.correlation_id,
        "differences": _cut(json.dumps(list(run.differences))),
        "not_restored": _cut(json.dumps(list(run.not_restored))),
    }
    optional = {
        "continuation": run.continuation,
        "finished_at": run.finished_at,
        "error_code": run.error_code,
        "error": run.error[:2000] if run.error else None,
        "target_id": run.target_id,
        "duration_s": run.duration.total_seconds() if run.duration is not None else None,
    }
    entity.update({k: v for k, v in optional.items() if v is not None})
    return entity


def _texts(raw: Any) -> tuple[str, ...]:
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return (str(raw),)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _run(entity: Any) -> BackupRun:
    return BackupRun(
        instance_id=str(entity["instance_id"]),
        run_id=str(entity["RowKey"]),
        kind=RunKind(entity["kind"]),
        status=RunStatus(entity["status"]),
        started_at=utc_of(entity["started_at"]),
        blob=str(entity.get("blob") or ""),
        continuation=entity.get("continuation"),
        finished_at=utc_of(entity["finished_at"]) if entity.get("finished_at") else None,
        error_code=entity.get("error_code"),
        error=entity.get("error"),
        target_id=entity.get("target_id"),
        differences=_texts(entity.get("differences")),
        not_restored=_texts(entity.get("not_restored")),
        verified=bool(entity.get("verified")),
        pruned=bool(entity.get("pruned")),
        correlation_id=str(entity.get("correlation_id") or ""),
    )


class BackupStore(TableStore):
    """The `BackupRecords` protocol of handlers/backup.py and handlers/restore_test.py."""

    kind = "backups"

    def __init__(self, tables: AsyncTableServiceClient, table_name: str = DEFAULT_TABLE) -> None:
        super().__init__(tables, table_name)

    async def save(self, run: BackupRun) -> None:
        """Insert or replace the run's row (a run is written by one worker at a time: the
        timer never overlaps itself)."""
        table = await self._client()
        try:
            await table.upsert_entity(_entity(run), mode=UpdateMode.REPLACE)
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="save run") from exc

    async def runs(self, instance_id: str, *, limit: int = 200) -> list[BackupRun]:
        """The instance's runs, newest first (at most `limit`)."""
        table = await self._client()
        key = instance_key(instance_id).replace("'", "''")
        out: list[BackupRun] = []
        try:
            async for entity in table.query_entities(f"PartitionKey eq '{key}'", results_per_page=min(limit, 1000)):
                out.append(_run(entity))
                if len(out) >= limit:
                    break
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read runs") from exc
        return out

    async def status(self, instance_id: str) -> BackupStatus:
        return BackupStatus(**backup_status(await self.runs(instance_id)))
