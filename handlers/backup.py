"""Backup: one tick of the backup job over the instances in scope.

Each tick, per instance: resume the open backup from its stored continuation token (the
`backups` table) and wait for it at most `max_wait`; or, when none is open and one is due
(the newest started backup is older than the policy's `backups.every_hours`, or `force`),
read the content manifest, record the intent (`starting`), start APIM's native Backup LRO
into `{instance}/{UTC timestamp}.apimbackup` in the configured container, store the
continuation token (`running`), write the manifest beside the blob and wait as above. A
backup still running when `max_wait` is spent is left `running` for the next tick, so a
tick never outlives the Functions timeout however long Azure takes. Once a backup has
succeeded, retention deletes the backups (and manifests) beyond the newest `keep_last` or
older than `max_age_days`, never the newest backup a test-restore verified.

Tiers without backup (Consumption, the v2 tiers) are reported `unsupported`, never failed.
A failure (Azure's LRO ended Failed or Canceled, the start was refused, the blob is
missing afterwards, the worker died before Azure answered) is recorded on the run with a
typed `error_code` and logged as one structured event `backup.failed`, never raised past
the instance: the other instances still run. Transient errors (throttling, storage
unavailable) leave the run as it was for the next tick.

Azure actions:
    Microsoft.ApiManagement/service/backup/action
    Microsoft.ApiManagement/service/read
    Microsoft.ApiManagement/service/*/read
    Microsoft.Insights/diagnosticSettings/read
and Storage Blob Data Contributor on the backup storage account for the product (manifests,
retention) and for each instance's managed identity (APIM writes the backup).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from handlers.job_incidents import report_backups
from shared.backup import (
    BackupRun,
    Content,
    Manifest,
    RunKind,
    RunStatus,
    backup_blob_name,
    manifest_blob_name,
    retention_victims,
    supports_backup,
)
from shared.backup_store import new_run_id
from shared.errors import PermanentError, TransientError
from shared.incidents import IncidentApi
from shared.inventory import InstanceRef
from shared.policy import BackupPolicy

if TYPE_CHECKING:
    # Types only: the Azure side (the SDK's models) is imported when the composition root
    # builds it, not when function_app.py indexes the timers.
    from shared.backup_azure import LroOutcome, ServiceFacts

LOG = logging.getLogger("apim_remediator.backup")
# A tick waits this long for an LRO at most, well inside the host's 10-minute timeout.
DEFAULT_MAX_WAIT = 240.0


class BackupOutcome(StrEnum):
    RUNNING = "running"  # started or resumed; still running when the tick's wait ran out
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"  # the tier has no backup (Consumption, v2 tiers)
    NOT_DUE = "not_due"  # a backup started within backups.every_hours
    NOT_CONFIGURED = "not_configured"  # APIMR_BACKUP_STORAGE_ACCOUNT is not set


@dataclass(frozen=True)
class BackupRequest:
    instance_ids: tuple[str, ...] = ()  # only these (each must be in scope); empty: every instance in scope
    force: bool = False  # start a new backup even when one is not due
    max_wait: float = DEFAULT_MAX_WAIT
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class InstanceBackup:
    instance_id: str
    outcome: BackupOutcome
    blob: str | None = None
    run_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    duration_s: float | None = None
    pruned: tuple[str, ...] = ()
    sku: str | None = None


@dataclass(frozen=True)
class BackupResult:
    correlation_id: str
    instances: tuple[InstanceBackup, ...]

    @property
    def failed(self) -> tuple[InstanceBackup, ...]:
        return tuple(i for i in self.instances if i.outcome is BackupOutcome.FAILED)


class Inventory(Protocol):
    async def discover(self) -> tuple[InstanceRef, ...]: ...


class ScopePolicy(Protocol):
    @property
    def backups(self) -> BackupPolicy: ...

    def in_scope(self, subscription_id: str, resource_group: str, tags: dict[str, str]) -> bool: ...


class BackupAzure(Protocol):
    async def service(self, instance_id: str) -> ServiceFacts: ...
    async def begin(self, kind: RunKind, facts: ServiceFacts, blob: str) -> str: ...
    async def poll(self, kind: RunKind, instance_id: str, token: str, *, max_wait: float) -> LroOutcome: ...
    async def content(self, instance_id: str) -> tuple[Content, dict[str, Any]]: ...


class BackupBlobs(Protocol):
    async def ensure_container(self) -> None: ...
    async def put(self, blob: str, data: str) -> None: ...
    async def get(self, blob: str) -> bytes | None: ...
    async def exists(self, blob: str) -> bool: ...
    async def delete(self, blob: str) -> None: ...


class BackupRecords(Protocol):
    async def save(self, run: BackupRun) -> None: ...
    async def runs(self, instance_id: str, *, limit: int = ...) -> list[BackupRun]: ...


@dataclass(frozen=True)
class BackupJobDeps:
    """None for `azure`, `blobs` and `records` when backups are not configured."""

    inventory: Inventory
    policy: ScopePolicy
    azure: BackupAzure | None
    blobs: BackupBlobs | None
    records: BackupRecords | None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    incidents: IncidentApi | None = None  # None: failures are only logged and recorded


def log_failure(event: str, run: BackupRun, *, correlation_id: str) -> None:
    """The one structured event of a failed backup or test-restore (incidents subscribe to it)."""
    LOG.error(
        "%s of %s failed: %s %s",
        run.kind.value.replace("_", "-"),
        run.instance_id,
        run.error_code,
        run.error or "",
        extra={
            "event": event,
            "instance_id": run.instance_id,
            "target_id": run.target_id or "",
            "run_id": run.run_id,
            "error_code": run.error_code or "",
            "blob": run.blob,
            "correlation_id": correlation_id,
        },
    )


async def select_instances(instance_ids: Sequence[str], inventory: Inventory, policy: ScopePolicy) -> list[InstanceRef]:
    """The instances in scope (settings and policy), narrowed to `instance_ids` when given;
    an id given but not in scope is refused (PermanentError)."""
    refs = [r for r in await inventory.discover() if policy.in_scope(r.subscription_id, r.resource_group, dict(r.tags))]
    return narrow(refs, instance_ids)


def narrow(refs: Sequence[InstanceRef], instance_ids: Sequence[str]) -> list[InstanceRef]:
    """`refs` narrowed to `instance_ids` (all of them when none is given); an id not among
    them is refused (PermanentError)."""
    if not instance_ids:
        return list(refs)
    by_id = {r.id.lower(): r for r in refs}
    missing = [i for i in instance_ids if i.lower().rstrip("/") not in by_id]
    if missing:
        raise PermanentError(f"not APIM instances in the configured scope: {', '.join(missing)}")
    return [by_id[i.lower().rstrip("/")] for i in instance_ids]


async def run_backups(request: BackupRequest, deps: BackupJobDeps) -> BackupResult:
    """One tick: resume or start a backup of each instance in scope; never raises for one instance."""
    if deps.azure is None or deps.blobs is None or deps.records is None:
        LOG.info("backups are not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)", extra={"event": "backup.off"})
        return BackupResult(request.correlation_id, ())
    refs = await select_instances(request.instance_ids, deps.inventory, deps.policy)
    job = _Job(request, deps, deps.azure, deps.blobs, deps.records)
    result = BackupResult(request.correlation_id, tuple([await job.one(ref) for ref in refs]))
    if deps.incidents is not None:
        await report_backups(result, deps.incidents)
    return result


@dataclass
class _Job:
    request: BackupRequest
    deps: BackupJobDeps
    azure: BackupAzure
    blobs: BackupBlobs
    records: BackupRecords
    container_ready: bool = False

    async def one(self, ref: InstanceRef) -> InstanceBackup:
        try:
            return await self._one(ref)
        except (PermanentError, TransientError) as error:
            # Nothing was recorded as finished: a transient failure is retried next tick; a
            # permanent one (no identity, refused start) was recorded on the run where one exists.
            LOG.warning(
                "backup of %s: %s",
                ref.id,
                error,
                extra={"event": "backup.error", "instance_id": ref.id, "correlation_id": self.request.correlation_id},
            )
            kind = "Transient" if isinstance(error, TransientError) else "Permanent"
            return InstanceBackup(ref.id, BackupOutcome.FAILED, error_code=f"{kind}Error", error=str(error))

    async def _one(self, ref: InstanceRef) -> InstanceBackup:
        runs = await self.records.runs(ref.id)
        backups = [r for r in runs if r.kind is RunKind.BACKUP]
        unfinished = [r for r in backups if r.status.is_open]
        if unfinished:
            return await self.settle(unfinished[0], runs)
        policy = self.deps.policy.backups
        now = self.deps.clock()
        newest = max((r.started_at for r in backups), default=None)
        if not self.request.force and newest is not None and now - newest < timedelta(hours=policy.every_hours):
            return InstanceBackup(ref.id, BackupOutcome.NOT_DUE)
        facts = await self.azure.service(ref.id)
        if not supports_backup(facts.sku):
            LOG.info(
                "backup of %s: the %s tier has no backup and restore",
                ref.id,
                facts.sku,
                extra={"event": "backup.unsupported", "instance_id": ref.id, "sku": facts.sku},
            )
            return InstanceBackup(ref.id, BackupOutcome.UNSUPPORTED, sku=facts.sku)
        return await self.start(facts, runs, now)

    async def start(self, facts: ServiceFacts, runs: list[BackupRun], now: datetime) -> InstanceBackup:
        if not self.container_ready:
            await self.blobs.ensure_container()
            self.container_ready = True
        blob = backup_blob_name(facts.name, now)
        if any(r.blob == blob for r in runs):
            # Blob names have whole seconds: a second backup in the same second would overwrite
            # the first one's blob, so it waits for the next tick.
            return InstanceBackup(facts.id, BackupOutcome.NOT_DUE, blob=blob)
        content, not_in_backup = await self.azure.content(facts.id)
        run = BackupRun(
            instance_id=facts.id,
            run_id=new_run_id(now),
            kind=RunKind.BACKUP,
            status=RunStatus.STARTING,
            started_at=now,
            blob=blob,
            correlation_id=self.request.correlation_id,
        )
        await self.records.save(run)  # the intent, before Azure is asked
        try:
            token = await self.azure.begin(RunKind.BACKUP, facts, blob)
        except (PermanentError, TransientError) as error:
            code = "StartRefused" if isinstance(error, PermanentError) else "StartFailed"
            failed = run.finish(RunStatus.FAILED, self.deps.clock(), error_code=code, error=str(error))
            await self.records.save(failed)
            log_failure("backup.failed", failed, correlation_id=self.request.correlation_id)
            return _result(failed)
        run = replace(run, status=RunStatus.RUNNING, continuation=token)
        await self.records.save(run)
        manifest = Manifest(
            instance_id=facts.id,
            instance_name=facts.name,
            sku=facts.sku,
            taken_at=now,
            backup_blob=blob,
            content=content,
            not_in_backup=not_in_backup,
        )
        await self.blobs.put(manifest_blob_name(blob), manifest.to_json())
        return await self.settle(run, [run, *runs])

    async def settle(self, run: BackupRun, runs: list[BackupRun]) -> InstanceBackup:
        """Resume an open run from its token; record how it ended, or leave it running."""
        if run.status is RunStatus.STARTING or not run.continuation:
            failed = run.finish(
                RunStatus.FAILED,
                self.deps.clock(),
                error_code="Interrupted",
                error="the worker stopped before Azure accepted the backup (no continuation token was stored)",
            )
            await self.records.save(failed)
            log_failure("backup.failed", failed, correlation_id=self.request.correlation_id)
            return _result(failed)
        outcome = await self.azure.poll(
            RunKind.BACKUP, run.instance_id, run.continuation, max_wait=self.request.max_wait
        )
        if outcome.status == "InProgress":
            return _result(run)
        now = self.deps.clock()
        if outcome.status != "Succeeded":
            failed = run.finish(RunStatus.FAILED, now, error_code=outcome.error_code, error=outcome.error)
            await self.records.save(failed)
            log_failure("backup.failed", failed, correlation_id=self.request.correlation_id)
            return _result(failed)
        if not await self.blobs.exists(run.blob):
            failed = run.finish(
                RunStatus.FAILED,
                now,
                error_code="BackupBlobMissing",
                error=f"Azure reported success but {run.blob} is not in the container",
            )
            await self.records.save(failed)
            log_failure("backup.failed", failed, correlation_id=self.request.correlation_id)
            return _result(failed)
        done = run.finish(RunStatus.SUCCEEDED, now)
        await self.records.save(done)
        LOG.info(
            "backup of %s succeeded: %s (%.1f s)",
            done.instance_id,
            done.blob,
            done.duration.total_seconds() if done.duration else 0.0,
            extra={"event": "backup.succeeded", "instance_id": done.instance_id, "blob": done.blob},
        )
        pruned = await self.prune([done, *(r for r in runs if r.run_id != done.run_id)], now)
        return replace(_result(done), pruned=pruned)

    async def prune(self, runs: list[BackupRun], now: datetime) -> tuple[str, ...]:
        policy = self.deps.policy.backups
        victims = retention_victims(
            runs, keep_last=policy.keep_last, max_age=timedelta(days=policy.max_age_days), now=now
        )
        for victim in victims:
            await self.blobs.delete(victim.blob)
            await self.blobs.delete(manifest_blob_name(victim.blob))
            await self.records.save(replace(victim, pruned=True))
        return tuple(v.blob for v in victims)


def _result(run: BackupRun) -> InstanceBackup:
    outcome = {
        RunStatus.RUNNING: BackupOutcome.RUNNING,
        RunStatus.STARTING: BackupOutcome.RUNNING,
        RunStatus.SUCCEEDED: BackupOutcome.SUCCEEDED,
    }.get(run.status, BackupOutcome.FAILED)
    return InstanceBackup(
        instance_id=run.instance_id,
        outcome=outcome,
        blob=run.blob,
        run_id=run.run_id,
        error_code=run.error_code,
        error=run.error,
        duration_s=run.duration.total_seconds() if run.duration is not None else None,
    )
