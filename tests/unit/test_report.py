"""Scan reports: table, JSON and SARIF 2.1.0 renderings of the same findings."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime

from shared.evaluation import evaluate_snapshot
from shared.model import Exemption, RuleFailure, Severity
from shared.policy import Policy
from shared.report import InstanceResult, ScanReport, render_json, render_sarif, render_table
from shared.rules import REGISTRY
from tests.factories import SERVICE_ID, compliant, service, subscription

STARTED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TODAY = date(2026, 11, 23)


def drifted_report() -> ScanReport:
    snapshot = compliant(
        service=service(public_network_access="Enabled"),
        subscriptions=(subscription("orders-mobile"), subscription("everything", scope="/apis")),
    )
    findings = evaluate_snapshot(snapshot, Policy(), today=date(2026, 11, 23))
    exempted = [
        replace(f, exemption=Exemption(reason="migration window", source="policy", expires="2027-01-31"))
        if f.rule_id == "NET-001"
        else f
        for f in findings
    ]
    broken = SERVICE_ID.replace("apim-good", "apim-gone")
    return ScanReport(
        started=STARTED,
        finished=STARTED,
        policy_file="baseline.yaml",
        instances=(
            InstanceResult(instance_id=SERVICE_ID, findings=tuple(exempted), unreadable=("loggers: 403 Forbidden",)),
            InstanceResult(instance_id=broken, error="reading apim-gone: not found (ResourceNotFound)"),
        ),
    )


def test_findings_of_the_drifted_snapshot() -> None:
    rules = sorted(f.rule_id for f in drifted_report().findings)
    assert rules == ["KEY-001", "KEY-002", "NET-001"]


def test_sarif_is_2_1_0_with_every_rule_and_resource_locations() -> None:
    report = drifted_report()
    sarif = json.loads(render_sarif(report))
    assert sarif["version"] == "2.1.0"
    assert sarif["$schema"].endswith("sarif-2.1.0.json")
    [run] = sarif["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted(REGISTRY)
    for rule in rules:
        assert rule["shortDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] in {"error", "warning", "note"}
        assert 0.0 <= float(rule["properties"]["security-severity"]) <= 10.0
    results = run["results"]
    assert len(results) == 3
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        [location] = result["locations"]
        resource = location["logicalLocations"][0]["fullyQualifiedName"]
        assert resource.startswith(SERVICE_ID)
        assert location["physicalLocation"]["artifactLocation"]["uri"] == resource.lstrip("/")
        assert result["partialFingerprints"]["apimRemediator/v1"].startswith(result["ruleId"] + ":")
    exempt = [r for r in results if r["ruleId"] == "NET-001"]
    assert exempt[0]["suppressions"] == [{"kind": "external", "justification": "migration window"}]
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    texts = [n["message"]["text"] for n in invocation["toolExecutionNotifications"]]
    assert any("apim-gone" in t for t in texts)
    assert any("loggers: 403 Forbidden" in t for t in texts)


def test_json_lists_instances_findings_and_exemptions() -> None:
    body = json.loads(render_json(drifted_report()))
    first, second = body["instances"]
    assert second["error"].startswith("reading apim-gone")
    by_rule = {f["rule"]: f for f in first["findings"]}
    assert by_rule["NET-001"]["exemption"]["reason"] == "migration window"
    assert by_rule["KEY-001"]["resource"] == f"{SERVICE_ID}/subscriptions/everything"
    assert by_rule["KEY-001"]["evidence"]["actual"]
    # Worst first.
    ranks = [Severity(f["severity"]).rank for f in first["findings"]]
    assert ranks == sorted(ranks, reverse=True)


def test_table_names_each_finding_and_the_totals() -> None:
    table = render_table(drifted_report())
    assert "apim-good: 2 finding(s), 1 exempt" in table
    assert "(exempt: migration window)" in table
    assert "[subscriptions/everything]" in table
    assert "apim-gone: NOT SCANNED: reading apim-gone" in table
    assert "UNREAD   loggers: 403 Forbidden" in table
    assert table.rstrip().endswith("2 instance(s), 2 finding(s) not exempt")


def test_fails_on_threshold_ignores_exempt_findings() -> None:
    clean = ScanReport(started=STARTED, finished=STARTED, policy_file="p", instances=(InstanceResult(SERVICE_ID),))
    assert not clean.fails(Severity.INFO)
    report = drifted_report()
    assert report.fails(None)  # an instance could not be scanned
    only_first = replace(report, instances=report.instances[:1])
    # NET-001 is exempt; KEY-001 (high) is the worst that counts.
    assert only_first.worst() is Severity.HIGH
    assert only_first.fails(Severity.HIGH, allow_partial=True)
    assert not only_first.fails(Severity.CRITICAL, allow_partial=True)


def test_a_partial_result_fails_the_gate_unless_allowed_and_not_configured_is_not_partial() -> None:
    partial = ScanReport(
        started=STARTED,
        finished=STARTED,
        policy_file="p",
        instances=(InstanceResult(SERVICE_ID, unreadable=("loggers: 403 Forbidden",)),),
    )
    assert partial.partial
    assert partial.fails(Severity.CRITICAL)  # nothing found, but loggers were never looked at
    assert not partial.fails(Severity.CRITICAL, allow_partial=True)
    assert not partial.fails(None)
    unset = replace(
        partial,
        instances=(InstanceResult(SERVICE_ID, not_configured=("key_ledger: not configured (no vault)",)),),
    )
    assert not unset.partial
    assert not unset.fails(Severity.INFO)
    assert "NOT SET  key_ledger: not configured" in render_table(unset)
    assert json.loads(render_json(unset))["instances"][0]["not_configured"] == ["key_ledger: not configured (no vault)"]
    notes = json.loads(render_sarif(unset))["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert [n["level"] for n in notes] == ["note"]


def rule_failure_report() -> ScanReport:
    failure = RuleFailure("MGMT-003", SERVICE_ID, "ValueError: MGMT-003: min_api_version must be YYYY-MM-DD")
    return ScanReport(
        started=STARTED,
        finished=STARTED,
        policy_file="p",
        instances=(InstanceResult(SERVICE_ID, rule_failures=(failure,)),),
    )


def test_a_rule_failure_is_a_tool_notification_naming_rule_and_instance() -> None:
    run = json.loads(render_sarif(rule_failure_report()))["runs"][0]
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    [notification] = invocation["toolExecutionNotifications"]
    assert notification["level"] == "error"
    assert notification["associatedRule"] == {"id": "MGMT-003", "index": sorted(REGISTRY).index("MGMT-003")}
    assert SERVICE_ID in notification["message"]["text"]
    assert "MGMT-003" in notification["message"]["text"]
    [location] = notification["locations"]
    assert location["logicalLocations"][0]["fullyQualifiedName"] == SERVICE_ID
    body = json.loads(render_json(rule_failure_report()))
    assert body["instances"][0]["rule_failures"] == [
        {"rule": "MGMT-003", "reason": "ValueError: MGMT-003: min_api_version must be YYYY-MM-DD"}
    ]
    assert "FAILED   rule MGMT-003 did not run to the end: ValueError" in render_table(rule_failure_report())


def test_two_secret_headers_of_one_diagnostic_get_distinct_stable_fingerprints() -> None:
    base = compliant()

    def fingerprints(*headers: str) -> list[str]:
        diagnostic = replace(base.apim_diagnostics[0], frontend_request_headers=headers)
        snapshot = replace(base, apim_diagnostics=(diagnostic,))
        report = ScanReport(
            started=STARTED,
            finished=STARTED,
            policy_file="p",
            instances=(InstanceResult(SERVICE_ID, findings=tuple(evaluate_snapshot(snapshot, Policy(), today=TODAY))),),
        )
        results = json.loads(render_sarif(report))["runs"][0]["results"]
        return sorted(r["partialFingerprints"]["apimRemediator/v1"] for r in results if r["ruleId"] == "LOG-003")

    both = fingerprints("Authorization", "Ocp-Apim-Subscription-Key")
    assert len(both) == 2
    assert len(set(both)) == 2, both
    # Stable: the same header keeps its fingerprint when the other goes away or the case changes.
    assert set(fingerprints("authorization")) < set(both)
    assert fingerprints("Authorization", "Ocp-Apim-Subscription-Key") == both
