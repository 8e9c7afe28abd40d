"""The pure backup machinery: blob names, the manifest, the comparison with a restored
instance, retention (never the newest verified backup) and the status the BAK rules read."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shared.backup import (
    ApiContent,
    BackupRun,
    Content,
    Manifest,
    ManifestError,
    ProductContent,
    RunKind,
    RunStatus,
    backup_blob_name,
    backup_status,
    content_differences,
    manifest_blob_name,
    manifest_from_json,
    retention_victims,
    settings_not_restored,
    supports_backup,
)

NOW = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
SRC = (
    "/subscriptions/3f2a1b0c-0000-4000-8000-000000000101/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a"
)

CONTENT = Content(
    apis={
        "orders": ApiContent(path="orders", operations=("create", "list"), policy_sha256="a" * 64),
        "legacy": ApiContent(path="legacy", operations=("ping",), policy_sha256=None),
    },
    products={"mobile": ProductContent(apis=("orders",), policy_sha256=None)},
    service_policy_sha256="b" * 64,
    named_values=("backend-key",),
    subscription_count=2,
    user_count=1,
)


def test_blob_names_carry_the_instance_and_the_utc_timestamp() -> None:
    blob = backup_blob_name("apim-prod", datetime(2026, 11, 30, 8, 5, 9, tzinfo=UTC))
    assert blob == "apim-prod/20261130T080509Z.apimbackup"
    assert manifest_blob_name(blob) == "apim-prod/20261130T080509Z.manifest.json"


@pytest.mark.parametrize(
    ("sku", "supported"),
    [("Premium", True), ("Developer", True), ("Basic", True), ("Standard", True), ("Consumption", False),
     ("BasicV2", False), ("StandardV2", False), ("PremiumV2", False)],
)  # fmt: skip
def test_only_the_classic_tiers_have_backup(sku: str, supported: bool) -> None:
    assert supports_backup(sku) is supported


def test_the_manifest_round_trips_and_refuses_what_is_not_one() -> None:
    manifest = Manifest(SRC, "a", "Premium", NOW, "a/x.apimbackup", CONTENT, {"customProperties": {"k": "True"}})
    again = manifest_from_json(manifest.to_json())
    assert again == manifest
    with pytest.raises(ManifestError):
        manifest_from_json('{"format": "something-else"}')
    with pytest.raises(ManifestError):
        manifest_from_json("not json")


def test_identical_content_has_no_difference() -> None:
    assert content_differences(CONTENT, CONTENT) == []


def test_every_kind_of_difference_is_one_readable_line() -> None:
    restored = replace(
        CONTENT,
        apis={
            "orders": ApiContent(path="orders-v2", operations=("list", "delete"), policy_sha256="c" * 64),
            "extra": ApiContent(path="extra", operations=(), policy_sha256=None),
        },
        products={"mobile": ProductContent(apis=(), policy_sha256="d" * 64)},
        service_policy_sha256=None,
        named_values=(),
        subscription_count=1,
        user_count=1,
    )
    assert content_differences(CONTENT, restored) == [
        "API 'legacy' is missing",
        "API 'extra' is present but not in the backup",
        "API 'orders': path is 'orders-v2', the backup has 'orders'",
        "API 'orders': operation 'create' is missing",
        "API 'orders': operation 'delete' is present but not in the backup",
        "API 'orders': policy differs (sha256 cccccccccccc…, the backup has aaaaaaaaaaaa…)",
        "product 'mobile': APIs are [], the backup has ['orders']",
        "product 'mobile': policy differs (the backup has none)",
        "global policy differs (missing after the restore)",
        "named value 'backend-key' is missing",
        "subscriptions: 1, the backup has 2",
    ]


def test_settings_a_backup_does_not_carry_are_listed_not_failed() -> None:
    assert settings_not_restored({"identity": "SystemAssigned", "tls": 1}, {"identity": None, "tls": 1}) == [
        "identity: source had 'SystemAssigned', target has None"
    ]


def run(
    minutes_ago: int, status: RunStatus = RunStatus.SUCCEEDED, *, verified: bool = False, kind: RunKind = RunKind.BACKUP
) -> BackupRun:
    at = NOW - timedelta(minutes=minutes_ago)
    return BackupRun(
        instance_id=SRC,
        run_id=f"r{minutes_ago}",
        kind=kind,
        status=status,
        started_at=at,
        finished_at=at + timedelta(minutes=1),
        blob=f"a/{minutes_ago}.apimbackup",
        verified=verified,
    )


def test_retention_keeps_the_newest_by_count_and_age() -> None:
    runs = [run(10), run(20), run(30), run(40, RunStatus.FAILED)]
    victims = retention_victims(runs, keep_last=2, max_age=timedelta(days=30), now=NOW)
    assert [v.run_id for v in victims] == ["r30"]
    old = [run(10), run(60 * 24 * 40)]
    assert [v.run_id for v in retention_victims(old, keep_last=5, max_age=timedelta(days=30), now=NOW)] == ["r57600"]


def test_retention_never_deletes_the_newest_verified_backup_nor_the_newest() -> None:
    runs = [run(10), run(20), run(30, verified=True), run(40, verified=True)]
    victims = retention_victims(runs, keep_last=1, max_age=timedelta(minutes=5), now=NOW)
    assert [v.run_id for v in victims] == ["r20", "r40"]


def test_the_status_the_rules_read() -> None:
    failed_test = replace(
        run(5, RunStatus.FAILED, kind=RunKind.RESTORE_TEST),
        error_code="ContentMismatch",
        differences=("API 'legacy' is missing",),
    )
    status = backup_status(
        [run(30), run(20, RunStatus.FAILED), run(50, RunStatus.PASSED, kind=RunKind.RESTORE_TEST), failed_test]
    )
    assert status["last_backup_at"] == NOW - timedelta(minutes=29)
    assert status["last_attempt_failed"] == "failed"
    assert status["last_restore_test_passed"] is False
    assert status["last_restore_test_summary"] == "1 difference(s): API 'legacy' is missing"
    assert status["last_passing_restore_test_at"] == NOW - timedelta(minutes=49)
    # Open runs are not results.
    assert backup_status([run(1, RunStatus.RUNNING)])["last_backup_at"] is None
