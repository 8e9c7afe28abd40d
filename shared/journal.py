"""Intent journal and audit trail in Azure Table storage.

Every change the product makes to Azure is journaled BEFORE it is made (`record_intent`)
and its outcome after (`record_outcome`), so the next worker can resume or roll back what
a crashed one left (`unfinished`) and an operator can read who changed what and why
(`history`).

Layout (one table, default "remediationjournal"):

- PartitionKey = `instance_key(instance_id)`: every entry of one APIM instance in one
  partition, so `unfinished` and `history` are single-partition queries.
- RowKey = inverted UTC timestamp in microseconds (19 digits, zero padded) + "-" + a uuid:
  the table returns rows in RowKey order, so a partition reads newest first without
  sorting. One `Journal` never issues two row keys with the same timestamp part, so its
  own entries keep their order even within one microsecond.
- Properties: the `JournalEntry` fields (trigger as `trigger_kind` + `trigger_detail`).
  `before`/`after`/`error` are truncated with a marker to the 64 KiB (UTF-16) string
  property limit; with every other property small, an entity stays far below 1 MiB.

Secrets never reach the table: `before`/`after` that look like they carry a key,
password or connection string are refused (`PermanentError`) — the caller redacts first
(`"***"`, `"<redacted>"` or null count as redacted). Error texts are scrubbed instead of
refused, because losing a failure record is worse than a redacted word.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.errors import PermanentError
from shared.tables import TableStore, storage_error

DEFAULT_TABLE = "remediationjournal"

# Azure Table string properties hold at most 64 KiB of UTF-16.
MAX_STRING_BYTES = 64 * 1024
TRUNCATION_MARKER = "\n…[truncated by apim-remediator: {kept} of {total} characters kept]"

# RowKey: 10**19 - 1 minus microseconds since the epoch, zero padded to 19 digits.
_ROW_KEY_CEILING = 10**19 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_UNSAFE_KEY_CHARS = re.compile(r"[^a-z0-9._-]+")
# Statuses worth retrying: timeouts, throttling, server-side failures.


class Phase(StrEnum):
    """Where a journaled change stands."""

    INTENT = "intent"  # written before the change; nothing may have happened yet
    APPLIED = "applied"  # the write returned; not yet verified by re-reading
    # Azure accepted the write and runs it as a long operation (an APIM service update can
    # take an hour): `operation_url` says where to poll; a later run verifies and closes it.
    RUNNING = "running"
    VERIFIED = "verified"  # re-read shows the intended state: done
    FAILED = "failed"  # the write or the verification failed: incident
    RECOVERED = "recovered"  # a later worker completed (or rolled back) a crashed one's change
    ABANDONED = "abandoned"  # a later worker found the change moot (e.g. re-plan found no drift)
    # Some steps of a multi-step change took effect, then one was refused (e.g. 412 on the
    # named value after its secret was copied to Key Vault): `steps_done` says how many.
    PARTIAL = "partial"


OPEN_PHASES = frozenset({Phase.INTENT, Phase.APPLIED, Phase.RUNNING})
FINAL_PHASES = frozenset({Phase.VERIFIED, Phase.FAILED, Phase.RECOVERED, Phase.ABANDONED, Phase.PARTIAL})
_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.INTENT: frozenset({Phase.APPLIED, Phase.RUNNING}) | FINAL_PHASES,
    Phase.APPLIED: FINAL_PHASES,
    Phase.RUNNING: FINAL_PHASES,
}


class TriggerKind(StrEnum):
    TIMER = "timer"
    EVENT = "event"
    HTTP = "http"
    CLI = "cli"


@dataclass(frozen=True)
class Trigger:
    """Who or what started the run: the Event Grid event id, the HTTP caller's object id,
    the CLI user, the timer's schedule."""

    kind: TriggerKind
    detail: str


