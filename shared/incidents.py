"""Incidents: one per problem, updated while it lasts, resolved when fixed, never lost.

The public entry point is `IncidentReporter` (the `IncidentApi` Protocol): any use case that
meets a problem people must look at calls `raise_problem(Problem(...))`, and `resolve(
fingerprint, note)` once it is gone. Everything else here serves those two calls.

- Identity: a problem's fingerprint is its family and resource (`TLS:/subscriptions/...`),
  so one instance with twelve TLS findings is one incident, and a later run seeing the same
  problem updates that incident (count, last seen) instead of opening another.
- Lifecycle: `new` when first raised, `active` once a later run sees it again, `resolved`
  with a note when it is gone; raising a resolved problem again reopens it (`new`).
- Outbox: every change of an incident (a new version) is written in ONE Table transaction
  with an outbox row per configured sink (same partition: the incident's), so a change is
  stored before it is delivered and no change exists without its deliveries.
  `deliver_pending` claims a row (ETag), delivers it, and marks it delivered after the sink
  acknowledged it; a sink that is down leaves its rows for the next run. A row delivered is
  never delivered again; a crash between the sink's acknowledgement and the mark can repeat
  one delivery, which carries the same delivery id (`X-Apimr-Delivery`) for the receiver
  to drop.
- Noise: at most `max_new_per_batch` incidents are opened per batch (a sweep); problems over
  the limit are gathered in one summary incident (`SUMMARY:new-incident-limit`) until a
  later batch has room for them.
- Redaction: titles, descriptions and notes go through `journal.scrub` and a bearer-token
  filter before they are stored; sinks only ever see stored text.

Table layout (one table, default "incidents"):
- PartitionKey = incident key (SHA-256 of the fingerprint, 40 hex); RowKey "~incident": the
  incident; "out-{version:010d}-{sink}": an outbox row with the incident as it was at that
  version; "sink-{sink}": what a sink keeps between deliveries (Sentinel's ETag).
- PartitionKey "~budget", RowKey = batch id: how many incidents a batch opened.

The structured log event (`event=incident.<change>`) is written at once for every change:
it needs no outbox, it lands in Application Insights with the Functions host's logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.errors import PermanentError, TransientError
from shared.journal import scrub
from shared.model import Severity
from shared.tables import TableStore, storage_error, utc_of

LOG = logging.getLogger("apim_remediator.incidents")

DEFAULT_TABLE = "incidents"
INCIDENT_ROW = "~incident"
BUDGET_PARTITION = "~budget"
SUMMARY_FINGERPRINT = "SUMMARY:new-incident-limit"
MAX_TEXT = 30_000  # a Table string property holds 32K UTF-16 characters
MAX_MEMBERS = 200
CLAIM_SECONDS = 300  # a claimed outbox row is left alone by other workers this long
OUTBOX_RETENTION = timedelta(days=30)  # delivered outbox rows are kept this long (the CLI shows them)
BUDGET_RETENTION = timedelta(days=2)  # a sweep's new-incident count outlives the sweep by far
_FAMILY = re.compile(r"^[A-Z][A-Z0-9-]{0,31}$")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """Text fit for an incident: credential-looking fragments replaced by `***`."""
    text = scrub(text)
    text = _BEARER.sub("Bearer ***", text)
    return _JWT.sub("***", text)


class ProblemKind(StrEnum):
    FINDING = "finding"  # drift the policy leaves to people, or a fix refused or failed
    WORK = "work"  # a work item the product gave up on (poison, permanent failure)
    RUN = "run"  # a run that stopped short (blast radius)
    ROTATION = "rotation"  # a key rotation that could not finish (issue 12)
    BACKUP = "backup"  # a failed backup (issue 13)
    RESTORE_TEST = "restore-test"  # a failed or drifting test-restore (issue 13)
    SUMMARY = "summary"  # problems over the new-incident limit of a batch


class IncidentStatus(StrEnum):
    NEW = "new"
    ACTIVE = "active"
    RESOLVED = "resolved"


class ChangeKind(StrEnum):
    OPENED = "opened"
    REOPENED = "reopened"
    ACTIVATED = "activated"  # new -> active: a later run saw it again
    ESCALATED = "escalated"  # severity went up
    UPDATED = "updated"  # seen again (count, last seen, description)
    RESOLVED = "resolved"


# Status changes: what a chat channel or a ticketing webhook is told about. Count bumps
# (UPDATED) go to Sentinel, which updates in place, and to the log.
STATE_CHANGES = frozenset(
    {ChangeKind.OPENED, ChangeKind.REOPENED, ChangeKind.ACTIVATED, ChangeKind.ESCALATED, ChangeKind.RESOLVED}
)


@dataclass(frozen=True)
class Problem:
    """Something people must look at. `family` + `resource_id` is its identity (fingerprint).

    `family`: the rule family for findings ("TLS"), else a short upper-case name ("BACKUP").
    `description`: markdown with the evidence and what the product did or refused to do and
    why; never a secret value (it is redacted anyway)."""

    kind: ProblemKind
    family: str
    resource_id: str
    title: str
    severity: Severity
    description: str
    instance_id: str = ""

    def __post_init__(self) -> None:
        if not _FAMILY.match(self.family):
            raise PermanentError(f"incident family {self.family!r} must be 1-32 upper-case letters, digits or '-'")
        if not self.resource_id.strip():
            raise PermanentError("an incident needs the resource it is about")
        if not self.title.strip():
            raise PermanentError("an incident needs a title")

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.family, self.resource_id)


def fingerprint_of(family: str, resource_id: str) -> str:
    return f"{family}:{resource_id.lower()}"


def incident_key(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:40]


def incident_guid(fingerprint: str) -> str:
    """The incident's id in Sentinel: the same fingerprint always names the same incident."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"apim-remediator:incident:{fingerprint}"))


