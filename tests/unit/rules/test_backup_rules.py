"""BAK-001 (a successful backup within the RPO) and BAK-002 (a passing test-restore within its
interval, and the last one not failed)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from shared.model import BackupStatus, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import compliant


def snap(sku: str = "Premium", **status: Any) -> Snapshot:
    base = compliant()
    return replace(base, service=replace(base.service, sku_name=sku), backups=BackupStatus(**status))


def hours_ago(snapshot_hours: float) -> Any:
    return compliant().read_at - timedelta(hours=snapshot_hours)


def test_no_backup_at_all_fires_bak_001_and_says_how_to_fix() -> None:
    [finding] = evaluate_rule("BAK-001", snap())
    assert "there is none" in finding.message
    assert "apim-remediator backup" in finding.message
    assert not finding.remediable  # the fix is the job, not a planned write


def test_a_backup_within_the_rpo_is_fine_and_an_older_one_is_not() -> None:
    assert evaluate_rule("BAK-001", snap(last_backup_at=hours_ago(23))) == []
    [finding] = evaluate_rule("BAK-001", snap(last_backup_at=hours_ago(25)))
    assert finding.evidence.expected == "within 24 h"
    assert evaluate_rule("BAK-001", snap(last_backup_at=hours_ago(25)), {"rpo_hours": 48}) == []


def test_a_failed_last_attempt_is_named() -> None:
    [finding] = evaluate_rule("BAK-001", snap(last_attempt_failed="OperationFailed: storage refused"))
    assert "The last attempt failed (OperationFailed: storage refused)" in finding.message


@pytest.mark.parametrize("rule_id", ["BAK-001", "BAK-002"])
def test_silent_when_not_configured_unreadable_or_the_tier_has_no_backup(rule_id: str) -> None:
    off = replace(compliant(), not_configured=("backups: not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)",))
    assert evaluate_rule(rule_id, off) == []
    broken = replace(snap(), unreadable=("backups: table unavailable",))
    assert evaluate_rule(rule_id, broken) == []
    for sku in ("Consumption", "BasicV2", "StandardV2"):
        assert evaluate_rule(rule_id, snap(sku)) == []
    assert evaluate_rule(rule_id, compliant()) == []  # no record read at all: nothing to say


def test_bak_002_fires_without_a_passing_test_restore_and_passes_with_a_recent_one() -> None:
    [finding] = evaluate_rule("BAK-002", snap(last_backup_at=hours_ago(1)))
    assert "none has passed" in finding.message
    recent = snap(
        last_restore_test_at=hours_ago(2), last_restore_test_passed=True, last_passing_restore_test_at=hours_ago(2)
    )
    assert evaluate_rule("BAK-002", recent) == []
    stale = snap(last_restore_test_passed=True, last_passing_restore_test_at=hours_ago(24 * 8))
    [finding] = evaluate_rule("BAK-002", stale)
    assert "within 7 day(s)" in finding.message


def test_bak_002_reports_a_failed_test_restore_with_its_diff() -> None:
    failed = snap(
        last_restore_test_at=hours_ago(1),
        last_restore_test_passed=False,
        last_restore_test_summary="1 difference(s): API 'legacy' is missing",
        last_passing_restore_test_at=hours_ago(30),
    )
    [finding] = evaluate_rule("BAK-002", failed)
    assert finding.message.endswith("failed: 1 difference(s): API 'legacy' is missing")
    assert finding.evidence.actual == "failed"


def test_the_rules_are_registered_with_their_parameters() -> None:
    assert [p.name for p in REGISTRY["BAK-001"].params] == ["rpo_hours"]
    assert [p.name for p in REGISTRY["BAK-002"].params] == ["interval_days"]
