"""Streamed reports: JSON lines and SARIF written one instance at a time are valid, say
what the whole-document renderings say, and the tally fails a scan exactly as the report
would."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from shared.model import RuleFailure, Severity
from shared.report import ScanReport, instance_json, render_sarif
from shared.report_stream import JsonLinesWriter, SarifStreamWriter, ScanTally
from tests.unit.test_report import STARTED, drifted_report


def _report() -> ScanReport:
    report = drifted_report()
    first = report.instances[0]
    failed = replace(
        first,
        instance_id=first.instance_id + "-3",
        findings=(),
        unreadable=(),
        not_configured=("key_ledger: not configured",),
        rule_failures=(RuleFailure(rule_id="KEY-001", instance_id=first.instance_id + "-3", reason="boom"),),
    )
    return replace(report, finished=STARTED + timedelta(seconds=3), instances=(*report.instances, failed))


def _stream(writer: Any, report: ScanReport) -> None:
    writer.begin(report.started, report.policy_file)
    for result in report.instances:
        writer.add(result)
    writer.end(report.finished)


def test_json_lines_carry_one_instance_per_line_between_a_header_and_a_summary() -> None:
    report = _report()
    out = io.StringIO()
    _stream(JsonLinesWriter(out), report)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["scan", "instance", "instance", "instance", "summary"]
    assert lines[0]["policy"] == "baseline.yaml"
    assert lines[0]["started"] == STARTED.isoformat()
    for line, result in zip(lines[1:-1], report.instances, strict=True):
        assert {k: v for k, v in line.items() if k != "type"} == json.loads(json.dumps(instance_json(result)))
    summary = lines[-1]
    assert summary["instances"] == 3
    assert summary["not_scanned"] == 1
    assert summary["findings"] == len(report.findings)
    assert summary["active_findings"] == len(report.active_findings)
    assert summary["worst"] == report.worst().value  # type: ignore[union-attr]
    assert summary["partial"] is True


def _canonical(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(item, sort_keys=True) for item in items)


def test_streamed_sarif_is_the_document_render_sarif_builds() -> None:
    report = _report()
    out = io.StringIO()
    _stream(SarifStreamWriter(out), report)
    streamed = json.loads(out.getvalue())
    whole = json.loads(render_sarif(report))
    assert streamed["$schema"] == whole["$schema"]
    assert streamed["version"] == "2.1.0"
    [run], [expected] = streamed["runs"], whole["runs"]
    assert run["tool"] == expected["tool"]
    assert _canonical(run["results"]) == _canonical(expected["results"])
    [invocation], [expected_invocation] = run["invocations"], expected["invocations"]
    assert invocation["executionSuccessful"] is expected_invocation["executionSuccessful"] is False
    assert _canonical(invocation["toolExecutionNotifications"]) == _canonical(
        expected_invocation["toolExecutionNotifications"]
    )
    assert invocation["endTimeUtc"] == expected_invocation["endTimeUtc"]


def test_streamed_sarif_of_a_clean_scan_is_valid() -> None:
    report = replace(_report(), instances=())
    out = io.StringIO()
    _stream(SarifStreamWriter(out), report)
    [run] = json.loads(out.getvalue())["runs"]
    assert run["results"] == []
    assert run["invocations"][0]["executionSuccessful"] is True


@pytest.mark.parametrize("threshold", [None, *Severity])
@pytest.mark.parametrize("allow_partial", [False, True])
@pytest.mark.parametrize("which", [slice(0, 1), slice(0, 2), slice(2, 3), slice(0, 3), slice(0, 0)])
def test_the_tally_fails_exactly_when_the_report_would(
    threshold: Severity | None, allow_partial: bool, which: slice
) -> None:
    report = replace(_report(), instances=_report().instances[which])
    tally = ScanTally()
    for result in report.instances:
        tally.add(result)
    assert tally.fails(threshold, allow_partial=allow_partial) == report.fails(threshold, allow_partial=allow_partial)
    assert tally.worst() == report.worst()