@dataclass(frozen=True)
class JournalEntry:
    """One journaled change. `etag` is the journal row's own ETag (for conditional
    updates); `etag_before` is the ARM resource's ETag the change was planned against."""

    instance_id: str
    correlation_id: str
    row_key: str
    rule_id: str
    resource_id: str
    action: str
    trigger: Trigger
    before: str | None
    after: str | None
    etag_before: str | None
    phase: Phase
    error: str | None
    started_at: datetime
    updated_at: datetime
    etag: str
    operation_url: str | None = None  # phase RUNNING: the long-running operation to poll
    steps_done: int | None = None  # steps of the plan that took effect (recorded with the outcome)

    @property
    def partition_key(self) -> str:
        return instance_key(self.instance_id)

    @property
    def is_open(self) -> bool:
        return self.phase in OPEN_PHASES


class JournalRefused(PermanentError):
    """The journal refused a row (it looked like it carried a secret): the change it was
    to record must not be made."""


class JournalConflict(PermanentError):
    """The entry changed since it was read: another worker recorded an outcome for it.

    Retrying with the same entry cannot succeed; re-read it (`Journal.get`) and decide
    again. Under the instance lease this means the lease was lost or a bug."""


# -- keys ---------------------------------------------------------------------------------


def instance_key(instance_id: str) -> str:
    """A stable storage key for an instance: Table PartitionKey and lease blob name.

    The ARM id, lowercased (ARM ids are case-insensitive) and stripped of surrounding
    slashes, with every run of characters outside `[a-z0-9._-]` replaced by `_` (that
    removes the `/ \\ # ?` and control characters Table keys forbid), cut to 200
    characters, then `~` and the first 16 hex digits of the SHA-256 of the lowercased id
    so two ids that read alike never share a key. E.g.
    `subscriptions_0000…_resourcegroups_rg_providers_microsoft.apimanagement_service_apim~3f2a…`.
    """
    normalized = instance_id.strip().strip("/").lower()
    if not normalized:
        raise PermanentError("an instance id is required (got an empty one)")
    readable = _UNSAFE_KEY_CHARS.sub("_", normalized)[:200]
    digest = hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:16]
    return f"{readable}~{digest}"


def row_key_for(at: datetime) -> str:
    """A RowKey that sorts newer entries first: inverted microseconds + a uuid."""
    micros = (at - _EPOCH) // timedelta(microseconds=1)
    return f"{_ROW_KEY_CEILING - micros:019d}-{uuid.uuid4().hex}"


# -- secrets and sizes ----------------------------------------------------------------------

# JSON keys whose non-empty value is a secret (compared case-insensitively).
SECRET_KEYS = frozenset(
    {
        "primarykey",
        "secondarykey",
        "accesskey",
        "accountkey",
        "sharedaccesskey",
        "connectionstring",
        "password",
        "clientsecret",
    }
)
# Text that carries a credential wherever it appears (connection strings, SAS tokens).
_SECRET_TEXT = re.compile(
    r"(AccountKey|SharedAccessKey|SharedAccessSignature|ClientSecret|Password)\s*=\s*[^;\s\"']+"
    r"|[?&]sig=[^&\s\"']+",
    re.IGNORECASE,
)
_REDACTED = re.compile(r"^\s*(\*+|<?\[?redacted\]?>?)\s*$", re.IGNORECASE)


def _is_redacted(value: Any) -> bool:
    if value is None or value == "":
        return True
    return isinstance(value, str) and bool(_REDACTED.match(value))


def _secret_paths(node: Any, path: str) -> list[str]:
    """JSON paths in `node` holding what looks like a secret value."""
    found: list[str] = []
    if isinstance(node, dict):
        keys = {str(k).lower() for k in node}
        # A named value's `value` (an object with displayName/secret/keyVault beside it).
        named_value = "value" in keys and bool(keys & {"displayname", "secret", "keyvault"})
        for key, value in node.items():
            where = f"{path}.{key}"
            lowered = str(key).lower()
            if (lowered in SECRET_KEYS or (named_value and lowered == "value")) and not _is_redacted(value):
                found.append(where)
            else:
                found.extend(_secret_paths(value, where))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_secret_paths(item, f"{path}[{i}]"))
    elif isinstance(node, str) and _SECRET_TEXT.search(node):
        found.append(path)
    return found


