"""Incidents from what a run saw: the use case between the reconcile loop and
`shared/incidents.py`.

After every reconcile, `RunIncidents.after_reconcile` turns the run's report into problems
(`problems_from_report`, pure): the findings the rescan still shows, grouped by rule family
and resource, that the policy leaves to people (detect mode), or whose fix was refused or
failed — each with the evidence and what the product did or refused to do and why; and a
run the blast-radius cap stopped. Each is raised (opened, or counted again), and the open
incidents of the instance that the run no longer shows are resolved with a note saying
whether the product fixed them or they went away. A successful reconcile also resolves the
instance's work-failure incident (a poison message or a permanent failure, raised by
`handlers/work.py` through `report_work_failure`). Then the outbox is delivered.

Exempt findings never become incidents (an exemption is a decision already made), and a
fix Azure is still applying (pending) is not a problem yet.

Azure actions: "Microsoft Sentinel Responder" on the Sentinel workspace when
APIMR_INCIDENT_SENTINEL_WORKSPACE is set (Microsoft.SecurityInsights/incidents/read and
Microsoft.SecurityInsights/incidents/write; infra/sentinel-role.bicep); "Key Vault Secrets
User" on the secret named by APIMR_INCIDENT_WEBHOOK_SECRET_NAME; Storage Table Data
Contributor on the product's own account (the incidents table; main.bicep).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from handlers.remediate import ActionResult, RemediationReport, Status
from shared.findings_store import FindingChanges
from shared.incidents import (
    DeliveryReport,
    Incident,
    IncidentApi,
    IncidentReporter,
    Problem,
    ProblemKind,
    SinkState,
    fingerprint_of,
)
from shared.model import Finding, Severity
from shared.rules import REGISTRY

WORK_FAMILY = "WORK"
RUN_FAMILY = "RUN"
_RULE_FAMILIES = frozenset(rule.family for rule in REGISTRY.values())


class IncidentsPort(IncidentApi, Protocol):
    async def open_incidents(self, instance_id: str | None = None) -> list[Incident]: ...

    async def deliver_pending(self, *, limit: int = 100) -> DeliveryReport: ...

    async def waiting_in_summary(self) -> tuple[str, ...]: ...


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1] or resource_id


def family_of(rule_id: str) -> str:
    rule = REGISTRY.get(rule_id)
    return rule.family if rule is not None else rule_id.split("-", 1)[0].upper()


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())[:600]


def _what_was_done(result: ActionResult | None, finding: Finding) -> str | None:
    """What the product did about a finding, or None when it is not (yet) a problem."""
    if result is None:
        if not finding.remediable:
            return "left to people: this finding has no automatic remediation"
        return "not acted on in this run"
    detail = result.detail or result.summary
    if result.status is Status.PENDING:
        return None
    if result.status is Status.FAILED:
        return f"the fix failed: {detail}"
    if result.status is Status.REFUSED:
        return f"the fix was refused: {detail}"
    if result.status is Status.SKIPPED:
        return f"left to people: {detail}"
    if result.status is Status.FIXED:
        return f"fixed, but a rescan still shows it: {detail}"
    return f"{result.status.value}: {detail}"


def _results_by_target(report: RemediationReport) -> dict[tuple[str, str], ActionResult]:
    found: dict[tuple[str, str], ActionResult] = {}
    for result in report.results:
        found.setdefault((result.rule_id, result.resource_id.lower()), result)
    return found


def problems_from_report(report: RemediationReport, signals: Sequence[Finding] = ()) -> list[Problem]:
    """The problems a reconcile leaves to people, one per rule family and resource.

    `signals`: the runtime signal rules' findings of this run (reconcile evaluates them after
    the engine; none of them is fixed by it), grouped with the configuration findings."""
    results = _results_by_target(report)
    groups: dict[tuple[str, str], list[tuple[Finding, str]]] = defaultdict(list)
    for finding in (*report.remaining, *signals):
        if finding.exempt:
            continue
        done = _what_was_done(results.get((finding.rule_id, finding.resource_id.lower())), finding)
        if done is None:
            continue
        groups[(family_of(finding.rule_id), finding.resource_id.lower())].append((finding, done))
    problems = []
    for (family, _), members in sorted(groups.items()):
        members.sort(key=lambda m: (-m[0].severity.rank, m[0].rule_id, m[0].entry, m[0].evidence.path))
        first = members[0][0]
        severity = max((f.severity for f, _ in members), key=lambda s: s.rank)
        resource = _name(first.resource_id)
        instance = _name(first.instance_id)
        if len(members) == 1:
            title = f"{first.rule_id} {first.title} ({resource})"
        else:
            title = f"{len(members)} {family} findings on {resource}"
        if resource != instance:
            title += f" on {instance}"
        rows = "\n".join(
            f"| {f.rule_id} | {f.severity.value} | {_cell(f.message)} | "
            f"`{_cell(f.evidence.path)}`: {_cell(f.evidence.actual)} (expected {_cell(f.evidence.expected)}) | "
            f"{_cell(done)} |"
            for f, done in members
        )
        description = (
            f"**{family}** drift on `{resource}` (APIM instance `{instance}`), left to people by apim-remediator.\n\n"
            f"Resource: `{first.resource_id}`\n\n"
            "| Rule | Severity | Finding | Evidence | What apim-remediator did |\n"
            "|---|---|---|---|---|\n"
            f"{rows}\n\n"
            f"Run: `{report.correlation_id}`."
        )
        problems.append(
            Problem(
                kind=ProblemKind.FINDING,
                family=family,
                resource_id=first.resource_id,
                title=title,
                severity=severity,
                description=description,
                instance_id=report.instance_id,
            )
        )
    if report.stopped:
        instance = _name(report.instance_id)
        problems.append(
            Problem(
                kind=ProblemKind.RUN,
                family=RUN_FAMILY,
                resource_id=report.instance_id,
                title=f"Remediation stopped short on {instance}",
                severity=Severity.HIGH,
                description=(
                    f"The remediation run on `{instance}` stopped before fixing everything: {report.stopped}\n\n"
                    "So much drift at once is more often a deliberate migration than an accident: check it, then "
                    "raise `limits.max_writes_per_run` in the policy or fix by hand.\n\n"
                    f"Run: `{report.correlation_id}`."
                ),
                instance_id=report.instance_id,
            )
        )
    return problems


def resolution_note(incident: Incident, report: RemediationReport) -> str:
    """Why an open incident of this instance is gone in this run."""
    if incident.kind is ProblemKind.RUN:
        return f"remediation ran to completion in run {report.correlation_id}"
    if incident.kind is ProblemKind.WORK:
        return f"the instance was reconciled successfully in run {report.correlation_id}"
    targets = [
        r
        for r in report.results
        if r.resource_id.lower() == incident.resource_id.lower() and family_of(r.rule_id) == incident.family
    ]
    fixed = [r for r in targets if r.status is Status.FIXED]
    if fixed:
        what = "; ".join(sorted({f"{r.rule_id}: {r.summary}" for r in fixed}))
        return f"fixed by apim-remediator in run {report.correlation_id} ({what}), verified by a fresh read"
    exempt = [
        f
        for f in report.remaining
        if f.exempt
        and f.resource_id.lower() == incident.resource_id.lower()
        and family_of(f.rule_id) == incident.family
    ]
    if exempt and exempt[0].exemption is not None:
        return f"now exempt ({exempt[0].exemption.reason}); run {report.correlation_id}"
    pending = [r for r in targets if r.status is Status.PENDING]
    if pending:
        return f"apim-remediator's fix is being applied by Azure (run {report.correlation_id}); a later run verifies it"
    return (
        f"no longer seen by run {report.correlation_id}: fixed since the previous run "
        "(by a manual remediation or outside apim-remediator)"
    )


@dataclass(frozen=True)
class RunIncidents:
    """The reconcile loop's incident step (`ReconcileDeps.incidents`)."""

    reporter: IncidentsPort

    async def after_reconcile(
        self,
        report: RemediationReport,
        changes: FindingChanges,
        *,
        run_id: str,
        batch_id: str | None,
        signals: Sequence[Finding] = (),
    ) -> DeliveryReport:
        """`signals`: the runtime signal findings when the signals ran in this run. Findings the
        run did not evaluate (`changes.kept`: the signal rules between their runs, or a query
        that failed) hold their incidents: neither resolved nor counted again until they run."""
        problems = problems_from_report(report, signals)
        for problem in problems:
            await self.reporter.raise_problem(problem, run_id=run_id, batch_id=batch_id)
        current = {p.fingerprint for p in problems}
        held = {fingerprint_of(family_of(k.rule_id), k.resource_id) for k in changes.kept if not k.exempt}
        for incident in await self.reporter.open_incidents(instance_id=report.instance_id):
            if incident.fingerprint in current or incident.fingerprint in held:
                continue
            if incident.kind in (ProblemKind.FINDING, ProblemKind.RUN, ProblemKind.WORK):
                await self.reporter.resolve(incident.fingerprint, resolution_note(incident, report), run_id=run_id)
        # Problems of this instance waiting in the summary incident (over a sweep's limit)
        # that this run no longer shows leave it.
        prefix = f":{report.instance_id.lower()}"
        for waiting in await self.reporter.waiting_in_summary():
            family, _, resource = waiting.partition(":")
            ours = family in _RULE_FAMILIES or family == RUN_FAMILY  # not a backup's or a rotation's
            if ours and waiting not in current and f":{resource}".startswith(prefix):
                await self.reporter.resolve(waiting, f"no longer seen by run {run_id}", run_id=run_id)
        return await self.reporter.deliver_pending()


