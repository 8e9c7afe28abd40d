"""The scan use case with a recording fake of its narrow InstanceSource: scope narrowing,
policy modes and exemptions, one failing instance not stopping the rest, progress."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date
from types import MappingProxyType

import pytest

from handlers.scan import ScanRequest, scan
from shared.errors import OutOfScopeError, PermanentError, RuleError
from shared.evaluation import evaluate_snapshot
from shared.inventory import InstanceRef
from shared.model import Severity, Snapshot, frozen_map
from shared.policy import Policy, parse_policy
from shared.report import ScanReport
from tests.factories import RG, SERVICE_ID, SUB, compliant, service

OTHER_ID = SERVICE_ID.replace("apim-good", "apim-open")


def ref(instance_id: str, **tags: str) -> InstanceRef:
    return InstanceRef(
        id=instance_id,
        name=instance_id.rsplit("/", 1)[-1],
        subscription_id=SUB,
        resource_group=RG,
        location="westeurope",
        tags=frozen_map(tags),
    )


class RecordingSource:
    def __init__(self, snapshots: dict[str, Snapshot | Exception], refs: list[InstanceRef]) -> None:
        self.snapshots = snapshots
        self.refs = refs
        self.reads: list[str] = []

    async def discover(self) -> tuple[InstanceRef, ...]:
        return tuple(self.refs)

    async def locate(self, instance_id: str) -> InstanceRef | None:
        return next((r for r in self.refs if r.id.lower() == instance_id.lower()), None)

    async def read(self, ref: InstanceRef) -> Snapshot:
        self.reads.append(ref.id)
        found = self.snapshots[ref.id]
        if isinstance(found, Exception):
            raise found
        return found


def open_instance() -> Snapshot:
    return compliant(service=service(id=OTHER_ID, name="apim-open", public_network_access="Enabled"))


def policy(text: str = "version: 1\n") -> Policy:
    return parse_policy(text, source="policy.yaml", today=date(2026, 11, 23))


def run(request: ScanRequest, source: RecordingSource, chosen: Policy) -> ScanReport:
    return asyncio.run(scan(request, source, chosen, policy_file="policy.yaml", today=date(2026, 11, 23)))


def test_scan_finds_drift_only_where_it_is() -> None:
    source = RecordingSource({SERVICE_ID: compliant(), OTHER_ID: open_instance()}, [ref(SERVICE_ID), ref(OTHER_ID)])
    progress: list[tuple[int, int]] = []
    report = asyncio.run(
        scan(ScanRequest(), source, policy(), policy_file="p", progress=lambda d, t, _: progress.append((d, t)))
    )
    by_instance = {r.instance_id: r for r in report.instances}
    assert by_instance[SERVICE_ID].findings == ()
    assert [f.rule_id for f in by_instance[OTHER_ID].findings] == ["NET-001"]
    assert sorted(progress) == [(1, 2), (2, 2)]


def test_off_mode_skips_a_rule_and_exemptions_are_reported_not_hidden() -> None:
    source = RecordingSource({OTHER_ID: open_instance()}, [ref(OTHER_ID)])
    off = run(ScanRequest(), source, policy("version: 1\nrules:\n  NET-001: {mode: 'off'}\n"))
    assert off.findings == []
    exempt = run(
        ScanRequest(),
        source,
        policy(
            "version: 1\nexemptions:\n  - rule: NET-001\n    resource: '**/apim-open'\n"
            "    reason: partner cut-over\n    expires: 2027-01-31\n"
        ),
    )
    [finding] = exempt.findings
    assert finding.exemption is not None
    assert finding.exemption.reason == "partner cut-over"
    assert exempt.active_findings == []


def test_tag_exemption_on_the_instance() -> None:
    snapshot = open_instance()
    tagged = replace(
        snapshot, service=replace(snapshot.service, tags=frozen_map({"apim-remediator-exempt": "NET-001"}))
    )
    report = run(ScanRequest(), RecordingSource({OTHER_ID: tagged}, [ref(OTHER_ID)]), policy())
    [finding] = report.findings
    assert finding.exemption is not None
    assert finding.exemption.source == "tag"


def test_one_unreadable_instance_does_not_stop_the_scan() -> None:
    source = RecordingSource(
        {SERVICE_ID: PermanentError("reading apim-good: 403 AuthorizationFailed"), OTHER_ID: open_instance()},
        [ref(SERVICE_ID), ref(OTHER_ID)],
    )
    report = run(ScanRequest(), source, policy())
    errors = {r.instance_id: r.error for r in report.instances}
    assert errors[SERVICE_ID] == "reading apim-good: 403 AuthorizationFailed"
    assert errors[OTHER_ID] is None
    assert report.fails(None)


def test_request_narrows_scope_and_an_unknown_instance_is_refused() -> None:
    source = RecordingSource({SERVICE_ID: compliant(), OTHER_ID: open_instance()}, [ref(SERVICE_ID), ref(OTHER_ID)])
    run(ScanRequest(instance_ids=(OTHER_ID.upper(),)), source, policy())
    assert source.reads == [OTHER_ID]
    with pytest.raises(OutOfScopeError, match="not an APIM instance in the configured scope"):
        run(ScanRequest(instance_ids=(SERVICE_ID + "-nope",)), source, policy())


def test_policy_scope_excludes_instances_by_tag() -> None:
    source = RecordingSource(
        {SERVICE_ID: compliant(), OTHER_ID: open_instance()}, [ref(SERVICE_ID, env="prod"), ref(OTHER_ID, env="dev")]
    )
    report = run(ScanRequest(), source, policy("version: 1\nscope:\n  tags: {env: prod}\n"))
    assert [r.instance_id for r in report.instances] == [SERVICE_ID]
    assert source.reads == [SERVICE_ID]


def test_fail_on_threshold() -> None:
    report = run(ScanRequest(), RecordingSource({OTHER_ID: open_instance()}, [ref(OTHER_ID)]), policy())
    severity = report.findings[0].severity
    assert report.fails(severity)
    assert not report.fails(Severity.CRITICAL)
    assert not report.fails(None)


def test_a_rule_that_raises_is_reported_and_the_other_rules_still_run() -> None:
    # A value the rule cannot use, past the loader (issue 8's reproduction: MGMT-003 raised
    # ValueError and the scan died with a traceback).
    broken = Policy(overrides=MappingProxyType({"MGMT-003": MappingProxyType({"min_api_version": "2021-13-45"})}))
    source = RecordingSource({SERVICE_ID: compliant(), OTHER_ID: open_instance()}, [ref(SERVICE_ID), ref(OTHER_ID)])
    report = run(ScanRequest(), source, broken)
    results = {r.instance_id: r for r in report.instances}
    assert set(results) == {SERVICE_ID, OTHER_ID}
    for instance_id, result in results.items():
        assert result.error is None
        [failure] = result.rule_failures
        assert (failure.rule_id, failure.instance_id) == ("MGMT-003", instance_id)
        assert failure.reason.startswith("ValueError: MGMT-003: min_api_version must be YYYY-MM-DD")
    # NET-001 (public access) still ran on the open instance.
    assert [f.rule_id for f in results[OTHER_ID].findings] == ["NET-001"]
    # A check is missing, so "nothing at or above the threshold" is not known.
    assert report.fails(Severity.CRITICAL)
    assert not report.fails(None)


def test_evaluate_snapshot_refuses_an_incomplete_evaluation_with_a_rule_error() -> None:
    broken = Policy(overrides=MappingProxyType({"MGMT-003": MappingProxyType({"min_api_version": "nope"})}))
    with pytest.raises(RuleError, match=f"rule MGMT-003 failed on {SERVICE_ID}: ValueError"):
        evaluate_snapshot(compliant(), broken, today=date(2026, 11, 23))


class StuckSource(RecordingSource):
    """One instance's read fails with a bug; the other's never finishes on its own."""

    def __init__(self) -> None:
        super().__init__({}, [ref(SERVICE_ID), ref(OTHER_ID)])
        self.cancelled: list[str] = []

    async def read(self, ref: InstanceRef) -> Snapshot:
        if ref.id == SERVICE_ID:
            await asyncio.sleep(0)
            raise RuntimeError("bug while mapping apim-good")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(ref.id)
            raise
        raise AssertionError("unreachable")


def test_a_bug_in_one_instance_leaves_no_other_instance_running() -> None:
    source = StuckSource()

    async def scan_then_look() -> None:
        with pytest.raises(RuntimeError, match="bug while mapping apim-good"):
            await scan(ScanRequest(), source, policy(), policy_file="policy.yaml", today=date(2026, 11, 23))
        # Checked before asyncio.run's own clean-up could cancel a leftover task.
        assert source.cancelled == [OTHER_ID]

    asyncio.run(scan_then_look())