@dataclass(frozen=True)
class Incident:
    fingerprint: str
    kind: ProblemKind
    family: str
    resource_id: str
    instance_id: str
    title: str
    description: str
    severity: Severity
    status: IncidentStatus
    first_seen: datetime
    last_seen: datetime
    count: int
    version: int
    last_run: str = ""
    resolved_at: datetime | None = None
    note: str = ""  # the resolution note
    members: tuple[str, ...] = ()  # the summary incident: fingerprints over the limit
    etag: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return incident_key(self.fingerprint)

    @property
    def open(self) -> bool:
        return self.status is not IncidentStatus.RESOLVED

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("etag")
        for name in ("first_seen", "last_seen", "resolved_at"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value is not None else None
        data["members"] = list(self.members)
        data["key"] = self.key
        data["id"] = incident_guid(self.fingerprint)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Incident:
        try:
            return cls(
                fingerprint=str(data["fingerprint"]),
                kind=ProblemKind(data["kind"]),
                family=str(data["family"]),
                resource_id=str(data["resource_id"]),
                instance_id=str(data.get("instance_id", "")),
                title=str(data["title"]),
                description=str(data.get("description", "")),
                severity=Severity(data["severity"]),
                status=IncidentStatus(data["status"]),
                first_seen=utc_of(data["first_seen"]),
                last_seen=utc_of(data["last_seen"]),
                count=int(data["count"]),
                version=int(data["version"]),
                last_run=str(data.get("last_run", "")),
                resolved_at=utc_of(data["resolved_at"]) if data.get("resolved_at") else None,
                note=str(data.get("note", "")),
                members=tuple(str(m) for m in data.get("members", ())),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PermanentError(f"incident record is malformed ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class IncidentChange:
    kind: ChangeKind
    incident: Incident
    run_id: str = ""

    @property
    def delivery_id(self) -> str:
        """The same for every attempt to deliver this change: receivers deduplicate by it."""
        return f"{self.incident.key}-{self.incident.version}"


class IncidentApi(Protocol):
    """What other use cases (rotation, backups) call: raise a problem, resolve it."""

    async def raise_problem(self, problem: Problem, *, run_id: str = "", batch_id: str | None = None) -> Incident: ...

    async def resolve(self, fingerprint: str, note: str, *, run_id: str = "") -> Incident | None: ...


class IncidentSink(Protocol):
    """A place incidents are posted. `deliver` raises `TransientError` when the change must
    be tried again later; returning means the sink acknowledged it."""

    name: str
    kinds: frozenset[ChangeKind]  # which changes it is told about
    state_based: bool  # True: only the latest version matters (earlier pending ones are skipped)

    async def deliver(self, change: IncidentChange, state: dict[str, str]) -> dict[str, str]: ...


# -- the table --------------------------------------------------------------------------------


def _fit(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 20] + "\n\n(truncated)"


def _entity(incident: Incident) -> dict[str, Any]:
    return {
        "PartitionKey": incident.key,
        "RowKey": INCIDENT_ROW,
        "fingerprint": incident.fingerprint,
        "kind": incident.kind.value,
        "family": incident.family,
        "resource_id": incident.resource_id,
        "instance_id": incident.instance_id,
        "title": incident.title,
        "description": _fit(incident.description),
        "severity": incident.severity.value,
        "status": incident.status.value,
        "first_seen": incident.first_seen,
        "last_seen": incident.last_seen,
        "count": incident.count,
        "version": incident.version,
        "last_run": incident.last_run,
        "resolved_at": incident.resolved_at,
        "note": incident.note,
        "members": json.dumps(list(incident.members)),
    }


def _incident(entity: TableEntity) -> Incident:
    data = dict(entity)
    try:
        data["members"] = json.loads(str(entity.get("members") or "[]"))
    except ValueError:
        data["members"] = []
    incident = Incident.from_json(data)
    return replace(incident, etag=entity.metadata.get("etag"))


def _outbox_row(change: IncidentChange, sink: str) -> dict[str, Any]:
    return {
        "PartitionKey": change.incident.key,
        "RowKey": f"out-{change.incident.version:010d}-{sink}",
        "sink": sink,
        "change": change.kind.value,
        "run_id": change.run_id,
        "version": change.incident.version,
        "incident": _fit(json.dumps(change.incident.to_json())),
        "delivered": False,
        "attempts": 0,
        "last_error": "",
        "claimed_until": datetime(1970, 1, 1, tzinfo=UTC),
    }


@dataclass(frozen=True)
class OutboxRow:
    sink: str
    change: IncidentChange
    delivered: bool
    attempts: int
    last_error: str
    delivered_at: datetime | None
    etag: str | None = field(default=None, compare=False)
    row_key: str = ""


def _outbox(entity: TableEntity) -> OutboxRow:
    try:
        incident = Incident.from_json(json.loads(str(entity["incident"])))
        return OutboxRow(
            sink=str(entity["sink"]),
            change=IncidentChange(ChangeKind(entity["change"]), incident, str(entity.get("run_id", ""))),
            delivered=bool(entity.get("delivered", False)),
            attempts=int(entity.get("attempts", 0)),
            last_error=str(entity.get("last_error", "")),
            delivered_at=utc_of(entity["delivered_at"]) if entity.get("delivered_at") else None,
            etag=entity.metadata.get("etag"),
            row_key=str(entity["RowKey"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise PermanentError(f"incident outbox row {entity.get('RowKey')!r} is malformed ({exc!r})") from exc


class Conflict(Exception):
    """Someone else changed the incident since it was read: read it again."""


class IncidentStore(TableStore):
    kind = "incidents"

    def __init__(self, tables: AsyncTableServiceClient, table_name: str = DEFAULT_TABLE) -> None:
        super().__init__(tables, table_name)

    async def get(self, fingerprint: str) -> Incident | None:
        table = await self._client()
        try:
            entity = await table.get_entity(incident_key(fingerprint), INCIDENT_ROW)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an incident") from exc
        return _incident(entity)

    async def incidents(self, *, include_resolved: bool = False, instance_id: str | None = None) -> list[Incident]:
        table = await self._client()
        query = "RowKey eq @row"
        parameters: dict[str, Any] = {"row": INCIDENT_ROW}
        if not include_resolved:
            query += " and status ne @resolved"
            parameters["resolved"] = IncidentStatus.RESOLVED.value
        if instance_id is not None:
            query += " and instance_id eq @instance"
            parameters["instance"] = instance_id
        try:
            found = [_incident(e) async for e in table.query_entities(query, parameters=parameters)]
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="list incidents") from exc
        return sorted(found, key=lambda i: (-i.severity.rank, i.first_seen, i.fingerprint))

    async def commit(
        self, incident: Incident, change: IncidentChange, sinks: Sequence[str], *, create: bool
    ) -> Incident:
        """Store a new version of the incident and its outbox rows in one transaction;
        `Conflict` when another writer got there first."""
        table = await self._client()
        entity = _entity(incident)
        operations: list[Any] = []
        if create:
            operations.append(("create", entity))
        else:
            operations.append(
                (
                    "update",
                    entity,
                    {
                        "mode": UpdateMode.REPLACE,
                        "etag": incident.etag,
                        "match_condition": MatchConditions.IfNotModified,
                    },
                )
            )
        operations.extend(("create", _outbox_row(change, sink)) for sink in sinks)
        try:
            await table.submit_transaction(operations)
        except TableTransactionError as exc:
            if exc.status_code in (409, 412):
                raise Conflict() from exc
            raise storage_error(exc, what=self._what, operation="record an incident change") from exc
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise Conflict() from exc
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="record an incident change") from exc
        stored = await self.get(incident.fingerprint)
        return stored if stored is not None else incident

    async def take_slot(self, batch_id: str, limit: int) -> bool:
        """One more incident opened by this batch, if it is under `limit`."""
        table = await self._client()
        row = hashlib.sha256(batch_id.encode()).hexdigest()[:40]
        for _ in range(20):
            try:
                entity = await table.get_entity(BUDGET_PARTITION, row)
            except ResourceNotFoundError:
                entity = None
            except AzureError as exc:
                raise storage_error(exc, what=self._what, operation="read the new-incident budget") from exc
            opened = int(entity.get("opened", 0)) if entity is not None else 0
            if opened >= limit:
                return False
            body = {"PartitionKey": BUDGET_PARTITION, "RowKey": row, "batch": batch_id[:200], "opened": opened + 1}
            try:
                if entity is None:
                    await table.create_entity(body)
                else:
                    await table.update_entity(
                        body,
                        mode=UpdateMode.REPLACE,
                        etag=entity.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )
                return True
            except (ResourceExistsError, ResourceModifiedError):
                continue
            except AzureError as exc:
                raise storage_error(exc, what=self._what, operation="charge the new-incident budget") from exc
        raise TransientError("the new-incident budget kept changing under this run; try again")

    async def purge(self, *, delivered_before: datetime, budgets_before: datetime, limit: int = 1000) -> int:
        """Delete outbox rows delivered before `delivered_before` and new-incident budget
        rows last written before `budgets_before` (Table storage has no TTL). Incidents and
        undelivered rows are never purged. Returns how many rows went."""
        table = await self._client()
        gone = 0
        queries = (
            (
                "RowKey ge @lo and RowKey lt @hi and delivered eq true and delivered_at lt @before",
                {"lo": "out-", "hi": "out.", "before": delivered_before},
            ),
            ("PartitionKey eq @pk and Timestamp lt @before", {"pk": BUDGET_PARTITION, "before": budgets_before}),
        )
        try:
            for query, parameters in queries:
                async for entity in table.query_entities(query, parameters=parameters):
                    if gone >= limit:
                        return gone
                    try:
                        await table.delete_entity(entity["PartitionKey"], entity["RowKey"])
                    except ResourceNotFoundError:
                        continue  # another sweep purged it first
                    gone += 1
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="purge delivered outbox rows") from exc
        return gone

    # -- outbox --

    async def pending(self) -> list[OutboxRow]:
        table = await self._client()
        query = "RowKey ge @lo and RowKey lt @hi and delivered eq false"
        try:
            rows = [_outbox(e) async for e in table.query_entities(query, parameters={"lo": "out-", "hi": "out."})]
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read the outbox") from exc
        return sorted(rows, key=lambda r: (r.change.incident.key, r.change.incident.version, r.sink))

    async def outbox_of(self, fingerprint: str) -> list[OutboxRow]:
        table = await self._client()
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        parameters = {"pk": incident_key(fingerprint), "lo": "out-", "hi": "out."}
        try:
            rows = [_outbox(e) async for e in table.query_entities(query, parameters=parameters)]
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read the outbox") from exc
        return sorted(rows, key=lambda r: (r.change.incident.version, r.sink))

    async def claim(self, row: OutboxRow, now: datetime) -> OutboxRow | None:
        """Take a row for delivery; None when another worker holds it or delivered it."""
        table = await self._client()
        try:
            entity = await table.get_entity(row.change.incident.key, row.row_key)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read an outbox row") from exc
        if entity.get("delivered") or utc_of(entity.get("claimed_until") or now) > now:
            return None
        try:
            await table.update_entity(
                {
                    "PartitionKey": entity["PartitionKey"],
                    "RowKey": entity["RowKey"],
                    "claimed_until": now + timedelta(seconds=CLAIM_SECONDS),
                },
                mode=UpdateMode.MERGE,
                etag=entity.metadata["etag"],
                match_condition=MatchConditions.IfNotModified,
            )
        except ResourceModifiedError:
            return None
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="claim an outbox row") from exc
        return _outbox(entity)

    async def settle(self, row: OutboxRow, *, delivered: bool, error: str = "", now: datetime, note: str = "") -> None:
        table = await self._client()
        body: dict[str, Any] = {
            "PartitionKey": row.change.incident.key,
            "RowKey": row.row_key,
            "delivered": delivered,
            "attempts": row.attempts + (0 if note else 1),
            "last_error": error[:2000],
            "claimed_until": now,
        }
        if delivered:
            body["delivered_at"] = now
            body["delivery_note"] = note
        try:
            await table.update_entity(body, mode=UpdateMode.MERGE)
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="mark an outbox row") from exc

    async def sink_state(self, key: str, sink: str) -> dict[str, str]:
        table = await self._client()
        try:
            entity = await table.get_entity(key, f"sink-{sink}")
        except ResourceNotFoundError:
            return {}
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="read a sink's state") from exc
        return {k: str(v) for k, v in entity.items() if k not in ("PartitionKey", "RowKey") and isinstance(v, str)}

    async def save_sink_state(self, key: str, sink: str, state: Mapping[str, str]) -> None:
        table = await self._client()
        try:
            await table.upsert_entity(
                {"PartitionKey": key, "RowKey": f"sink-{sink}", **dict(state)}, mode=UpdateMode.REPLACE
            )
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="keep a sink's state") from exc