def refuse_secrets(text: str | None, field: str) -> None:
    """Raise `PermanentError` if `text` (JSON) looks like it carries a secret.

    Names the JSON paths, never the values. Text that is not JSON is refused too: the
    journal's before/after are JSON so the guard can read them."""
    if text is None:
        return
    try:
        document = json.loads(text)
    except ValueError:
        raise JournalRefused(f"journal {field} must be JSON text") from None
    paths = _secret_paths(document, "$")
    if paths:
        raise JournalRefused(
            f"journal {field} looks like it carries secret values at {', '.join(paths)}: "
            "redact them (e.g. '***') before journaling"
        )


def scrub(text: str) -> str:
    """Replace credential-looking fragments of free text (connection strings, SAS sig=, JSON
    secret keys) with `***`."""
    text = _SECRET_TEXT.sub(lambda m: m.group(0).split("=", 1)[0] + "=***", text)
    keys = "|".join(sorted(SECRET_KEYS))
    return re.sub(
        rf"(\"(?:{keys})\"\s*:\s*)\"[^\"]*\"",
        lambda m: m.group(1) + '"***"',
        text,
        flags=re.IGNORECASE,
    )


def fit(text: str, limit_bytes: int = MAX_STRING_BYTES) -> str:
    """`text` unchanged if it fits a Table string property, else cut with a marker."""
    if len(text) * 4 <= limit_bytes or len(text.encode("utf-16-le")) <= limit_bytes:
        return text
    # The marker's own size with the widest count it may print.
    budget = limit_bytes - len(TRUNCATION_MARKER.format(kept=len(text), total=len(text)).encode("utf-16-le"))
    budget -= budget % 2
    # errors="ignore" drops a surrogate pair cut in half at the end.
    kept = text.encode("utf-16-le")[:budget].decode("utf-16-le", errors="ignore")
    marker = TRUNCATION_MARKER.format(kept=len(kept), total=len(text))
    return kept + marker


# -- storage errors -------------------------------------------------------------------------


# -- the journal ----------------------------------------------------------------------------


def _utc(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise PermanentError(f"journal entry has a malformed timestamp ({type(value).__name__})")
    plain = datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=value.tzinfo or UTC,
    )
    return plain.astimezone(UTC)


def _optional_text(entity: Mapping[str, Any], name: str) -> str | None:
    value = entity.get(name)
    return None if value is None else str(value)


