"""The backup and test-restore jobs over small recording fakes of their protocols (the
production implementations are tested against the twin in tests/integration/test_backup_jobs.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest

from handlers.backup import BackupJobDeps, BackupOutcome, BackupRequest, run_backups
from handlers.restore_test import RestoreOutcome, RestoreRefused, RestoreTestRequest, run_restore_tests
from shared.backup import BackupRun, Content, RunKind, RunStatus
from shared.backup_azure import LroOutcome, ServiceFacts
from shared.inventory import InstanceRef
from shared.policy import BackupPolicy, Policy

NOW = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
SUB = "3f2a1b0c-0000-4000-8000-000000000101"


def sid(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.ApiManagement/service/{name}"


def ref(name: str) -> InstanceRef:
    return InstanceRef(id=sid(name), name=name, subscription_id=SUB, resource_group="rg", location="westeurope")


EMPTY = Content(apis={}, products={}, service_policy_sha256=None, named_values=(), subscription_count=0, user_count=0)


class Fakes:
    def __init__(self, skus: dict[str, str], outcome: str = "Succeeded") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.skus = skus
        self.outcome = outcome
        self.saved: dict[str, BackupRun] = {}
        self.blobs: dict[str, str] = {}

    # Inventory
    async def discover(self) -> tuple[InstanceRef, ...]:
        self.calls.append(("discover",))
        return tuple(ref(n) for n in self.skus)

    # BackupAzure
    async def service(self, instance_id: str) -> ServiceFacts:
        self.calls.append(("service", instance_id))
        name = instance_id.rsplit("/", 1)[1]
        return ServiceFacts(instance_id, name, self.skus[name], {}, True, ())

    async def begin(self, kind: RunKind, facts: ServiceFacts, blob: str) -> str:
        self.calls.append(("begin", kind, facts.id, blob))
        if kind is RunKind.BACKUP:
            self.blobs[blob] = "backup"
        return "token"

    async def poll(self, kind: RunKind, instance_id: str, token: str, *, max_wait: float) -> LroOutcome:
        self.calls.append(("poll", kind, instance_id))
        if self.outcome == "Succeeded":
            return LroOutcome("Succeeded")
        return LroOutcome(self.outcome, f"Operation{self.outcome}", "it broke")

    async def content(self, instance_id: str) -> tuple[Content, dict[str, Any]]:
        self.calls.append(("content", instance_id))
        return EMPTY, {}

    # BackupBlobs
    async def ensure_container(self) -> None: ...

    async def put(self, blob: str, data: str) -> None:
        self.blobs[blob] = data

    async def get(self, blob: str) -> bytes | None:
        return self.blobs[blob].encode() if blob in self.blobs else None

    async def exists(self, blob: str) -> bool:
        return blob in self.blobs

    async def delete(self, blob: str) -> None:
        self.blobs.pop(blob, None)

    # BackupRecords
    async def save(self, run: BackupRun) -> None:
        self.saved[run.run_id] = run

    async def runs(self, instance_id: str, *, limit: int = 200) -> list[BackupRun]:
        return [r for r in self.saved.values() if r.instance_id.lower() == instance_id.lower()]


def deps(fakes: Fakes, targets: dict[str, str] | None = None, configured: bool = True) -> BackupJobDeps:
    policy = Policy(
        backups=BackupPolicy(
            restore_targets=MappingProxyType({sid(s).lower(): sid(t) for s, t in (targets or {}).items()})
        )
    )
    return BackupJobDeps(
        inventory=fakes,
        policy=policy,
        azure=fakes if configured else None,
        blobs=fakes if configured else None,
        records=fakes if configured else None,
        clock=lambda: NOW,
    )


async def test_not_configured_touches_nothing() -> None:
    fakes = Fakes({"a": "Premium"})
    assert (await run_backups(BackupRequest(), deps(fakes, configured=False))).instances == ()
    assert fakes.calls == []


async def test_a_backup_runs_and_consumption_is_reported_unsupported() -> None:
    fakes = Fakes({"a": "Premium", "c": "Consumption"})
    result = await run_backups(BackupRequest(), deps(fakes))
    outcomes = {i.instance_id.rsplit("/", 1)[1]: i.outcome for i in result.instances}
    assert outcomes == {"a": BackupOutcome.SUCCEEDED, "c": BackupOutcome.UNSUPPORTED}
    assert not [c for c in fakes.calls if c[0] == "begin" and c[2].endswith("/c")]
    # A second tick within every_hours starts nothing.
    again = await run_backups(BackupRequest(), deps(fakes))
    assert {i.outcome for i in again.instances if i.instance_id.endswith("/a")} == {BackupOutcome.NOT_DUE}


@pytest.mark.parametrize("ending", ["Failed", "Canceled"])
async def test_an_lro_that_ends_badly_is_recorded_not_raised(ending: str, caplog: pytest.LogCaptureFixture) -> None:
    fakes = Fakes({"a": "Premium"}, outcome=ending)
    [item] = (await run_backups(BackupRequest(), deps(fakes))).instances
    assert item.outcome is BackupOutcome.FAILED
    assert item.error_code == f"Operation{ending}"
    [run] = fakes.saved.values()
    assert run.status is RunStatus.FAILED
    assert any(getattr(r, "event", "") == "backup.failed" for r in caplog.records)


async def test_a_run_left_starting_is_closed_as_interrupted_not_guessed() -> None:
    fakes = Fakes({"a": "Premium"})
    await fakes.save(
        BackupRun(sid("a"), "r1", RunKind.BACKUP, RunStatus.STARTING, NOW - timedelta(minutes=5), "a/x.apimbackup")
    )
    [item] = (await run_backups(BackupRequest(), deps(fakes))).instances
    assert item.outcome is BackupOutcome.FAILED
    assert item.error_code == "Interrupted"
    assert not [c for c in fakes.calls if c[0] in ("begin", "poll")]


async def test_a_named_target_the_policy_does_not_designate_is_refused_with_no_call() -> None:
    fakes = Fakes({"a": "Premium", "b": "Premium", "t": "Premium"})
    with pytest.raises(RestoreRefused, match="not the designated restore target"):
        await run_restore_tests(RestoreTestRequest(source_ids=(sid("a"),), target_id=sid("b")), deps(fakes, {"a": "t"}))
    with pytest.raises(RestoreRefused, match="designates no restore target"):
        await run_restore_tests(RestoreTestRequest(source_ids=(sid("b"),), target_id=sid("t")), deps(fakes, {"a": "t"}))
    assert fakes.calls == []


async def test_a_target_without_the_tag_is_refused_before_any_restore() -> None:
    fakes = Fakes({"a": "Premium", "t": "Premium"})
    await run_backups(BackupRequest(instance_ids=(sid("a"),)), deps(fakes))
    fakes.calls.clear()
    [outcome] = (await run_restore_tests(RestoreTestRequest(), deps(fakes, {"a": "t"}))).sources
    assert outcome.outcome is RestoreOutcome.REFUSED
    assert outcome.error_code == "RestoreRefused"
    assert not [c for c in fakes.calls if c[0] == "begin"]
    failed = [r for r in fakes.saved.values() if r.kind is RunKind.RESTORE_TEST]
    assert [replace(r, run_id="").status for r in failed] == [RunStatus.FAILED]


async def test_a_target_outside_the_scope_is_refused_without_reading_it() -> None:
    fakes = Fakes({"a": "Premium"})
    await run_backups(BackupRequest(instance_ids=(sid("a"),)), deps(fakes))
    fakes.calls.clear()
    [outcome] = (await run_restore_tests(RestoreTestRequest(), deps(fakes, {"a": "elsewhere"}))).sources
    assert outcome.outcome is RestoreOutcome.REFUSED
    assert "outside the configured scope" in (outcome.error or "")
    assert [c[0] for c in fakes.calls] == ["discover"]


def test_designation_is_refused_on_the_inventorys_tags_and_tier() -> None:
    """Pure: what the inventory says (tags, tier) decides before any call about the target."""
    from handlers.restore_test import designation_refusal
    from shared.inventory import instance_ref
    from shared.policy import RESTORE_TARGET_TAG

    src = "/subscriptions/3f2a1b0c-0000-4000-8000-000000000101/resourceGroups/rg/providers/Microsoft.ApiManagement"
    src += "/service/a"
    source = instance_ref(src, "westeurope", {}, {"name": "Premium"})
    assert source is not None
    assert source.sku == "Premium"
    target = src[:-1] + "b"
    tag = {RESTORE_TARGET_TAG: src.upper()}  # ids compare case-insensitively
    assert designation_refusal(source, target, tag, "Premium", "Premium") is None
    assert designation_refusal(source, target, tag, "", "Premium") is None  # unknown tier: the fresh read decides
    code, why = designation_refusal(source, target, tag, "Developer", "Premium") or ("", "")
    assert code == "TierMismatch"
    assert "Developer" in why
    assert designation_refusal(source, target, tag, "Consumption", "Consumption") is not None  # no backup tier
    code, why = designation_refusal(source, target, {}, "Premium", "Premium") or ("", "")
    assert code == "RestoreRefused"
    assert RESTORE_TARGET_TAG in why
