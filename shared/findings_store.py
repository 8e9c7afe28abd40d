"""The latest findings per APIM instance, in Azure Table storage.

Every reconcile of an instance syncs what its rescan showed (`sync`): a finding seen for
the first time is `new`, one whose severity or message moved is `changed`, an open one no
longer seen is `resolved`. The HTTP API and later sweeps read from here instead of
rescanning, and the reconcile of a message older than the instance's last reconcile can
be skipped (`last_reconciled`: the queue's coalescing).

Layout (one table, default "findings"):

- PartitionKey = `journal.instance_key(instance_id)`: one instance per partition.
- RowKey "~instance": the instance summary (id, last reconciled at, open counts by
  severity, correlation id of the last run).
- RowKey = SHA-256 of the finding's fingerprint (rule, resource, property path, entry):
  rule_id, resource_id, severity, title, message, first_seen, last_seen, status
  (open | resolved), resolved_at, exempt. Messages never carry secrets (rules promise it).

Writes are upserts per row; two reconciles of one instance never run at once (the
instance lease), so there is no read-modify-write race to guard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.errors import PermanentError
from shared.journal import instance_key
from shared.model import Finding, Severity
from shared.report import fingerprint
from shared.tables import TableStore, storage_error, utc_of

DEFAULT_TABLE = "findings"
SUMMARY_ROW = "~instance"


class FindingStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class StoredFinding:
    instance_id: str
    key: str  # RowKey: the SHA-256 of the finding's fingerprint
    rule_id: str
    resource_id: str
    severity: Severity
    title: str
    message: str
    first_seen: datetime
    last_seen: datetime
    status: FindingStatus
    exempt: bool = False
    resolved_at: datetime | None = None


@dataclass(frozen=True)
class InstanceSummary:
    instance_id: str
    last_reconciled: datetime | None  # None: only a failure was recorded so far
    open_by_severity: dict[str, int] = field(default_factory=dict)
    correlation_id: str = ""
    last_error: str | None = None
    last_error_at: datetime | None = None

    @property
    def open_total(self) -> int:
        return sum(self.open_by_severity.values())


@dataclass(frozen=True)
class FindingChanges:
    """What one reconcile changed in the stored findings of an instance."""

    instance_id: str
    new: tuple[StoredFinding, ...] = ()
    changed: tuple[StoredFinding, ...] = ()
    resolved: tuple[StoredFinding, ...] = ()
    # Open findings of rules the scan did not evaluate (`sync`'s keep_rules), left as they were.
    kept: tuple[StoredFinding, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.resolved)


def finding_key(finding: Finding) -> str:
    return hashlib.sha256(fingerprint(finding).encode("utf-8")).hexdigest()


def _stored(entity: TableEntity) -> StoredFinding:
    try:
        return StoredFinding(
            instance_id=str(entity["instance_id"]),
            key=str(entity["RowKey"]),
            rule_id=str(entity["rule_id"]),
            resource_id=str(entity["resource_id"]),
            severity=Severity(entity["severity"]),
            title=str(entity.get("title", "")),
            message=str(entity.get("message", "")),
            first_seen=utc_of(entity["first_seen"]),
            last_seen=utc_of(entity["last_seen"]),
            status=FindingStatus(entity["status"]),
            exempt=bool(entity.get("exempt", False)),
            resolved_at=utc_of(entity["resolved_at"]) if entity.get("resolved_at") else None,
        )
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"findings row {entity.get('RowKey')!r} is malformed ({exc!r})") from exc


def _entity(instance_id: str, stored: StoredFinding) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": instance_key(instance_id),
        "RowKey": stored.key,
        "instance_id": instance_id,
        "rule_id": stored.rule_id,
        "resource_id": stored.resource_id,
        "severity": stored.severity.value,
        "title": stored.title,
        "message": stored.message,
        "first_seen": stored.first_seen,
        "last_seen": stored.last_seen,
        "status": stored.status.value,
        "exempt": stored.exempt,
    }
    if stored.resolved_at is not None:
        entity["resolved_at"] = stored.resolved_at
    return entity


class FindingsStore(TableStore):
    """The findings table: `sync` after a reconcile, `findings`/`summary`/`instances` to read."""

    kind = "findings"

    def __init__(self, tables: AsyncTableServiceClient, table_name: str = DEFAULT_TABLE) -> None:
        super().__init__(tables, table_name)

    async def _partition(self, instance_id: str) -> list[TableEntity]:
        table = await self._client()
        try:
            pages = table.query_entities("PartitionKey eq @pk", parameters={"pk": instance_key(instance_id)})
            return [entity async for entity in pages]
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an instance's findings") from exc

    async def findings(self, instance_id: str, *, include_resolved: bool = False) -> list[StoredFinding]:
        rows = [_stored(e) for e in await self._partition(instance_id) if e["RowKey"] != SUMMARY_ROW]
        if not include_resolved:
            rows = [r for r in rows if r.status is FindingStatus.OPEN]
        return sorted(rows, key=lambda r: (-r.severity.rank, r.rule_id, r.resource_id))

    async def summary(self, instance_id: str) -> InstanceSummary | None:
        table = await self._client()
        try:
            entity = await table.get_entity(instance_key(instance_id), SUMMARY_ROW)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an instance summary") from exc
        return _summary(entity)

    async def instances(self) -> list[InstanceSummary]:
        """Every instance ever reconciled (one summary row each)."""
        table = await self._client()
        try:
            pages = table.query_entities("RowKey eq @row", parameters={"row": SUMMARY_ROW})
            return [_summary(entity) async for entity in pages]
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="list instances") from exc

    async def record_failure(self, instance_id: str, error: str, *, at: datetime, correlation_id: str = "") -> None:
        """A reconcile that failed for good (or a poison message): kept on the instance's
        summary row for the operator (the text is the product's own error: no secrets)."""
        table = await self._client()
        try:
            await table.upsert_entity(
                {
                    "PartitionKey": instance_key(instance_id),
                    "RowKey": SUMMARY_ROW,
                    "instance_id": instance_id,
                    "last_error": error[:4000],
                    "last_error_at": at,
                    "last_error_correlation_id": correlation_id,
                },
                mode=UpdateMode.MERGE,
            )
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record a failure") from exc

    async def last_reconciled(self, instance_id: str) -> datetime | None:
        found = await self.summary(instance_id)
        return found.last_reconciled if found else None

    async def last_signals(self, instance_id: str) -> datetime | None:
        """When the runtime signals last ran for the instance (None: never)."""
        table = await self._client()
        try:
            entity = await table.get_entity(instance_key(instance_id), SUMMARY_ROW, select=["signals_at"])
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an instance summary") from exc
        return utc_of(entity["signals_at"]) if entity.get("signals_at") else None

    async def sync(
        self,
        instance_id: str,
        findings: Sequence[Finding],
        *,
        seen_at: datetime,
        correlation_id: str = "",
        keep_rules: frozenset[str] = frozenset(),
        signals_at: datetime | None = None,
    ) -> FindingChanges:
        """Record what a fresh scan of the instance shows; return what changed.

        `keep_rules`: rules this scan did not evaluate (the runtime signals between their
        runs): their open findings stay open as they are, neither resolved nor rewritten.
        `signals_at`: the signals ran in this scan (recorded for `last_signals`)."""
        previous = {e["RowKey"]: _stored(e) for e in await self._partition(instance_id) if e["RowKey"] != SUMMARY_ROW}
        table = await self._client()
        new: list[StoredFinding] = []
        changed: list[StoredFinding] = []
        resolved: list[StoredFinding] = []
        current: dict[str, StoredFinding] = {}
        for finding in findings:
            key = finding_key(finding)
            before = previous.get(key)
            reopened = before is not None and before.status is FindingStatus.RESOLVED
            stored = StoredFinding(
                instance_id=instance_id,
                key=key,
                rule_id=finding.rule_id,
                resource_id=finding.resource_id,
                severity=finding.severity,
                title=finding.title,
                message=finding.message,
                first_seen=before.first_seen if before is not None and not reopened else seen_at,
                last_seen=seen_at,
                status=FindingStatus.OPEN,
                exempt=finding.exempt,
            )
            current[key] = stored
            if before is None or reopened:
                new.append(stored)
            elif (before.severity, before.message, before.exempt) != (stored.severity, stored.message, stored.exempt):
                changed.append(stored)
        kept = {
            key: before
            for key, before in previous.items()
            if key not in current and before.status is FindingStatus.OPEN and before.rule_id in keep_rules
        }
        for key, before in previous.items():
            if key not in current and key not in kept and before.status is FindingStatus.OPEN:
                resolved.append(
                    StoredFinding(
                        **{**before.__dict__, "status": FindingStatus.RESOLVED, "resolved_at": seen_at},
                    )
                )
        counts: dict[str, int] = {}
        for stored in [*current.values(), *kept.values()]:
            if not stored.exempt:
                counts[stored.severity.value] = counts.get(stored.severity.value, 0) + 1
        try:
            for stored in [*current.values(), *resolved]:
                await table.upsert_entity(_entity(instance_id, stored), mode=UpdateMode.REPLACE)
            await table.upsert_entity(
                {
                    "PartitionKey": instance_key(instance_id),
                    "RowKey": SUMMARY_ROW,
                    "instance_id": instance_id,
                    "last_reconciled": seen_at,
                    "correlation_id": correlation_id,
                    "last_error": "",
                    **{f"open_{severity.value}": counts.get(severity.value, 0) for severity in Severity},
                    **({"signals_at": signals_at} if signals_at is not None else {}),
                },
                mode=UpdateMode.MERGE,
            )
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record findings") from exc
        return FindingChanges(instance_id, tuple(new), tuple(changed), tuple(resolved), tuple(kept.values()))


def _summary(entity: TableEntity) -> InstanceSummary:
    try:
        return InstanceSummary(
            instance_id=str(entity["instance_id"]),
            last_reconciled=utc_of(entity["last_reconciled"]) if entity.get("last_reconciled") else None,
            open_by_severity={s.value: int(entity.get(f"open_{s.value}", 0)) for s in Severity},
            correlation_id=str(entity.get("correlation_id", "")),
            last_error=str(entity["last_error"]) if entity.get("last_error") else None,
            last_error_at=utc_of(entity["last_error_at"]) if entity.get("last_error_at") else None,
        )
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"findings summary row of {entity.get('instance_id')!r} is malformed ({exc!r})") from exc