# -- the reporter -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryReport:
    delivered: tuple[str, ...] = ()  # "<sink> <delivery id>"
    failed: tuple[str, ...] = ()  # "<sink> <delivery id>: <why>"
    skipped: int = 0  # superseded versions of state-based sinks, rows another worker holds

    @property
    def pending_left(self) -> bool:
        return bool(self.failed)


@dataclass(frozen=True)
class _Pass:
    slots: frozenset[tuple[str, str]]  # (sink, incident) rows another run held
    skipped: int


@dataclass(frozen=True)
class SinkState:
    """What the CLI shows per incident and sink."""

    sink: str
    delivered_version: int
    pending_versions: tuple[int, ...]
    attempts: int
    last_error: str


def _escalated(before: Severity, after: Severity) -> bool:
    return after.rank > before.rank


class IncidentReporter:
    """Raise, update and resolve incidents; deliver their changes to the configured sinks."""

    def __init__(
        self,
        store: IncidentStore,
        sinks: Sequence[IncidentSink] = (),
        *,
        max_new_per_batch: int = 10,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        logger: logging.Logger = LOG,
    ) -> None:
        self.store = store
        self.sinks = tuple(sinks)
        self.max_new_per_batch = max_new_per_batch
        self.clock = clock
        self.logger = logger

    def _sinks_for(self, kind: ChangeKind) -> list[str]:
        return [s.name for s in self.sinks if kind in s.kinds]

    def _log(self, change: IncidentChange) -> None:
        incident = change.incident
        level = logging.INFO if change.kind in (ChangeKind.UPDATED, ChangeKind.RESOLVED) else logging.WARNING
        self.logger.log(
            level,
            "incident %s: %s (%s, seen %d time(s))",
            change.kind.value,
            incident.title,
            incident.severity.value,
            incident.count,
            extra={
                "event": f"incident.{change.kind.value}",
                "incident_id": incident_guid(incident.fingerprint),
                "fingerprint": incident.fingerprint,
                "severity": incident.severity.value,
                "status": incident.status.value,
                "count": incident.count,
                "instance_id": incident.instance_id,
                "resource_id": incident.resource_id,
                "correlation_id": change.run_id,
            },
        )

    async def _commit(self, incident: Incident, kind: ChangeKind, run_id: str, *, create: bool) -> Incident:
        change = IncidentChange(kind, incident, run_id)
        stored = await self.store.commit(incident, change, self._sinks_for(kind), create=create)
        self._log(change)
        return stored

    async def raise_problem(self, problem: Problem, *, run_id: str = "", batch_id: str | None = None) -> Incident:
        """Open the problem's incident, or update it (count, last seen) when it is open.

        A run (`run_id`) that raises the same problem twice counts it once. `batch_id` (a
        sweep) charges opening against the batch's new-incident limit; over it, the problem
        joins the summary incident instead and that is returned."""
        title = redact(problem.title)[:250]
        description = redact(problem.description)
        charged = False  # a slot of the batch's limit, taken once even when a write is retried
        for _ in range(8):
            existing = await self.store.get(problem.fingerprint)
            now = self.clock()
            if existing is not None and existing.open:
                same_run = bool(run_id) and existing.last_run == run_id
                status = existing.status if same_run else IncidentStatus.ACTIVE
                updated = replace(
                    existing,
                    title=title,
                    description=description,
                    severity=problem.severity,
                    status=status,
                    count=existing.count if same_run else existing.count + 1,
                    last_seen=now,
                    last_run=run_id or existing.last_run,
                    version=existing.version + 1,
                )
                if same_run and (updated.title, updated.description, updated.severity) == (
                    existing.title,
                    existing.description,
                    existing.severity,
                ):
                    return existing
                if _escalated(existing.severity, problem.severity):
                    kind = ChangeKind.ESCALATED
                elif existing.status is IncidentStatus.NEW and status is IncidentStatus.ACTIVE:
                    kind = ChangeKind.ACTIVATED
                else:
                    kind = ChangeKind.UPDATED
                try:
                    return await self._commit(updated, kind, run_id, create=False)
                except Conflict:
                    continue
            if batch_id and problem.kind is not ProblemKind.SUMMARY and not charged:
                if not await self.store.take_slot(batch_id, self.max_new_per_batch):
                    return await self._overflow(problem, run_id=run_id)
                charged = True
            opened = Incident(
                fingerprint=problem.fingerprint,
                kind=problem.kind,
                family=problem.family,
                resource_id=problem.resource_id,
                instance_id=problem.instance_id,
                title=title,
                description=description,
                severity=problem.severity,
                status=IncidentStatus.NEW,
                first_seen=now,
                last_seen=now,
                count=1,
                version=existing.version + 1 if existing is not None else 1,
                last_run=run_id,
                etag=existing.etag if existing is not None else None,
            )
            try:
                stored = await self._commit(
                    opened, ChangeKind.REOPENED if existing else ChangeKind.OPENED, run_id, create=existing is None
                )
            except Conflict:
                continue
            if problem.kind is not ProblemKind.SUMMARY:
                await self._leave_summary(problem.fingerprint, run_id=run_id, note="has an incident of its own now")
            return stored
        raise TransientError(f"incident {problem.fingerprint} kept changing under this run; try again")

    async def _overflow(self, problem: Problem, *, run_id: str) -> Incident:
        for _ in range(8):
            summary = await self.store.get(SUMMARY_FINGERPRINT)
            members = list(summary.members if summary is not None and summary.open else ())
            if problem.fingerprint in members:
                if summary is not None and summary.last_run == run_id:
                    return summary
            else:
                members.append(problem.fingerprint)
            members = members[-MAX_MEMBERS:]
            lines = "\n".join(f"- `{m}`" for m in members)
            description = (
                f"More problems appeared in one sweep than the limit of {self.max_new_per_batch} new incidents "
                "per sweep (APIMR_INCIDENT_MAX_NEW_PER_SWEEP) allows. A large change at once is more often a "
                "deliberate migration than drift; each of these gets an incident of its own as later sweeps "
                f"have room.\n\nWaiting for an incident ({len(members)}):\n{lines}"
            )
            severity = max(
                (summary.severity if summary is not None and summary.open else Severity.INFO, problem.severity),
                key=lambda s: s.rank,
            )
            summary_problem = Problem(
                kind=ProblemKind.SUMMARY,
                family="SUMMARY",
                resource_id="new-incident-limit",
                title=f"{len(members)} problem(s) over the new-incident limit",
                severity=severity,
                description=description,
            )
            incident = await self._raise_summary(summary_problem, summary, tuple(members), run_id)
            if incident is not None:
                return incident
        raise TransientError("the summary incident kept changing under this run; try again")

    async def _raise_summary(
        self, problem: Problem, summary: Incident | None, members: tuple[str, ...], run_id: str
    ) -> Incident | None:
        now = self.clock()
        if summary is not None and summary.open:
            updated = replace(
                summary,
                title=problem.title,
                description=problem.description,
                severity=problem.severity,
                members=members,
                last_seen=now,
                count=summary.count + (0 if summary.last_run == run_id else 1),
                status=IncidentStatus.ACTIVE if summary.last_run != run_id else summary.status,
                last_run=run_id,
                version=summary.version + 1,
            )
            activated = summary.status is IncidentStatus.NEW and updated.status is IncidentStatus.ACTIVE
            kind = ChangeKind.ACTIVATED if activated else ChangeKind.UPDATED
            create = False
        else:
            updated = Incident(
                fingerprint=problem.fingerprint,
                kind=ProblemKind.SUMMARY,
                family="SUMMARY",
                resource_id=problem.resource_id,
                instance_id="",
                title=problem.title,
                description=problem.description,
                severity=problem.severity,
                status=IncidentStatus.NEW,
                first_seen=now,
                last_seen=now,
                count=1,
                version=summary.version + 1 if summary is not None else 1,
                last_run=run_id,
                members=members,
                etag=summary.etag if summary is not None else None,
            )
            kind = ChangeKind.REOPENED if summary is not None else ChangeKind.OPENED
            create = summary is None
        try:
            return await self._commit(updated, kind, run_id, create=create)
        except Conflict:
            return None

    async def _leave_summary(self, fingerprint: str, *, run_id: str, note: str) -> None:
        for _ in range(8):
            summary = await self.store.get(SUMMARY_FINGERPRINT)
            if summary is None or not summary.open or fingerprint not in summary.members:
                return
            members = tuple(m for m in summary.members if m != fingerprint)
            if not members:
                resolved = replace(
                    summary,
                    members=(),
                    status=IncidentStatus.RESOLVED,
                    resolved_at=self.clock(),
                    note="every problem over the limit has an incident of its own or is gone",
                    version=summary.version + 1,
                    last_run=run_id or summary.last_run,
                )
                kind = ChangeKind.RESOLVED
            else:
                lines = "\n".join(f"- `{m}`" for m in members)
                head = summary.description.split("\n\nWaiting for an incident", 1)[0]
                resolved = replace(
                    summary,
                    members=members,
                    title=f"{len(members)} problem(s) over the new-incident limit",
                    description=f"{head}\n\nWaiting for an incident ({len(members)}):\n{lines}",
                    version=summary.version + 1,
                )
                kind = ChangeKind.UPDATED
            try:
                await self._commit(resolved, kind, run_id, create=False)
                return
            except Conflict:
                continue
        raise TransientError("the summary incident kept changing under this run; try again")

    async def resolve(self, fingerprint: str, note: str, *, run_id: str = "") -> Incident | None:
        """Resolve the open incident of `fingerprint` with a note; None when none is open.

        A problem waiting in the summary incident leaves it."""
        clean = redact(note)[:2000]
        for _ in range(8):
            existing = await self.store.get(fingerprint)
            if existing is None or not existing.open:
                await self._leave_summary(fingerprint, run_id=run_id, note=clean)
                return None
            resolved = replace(
                existing,
                status=IncidentStatus.RESOLVED,
                resolved_at=self.clock(),
                note=clean,
                version=existing.version + 1,
                last_run=run_id or existing.last_run,
            )
            try:
                return await self._commit(resolved, ChangeKind.RESOLVED, run_id, create=False)
            except Conflict:
                continue
        raise TransientError(f"incident {fingerprint} kept changing under this run; try again")

    async def purge(self, *, now: datetime | None = None) -> int:
        """Housekeeping for the sweep: delivered outbox rows after `OUTBOX_RETENTION`, budget
        rows after `BUDGET_RETENTION`."""
        at = now or self.clock()
        return await self.store.purge(delivered_before=at - OUTBOX_RETENTION, budgets_before=at - BUDGET_RETENTION)

    async def open_incidents(self, instance_id: str | None = None) -> list[Incident]:
        return await self.store.incidents(instance_id=instance_id)

    async def waiting_in_summary(self) -> tuple[str, ...]:
        summary = await self.store.get(SUMMARY_FINGERPRINT)
        return summary.members if summary is not None and summary.open else ()

    async def delivery_state(self, incident: Incident) -> list[SinkState]:
        rows = await self.store.outbox_of(incident.fingerprint)
        out = []
        for sink in sorted({r.sink for r in rows}):
            mine = [r for r in rows if r.sink == sink]
            delivered = [r.change.incident.version for r in mine if r.delivered]
            pending = tuple(r.change.incident.version for r in mine if not r.delivered)
            last = max(mine, key=lambda r: r.change.incident.version)
            out.append(
                SinkState(
                    sink=sink,
                    delivered_version=max(delivered, default=0),
                    pending_versions=pending,
                    attempts=sum(r.attempts for r in mine if not r.delivered),
                    last_error=last.last_error,
                )
            )
        return out

    async def deliver_pending(self, *, limit: int = 100, passes: int = 3, pause: float = 0.5) -> DeliveryReport:
        """Deliver undelivered changes, oldest version first per incident and sink.

        A sink that fails is not tried again in this call (it is down; its rows wait for
        the next run); a later version of an incident is never delivered before an earlier
        one to the same sink. State-based sinks get only an incident's latest version.

        Every run delivers, so two runs often meet on the same row: the one that claims it
        delivers it, the other waits for it (`pause`) and reads the outbox again, up to
        `passes` times, so a version written right behind the claimed one is not left to
        the next run."""
        delivered: list[str] = []
        failed: list[str] = []
        skipped = 0
        down: set[str] = set()
        for attempt in range(passes):
            if attempt:
                await asyncio.sleep(pause)
            blocked = await self._deliver_pass(limit, down, delivered, failed)
            skipped += blocked.skipped
            if not blocked.slots:
                break
        return DeliveryReport(tuple(delivered), tuple(failed), skipped)

    async def _deliver_pass(self, limit: int, down: set[str], delivered: list[str], failed: list[str]) -> _Pass:
        by_name = {s.name: s for s in self.sinks}
        rows = [r for r in await self.store.pending() if r.sink in by_name and r.sink not in down]
        skipped = 0
        blocked: set[tuple[str, str]] = set()
        latest: dict[tuple[str, str], int] = {}
        for row in rows:
            slot = (row.sink, row.change.incident.key)
            latest[slot] = max(latest.get(slot, 0), row.change.incident.version)
        for row in rows[:limit]:
            sink = by_name[row.sink]
            slot = (row.sink, row.change.incident.key)
            if row.sink in down or slot in blocked:
                continue
            now = self.clock()
            if sink.state_based and row.change.incident.version < latest[slot]:
                claimed = await self.store.claim(row, now)
                if claimed is not None:
                    await self.store.settle(claimed, delivered=True, now=now, note="superseded by a later version")
                skipped += 1
                continue
            claimed = await self.store.claim(row, now)
            if claimed is None:
                skipped += 1
                blocked.add(slot)
                continue
            state = await self.store.sink_state(row.change.incident.key, row.sink)
            try:
                new_state = await sink.deliver(claimed.change, state)
            except (TransientError, PermanentError) as error:
                reason = redact(str(error))
                await self.store.settle(claimed, delivered=False, error=reason, now=self.clock())
                failed.append(f"{row.sink} {claimed.change.delivery_id}: {reason}")
                self.logger.warning(
                    "incident delivery to %s failed (kept for the next run): %s",
                    row.sink,
                    reason,
                    extra={
                        "event": "incident.delivery_failed",
                        "sink": row.sink,
                        "fingerprint": claimed.change.incident.fingerprint,
                        "delivery_id": claimed.change.delivery_id,
                    },
                )
                down.add(row.sink)
                continue
            if new_state != state:
                await self.store.save_sink_state(row.change.incident.key, row.sink, new_state)
            await self.store.settle(claimed, delivered=True, now=self.clock())
            delivered.append(f"{row.sink} {claimed.change.delivery_id}")
            self.logger.info(
                "incident change delivered to %s: %s v%d",
                row.sink,
                claimed.change.incident.title,
                claimed.change.incident.version,
                extra={
                    "event": "incident.delivered",
                    "sink": row.sink,
                    "fingerprint": claimed.change.incident.fingerprint,
                    "delivery_id": claimed.change.delivery_id,
                },
            )
        return _Pass(frozenset(blocked), skipped)