def work_failure_problem(instance_id: str, reason: str, *, poisoned: bool) -> Problem:
    instance = _name(instance_id)
    what = "was given up on after its retries (poison queue)" if poisoned else "failed for good"
    return Problem(
        kind=ProblemKind.WORK,
        family=WORK_FAMILY,
        resource_id=instance_id,
        title=f"Reconciling {instance} {'was given up on' if poisoned else 'failed'}",
        severity=Severity.HIGH,
        description=(
            f"The work item for `{instance}` {what}; the instance is not being kept secure until this is "
            f"fixed.\n\nReason: {reason}\n\nResolved automatically by the next successful reconcile."
        ),
        instance_id=instance_id,
    )


async def report_work_failure(
    reporter: IncidentsPort, instance_id: str, reason: str, *, poisoned: bool, run_id: str = ""
) -> Incident:
    incident = await reporter.raise_problem(work_failure_problem(instance_id, reason, poisoned=poisoned), run_id=run_id)
    await reporter.deliver_pending()
    return incident


@dataclass(frozen=True)
class IncidentView:
    incident: Incident
    sinks: tuple[SinkState, ...]


async def list_incidents(reporter: IncidentReporter, *, include_resolved: bool = False) -> list[IncidentView]:
    """Open incidents (or all) with their delivery state per sink, for `apim-remediator incidents`."""
    found = await reporter.store.incidents(include_resolved=include_resolved)
    return [IncidentView(i, tuple(await reporter.delivery_state(i))) for i in found]


def render_incidents(views: Sequence[IncidentView]) -> str:
    if not views:
        return "no open incidents\n"
    lines = []
    for view in views:
        i = view.incident
        lines.append(
            f"{i.status.value.upper():<9} {i.severity.value:<8} x{i.count:<4} {i.title}\n"
            f"          {i.fingerprint}\n"
            f"          first {i.first_seen.isoformat(timespec='seconds')}"
            f"  last {i.last_seen.isoformat(timespec='seconds')}"
        )
        if i.note:
            lines.append(f"          resolved: {i.note}")
        if not view.sinks:
            lines.append("          delivery: log only")
        for s in view.sinks:
            if s.pending_versions:
                state = f"PENDING v{','.join(map(str, s.pending_versions))} ({s.attempts} failed attempt(s))"
                if s.last_error:
                    state += f": {s.last_error}"
            else:
                state = f"delivered (v{s.delivered_version})"
            lines.append(f"          {s.sink}: {state}")
    return "\n".join(lines) + "\n"


__all__ = [
    "IncidentView",
    "IncidentsPort",
    "RunIncidents",
    "fingerprint_of",
    "list_incidents",
    "problems_from_report",
    "render_incidents",
    "report_work_failure",
    "resolution_note",
    "work_failure_problem",
]
