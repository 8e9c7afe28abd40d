"""Renderings of a remediation report: the plan of a dry run, or what was done."""

from __future__ import annotations

import json

from handlers.remediate import RemediationReport, Status


def render_remediation_table(report: RemediationReport) -> str:
    name = report.instance_id.rsplit("/", 1)[-1]
    mode = "dry run (nothing changed; --apply to act)" if report.dry_run else "applied"
    lines = [f"{name}: {mode}, correlation id {report.correlation_id}"]
    for note in report.recovered:
        lines.append(f"  RECOVERED {note}")
    if report.stopped:
        lines.append(f"  STOPPED   {report.stopped}")
    for r in report.results:
        where = r.resource_id[len(report.instance_id) + 1 :] if r.resource_id != report.instance_id else "service"
        lines.append(f"  {r.status.value.upper():<9} {r.rule_id:<9} [{where}] {r.summary}")
        for change in r.changes:
            lines.append(f"  {'':<9} {'':<9}   {change.path}: {change.before} -> {change.after}")
        for request in r.requests:
            lines.append(f"  {'':<9} {'':<9}   {request}")
        if r.detail:
            lines.append(f"  {'':<9} {'':<9}   {r.detail}")
    if not report.results:
        lines.append("  nothing to do")
    if not report.dry_run:
        lines.append(f"{report.writes} write request(s) sent, charged to the run's write budget")
        lines.append(f"{len(report.remaining)} finding(s) not exempt remain after a rescan")
        for f in report.remaining:
            lines.append(f"  {f.severity.value.upper():<8} {f.rule_id:<9} {f.message}")
    fixed = sum(1 for r in report.results if r.status is Status.FIXED)
    lines.append(f"{fixed} fixed, {sum(1 for r in report.results if r.status is Status.FAILED)} failed")
    return "\n".join(lines) + "\n"


def render_remediation_json(report: RemediationReport) -> str:
    return (
        json.dumps(
            {
                "instance": report.instance_id,
                "dry_run": report.dry_run,
                "correlation_id": report.correlation_id,
                "stopped": report.stopped,
                "writes": report.writes,
                "recovered": list(report.recovered),
                "results": [
                    {
                        "rule": r.rule_id,
                        "resource": r.resource_id,
                        "status": r.status.value,
                        "summary": r.summary,
                        "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in r.changes],
                        "requests": list(r.requests),
                        "detail": r.detail,
                    }
                    for r in report.results
                ],
                "remaining": [{"rule": f.rule_id, "resource": f.resource_id} for f in report.remaining],
            },
            indent=2,
        )
        + "\n"
    )
