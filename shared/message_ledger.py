"""What the Functions app received and must remember: Event Grid event ids already taken
(at-least-once delivery: a redelivered event must not run twice) and messages it could not
use (malformed or poisoned: kept for the operator, never retried forever).

One Azure table (default "apimrmessages"):

- PartitionKey "event", RowKey = SHA-256 of the event id: one row per event taken, with
  `event_type` and `taken_at`. Taking an event is an insert, which Table storage refuses
  when the row exists, so of two deliveries of one event arriving at once exactly one
  wins. A run that failed with a transient error gives the event back (`release`) so Event
  Grid's retry can take it again. Table storage has no TTL: `purge` deletes rows older
  than Event Grid's retry window (24 h by default; the sweep calls it with 48 h).
- PartitionKey "deadletter", RowKey = inverted time + a random suffix (newest first):
  `source` (work, poison, events), `message_id`, `dequeue_count`, `instance_id` (when the
  message named one), `reason` (the product's own text: never the message body, which is
  untrusted and may be large).

Event ids come from the payload, so they are hashed into keys: Table keys forbid `/ \\ # ?`
and control characters, and a hash cannot be shaped to collide with another row kind.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.tables import TableStore, storage_error, utc_of

DEFAULT_TABLE = "apimrmessages"
EVENT_PARTITION = "event"
DEAD_LETTER_PARTITION = "deadletter"
_MAX_TICKS = 10**19  # inverted-time keys sort newest first


def event_key(event_id: str) -> str:
    return hashlib.sha256(event_id.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class DeadLetter:
    source: str  # "work", "poison", "events"
    reason: str
    at: datetime
    message_id: str = ""
    dequeue_count: int | None = None
    instance_id: str | None = None


class MessageLedger(TableStore):
    """Event claims (dedupe) and dead letters, in one table of the product's storage."""

    kind = "message"

    def __init__(self, tables: AsyncTableServiceClient, table_name: str = DEFAULT_TABLE) -> None:
        super().__init__(tables, table_name)

    async def claim(self, event_id: str, *, event_type: str, at: datetime) -> bool:
        """Take an event: True the first time, False for every later delivery of it."""
        table = await self._client()
        try:
            await table.create_entity(
                {
                    "PartitionKey": EVENT_PARTITION,
                    "RowKey": event_key(event_id),
                    "event_type": event_type[:200],
                    "taken_at": at,
                }
            )
        except ResourceExistsError:
            return False
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="take an event") from exc
        return True

    async def release(self, event_id: str) -> None:
        """Give an event back after a transient failure, so its redelivery runs."""
        table = await self._client()
        try:
            await table.delete_entity(EVENT_PARTITION, event_key(event_id))
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="release an event") from exc

    async def purge(self, *, older_than: datetime, limit: int = 1000) -> int:
        """Delete event rows taken before `older_than` (at most `limit` per call)."""
        table = await self._client()
        deleted = 0
        try:
            rows = table.query_entities(
                "PartitionKey eq @pk and taken_at lt @cutoff",
                parameters={"pk": EVENT_PARTITION, "cutoff": older_than},
                select=["PartitionKey", "RowKey"],
            )
            async for row in rows:
                if deleted >= limit:
                    break
                await table.delete_entity(row["PartitionKey"], row["RowKey"])
                deleted += 1
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="purge old events") from exc
        return deleted

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        table = await self._client()
        at = letter.at.astimezone(UTC)
        ticks = int(at.timestamp() * 1_000_000)
        entity: dict[str, object] = {
            "PartitionKey": DEAD_LETTER_PARTITION,
            "RowKey": f"{_MAX_TICKS - ticks:020d}-{uuid.uuid4().hex[:8]}",
            "source": letter.source,
            "reason": letter.reason[:4000],
            "at": at,
            "message_id": letter.message_id[:200],
            "instance_id": letter.instance_id or "",
        }
        if letter.dequeue_count is not None:
            entity["dequeue_count"] = letter.dequeue_count
        try:
            await table.create_entity(entity)
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record a dead letter") from exc

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters first."""
        table = await self._client()
        found: list[DeadLetter] = []
        try:
            rows = table.query_entities("PartitionKey eq @pk", parameters={"pk": DEAD_LETTER_PARTITION})
            async for row in rows:
                found.append(
                    DeadLetter(
                        source=str(row.get("source", "")),
                        reason=str(row.get("reason", "")),
                        at=utc_of(row["at"]),
                        message_id=str(row.get("message_id", "")),
                        dequeue_count=int(row["dequeue_count"]) if row.get("dequeue_count") is not None else None,
                        instance_id=str(row["instance_id"]) if row.get("instance_id") else None,
                    )
                )
                if len(found) >= limit:
                    break
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read dead letters") from exc
        return found
