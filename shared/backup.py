"""Backups and test-restores: the records, the content manifest, the comparison, retention.

Pure machinery (no Azure calls): the handlers (`handlers/backup.py`,
`handlers/restore_test.py`) drive the state machine below over narrow protocols whose
production implementations are `shared/backup_azure.py` (ARM, blobs) and
`shared/backup_store.py` (Table storage).

The state machine of one run (a backup of a source, or a test-restore into its target):

    starting --(LRO accepted; continuation token stored)--> running
    running  --(a later tick polls from the stored token)--> succeeded | failed
    succeeded (restore test) --(target read, compared with the manifest)--> passed | failed

`starting` is written before the POST that starts the LRO (the intent, as the journal does
for remediation): a worker that dies between the two leaves a `starting` row, which the next
tick closes as failed ("interrupted before Azure answered") rather than guessing. A worker
that dies after the token was stored leaves a `running` row, which the next tick resumes
from the token (azure-core's JSON continuation token: the initial response's status,
polling headers and URL; no Authorization header, no request body).

Tiers: Microsoft documents backup and restore for Developer, Basic, Standard and Premium
only. Consumption and the v2 tiers (Basic v2, Standard v2, Premium v2) are reported as
`unsupported`, never failed.

What a backup does not carry (Learn, "Backup and restore in Azure API Management", and
reference/azure-facts.md): usage data, custom domain certificates and custom CA
certificates, virtual network settings, managed identity configuration, Azure Monitor
diagnostic settings, protocol and cipher settings, developer portal content. The manifest
records the ones the product can read (`not_in_backup`) so an operator sees what a
recovery must set again; a test-restore reports them, but they never fail it (the target
keeps its own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

BACKUP_TIERS = frozenset({"developer", "basic", "standard", "premium"})
MANIFEST_FORMAT = "apim-remediator-manifest/1"
BACKUP_SUFFIX = ".apimbackup"
MANIFEST_SUFFIX = ".manifest.json"
# What Learn lists as not part of a backup; `not_in_backup` in the manifest holds the
# readable ones.
NOT_IN_BACKUP = (
    "usage data (analytics)",
    "custom domain and custom CA certificates",
    "virtual network settings",
    "managed identity configuration",
    "Azure Monitor diagnostic settings",
    "protocol and cipher settings",
    "developer portal content",
)


def supports_backup(sku_name: str) -> bool:
    return sku_name.lower() in BACKUP_TIERS


def timestamp(at: datetime) -> str:
    """The UTC timestamp of blob names: 20261130T070512Z."""
    return at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def backup_blob_name(instance_name: str, at: datetime) -> str:
    """`{instance}/{UTC timestamp}.apimbackup`, as the issue and operators expect."""
    return f"{instance_name}/{timestamp(at)}{BACKUP_SUFFIX}"


def manifest_blob_name(backup_blob: str) -> str:
    """The manifest beside a backup: same name, `.manifest.json` instead of `.apimbackup`."""
    return backup_blob.removesuffix(BACKUP_SUFFIX) + MANIFEST_SUFFIX


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the manifest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiContent:
    path: str
    operations: tuple[str, ...]  # operation names, sorted
    policy_sha256: str | None  # None: no API-level policy
    operation_policies: Mapping[str, str] = field(default_factory=dict)  # operation -> SHA-256


@dataclass(frozen=True)
class ProductContent:
    apis: tuple[str, ...]
    policy_sha256: str | None


@dataclass(frozen=True)
class Content:
    """What a backup carries and a restore must bring back, as names, counts and hashes (never
    a value: named values by name only, policies by SHA-256)."""

    apis: Mapping[str, ApiContent]
    products: Mapping[str, ProductContent]
    service_policy_sha256: str | None
    named_values: tuple[str, ...]
    subscription_count: int
    user_count: int


@dataclass(frozen=True)
class Manifest:
    """The JSON document stored beside each backup."""

    instance_id: str
    instance_name: str
    sku: str
    taken_at: datetime
    backup_blob: str
    content: Content
    not_in_backup: Mapping[str, Any]  # settings a backup does not carry, as read at backup time

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "instance_id": self.instance_id,
                "instance_name": self.instance_name,
                "sku": self.sku,
                "taken_at": self.taken_at.isoformat(),
                "backup_blob": self.backup_blob,
                "not_backed_up_by_azure": list(NOT_IN_BACKUP),
                "content": content_to_json(self.content),
                "not_in_backup": dict(self.not_in_backup),
            },
            indent=2,
            sort_keys=True,
        )


def content_to_json(content: Content) -> dict[str, Any]:
    return {
        "apis": {name: asdict(api) for name, api in sorted(content.apis.items())},
        "products": {name: asdict(p) for name, p in sorted(content.products.items())},
        "service_policy_sha256": content.service_policy_sha256,
        "named_values": list(content.named_values),
        "subscription_count": content.subscription_count,
        "user_count": content.user_count,
    }


class ManifestError(ValueError):
    """A manifest blob that is not one of ours (wrong format, missing fields)."""


def manifest_from_json(text: str | bytes) -> Manifest:
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"not a {MANIFEST_FORMAT} document")
        body = raw["content"]
        content = Content(
            apis={
                str(name): ApiContent(
                    path=str(api["path"]),
                    operations=tuple(str(o) for o in api["operations"]),
                    policy_sha256=api.get("policy_sha256"),
                    operation_policies={str(k): str(v) for k, v in (api.get("operation_policies") or {}).items()},
                )
                for name, api in body["apis"].items()
            },
            products={
                str(name): ProductContent(apis=tuple(str(a) for a in p["apis"]), policy_sha256=p.get("policy_sha256"))
                for name, p in body["products"].items()
            },
            service_policy_sha256=body.get("service_policy_sha256"),
            named_values=tuple(str(n) for n in body["named_values"]),
            subscription_count=int(body["subscription_count"]),
            user_count=int(body["user_count"]),
        )
        return Manifest(
            instance_id=str(raw["instance_id"]),
            instance_name=str(raw["instance_name"]),
            sku=str(raw["sku"]),
            taken_at=datetime.fromisoformat(str(raw["taken_at"])),
            backup_blob=str(raw["backup_blob"]),
            content=content,
            not_in_backup=dict(raw.get("not_in_backup") or {}),
        )
    except ManifestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestError(f"malformed manifest ({type(error).__name__}: {error})") from error


# -- comparing a restored instance with the manifest ----------------------------------------


def content_differences(expected: Content, actual: Content) -> list[str]:
    """Every way `actual` (the restored target) differs from `expected` (the manifest), one
    readable line each, e.g. "API 'orders' is missing"; empty when they agree."""
    out: list[str] = []
    for name in sorted(set(expected.apis) - set(actual.apis)):
        out.append(f"API '{name}' is missing")
    for name in sorted(set(actual.apis) - set(expected.apis)):
        out.append(f"API '{name}' is present but not in the backup")
    for name in sorted(set(expected.apis) & set(actual.apis)):
        want, have = expected.apis[name], actual.apis[name]
        if want.path != have.path:
            out.append(f"API '{name}': path is '{have.path}', the backup has '{want.path}'")
        for op in sorted(set(want.operations) - set(have.operations)):
            out.append(f"API '{name}': operation '{op}' is missing")
        for op in sorted(set(have.operations) - set(want.operations)):
            out.append(f"API '{name}': operation '{op}' is present but not in the backup")
        if want.policy_sha256 != have.policy_sha256:
            out.append(f"API '{name}': policy differs ({_hash_change(want.policy_sha256, have.policy_sha256)})")
        for op in sorted(set(want.operation_policies) | set(have.operation_policies)):
            w, h = want.operation_policies.get(op), have.operation_policies.get(op)
            if w != h:
                out.append(f"API '{name}': policy of operation '{op}' differs ({_hash_change(w, h)})")
    for name in sorted(set(expected.products) - set(actual.products)):
        out.append(f"product '{name}' is missing")
    for name in sorted(set(actual.products) - set(expected.products)):
        out.append(f"product '{name}' is present but not in the backup")
    for name in sorted(set(expected.products) & set(actual.products)):
        want_p, have_p = expected.products[name], actual.products[name]
        if sorted(want_p.apis) != sorted(have_p.apis):
            out.append(f"product '{name}': APIs are {sorted(have_p.apis)}, the backup has {sorted(want_p.apis)}")
        if want_p.policy_sha256 != have_p.policy_sha256:
            out.append(f"product '{name}': policy differs ({_hash_change(want_p.policy_sha256, have_p.policy_sha256)})")
    if expected.service_policy_sha256 != actual.service_policy_sha256:
        out.append(
            f"global policy differs ({_hash_change(expected.service_policy_sha256, actual.service_policy_sha256)})"
        )
    for name in sorted(set(expected.named_values) - set(actual.named_values)):
        out.append(f"named value '{name}' is missing")
    for name in sorted(set(actual.named_values) - set(expected.named_values)):
        out.append(f"named value '{name}' is present but not in the backup")
    if expected.subscription_count != actual.subscription_count:
        out.append(f"subscriptions: {actual.subscription_count}, the backup has {expected.subscription_count}")
    if expected.user_count != actual.user_count:
        out.append(f"users: {actual.user_count}, the backup has {expected.user_count}")
    return out


def _hash_change(want: str | None, have: str | None) -> str:
    if want is None:
        return "the backup has none"
    if have is None:
        return "missing after the restore"
    return f"sha256 {have[:12]}…, the backup has {want[:12]}…"


def settings_not_restored(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The settings a backup does not carry whose value on the target differs from the
    source's at backup time: what a real recovery must set again by hand (never a failure)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            out.append(f"{key}: source had {expected.get(key)!r}, target has {actual.get(key)!r}")
    return out


# -- records ---------------------------------------------------------------------------------


class RunKind(StrEnum):
    BACKUP = "backup"
    RESTORE_TEST = "restore_test"


class RunStatus(StrEnum):
    STARTING = "starting"  # intent recorded; the POST may or may not have reached Azure
    RUNNING = "running"  # the LRO runs; `continuation` resumes it
    SUCCEEDED = "succeeded"  # backup: the LRO succeeded and the blob is there
    PASSED = "passed"  # restore test: restored, and the target matches the manifest
    FAILED = "failed"  # the LRO ended Failed/Canceled, or verification found differences

    @property
    def is_open(self) -> bool:
        return self in (RunStatus.STARTING, RunStatus.RUNNING)


@dataclass(frozen=True)
class BackupRun:
    """One backup or test-restore, as recorded in the backups table (no secret ever)."""

    instance_id: str  # the backup source (for a test-restore too)
    run_id: str
    kind: RunKind
    status: RunStatus
    started_at: datetime
    blob: str  # the backup blob (written, or restored from)
    continuation: str | None = None  # azure-core continuation token while RUNNING
    finished_at: datetime | None = None
    error_code: str | None = None  # typed outcome of a failure: Azure's code, or the product's
    error: str | None = None
    target_id: str | None = None  # restore test: the instance restored into
    differences: tuple[str, ...] = ()  # restore test: content differences (a failure)
    not_restored: tuple[str, ...] = ()  # restore test: settings the backup does not carry
    verified: bool = False  # backup: a passing test-restore came from it
    pruned: bool = False  # backup: retention deleted its blob and manifest
    correlation_id: str = ""

    @property
    def duration(self) -> timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def finish(
        self, status: RunStatus, at: datetime, *, error_code: str | None = None, error: str | None = None, **more: Any
    ) -> BackupRun:
        return replace(
            self, status=status, finished_at=at, continuation=None, error_code=error_code, error=error, **more
        )


def backup_status(runs: Iterable[BackupRun]) -> dict[str, Any]:
    """The fields of `model.BackupStatus` from one instance's records (any order)."""
    ordered = sorted(runs, key=lambda r: r.started_at, reverse=True)
    backups = [r for r in ordered if r.kind is RunKind.BACKUP and not r.status.is_open]
    tests = [r for r in ordered if r.kind is RunKind.RESTORE_TEST and not r.status.is_open]
    good = next((r for r in backups if r.status is RunStatus.SUCCEEDED and not r.pruned), None)
    latest_test = tests[0] if tests else None
    passing = next((r for r in tests if r.status is RunStatus.PASSED), None)
    failed_attempt = backups[0] if backups and backups[0].status is RunStatus.FAILED else None
    summary = ""
    if latest_test is not None:
        if latest_test.status is RunStatus.PASSED:
            summary = f"restored {latest_test.blob} into {latest_test.target_id}; matches the manifest"
        elif latest_test.differences:
            shown = "; ".join(latest_test.differences[:5])
            more = len(latest_test.differences) - 5
            summary = f"{len(latest_test.differences)} difference(s): {shown}" + (
                f"; and {more} more" if more > 0 else ""
            )
        else:
            summary = _reason(latest_test)
    return {
        "last_backup_at": good.finished_at if good else None,
        "last_backup_blob": good.blob if good else None,
        "last_attempt_failed": _reason(failed_attempt) if failed_attempt else None,
        "last_restore_test_at": latest_test.finished_at if latest_test else None,
        "last_restore_test_passed": (latest_test.status is RunStatus.PASSED) if latest_test else None,
        "last_restore_test_summary": summary,
        "last_passing_restore_test_at": passing.finished_at if passing else None,
    }


def _reason(run: BackupRun) -> str:
    code = run.error_code or "failed"
    return f"{code}: {run.error}" if run.error else code


# -- retention -------------------------------------------------------------------------------


def retention_victims(
    backups: Sequence[BackupRun], *, keep_last: int, max_age: timedelta, now: datetime
) -> list[BackupRun]:
    """The succeeded backups retention removes: beyond the newest `keep_last`, or older than
    `max_age`; never the newest verified backup (the last one a restore proved), and never
    the newest backup at all (a failed job must not leave an instance with none)."""
    done = sorted(
        (b for b in backups if b.kind is RunKind.BACKUP and b.status is RunStatus.SUCCEEDED and not b.pruned),
        key=lambda b: b.started_at,
        reverse=True,
    )
    protected = {done[0].run_id} if done else set()
    newest_verified = next((b for b in done if b.verified), None)
    if newest_verified is not None:
        protected.add(newest_verified.run_id)
    victims = []
    for index, run in enumerate(done):
        if run.run_id in protected:
            continue
        if index >= keep_last or now - run.started_at > max_age:
            victims.append(run)
    return victims
