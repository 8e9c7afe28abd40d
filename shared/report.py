"""A scan's result and its renderings: a table for people, JSON for tools, SARIF 2.1.0 for
code-scanning dashboards (one SARIF rule per catalogue entry, the resource id as the
location). Pure functions; no secret ever reaches a finding, so none reaches a report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared import __version__
from shared.model import Finding, RuleFailure, Severity
from shared.rules import REGISTRY, Rule

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
# GitHub code scanning reads a 0.0-10.0 "security-severity" from rule properties.
_SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}


@dataclass(frozen=True)
class InstanceResult:
    instance_id: str
    findings: tuple[Finding, ...] = ()
    unreadable: tuple[str, ...] = ()  # parts of the snapshot that could not be read: a partial result
    not_configured: tuple[str, ...] = ()  # parts the settings leave out: not read, but nothing failed
    error: str | None = None  # the instance could not be scanned at all
    notes: tuple[str, ...] = ()  # e.g. problems with the exemption tags
    rule_failures: tuple[RuleFailure, ...] = ()  # rules that raised: their checks are missing


@dataclass(frozen=True)
class ScanReport:
    started: datetime
    finished: datetime
    policy_file: str
    instances: tuple[InstanceResult, ...] = field(default_factory=tuple)
    # The policy file's custom rules (shared.custom_rules): SARIF describes them with the catalogue.
    custom_rules: tuple[Rule, ...] = ()

    def catalogue(self) -> dict[str, Rule]:
        """Every rule the scan could run: the registry's and the policy's custom rules."""
        return {**REGISTRY, **{r.id: r for r in self.custom_rules}}

    @property
    def findings(self) -> list[Finding]:
        return [f for result in self.instances for f in result.findings]

    @property
    def active_findings(self) -> list[Finding]:
        """Findings no exemption covers."""
        return [f for f in self.findings if not f.exempt]

    def worst(self) -> Severity | None:
        active = self.active_findings
        return max((f.severity for f in active), key=lambda s: s.rank) if active else None

    @property
    def partial(self) -> bool:
        """A part could not be read or a rule failed somewhere: some checks did not happen.
        Parts left out by configuration do not make a result partial."""
        return any(result.unreadable or result.rule_failures for result in self.instances)

    def fails(self, threshold: Severity | None, *, allow_partial: bool = False) -> bool:
        """True when an instance failed; with a threshold, also when an unexempted finding is
        at or above it, or when the result is partial (what was not checked may be above it)
        unless the operator allows partial results."""
        if any(result.error for result in self.instances):
            return True
        if threshold is None:
            return False
        if self.partial and not allow_partial:
            return True
        return any(f.severity.rank >= threshold.rank for f in self.active_findings)


def fingerprint(f: Finding) -> str:
    """A finding's identity across scans: rule, resource and property path, plus the list
    entry when one path carries several findings (two secret headers of one diagnostic).
    Never a value that changes while the finding stays the same problem."""
    base = f"{f.rule_id}:{f.resource_id.lower()}:{f.evidence.path}"
    return f"{base}:{f.entry}" if f.entry else base


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-f.severity.rank, f.instance_id, f.rule_id, f.resource_id))


def render_table(report: ScanReport) -> str:
    lines = []
    for result in report.instances:
        name = result.instance_id.rsplit("/", 1)[-1]
        if result.error:
            lines.append(f"{name}: NOT SCANNED: {result.error}")
            continue
        active = [f for f in result.findings if not f.exempt]
        exempt = len(result.findings) - len(active)
        summary = f"{len(active)} finding(s)" + (f", {exempt} exempt" if exempt else "")
        lines.append(f"{name}: {summary}")
        for f in _sorted(list(result.findings)):
            where = "" if f.resource_id == f.instance_id else f" [{f.resource_id[len(f.instance_id) + 1 :]}]"
            mark = f" (exempt: {f.exemption.reason})" if f.exemption else ""
            lines.append(f"  {f.severity.value.upper():<8} {f.rule_id:<9} {f.message}{where}{mark}")
            lines.append(f"  {'':<8} {'':<9} {f.evidence.path}: {f.evidence.actual} (expected {f.evidence.expected})")
        for part in result.unreadable:
            lines.append(f"  UNREAD   {part}")
        for part in result.not_configured:
            lines.append(f"  NOT SET  {part}")
        for failure in result.rule_failures:
            lines.append(f"  FAILED   rule {failure.rule_id} did not run to the end: {failure.reason}")
        for note in result.notes:
            lines.append(f"  NOTE     {note}")
    active = report.active_findings
    lines.append(f"{len(report.instances)} instance(s), {len(active)} finding(s) not exempt")
    return "\n".join(lines) + "\n"


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "rule": f.rule_id,
        "severity": f.severity.value,
        "title": f.title,
        "message": f.message,
        "instance": f.instance_id,
        "resource": f.resource_id,
        "evidence": {"path": f.evidence.path, "actual": f.evidence.actual, "expected": f.evidence.expected},
        "remediable": f.remediable,
        "exemption": None
        if f.exemption is None
        else {"reason": f.exemption.reason, "source": f.exemption.source, "expires": f.exemption.expires},
    }


def instance_json(r: InstanceResult) -> dict[str, Any]:
    """One instance's result as the JSON report (and each JSON line) carries it."""
    return {
        "id": r.instance_id,
        "error": r.error,
        "unreadable": list(r.unreadable),
        "not_configured": list(r.not_configured),
        "notes": list(r.notes),
        "rule_failures": [{"rule": f.rule_id, "reason": f.reason} for f in r.rule_failures],
        "findings": [_finding_json(f) for f in _sorted(list(r.findings))],
    }


