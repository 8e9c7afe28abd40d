"""Test-restore: prove the latest backup of each source comes back.

Each tick, per source instance that has a designated restore target: resume the open
test-restore from its continuation token; or, when one is due (the newest started one is
older than the policy's `backups.restore_tests.every_days`, or `force`), restore the
newest successful backup into the target, then read the target and compare it with the
backup's manifest. The verdict (passed, or failed with the differences), the recovery time
(restore start to verified) and the settings a backup does not carry are recorded on the
run; a failure or any difference is logged as one structured event
`restore_test.failed` and shows as BAK-002 on the source.

Restoring overwrites the target, so a target must be designated twice: the policy's
`backups.restore_tests.targets` maps the source to it AND the target carries the tag
`apim-remediator-restore-target-for` naming the source's resource id. A target the request
names that the policy does not map to the source is refused before any call to Azure; a
target outside the configured scope, without the tag, or of another tier than the source
(Azure restores only into the same tier) is refused on what the inventory's listing says
(its tags and sku), before any request about the target. The tag and tier are checked once
more on a fresh read of the target (against the backup's tier), before the restore is sent.
Refusals are recorded as failed test-restores (`error_code` RestoreRefused / TierMismatch).

Azure actions:
    Microsoft.ApiManagement/service/restore/action
    Microsoft.ApiManagement/service/read
    Microsoft.ApiManagement/service/*/read
    Microsoft.Insights/diagnosticSettings/read
and Storage Blob Data Contributor on the backup storage account for the product (reads the
manifest) and for each target's managed identity (APIM reads the backup).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum

from handlers.backup import (
    DEFAULT_MAX_WAIT,
    BackupAzure,
    BackupBlobs,
    BackupJobDeps,
    BackupRecords,
    log_failure,
    narrow,
    select_instances,
)
from handlers.job_incidents import report_restore_tests
from shared.backup import (
    BackupRun,
    Manifest,
    ManifestError,
    RunKind,
    RunStatus,
    content_differences,
    manifest_blob_name,
    manifest_from_json,
    settings_not_restored,
    supports_backup,
)
from shared.backup_store import new_run_id
from shared.errors import PermanentError, TransientError
from shared.inventory import InstanceRef
from shared.policy import RESTORE_TARGET_TAG

LOG = logging.getLogger("apim_remediator.restore_test")


class RestoreRefused(PermanentError):
    """A test-restore the designation rules forbid (said before anything is restored)."""


class RestoreOutcome(StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"  # the restore failed, or the restored target differs from the manifest
    REFUSED = "refused"  # the target is not designated (mapping and tag) or of another tier
    NO_TARGET = "no_target"  # the policy designates no restore target for this source
    NO_BACKUP = "no_backup"  # no successful backup to restore yet
    NOT_DUE = "not_due"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class RestoreTestRequest:
    source_ids: tuple[str, ...] = ()  # empty: every in-scope source the policy maps to a target
    target_id: str | None = None  # when named, it must be the policy's target of the one source
    force: bool = False
    max_wait: float = DEFAULT_MAX_WAIT
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class RestoreTestOutcome:
    source_id: str
    outcome: RestoreOutcome
    target_id: str | None = None
    blob: str | None = None
    run_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    differences: tuple[str, ...] = ()
    not_restored: tuple[str, ...] = ()
    recovery_s: float | None = None  # restore start to verified


@dataclass(frozen=True)
class RestoreTestResult:
    correlation_id: str
    sources: tuple[RestoreTestOutcome, ...]


def check_designation(request: RestoreTestRequest, targets_of: dict[str, str | None]) -> None:
    """Refuse a named target the policy does not map to the named source: pure, no Azure call."""
    if request.target_id is None:
        return
    if len(request.source_ids) != 1:
        raise RestoreRefused("a restore target can only be named together with exactly one source")
    source = request.source_ids[0]
    mapped = targets_of.get(source)
    if mapped is None:
        raise RestoreRefused(
            f"refused: the policy designates no restore target for {source} "
            "(backups.restore_tests.targets); nothing was restored"
        )
    if mapped.lower().rstrip("/") != request.target_id.lower().rstrip("/"):
        raise RestoreRefused(
            f"refused: {request.target_id} is not the designated restore target of {source} "
            f"(the policy designates {mapped}); restoring overwrites the target, nothing was restored"
        )


async def run_restore_tests(request: RestoreTestRequest, deps: BackupJobDeps) -> RestoreTestResult:
    """One tick of the test-restore job. Raises RestoreRefused for a non-designated target
    named in the request (before any Azure call); records everything else per source."""
    policy = deps.policy.backups
    check_designation(request, {s: policy.restore_target_of(s) for s in request.source_ids})
    if deps.azure is None or deps.blobs is None or deps.records is None:
        LOG.info("backups are not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)", extra={"event": "backup.off"})
        return RestoreTestResult(request.correlation_id, ())
    everything = await select_instances((), deps.inventory, deps.policy)
    refs = narrow(everything, request.source_ids)
    if not request.source_ids:
        refs = [r for r in refs if policy.restore_target_of(r.id) is not None]
    job = _Job(request, deps, deps.records, deps.azure, deps.blobs, {r.id.lower(): r for r in everything})
    result = RestoreTestResult(request.correlation_id, tuple([await job.one(ref) for ref in refs]))
    if deps.incidents is not None:
        await report_restore_tests(result, deps.incidents)
    return result


def designation_refusal(
    source: InstanceRef, target_id: str, target_tags: Mapping[str, str], target_sku: str, source_sku: str
) -> tuple[str, str] | None:
    """Why restoring `source`'s backup into the target is refused (error code, reason), or None.

    The target must carry the tag naming the source (restoring overwrites it) and be of the
    backup's tier. An unknown tier ("") is left to the check on the fresh read."""
    tagged = {k.lower(): v for k, v in target_tags.items()}.get(RESTORE_TARGET_TAG, "")
    if tagged.lower().rstrip("/") != source.id.lower().rstrip("/"):
        return (
            "RestoreRefused",
            f"{target_id} does not carry the tag {RESTORE_TARGET_TAG}={source.id}: it is not designated as this "
            "source's restore target (restoring overwrites it); nothing was restored",
        )
    if target_sku and source_sku and (target_sku.lower() != source_sku.lower() or not supports_backup(target_sku)):
        return (
            "TierMismatch",
            f"{target_id} is {target_sku}, the backup is of a {source_sku} instance: Azure restores only into "
            "the same tier; nothing was restored",
        )
    return None


