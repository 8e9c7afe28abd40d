"""The remediation engine over recording fakes of its narrow protocols, for the cases the
twin cannot produce on demand: a lease lost mid-run, a journal that refuses a row, the
order of reads and writes. The production implementations of these protocols are tested
against the twin and Azurite (tests/integration)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from handlers.remediate import (
    RemediateRequest,
    RemediationDeps,
    ServiceUpdate,
    Status,
    _write_count,
    plan_run,
    remediate,
)
from shared.actions import APIM_API_VERSION, REMEDIATIONS, PlanContext, Refusal, Remediation, RemediationPlan
from shared.actions.executor import ArmResponse, OperationState, unmet
from shared.errors import LeaseLost
from shared.evidence import PlanEvidence
from shared.inventory import InstanceRef
from shared.journal import JournalEntry, JournalRefused, Phase, Trigger, TriggerKind
from shared.model import AccessSetting, Finding, Snapshot, frozen_map
from shared.policy import parse_policy
from shared.rules import evaluate_rule
from tests.factories import GW, RG, SECURE_CUSTOM_PROPERTIES, SERVICE_ID, SUB, compliant

REF = InstanceRef(id=SERVICE_ID, name="apim-good", subscription_id=SUB, resource_group=RG, location="westeurope")
ACCESS = f"{SERVICE_ID}/tenant/access"
GIT = f"{SERVICE_ID}/tenant/gitAccess"
BOTH = "version: 1\nrules:\n  MGMT-001: {mode: remediate}\n  MGMT-002: {mode: remediate}\n"


class FakeArm:
    """ARM as a dict of bodies; PATCH merges `properties`; records every call in `events`."""

    def __init__(self, events: list[str], *, refuse: Mapping[str, int] | None = None) -> None:
        self.events = events
        self.refuse = dict(refuse or {})
        self.bodies: dict[str, dict[str, Any]] = {
            ACCESS: {"properties": {"enabled": True}},
            GIT: {"properties": {"enabled": True}},
        }
        self.after_patch: list[Any] = []

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
        max_wait: float | None = None,
    ) -> ArmResponse:
        self.events.append(f"{method} {path}")
        if method == "PATCH":
            if path in self.refuse:
                return ArmResponse(self.refuse[path], None, {"error": {"code": "BadRequest", "message": "refused"}})
            current = self.bodies.setdefault(path, {"properties": {}})
            current["properties"].update(dict((body or {}).get("properties", {})))
            for hook in self.after_patch:
                hook(path)
            return ArmResponse(200, '"after"', current)
        return ArmResponse(200, '"read"', self.bodies.get(path, {}))

    async def operation_status(self, operation_url: str) -> OperationState:
        return OperationState("Succeeded")


class FakeSource:
    """Snapshots whose tenant settings read what FakeArm holds."""

    def __init__(self, arm: FakeArm, events: list[str]) -> None:
        self.arm = arm
        self.events = events

    async def discover(self) -> tuple[InstanceRef, ...]:
        return (REF,)

    async def locate(self, instance_id: str) -> InstanceRef | None:
        return REF if instance_id.lower() == REF.id.lower() else None

    async def read(self, ref: InstanceRef) -> Snapshot:
        self.events.append("read")
        access = bool(self.arm.bodies[ACCESS]["properties"]["enabled"])
        git = bool(self.arm.bodies[GIT]["properties"]["enabled"])
        return compliant(
            tenant_access=AccessSetting(id=ACCESS, enabled=access, etag='"t1"'),
            git_access=AccessSetting(id=GIT, enabled=git, etag='"g1"'),
        )


class FakeJournal:
    def __init__(self, events: list[str], *, refuse: Sequence[str] = ()) -> None:
        self.events = events
        self.refuse = set(refuse)
        self.rows: list[JournalEntry] = []

    async def record_intent(self, instance_id: str, *, rule_id: str, resource_id: str, **fields: Any) -> JournalEntry:
        if rule_id in self.refuse:
            raise JournalRefused("journal after looks like it carries secret values at $.requests[0]")
        self.events.append(f"journal intent {rule_id}")
        now = datetime(2026, 11, 30, tzinfo=UTC)
        entry = JournalEntry(
            instance_id=instance_id,
            correlation_id=str(fields["correlation_id"]),
            row_key=str(len(self.rows)),
            rule_id=rule_id,
            resource_id=resource_id,
            action=str(fields["action"]),
            trigger=fields["trigger"],
            before=fields["before"],
            after=fields["after"],
            etag_before=fields["etag_before"],
            phase=Phase.INTENT,
            error=None,
            started_at=now,
            updated_at=now,
            etag="",
        )
        self.rows.append(entry)
        return entry

    async def record_outcome(self, entry: JournalEntry, phase: Phase, **fields: Any) -> JournalEntry:
        self.events.append(f"journal {phase.value} {entry.rule_id}")
        return replace(entry, phase=phase)

    async def unfinished(self, instance_id: str) -> list[JournalEntry]:
        return []


@dataclass
class FakeLease:
    lost: bool = False

    def assert_held(self) -> None:
        if self.lost:
            raise LeaseLost(f"lease lost on instance {SERVICE_ID}: taken over; stop before the next write")


class FakeLocks:
    def __init__(self, lease: FakeLease) -> None:
        self.lease = lease

    @asynccontextmanager
    async def hold(self, instance_id: str, *, wait: float = 10.0) -> AsyncIterator[FakeLease]:
        yield self.lease


class NoEvidence:
    async def gather(
        self, snapshot: Snapshot, findings: Sequence[Finding], params: Mapping[str, Mapping[str, Any]]
    ) -> PlanEvidence:
        return PlanEvidence()


class NoSecrets:
    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        raise AssertionError("no secret is written in these tests")


def engine(
    *, refuse_patch: Mapping[str, int] | None = None, refuse_journal: Sequence[str] = ()
) -> tuple[RemediationDeps, list[str], FakeArm, FakeJournal, FakeLease]:
    events: list[str] = []
    arm = FakeArm(events, refuse=refuse_patch)
    journal = FakeJournal(events, refuse=refuse_journal)
    lease = FakeLease()
    deps = RemediationDeps(
        source=FakeSource(arm, events),
        arm=arm,
        secrets=NoSecrets(),
        journal=journal,
        locks=FakeLocks(lease),
        policy=parse_policy(BOTH, source="policy.yaml"),
        key_vault_url=None,
        evidence=NoEvidence(),
    )
    return deps, events, arm, journal, lease


def apply() -> RemediateRequest:
    return RemediateRequest(instance_id=SERVICE_ID, trigger=Trigger(TriggerKind.CLI, "test"), apply=True)


async def test_both_fixes_land_in_order() -> None:
    deps, _, _, _, _ = engine()
    report = await remediate(apply(), deps)
    assert [(r.rule_id, r.status) for r in report.results] == [("MGMT-001", Status.FIXED), ("MGMT-002", Status.FIXED)]
    assert report.writes == 2


async def test_lease_loss_ends_the_run_at_once() -> None:
    """Lost right after the first write: no outcome row, no second rule, no second write —
    whoever holds the lease now settles the open intent."""
    deps, events, arm, _, lease = engine()

    def lose(_: str) -> None:
        lease.lost = True

    arm.after_patch.append(lose)
    with pytest.raises(LeaseLost):
        await remediate(apply(), deps)
    assert [e for e in events if e.startswith(("journal", "PATCH"))] == [
        "journal intent MGMT-001",
        f"PATCH {ACCESS}",
    ]


async def test_a_journal_refusal_is_a_reported_failure_and_nothing_is_written() -> None:
    deps, events, _, _, _ = engine(refuse_journal=("MGMT-001",))
    report = await remediate(apply(), deps)
    first, second = report.results
    assert (first.rule_id, first.status) == ("MGMT-001", Status.FAILED)
    assert "the journal refused to record the intent" in first.detail
    assert "a change that cannot be journaled is not made" in first.detail
    assert f"PATCH {ACCESS}" not in events
    assert (second.rule_id, second.status) == ("MGMT-002", Status.FIXED)  # the run went on


async def test_after_a_failed_write_the_next_rule_is_planned_from_a_fresh_read() -> None:
    deps, events, _, _, _ = engine(refuse_patch={ACCESS: 400})
    report = await remediate(apply(), deps)
    assert [(r.rule_id, r.status) for r in report.results] == [
        ("MGMT-001", Status.FAILED),
        ("MGMT-002", Status.FIXED),
    ]
    failed_at = events.index(f"PATCH {ACCESS}")
    next_write = events.index(f"PATCH {GIT}")
    assert "read" in events[failed_at:next_write]


# -- planning what earlier fixes unlock ----------------------------------------------------------


def test_the_dry_run_plans_what_an_earlier_fix_unlocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remediation that needs the identity ID-001 gives is planned from the snapshot as
    ID-001 would leave it, so the dry run shows it and the budget projection counts it."""

    def needs_identity(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
        if not snapshot.service.identity_type:
            return Refusal(finding.rule_id, SERVICE_ID, finding.resource_id, "needs ID-001 first")
        return RemediationPlan(finding.rule_id, SERVICE_ID, finding.resource_id, "Fix it", (), (), ())

    monkeypatch.setitem(
        REMEDIATIONS, "API-001", Remediation(rule_id="API-001", plan=needs_identity, depends_on=("ID-001",))
    )
    snapshot = compliant()
    api = replace(snapshot.apis[0], protocols=("http", "https"))
    snapshot = replace(snapshot, service=replace(snapshot.service, identity_type=None), apis=(api,))
    findings = evaluate_rule("ID-001", snapshot) + evaluate_rule("API-001", snapshot)
    policy = parse_policy("version: 1\n", source="policy.yaml")
    items = plan_run(findings, snapshot, policy, None)
    assert isinstance(items[0], ServiceUpdate)
    assert [p.rule_id for p in items[0].plans] == ["ID-001"]
    assert isinstance(items[1], RemediationPlan)  # unlocked by ID-001's projected identity
    assert _write_count(items) == 1  # the fake plan sends nothing; ID-001's PATCH is one write


# -- TLS verification: the keys the fix owns, case-insensitively ---------------------------------


async def test_tls_verification_reads_keys_and_values_case_insensitively() -> None:
    tls10 = GW + "Security.Protocols.Tls10"
    snapshot = compliant()
    snapshot = replace(
        snapshot,
        service=replace(snapshot.service, custom_properties=frozen_map({**SECURE_CUSTOM_PROPERTIES, tls10: "True"})),
    )
    remediation = REMEDIATIONS["TLS-001"]
    assert remediation.combiner is not None
    plan = remediation.combiner(
        evaluate_rule("TLS-001", snapshot), snapshot, PlanContext(params={}, key_vault_url=None)
    )
    assert isinstance(plan, RemediationPlan)
    # Azure may answer with other casing ("false", a lower-cased key) and with keys Azure added.
    read_back = {k.lower(): v.lower() for k, v in {**SECURE_CUSTOM_PROPERTIES, tls10: "False"}.items()}
    read_back[GW.lower() + "security.ciphers.new_suite"] = "true"
    events: list[str] = []
    arm = FakeArm(events)
    arm.bodies[SERVICE_ID] = {"properties": {"customProperties": read_back}}
    assert await unmet(plan.expectations, arm) == []
    # ...while the switch the fix owns still True is a failed verification.
    arm.bodies[SERVICE_ID] = {"properties": {"customProperties": {**read_back, tls10.lower(): "true"}}}
    [problem] = await unmet(plan.expectations, arm)
    assert "customProperties" in problem
    assert all(e.api_version == APIM_API_VERSION for e in plan.expectations)


# -- concurrent changes seen after a service update ---------------------------------------------------


def test_concurrent_changes_are_paths_beyond_our_patch() -> None:
    from handlers.remediate import concurrent_changes

    before = {
        "properties": {"publicNetworkAccess": "Enabled", "customProperties": {"A": "True", "B": "True"}},
        "tags": {"owner": "x"},
    }
    patch = {"properties": {"customProperties": {"A": "False", "B": "True"}}, "identity": {"type": "SystemAssigned"}}
    after = {
        "properties": {
            "publicNetworkAccess": "Enabled",
            "customProperties": {"a": "false", "B": "True"},
            "provisioningState": "Succeeded",
        },
        "identity": {"type": "SystemAssigned", "principalId": "p", "tenantId": "t"},
        "tags": {"owner": "x"},
    }
    assert concurrent_changes(before, patch, after) == []  # Azure's own fields and casing are not changes
    after["tags"] = {"owner": "y", "change": "CHG-1"}
    after["properties"]["customProperties"]["B"] = "False"  # type: ignore[index]
    assert concurrent_changes(before, patch, after) == [
        "properties.customProperties.B",
        "tags.change",
        "tags.owner",
    ]


# -- manual remediation: force_rule_ids ---------------------------------------------------------

DETECT_ONE = "version: 1\nrules:\n  MGMT-001: {mode: detect}\n  MGMT-002: {mode: remediate}\n"


def detect_engine(policy: str = DETECT_ONE) -> tuple[RemediationDeps, list[str]]:
    deps, events, _, _, _ = engine()
    return replace(deps, policy=parse_policy(policy, source="policy.yaml")), events


async def test_a_detect_mode_rule_is_applied_only_when_named_for_manual_remediation() -> None:
    deps, events = detect_engine()
    report = await remediate(apply(), deps)
    assert [(r.rule_id, r.status) for r in report.results] == [("MGMT-002", Status.FIXED), ("MGMT-001", Status.SKIPPED)]
    assert f"PATCH {ACCESS}" not in events

    deps, events = detect_engine()
    forced = replace(apply(), rule_ids=("MGMT-002",), force_rule_ids=("MGMT-001",))
    report = await remediate(forced, deps)
    # Named in force_rule_ids: selected although rule_ids names only MGMT-002, and applied.
    assert [(r.rule_id, r.status) for r in report.results] == [("MGMT-001", Status.FIXED), ("MGMT-002", Status.FIXED)]
    assert f"PATCH {ACCESS}" in events


async def test_forcing_never_applies_an_exempt_finding_or_a_rule_not_named() -> None:
    exempt = DETECT_ONE + (
        "exemptions:\n  - rule: MGMT-001\n    resource: '*'\n    reason: change freeze\n    expires: 2099-01-01\n"
    )
    deps, events = detect_engine(exempt.replace("MGMT-002: {mode: remediate}", "MGMT-002: {mode: detect}"))
    report = await remediate(replace(apply(), force_rule_ids=("MGMT-001",)), deps)
    by_rule = {r.rule_id: (r.status, r.detail) for r in report.results}
    assert by_rule["MGMT-001"] == (Status.SKIPPED, "exempt: change freeze")
    assert by_rule["MGMT-002"][0] is Status.SKIPPED  # detect mode and not named
    assert not [e for e in events if e.startswith("PATCH")]


async def test_the_dry_run_says_a_forced_rule_would_be_applied() -> None:
    deps, _ = detect_engine()
    plan = await remediate(
        RemediateRequest(instance_id=SERVICE_ID, trigger=Trigger(TriggerKind.CLI, "t"), force_rule_ids=("MGMT-001",)),
        deps,
    )
    [mgmt1] = [r for r in plan.results if r.rule_id == "MGMT-001"]
    assert mgmt1.status is Status.WOULD
    assert "named for manual remediation" in mgmt1.detail