def render_json(report: ScanReport) -> str:
    body = {
        "tool": {"name": "apim-remediator", "version": __version__},
        "started": report.started.isoformat(),
        "finished": report.finished.isoformat(),
        "policy": report.policy_file,
        "instances": [instance_json(r) for r in report.instances],
    }
    return json.dumps(body, indent=2) + "\n"


def _sarif_rule(rule: Rule) -> dict[str, Any]:
    refs = rule.references
    tags = ["security", "azure", "api-management", *refs.owasp_api, *refs.mcsb]
    if rule.id not in REGISTRY:
        tags.append("custom")  # defined in the operator's policy file, not in the catalogue
    help_lines = [rule.rationale]
    if refs.azure_policy:
        help_lines.append("Azure Policy: " + ", ".join(refs.azure_policy))
    if refs.docs:
        help_lines.append("Docs: " + ", ".join(refs.docs))
    return {
        "id": rule.id,
        "name": rule.id.replace("-", ""),
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.rationale},
        "help": {"text": "\n".join(help_lines)},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "properties": {
            "tags": tags,
            "security-severity": _SECURITY_SEVERITY[rule.severity],
            "remediable": rule.remediable,
        },
    }


def render_sarif(report: ScanReport) -> str:
    """SARIF 2.1.0: every catalogue rule (and custom rule), one result per finding at its resource id."""
    catalogue = report.catalogue()
    index = sarif_rule_index(catalogue)
    results = [sarif_result(f, index) for f in _sorted(report.findings)]
    notifications = [n for r in report.instances for n in sarif_notifications(r, index)]
    run: dict[str, Any] = {
        "tool": sarif_tool(catalogue),
        "invocations": [
            sarif_invocation(
                report.started,
                report.finished,
                successful=not any(r.error or r.rule_failures for r in report.instances),
                notifications=notifications,
            )
        ],
        "results": results,
    }
    return json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}, indent=2) + "\n"


def sarif_rule_index(catalogue: Mapping[str, Rule]) -> dict[str, int]:
    """Each rule's index in the SARIF driver's `rules` (sorted by id): the catalogue's and the
    policy's custom rules (`ScanReport.catalogue()` / `Policy.catalogue()`)."""
    return {rule_id: i for i, rule_id in enumerate(sorted(catalogue))}


def sarif_tool(catalogue: Mapping[str, Rule]) -> dict[str, Any]:
    return {
        "driver": {
            "name": "apim-remediator",
            "version": __version__,
            "rules": [_sarif_rule(catalogue[rule_id]) for rule_id in sorted(catalogue)],
        }
    }


def sarif_result(f: Finding, index: dict[str, int]) -> dict[str, Any]:
    """One finding as a SARIF result at its resource id."""
    result: dict[str, Any] = {
        "ruleId": f.rule_id,
        "ruleIndex": index[f.rule_id],
        "level": _SARIF_LEVEL[f.severity],
        "message": {"text": f"{f.message} ({f.evidence.path}: {f.evidence.actual}; expected {f.evidence.expected})"},
        "locations": [
            {
                "physicalLocation": {"artifactLocation": {"uri": f.resource_id.lstrip("/")}},
                "logicalLocations": [{"fullyQualifiedName": f.resource_id, "kind": "resource"}],
            }
        ],
        "partialFingerprints": {"apimRemediator/v1": fingerprint(f)},
        "properties": {"severity": f.severity.value, "instance": f.instance_id, "remediable": f.remediable},
    }
    if f.exemption is not None:
        result["suppressions"] = [{"kind": "external", "justification": f.exemption.reason}]
    return result