@dataclass
class _Job:
    request: RestoreTestRequest
    deps: BackupJobDeps
    records: BackupRecords

    azure: BackupAzure
    blobs: BackupBlobs
    in_scope: Mapping[str, InstanceRef]  # by lowercase id: the instances the settings and policy admit

    async def one(self, ref: InstanceRef) -> RestoreTestOutcome:
        try:
            return await self._one(ref)
        except (PermanentError, TransientError) as error:
            LOG.warning(
                "test-restore of %s: %s",
                ref.id,
                error,
                extra={
                    "event": "restore_test.error",
                    "instance_id": ref.id,
                    "correlation_id": self.request.correlation_id,
                },
            )
            kind = "Transient" if isinstance(error, TransientError) else "Permanent"
            return RestoreTestOutcome(ref.id, RestoreOutcome.FAILED, error_code=f"{kind}Error", error=str(error))

    async def _one(self, ref: InstanceRef) -> RestoreTestOutcome:
        policy = self.deps.policy.backups
        runs = await self.records.runs(ref.id)
        tests = [r for r in runs if r.kind is RunKind.RESTORE_TEST]
        unfinished = [r for r in tests if r.status.is_open]
        if unfinished:
            return await self.settle(unfinished[0], runs)
        target_id = policy.restore_target_of(ref.id)
        if target_id is None:
            return RestoreTestOutcome(ref.id, RestoreOutcome.NO_TARGET)
        now = self.deps.clock()
        newest = max((r.started_at for r in tests), default=None)
        due = newest is None or now - newest >= timedelta(days=policy.restore_test_every_days)
        if not (due or self.request.force):
            return RestoreTestOutcome(ref.id, RestoreOutcome.NOT_DUE, target_id=target_id)
        backup = next(
            (
                r
                for r in sorted(runs, key=lambda r: r.started_at, reverse=True)
                if r.kind is RunKind.BACKUP and r.status is RunStatus.SUCCEEDED and not r.pruned
            ),
            None,
        )
        if backup is None:
            return RestoreTestOutcome(ref.id, RestoreOutcome.NO_BACKUP, target_id=target_id)
        run = BackupRun(
            instance_id=ref.id,
            run_id=new_run_id(now),
            kind=RunKind.RESTORE_TEST,
            status=RunStatus.STARTING,
            started_at=now,
            blob=backup.blob,
            target_id=target_id,
            correlation_id=self.request.correlation_id,
        )
        target = self.in_scope.get(target_id.lower().rstrip("/"))
        if target is None:
            return await self.fail(
                run,
                "RestoreRefused",
                f"{target_id} is outside the configured scope (settings and policy): the product writes only "
                "in scope; nothing was restored",
                refused=True,
            )
        # What the inventory already says (tags, tier) refuses before any call about the target;
        # the same checks run again on a fresh read of it below, before the restore.
        refusal = designation_refusal(ref, target_id, target.tags, target.sku, ref.sku)
        if refusal is not None:
            return await self.fail(run, refusal[0], refusal[1], refused=True)
        manifest = await self.manifest(backup.blob)
        if isinstance(manifest, str):
            return await self.fail(run, "ManifestUnreadable", manifest)
        facts = await self.azure.service(target_id)
        refusal = designation_refusal(ref, target_id, facts.tags, facts.sku, manifest.sku)
        if refusal is not None:
            return await self.fail(run, refusal[0], refusal[1], refused=True)
        await self.records.save(run)  # the intent: the target is about to be overwritten
        try:
            token = await self.azure.begin(RunKind.RESTORE_TEST, facts, backup.blob)
        except (PermanentError, TransientError) as error:
            code = "StartRefused" if isinstance(error, PermanentError) else "StartFailed"
            return await self.fail(run, code, str(error))
        run = replace(run, status=RunStatus.RUNNING, continuation=token)
        await self.records.save(run)
        return await self.settle(run, runs)

    async def manifest(self, blob: str) -> Manifest | str:
        raw = await self.blobs.get(manifest_blob_name(blob))
        if raw is None:
            return f"the manifest {manifest_blob_name(blob)} is missing"
        try:
            return manifest_from_json(raw)
        except ManifestError as error:
            return f"the manifest {manifest_blob_name(blob)} is unreadable: {error}"

    async def fail(self, run: BackupRun, code: str, why: str, *, refused: bool = False) -> RestoreTestOutcome:
        failed = run.finish(RunStatus.FAILED, self.deps.clock(), error_code=code, error=why)
        await self.records.save(failed)
        log_failure(
            "restore_test.refused" if refused else "restore_test.failed",
            failed,
            correlation_id=self.request.correlation_id,
        )
        return _outcome(failed, RestoreOutcome.REFUSED if refused else RestoreOutcome.FAILED)

    async def settle(self, run: BackupRun, runs: list[BackupRun]) -> RestoreTestOutcome:
        if run.status is RunStatus.STARTING or not run.continuation or not run.target_id:
            return await self.fail(
                run, "Interrupted", "the worker stopped before Azure accepted the restore (no continuation token)"
            )
        outcome = await self.azure.poll(
            RunKind.RESTORE_TEST, run.target_id, run.continuation, max_wait=self.request.max_wait
        )
        if outcome.status == "InProgress":
            return _outcome(run, RestoreOutcome.RUNNING)
        if outcome.status != "Succeeded":
            return await self.fail(run, outcome.error_code or f"Restore{outcome.status}", outcome.error or "")
        manifest = await self.manifest(run.blob)
        if isinstance(manifest, str):
            return await self.fail(run, "ManifestUnreadable", manifest)
        content, not_in_backup = await self.azure.content(run.target_id)
        differences = tuple(content_differences(manifest.content, content))
        not_restored = tuple(settings_not_restored(manifest.not_in_backup, not_in_backup))
        now = self.deps.clock()
        if differences:
            failed = run.finish(
                RunStatus.FAILED,
                now,
                error_code="ContentMismatch",
                error=f"{len(differences)} difference(s) between the restored target and the manifest",
                differences=differences,
                not_restored=not_restored,
            )
            await self.records.save(failed)
            log_failure("restore_test.failed", failed, correlation_id=self.request.correlation_id)
            return _outcome(failed, RestoreOutcome.FAILED)
        passed = run.finish(RunStatus.PASSED, now, not_restored=not_restored)
        await self.records.save(passed)
        for backup in runs:
            if backup.kind is RunKind.BACKUP and backup.blob == run.blob and not backup.verified:
                await self.records.save(replace(backup, verified=True))
        LOG.info(
            "test-restore of %s into %s passed (recovery %.1f s)",
            run.instance_id,
            run.target_id,
            passed.duration.total_seconds() if passed.duration else 0.0,
            extra={"event": "restore_test.passed", "instance_id": run.instance_id, "target_id": run.target_id},
        )
        return _outcome(passed, RestoreOutcome.PASSED)


def _outcome(run: BackupRun, outcome: RestoreOutcome) -> RestoreTestOutcome:
    return RestoreTestOutcome(
        source_id=run.instance_id,
        outcome=outcome,
        target_id=run.target_id,
        blob=run.blob,
        run_id=run.run_id,
        error_code=run.error_code,
        error=run.error,
        differences=run.differences,
        not_restored=run.not_restored,
        recovery_s=run.duration.total_seconds() if run.duration is not None else None,
    )