class Journal(TableStore):
    """The intent journal of the product's changes, one table in Azure Table storage."""

    kind = "journal"

    def __init__(
        self,
        tables: AsyncTableServiceClient,
        table_name: str = DEFAULT_TABLE,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(tables, table_name)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._last_micros = 0

    def _now(self) -> datetime:
        now = _utc(self._clock())
        micros = (now - _EPOCH) // timedelta(microseconds=1)
        # Strictly increasing within this journal, so row keys keep the order of writes.
        micros = max(micros, self._last_micros + 1)
        self._last_micros = micros
        return _EPOCH + timedelta(microseconds=micros)

    async def record_intent(
        self,
        instance_id: str,
        *,
        correlation_id: str,
        rule_id: str,
        resource_id: str,
        action: str,
        trigger: Trigger,
        before: str | None,
        after: str | None,
        etag_before: str | None,
    ) -> JournalEntry:
        """Write an entry in phase `intent` before the change is made; return it.

        `before`/`after` are JSON text without secrets (refused otherwise) and are cut to
        the Table limit with a marker."""
        refuse_secrets(before, "before")
        refuse_secrets(after, "after")
        now = self._now()
        entry = JournalEntry(
            instance_id=instance_id,
            correlation_id=correlation_id,
            row_key=row_key_for(now),
            rule_id=rule_id,
            resource_id=resource_id,
            action=fit(action),
            trigger=Trigger(TriggerKind(trigger.kind), fit(scrub(trigger.detail))),
            before=None if before is None else fit(before),
            after=None if after is None else fit(after),
            etag_before=etag_before,
            phase=Phase.INTENT,
            error=None,
            started_at=now,
            updated_at=now,
            etag="",
        )
        entity: dict[str, Any] = {
            "PartitionKey": entry.partition_key,
            "RowKey": entry.row_key,
            "instance_id": entry.instance_id,
            "correlation_id": entry.correlation_id,
            "rule_id": entry.rule_id,
            "resource_id": entry.resource_id,
            "action": entry.action,
            "trigger_kind": entry.trigger.kind.value,
            "trigger_detail": entry.trigger.detail,
            "phase": entry.phase.value,
            "started_at": entry.started_at,
            "updated_at": entry.updated_at,
        }
        for name in ("before", "after", "etag_before"):
            value = getattr(entry, name)
            if value is not None:
                entity[name] = value
        table = await self._client()
        try:
            metadata = await table.create_entity(entity)
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record intent") from exc
        return replace(entry, etag=str(metadata["etag"]))

    async def record_outcome(
        self,
        entry: JournalEntry,
        phase: Phase,
        *,
        error: str | None = None,
        after: str | None = None,
        operation_url: str | None = None,
        steps_done: int | None = None,
    ) -> JournalEntry:
        """Move `entry` to `phase` (ETag-conditional: `JournalConflict` if another writer
        changed it since `entry` was read); return the updated entry.

        `error` is scrubbed of credential-looking text; `after` (the observed state)
        replaces the planned one when given and is guarded like `record_intent`'s.
        `operation_url` (phase RUNNING) is where a later run polls the operation;
        `steps_done` how many steps of the plan took effect."""
        phase = Phase(phase)
        if phase not in _NEXT.get(entry.phase, frozenset()):
            raise PermanentError(
                f"journal entry {entry.row_key} of {entry.instance_id} is {entry.phase.value}: "
                f"cannot record {phase.value}"
            )
        refuse_secrets(after, "after")
        now = self._now()
        changes: dict[str, Any] = {
            "PartitionKey": entry.partition_key,
            "RowKey": entry.row_key,
            "phase": phase.value,
            "updated_at": now,
        }
        clean_error = None if error is None else fit(scrub(error))
        if clean_error is not None:
            changes["error"] = clean_error
        if after is not None:
            after = fit(after)
            changes["after"] = after
        if operation_url is not None:
            operation_url = fit(scrub(operation_url))
            changes["operation_url"] = operation_url
        if steps_done is not None:
            changes["steps_done"] = steps_done
        table = await self._client()
        try:
            metadata = await table.update_entity(
                changes, mode=UpdateMode.MERGE, etag=entry.etag, match_condition=MatchConditions.IfNotModified
            )
        except ResourceModifiedError as exc:
            raise JournalConflict(
                f"record {phase.value} in {self._what}: entry {entry.row_key} of {entry.instance_id} "
                "was changed by another writer since it was read"
            ) from exc
        except ResourceNotFoundError as exc:
            raise PermanentError(
                f"record {phase.value} in {self._what}: entry {entry.row_key} of {entry.instance_id} does not exist"
            ) from exc
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation=f"record {phase.value}") from exc
        return replace(
            entry,
            phase=phase,
            updated_at=now,
            error=clean_error if clean_error is not None else entry.error,
            after=after if after is not None else entry.after,
            etag=str(metadata["etag"]),
            operation_url=operation_url if operation_url is not None else entry.operation_url,
            steps_done=steps_done if steps_done is not None else entry.steps_done,
        )

    async def get(self, instance_id: str, row_key: str) -> JournalEntry:
        """Re-read one entry (e.g. after a `JournalConflict`)."""
        table = await self._client()
        try:
            entity = await table.get_entity(instance_key(instance_id), row_key)
        except ResourceNotFoundError as exc:
            raise PermanentError(f"read {self._what}: entry {row_key} of {instance_id} does not exist") from exc
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read entry") from exc
        return _entry(entity)

    async def unfinished(self, instance_id: str) -> list[JournalEntry]:
        """Entries still in `intent` or `applied` (what a crashed worker left), newest first."""
        open_phases = " or ".join(f"phase eq '{p.value}'" for p in sorted(OPEN_PHASES))
        return await self._query(instance_id, f"PartitionKey eq @pk and ({open_phases})", limit=None)

    async def history(self, instance_id: str, limit: int = 100) -> list[JournalEntry]:
        """The instance's most recent `limit` entries, newest first."""
        if limit < 1:
            raise PermanentError(f"history limit must be at least 1, got {limit}")
        return await self._query(instance_id, "PartitionKey eq @pk", limit=limit)

    async def of_correlation(self, instance_id: str, correlation_id: str) -> list[JournalEntry]:
        """Every entry of one run or multi-entry change (e.g. a key rotation's steps), newest first."""
        return await self._query(
            instance_id, "PartitionKey eq @pk and correlation_id eq @cid", limit=None, cid=correlation_id
        )

    async def _query(self, instance_id: str, query: str, *, limit: int | None, **extra: str) -> list[JournalEntry]:
        table = await self._client()
        entries: list[JournalEntry] = []
        try:
            pages = table.query_entities(
                query,
                parameters={"pk": instance_key(instance_id), **extra},
                results_per_page=min(limit, 1000) if limit else None,
            )
            async for entity in pages:
                entries.append(_entry(entity))
                if limit is not None and len(entries) >= limit:
                    break
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="query entries") from exc
        return entries


