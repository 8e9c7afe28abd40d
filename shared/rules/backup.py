"""Backup rules: a recent backup exists, and a recent test-restore proved one comes back.

Both read `Snapshot.backups` (the product's own backup records, `shared/backup_store.py`);
when backups are not configured the part is `not_configured` and they say nothing. Tiers
without backup and restore (Consumption, the v2 tiers) give no finding. Neither has a
planner: the fix is to run the job (`apim-remediator backup` / `apim-remediator
restore-test`, or their timers), which the finding's message says.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from shared.backup import supports_backup
from shared.model import Finding, Severity, Snapshot
from shared.rules import Param, References, Rule, rule

_DOCS = "https://learn.microsoft.com/azure/api-management/"
_REFS = References(
    mcsb=("BR-1", "BR-2", "BR-4"),
    docs=(
        _DOCS + "api-management-howto-disaster-recovery-backup-restore",
        _DOCS + "secure-apim",
    ),
)


def _applies(snapshot: Snapshot) -> bool:
    return snapshot.readable("backups") and snapshot.backups is not None and supports_backup(snapshot.service.sku_name)


@rule(
    "BAK-001",
    title="No successful backup within the recovery point objective",
    severity=Severity.MEDIUM,
    rationale=(
        "Microsoft's checklist for securing API Management asks for regular, automated backups: an "
        "instance deleted, corrupted or misconfigured by an attacker comes back only from a backup. "
        "Fires when the newest backup whose native Backup operation succeeded is older than rpo_hours "
        "(or there is none). MEDIUM: nothing is exposed today, but recovery loses everything since. "
        "Run `apim-remediator backup` (or let the backup timer run). Only tiers with backup and "
        "restore (Developer, Basic, Standard, Premium) are checked."
    ),
    references=_REFS,
    params=[Param("rpo_hours", 24, "the recovery point objective: the newest good backup's maximum age", minimum=1)],
)
def recent_backup(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _applies(snapshot):
        return []
    status = snapshot.backups
    assert status is not None
    rpo = timedelta(hours=int(params["rpo_hours"]))
    last = status.last_backup_at
    if last is not None and snapshot.read_at - last <= rpo:
        return []
    failed = f" The last attempt failed ({status.last_attempt_failed})." if status.last_attempt_failed else ""
    when = f"the newest is from {last.isoformat()}" if last is not None else "there is none"
    return [
        rule.finding(
            snapshot,
            message=(
                f"APIM instance {snapshot.service.name} has no successful backup within {params['rpo_hours']} h "
                f"({when}).{failed} Run `apim-remediator backup`."
            ),
            path="backups.last_backup_at",
            actual=last.isoformat() if last is not None else None,
            expected=f"within {params['rpo_hours']} h",
        )
    ]


@rule(
    "BAK-002",
    title="No passing test-restore within its interval, or the last one failed",
    severity=Severity.MEDIUM,
    rationale=(
        "A backup nobody restored is a hope, not a recovery plan: the checklist asks to test recovery. "
        "Fires when the newest test-restore (the latest backup restored into the designated restore "
        "target and compared with its manifest) failed or found differences, or when no test-restore "
        "passed within interval_days (also when no restore target is designated: nothing proves a "
        "restore). Run `apim-remediator restore-test` after designating a target (policy "
        "backups.restore_tests.targets and the target's apim-remediator-restore-target-for tag)."
    ),
    references=_REFS,
    params=[Param("interval_days", 7, "how often a test-restore must pass", minimum=1)],
)
def tested_restore(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _applies(snapshot):
        return []
    status = snapshot.backups
    assert status is not None
    interval = timedelta(days=int(params["interval_days"]))
    if status.last_restore_test_passed is False:
        return [
            rule.finding(
                snapshot,
                message=(
                    f"The last test-restore of APIM instance {snapshot.service.name} failed: "
                    f"{status.last_restore_test_summary}"
                ),
                path="backups.last_restore_test",
                actual="failed",
                expected="passed",
            )
        ]
    last = status.last_passing_restore_test_at
    if last is not None and snapshot.read_at - last <= interval:
        return []
    when = f"the last passed on {last.isoformat()}" if last is not None else "none has passed"
    return [
        rule.finding(
            snapshot,
            message=(
                f"No test-restore of APIM instance {snapshot.service.name} passed within "
                f"{params['interval_days']} day(s) ({when}). Run `apim-remediator restore-test`."
            ),
            path="backups.last_passing_restore_test_at",
            actual=last.isoformat() if last is not None else None,
            expected=f"within {params['interval_days']} day(s)",
        )
    ]
