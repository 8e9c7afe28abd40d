"""Incidents of the jobs that are not a reconcile: backups, test-restores, key rotations.

A failed backup or a failed or refused test-restore opens (or counts again) one incident per
instance and job (`BACKUP:{instance}`, `RESTORE-TEST:{instance}`); the next success resolves
it with a note. A key rotation that could not finish (refused or failed, from an event, the
CLI or the HTTP API) opens `ROTATION:{subscription}`; the next rotation that finishes
resolves it. Rotations the engine runs for the KEY rules report through reconcile instead
(their refusals are the findings' incidents), and a pending or busy one is finished by the
next run, so neither opens one here. A transient failure (storage or ARM briefly unreachable) is retried by the
next tick and opens nothing. Telling people must never break the job: an incident that
cannot be stored is logged and the job's own record stands (the BAK rules keep reporting
what is missing, and their findings become incidents through reconcile).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.errors import RemediatorError
from shared.incidents import IncidentApi, Problem, ProblemKind, fingerprint_of
from shared.model import Severity

if TYPE_CHECKING:  # the jobs call this module: their types only, no import cycle
    from collections.abc import Sequence

    from handlers.backup import BackupResult, InstanceBackup
    from handlers.restore_test import RestoreTestOutcome, RestoreTestResult
    from shared.rotation import RotationResult

LOG = logging.getLogger("apim_remediator.incidents")
BACKUP_FAMILY = "BACKUP"
RESTORE_FAMILY = "RESTORE-TEST"
TRANSIENT = "TransientError"  # the error code a backup tick gives a transient failure


def _name(instance_id: str) -> str:
    return instance_id.rstrip("/").rsplit("/", 1)[-1]


def backup_problem(item: InstanceBackup, correlation_id: str) -> Problem:
    lines = [
        f"The native backup of `{item.instance_id}` failed: **{item.error_code}**.",
        "",
        f"- What Azure or the product said: {item.error or '(no detail)'}",
        f"- Backup run: `{item.run_id or '-'}`; blob `{item.blob or '-'}`; job run `{correlation_id}`",
        "- What the product did: recorded the failure; the next tick of the backup timer starts a new backup "
        "when one is due (`apim-remediator backup --instance ... --force` starts one now).",
        "- Until a backup succeeds, BAK-001 stays open for this instance.",
    ]
    return Problem(
        kind=ProblemKind.BACKUP,
        family=BACKUP_FAMILY,
        resource_id=item.instance_id,
        title=f"Backup of {_name(item.instance_id)} failed ({item.error_code})",
        severity=Severity.HIGH,
        description="\n".join(lines),
        instance_id=item.instance_id,
    )


def restore_problem(item: RestoreTestOutcome, correlation_id: str) -> Problem:
    verb = "was refused" if item.outcome.value == "refused" else "failed"
    lines = [
        f"The test-restore of `{item.source_id}` into `{item.target_id or '(no target)'}` {verb}: "
        f"**{item.error_code or item.outcome.value}**.",
        "",
        f"- Detail: {item.error or '(none)'}",
        f"- Backup restored: `{item.blob or '-'}`; run `{item.run_id or '-'}`; job run `{correlation_id}`",
    ]
    if item.differences:
        lines += ["", "Differences between the restored instance and the backup's manifest:", ""]
        lines += [f"- {line}" for line in item.differences]
    lines += ["", "Until a test-restore passes, BAK-002 stays open for this instance."]
    return Problem(
        kind=ProblemKind.RESTORE_TEST,
        family=RESTORE_FAMILY,
        resource_id=item.source_id,
        title=f"Test-restore of {_name(item.source_id)} {verb} ({item.error_code or item.outcome.value})",
        severity=Severity.HIGH,
        description="\n".join(lines),
        instance_id=item.source_id,
    )


async def report_backups(result: BackupResult, incidents: IncidentApi) -> None:
    """Raise an incident per failed backup, resolve it on the instance's next success."""
    for item in result.instances:
        try:
            if item.outcome.value == "failed" and item.error_code != TRANSIENT:
                await incidents.raise_problem(backup_problem(item, result.correlation_id), run_id=result.correlation_id)
            elif item.outcome.value == "succeeded":
                note = f"backup {item.blob} succeeded (run {item.run_id})"
                await incidents.resolve(
                    fingerprint_of(BACKUP_FAMILY, item.instance_id), note, run_id=result.correlation_id
                )
        except RemediatorError as error:
            _not_told(item.instance_id, "backup", error)


async def report_restore_tests(result: RestoreTestResult, incidents: IncidentApi) -> None:
    """Raise an incident per failed or refused test-restore, resolve it when one passes."""
    for item in result.sources:
        try:
            if item.outcome.value in ("failed", "refused") and item.error_code != TRANSIENT:
                problem = restore_problem(item, result.correlation_id)
                await incidents.raise_problem(problem, run_id=result.correlation_id)
            elif item.outcome.value == "passed":
                recovery = f" in {item.recovery_s:.0f} s" if item.recovery_s is not None else ""
                note = f"test-restore of {item.blob} into {item.target_id} passed{recovery} (run {item.run_id})"
                await incidents.resolve(
                    fingerprint_of(RESTORE_FAMILY, item.source_id), note, run_id=result.correlation_id
                )
        except RemediatorError as error:
            _not_told(item.source_id, "test-restore", error)


ROTATION_FAMILY = "ROTATION"


def rotation_problem(result: RotationResult, instance_id: str) -> Problem:
    subscription = _name(result.subscription_id)
    lines = [
        f"The {result.action} of subscription `{subscription}` on `{_name(instance_id)}` {result.status.value}: "
        f"{result.detail}",
        "",
        f"- Rotation `{result.op_id or '-'}`; steps done: {', '.join(result.steps) or 'none'}",
        "- The key the Key Vault ledger holds is still one APIM accepts: nothing was cut off.",
        "- `apim-remediator rotate --instance ... --subscription ... --apply` runs it again once the reason is fixed.",
    ]
    return Problem(
        kind=ProblemKind.ROTATION,
        family=ROTATION_FAMILY,
        resource_id=result.subscription_id,
        title=f"Key {result.action} of {subscription} {result.status.value}",
        severity=Severity.HIGH,
        description="\n".join(lines),
        instance_id=instance_id,
    )


async def report_rotations(
    results: Sequence[RotationResult], instance_id: str, incidents: IncidentApi, *, run_id: str = ""
) -> None:
    """Raise an incident per rotation refused or failed, resolve it when one finishes."""
    for result in results:
        try:
            if result.status.value in ("refused", "failed"):
                await incidents.raise_problem(rotation_problem(result, instance_id), run_id=run_id)
            elif result.status.value == "done":
                note = f"{result.action} done (rotation {result.op_id})"
                await incidents.resolve(fingerprint_of(ROTATION_FAMILY, result.subscription_id), note, run_id=run_id)
        except RemediatorError as error:
            _not_told(result.subscription_id, "rotation", error)


def _not_told(instance_id: str, job: str, error: RemediatorError) -> None:
    LOG.error(
        "the %s incident of %s could not be stored: %s",
        job,
        instance_id,
        error,
        extra={"event": "incident.not_stored", "instance_id": instance_id, "job": job},
    )