# -- Sentinel -----------------------------------------------------------------------------------

SENTINEL_API_VERSION = "2024-09-01"
_SENTINEL_SEVERITY = {
    Severity.CRITICAL: "High",
    Severity.HIGH: "High",
    Severity.MEDIUM: "Medium",
    Severity.LOW: "Low",
    Severity.INFO: "Informational",
}
_SENTINEL_STATUS = {IncidentStatus.NEW: "New", IncidentStatus.ACTIVE: "Active", IncidentStatus.RESOLVED: "Closed"}
SENTINEL_LABEL = "apim-remediator"
SENTINEL_DESCRIPTION_MAX = 5000  # Sentinel keeps descriptions short; the rest stays in the table
_WORKSPACE = re.compile(
    r"^/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[-\w._()]{1,90}/providers/"
    r"Microsoft\.OperationalInsights/workspaces/[A-Za-z0-9][A-Za-z0-9-]{2,62}$",
    re.IGNORECASE,
)


def is_workspace_id(value: str) -> bool:
    return bool(_WORKSPACE.match(value))


class RawArm(Protocol):
    """The slice of `shared.armapi.AzureArm` the Sentinel sink uses."""

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
        max_wait: float | None = None,
    ) -> Any: ...


def sentinel_properties(incident: Incident, *, owner: Any = None, labels: Sequence[Any] = ()) -> dict[str, Any]:
    """The incident as Sentinel's `properties` (owner and the analysts' labels kept)."""
    description = incident.description
    footer = (
        f"\n\n---\nSeen {incident.count} time(s), first {incident.first_seen.isoformat()}, last "
        f"{incident.last_seen.isoformat()}. Fingerprint `{incident.fingerprint}`."
    )
    if incident.note:
        footer += f"\n\nResolution: {incident.note}"
    room = SENTINEL_DESCRIPTION_MAX - len(footer)
    if len(description) > room:
        marker = "\n\n(truncated; see apim-remediator incidents)"
        description = description[: max(0, room - len(marker))] + marker
    names = {str(label.get("labelName")) for label in labels if isinstance(label, dict)}
    kept = [
        {"labelName": str(label["labelName"])} for label in labels if isinstance(label, dict) and label.get("labelName")
    ]
    for name in (SENTINEL_LABEL, incident.family):
        if name not in names:
            kept.append({"labelName": name})
    props: dict[str, Any] = {
        "title": incident.title,
        "description": description + footer,
        "severity": _SENTINEL_SEVERITY[incident.severity],
        "status": _SENTINEL_STATUS[incident.status],
        "labels": kept,
        "firstActivityTimeUtc": incident.first_seen.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "lastActivityTimeUtc": incident.last_seen.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if isinstance(owner, dict) and any(owner.get(k) for k in ("objectId", "email", "assignedTo", "userPrincipalName")):
        props["owner"] = owner
    if incident.status is IncidentStatus.RESOLVED:
        props["classification"] = "TruePositive"
        props["classificationComment"] = incident.note or "resolved by apim-remediator"
    return props


class SentinelSink:
    """Microsoft Sentinel incidents on a workspace: one incident per fingerprint (a GUID
    derived from it), updated with the incident's ETag, closed with a classification and
    the resolution note as its comment.

    The ETag and the analysts' owner and labels from the last write are kept (sink state),
    so an update is one PUT; when an analyst changed the incident meanwhile Sentinel answers
    409 (stale ETag) and the sink reads the incident again, keeps their owner and labels,
    and retries.

    Shapes: Azure/azure-rest-api-specs, specification/securityinsights (resource-manager,
    stable/2024-09-01/Incidents.json: Incidents_CreateOrUpdate
    answers 200/201; `etag` on the resource; classification and classificationComment).

    Azure actions (on the workspace; "Microsoft Sentinel Responder" grants them):
        Microsoft.SecurityInsights/incidents/read
        Microsoft.SecurityInsights/incidents/write
    """

    name = "sentinel"
    kinds = frozenset(ChangeKind)
    state_based = True

    def __init__(self, arm: RawArm, workspace_id: str, *, attempts: int = 3) -> None:
        self.arm = arm
        self.workspace_id = workspace_id.rstrip("/")
        self.attempts = attempts

    def path(self, incident: Incident) -> str:
        guid = incident_guid(incident.fingerprint)
        return f"{self.workspace_id}/providers/Microsoft.SecurityInsights/incidents/{guid}"

    async def _read(self, path: str) -> tuple[str | None, Any, list[Any]]:
        response = await self.arm.send("GET", path, SENTINEL_API_VERSION)
        if response.status == 404:
            return None, None, []
        if response.status != 200 or not isinstance(response.body, dict):
            raise _sentinel_error("reading", path, response)
        props = response.body.get("properties") or {}
        labels = props.get("labels") or []
        return str(response.body.get("etag") or response.etag or ""), props.get("owner"), list(labels)

    async def deliver(self, change: IncidentChange, state: dict[str, str]) -> dict[str, str]:
        path = self.path(change.incident)
        etag: str | None = state.get("etag") or None
        owner = json.loads(state["owner"]) if state.get("owner") else None
        labels = json.loads(state["labels"]) if state.get("labels") else []
        if not state:
            etag, owner, labels = await self._read(path)
        for _ in range(self.attempts):
            body: dict[str, Any] = {"properties": sentinel_properties(change.incident, owner=owner, labels=labels)}
            if etag:
                body["etag"] = etag
            response = await self.arm.send("PUT", path, SENTINEL_API_VERSION, body=body)
            if response.status in (200, 201) and isinstance(response.body, dict):
                props = response.body.get("properties") or {}
                return {
                    "etag": str(response.body.get("etag") or response.etag or ""),
                    "owner": json.dumps(props.get("owner")),
                    "labels": json.dumps(props.get("labels") or []),
                    "incident_number": str(props.get("incidentNumber", "")),
                }
            if response.status in (409, 412):
                # Someone (an analyst, an automation rule) changed it since our last write.
                LOG.info(
                    "sentinel incident changed since our last write (HTTP %d): reading it again",
                    response.status,
                    extra={"event": "incident.sentinel_conflict", "fingerprint": change.incident.fingerprint},
                )
                etag, owner, labels = await self._read(path)
                continue
            raise _sentinel_error("writing", path, response)
        raise TransientError(f"Sentinel incident {path.rsplit('/', 1)[-1]} kept changing; tried {self.attempts} times")


def _sentinel_error(doing: str, path: str, response: Any) -> Exception:
    body = response.body if isinstance(response.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    text = f"{doing} Sentinel incident {path.rsplit('/', 1)[-1]}: HTTP {response.status} {code}".strip()
    if response.status in (408, 429) or response.status >= 500:
        return TransientError(text)
    # 401/403/404/400 need a person (RBAC, workspace, a field Sentinel refuses), but the
    # change must not be lost: the outbox keeps it and later runs try again.
    return TransientError(text + " (kept in the outbox; check the workspace and the product's role on it)")


# -- webhooks -----------------------------------------------------------------------------------


class WebhookFormat(StrEnum):
    JSON = "json"
    TEAMS = "teams"  # an Adaptive Card for a Teams Workflows ("Post to a channel when a webhook request is received")
    SLACK = "slack"  # Block Kit for a Slack incoming webhook


SIGNATURE_HEADER = "X-Apimr-Signature"
TIMESTAMP_HEADER = "X-Apimr-Timestamp"
DELIVERY_HEADER = "X-Apimr-Delivery"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>` (the timestamp header's
    value): a receiver recomputes it, compares in constant time and rejects old timestamps."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, header: str, *, now: float, tolerance: float = 300
) -> bool:
    """What a receiver does (the tests' receiver uses it; documented in the README)."""
    try:
        age = abs(now - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(signature(secret, timestamp, body), header)


_ICON = {
    ChangeKind.OPENED: "New incident",
    ChangeKind.REOPENED: "Incident reopened",
    ChangeKind.ACTIVATED: "Incident still open",
    ChangeKind.ESCALATED: "Incident escalated",
    ChangeKind.UPDATED: "Incident updated",
    ChangeKind.RESOLVED: "Incident resolved",
}


def payload(change: IncidentChange, fmt: WebhookFormat) -> dict[str, Any]:
    incident = change.incident
    headline = f"{_ICON[change.kind]}: {incident.title}"
    facts = [
        ("Severity", incident.severity.value),
        ("Status", incident.status.value),
        ("Seen", f"{incident.count} time(s), last {incident.last_seen.isoformat()}"),
        ("Resource", incident.resource_id),
    ]
    if incident.note:
        facts.append(("Resolution", incident.note))
    text = incident.description[:3000]
    if fmt is WebhookFormat.TEAMS:
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {"type": "TextBlock", "size": "Large", "weight": "Bolder", "wrap": True, "text": headline},
                            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts]},
                            {"type": "TextBlock", "wrap": True, "text": text},
                        ],
                    },
                }
            ],
        }
    if fmt is WebhookFormat.SLACK:
        return {
            "text": headline,
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": headline[:150]}},
                {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"[:2000]} for k, v in facts]},
                {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900] or "-"}},
            ],
        }
    return {
        "schema": "apim-remediator/incident-change/v1",
        "delivery_id": change.delivery_id,
        "change": change.kind.value,
        "run_id": change.run_id,
        "incident": incident.to_json(),
    }


class NoAnswer(OSError):
    """A webhook request that got no HTTP answer; the text names the kind of failure only."""


class HttpPost(Protocol):
    """One POST; returns the status code, raises OSError/asyncio.TimeoutError on no answer."""

    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> int: ...


SecretSource = Callable[[], Any]  # an awaitable factory of the HMAC key bytes (Key Vault)


class WebhookSink:
    """A webhook: generic JSON, a Teams Workflows Adaptive Card or Slack Block Kit, signed
    with HMAC-SHA256 (key from Key Vault), each attempt bounded by a timeout, retried with
    exponential backoff on no answer, 408, 429 and 5xx. The URL is treated as a secret (Teams
    and Slack URLs carry their own signature): errors name only its host."""

    name = "webhook"
    kinds = STATE_CHANGES
    state_based = False
    KEY_TTL = 300.0

    def __init__(
        self,
        url: str,
        post: HttpPost,
        *,
        fmt: WebhookFormat = WebhookFormat.JSON,
        secret: SecretSource | None = None,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.post = post
        self.fmt = fmt
        self.secret = secret
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.clock = clock
        self._cached: tuple[bytes, float] | None = None

    async def _key(self) -> bytes | None:
        """The HMAC key, read from Key Vault at most every `KEY_TTL` seconds (a rotated key
        is used within minutes, without a restart)."""
        if self.secret is None:
            return None
        now = time.monotonic()
        if self._cached is None or now - self._cached[1] > self.KEY_TTL:
            self._cached = (await self.secret(), now)
        return self._cached[0]

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[-1].split("/", 1)[0].split("@")[-1].split("?")[0]

    async def deliver(self, change: IncidentChange, state: dict[str, str]) -> dict[str, str]:
        body = json.dumps(payload(change, self.fmt), separators=(",", ":")).encode("utf-8")
        key = await self._key()
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            stamp = str(int(self.clock()))
            headers = {"Content-Type": "application/json", DELIVERY_HEADER: change.delivery_id, TIMESTAMP_HEADER: stamp}
            if key is not None:
                headers[SIGNATURE_HEADER] = signature(key, stamp, body)
            try:
                status = await self.post(self.url, body, headers, self.timeout)
            except NoAnswer as error:
                last = f"no answer from {self.host} ({error})"
                continue
            except (OSError, TimeoutError) as error:
                last = f"no answer from {self.host} ({type(error).__name__})"
                continue
            if 200 <= status < 300:
                return state
            last = f"{self.host} answered HTTP {status}"
            if status not in (408, 429) and status < 500:
                break  # a 4xx will not change by retrying now; the outbox keeps the change
        raise TransientError(f"webhook delivery {change.delivery_id}: {last}")


def aiohttp_post(ssl_context: Any) -> HttpPost:
    """The production `HttpPost`: aiohttp with the product's SSL context, no redirects
    (a redirect could carry the signed body elsewhere)."""

    async def post(url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> int:
        import aiohttp

        client_timeout = aiohttp.ClientTimeout(total=seconds)
        try:
            async with (
                aiohttp.ClientSession(timeout=client_timeout) as session,
                session.post(url, data=body, headers=dict(headers), ssl=ssl_context, allow_redirects=False) as response,
            ):
                await response.read()
                return response.status
        except TimeoutError:
            raise NoAnswer(f"no answer within {seconds:g} s") from None
        except aiohttp.ClientError as error:
            # The class says what happened (refused, reset, TLS); aiohttp's text can carry the URL.
            cause = type(getattr(error, "os_error", None) or error).__name__
            raise NoAnswer(f"{type(error).__name__}: {cause}") from None

    return post


def key_vault_secret(client: Any, name: str) -> SecretSource:
    """The webhook's HMAC key: the current version of a Key Vault secret, read per delivery
    run (a rotated key is picked up without a restart)."""

    async def read() -> bytes:
        try:
            secret = await client.get_secret(name)
        except AzureError as error:
            status = getattr(error, "status_code", None)
            raise TransientError(
                f"reading the webhook signing secret {name!r} from Key Vault: {status} {type(error).__name__}"
            ) from error
        if not secret.value:
            raise TransientError(f"the webhook signing secret {name!r} is empty")
        return str(secret.value).encode("utf-8")

    return read