def sarif_notifications(r: InstanceResult, index: dict[str, int]) -> list[dict[str, Any]]:
    """What kept an instance's checks from being complete, as tool execution notifications."""
    notifications: list[dict[str, Any]] = []
    if r.error:
        notifications.append({"level": "error", "message": {"text": f"{r.instance_id}: {r.error}"}})
    notifications += [
        {"level": "warning", "message": {"text": f"{r.instance_id}: could not read {part}"}} for part in r.unreadable
    ]
    notifications += [
        {"level": "note", "message": {"text": f"{r.instance_id}: did not read {part}"}} for part in r.not_configured
    ]
    notifications += [
        {
            "level": "error",
            "message": {"text": f"{failure}; its checks are missing for this instance"},
            "associatedRule": {"id": failure.rule_id, "index": index[failure.rule_id]},
            "locations": [{"logicalLocations": [{"fullyQualifiedName": failure.instance_id, "kind": "resource"}]}],
        }
        for failure in r.rule_failures
    ]
    return notifications


def sarif_invocation(
    started: datetime, finished: datetime, *, successful: bool, notifications: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "executionSuccessful": successful,
        "startTimeUtc": started.isoformat().replace("+00:00", "Z"),
        "endTimeUtc": finished.isoformat().replace("+00:00", "Z"),
        "toolExecutionNotifications": notifications,
    }


RENDERERS = {"table": render_table, "json": render_json, "sarif": render_sarif}


def render_rules_markdown() -> str:
    """docs/rules.md: the catalogue as the registry has it (a test keeps the file current)."""
    lines = [
        "# Rule catalogue",
        "",
        "Generated from the rule registry (`apim-remediator rules --format markdown`); do not edit by hand.",
        "Modes, parameters and exemptions are set in the policy file (see `docs/policy.md`).",
        "",
        "| id | severity | title | remediation |",
        "|---|---|---|---|",
    ]
    for rule_id in sorted(REGISTRY):
        rule = REGISTRY[rule_id]
        fix = "yes" if rule.remediable else "no (detect only)"
        lines.append(f"| [{rule.id}](#{rule.id.lower()}) | {rule.severity.value} | {rule.title} | {fix} |")
    for rule_id in sorted(REGISTRY):
        rule = REGISTRY[rule_id]
        refs = rule.references
        lines += ["", f"## {rule.id}", "", f"**{rule.title}** ({rule.severity.value})", "", rule.rationale, ""]
        lines.append(f"Remediation: {'yes' if rule.remediable else 'none; this rule only detects'}.")
        if rule.workspace_note:
            lines += ["", f"Workspaces: {rule.workspace_note}"]
        if rule.params:
            lines += ["", "| parameter | type | default | meaning |", "|---|---|---|---|"]
            for p in rule.params:
                default = ", ".join(p.default) if isinstance(p.default, tuple) else str(p.default)
                lines.append(f"| `{p.name}` | {p.type_name} | `{default}` | {p.description} |")
        ref_lines = [
            ("Azure Policy", refs.azure_policy),
            ("Microsoft cloud security benchmark", refs.mcsb),
            ("OWASP API Security Top 10 (2023)", refs.owasp_api),
            ("Checkov", refs.checkov),
            ("Docs", refs.docs),
        ]
        present = [(label, values) for label, values in ref_lines if values]
        if present:
            lines.append("")
            lines += [f"- {label}: {', '.join(values)}" for label, values in present]
        for name, template in rule.queries:
            lines += ["", f"Query `{name}` (KQL; placeholders below):", "", "```kusto", template, "```"]
    lines += _signal_sources_markdown()
    return "\n".join(lines) + "\n"


def _signal_sources_markdown() -> list[str]:
    """How the runtime queries' placeholders are filled (docs/rules.md)."""
    from shared import signal_queries as kql

    return [
        "",
        "## Runtime query placeholders",
        "",
        "`{window}` is the rule's window as a KQL timespan (`60m`), `{limit}` the number of top offenders kept "
        f"({kql.TOP_LIMIT}), `{{service}}` the APIM service's ARM id as a string literal, and `{{source}}` the "
        "service's gateway logs in the table shape its diagnostic setting writes: resource-specific",
        "",
        "```kusto",
        kql.SOURCE_RESOURCE_SPECIFIC,
        "```",
        "",
        "or, when no setting writes resource-specific, the legacy AzureDiagnostics table:",
        "",
        "```kusto",
        kql.SOURCE_AZURE_DIAGNOSTICS,
        "```",
    ]