def _entry(entity: TableEntity) -> JournalEntry:
    try:
        return JournalEntry(
            instance_id=str(entity["instance_id"]),
            correlation_id=str(entity["correlation_id"]),
            row_key=str(entity["RowKey"]),
            rule_id=str(entity["rule_id"]),
            resource_id=str(entity["resource_id"]),
            action=str(entity["action"]),
            trigger=Trigger(TriggerKind(entity["trigger_kind"]), str(entity.get("trigger_detail", ""))),
            before=_optional_text(entity, "before"),
            after=_optional_text(entity, "after"),
            etag_before=_optional_text(entity, "etag_before"),
            phase=Phase(entity["phase"]),
            error=_optional_text(entity, "error"),
            started_at=_utc(entity["started_at"]),
            updated_at=_utc(entity["updated_at"]),
            etag=str(entity.metadata["etag"]),
            operation_url=_optional_text(entity, "operation_url"),
            steps_done=int(entity["steps_done"]) if entity.get("steps_done") is not None else None,
        )
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"journal row {entity.get('RowKey')!r} is malformed ({exc!r})") from exc


class JournalApi(Protocol):
    """What the engine and the rotations call on the journal (`Journal` implements it)."""

    async def record_intent(
        self,
        instance_id: str,
        *,
        correlation_id: str,
        rule_id: str,
        resource_id: str,
        action: str,
        trigger: Trigger,
        before: str | None,
        after: str | None,
        etag_before: str | None,
    ) -> JournalEntry: ...

    async def record_outcome(
        self,
        entry: JournalEntry,
        phase: Phase,
        *,
        error: str | None = None,
        after: str | None = None,
        operation_url: str | None = None,
        steps_done: int | None = None,
    ) -> JournalEntry: ...

    async def unfinished(self, instance_id: str) -> list[JournalEntry]: ...
