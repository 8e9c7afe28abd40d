"""Remediate one APIM instance: read, evaluate, plan, and (only with `apply`) journal,
lease, write with If-Match, verify by re-reading, rescan.

Dry run is the default and the first branch: it plans and says what it would do. With
`apply`, only rules the policy puts in `remediate` mode are acted on, never exempt
findings, never more writes than the policy's blast-radius cap. Every write is journaled
before it is made; an entry a crashed worker left open is settled first (recovered if a
re-read shows its planned state, abandoned otherwise — the fresh plan then redoes it). A
412 means someone changed the resource after we read it: re-read and re-plan, never
clobber.

Azure actions: those of the scan (handlers/scan.py) plus, when remediating
(infra/subscription-role.bicep with allowRemediation=true grants exactly these):
    Microsoft.ApiManagement/service/write
    Microsoft.ApiManagement/service/tenant/write
    Microsoft.ApiManagement/service/portalsettings/write
    Microsoft.ApiManagement/service/portalconfigs/write
    Microsoft.ApiManagement/service/subscriptions/write
    Microsoft.ApiManagement/service/namedValues/write
    Microsoft.ApiManagement/service/namedValues/listValue/action
    Microsoft.ApiManagement/service/apis/write
    Microsoft.ApiManagement/service/backends/write
    Microsoft.ApiManagement/service/loggers/write
    Microsoft.ApiManagement/service/diagnostics/write
    Microsoft.Insights/diagnosticSettings/write
    Microsoft.OperationalInsights/workspaces/read
    Microsoft.OperationalInsights/workspaces/query/read
(the last two are reads for KEY-001's evidence: whether gateway logs show the key unused;
API-003's evidence is a TLS handshake to the backend, no Azure action)
and "Key Vault Secrets Officer" on the product's vault (SEC-001); Storage Table Data
Contributor and Blob Data Contributor on the product's own storage account (main.bicep).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

from handlers.scan import InstanceSource
from shared.actions import (
    REMEDIATIONS,
    ArmWrite,
    Change,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    Step,
    order_rules,
)
from shared.actions.executor import ArmApi, PreconditionFailed, SecretApi, apply_plan, unmet, verify_plan
from shared.errors import OutOfScopeError, PermanentError, RemediatorError
from shared.evaluation import evaluate_snapshot
from shared.evidence import EvidenceSource, PlanEvidence
from shared.inventory import InstanceRef
from shared.journal import JournalEntry, Phase, Trigger
from shared.model import Finding, Mode, Snapshot
from shared.policy import Policy
from shared.rules import REGISTRY

MAX_REPLANS = 3


class Status(StrEnum):
    WOULD = "would"  # dry run: the plan
    FIXED = "fixed"  # written and verified
    REFUSED = "refused"  # unsafe or impossible; the reason says what would unblock it
    SKIPPED = "skipped"  # not acted on (mode, exemption, a dependency failed, nothing left)
    FAILED = "failed"  # the write or its verification failed: an incident
    RESOLVED = "resolved"  # the drift was gone on re-read (someone else fixed it)


@dataclass(frozen=True)
class ActionResult:
    rule_id: str
    resource_id: str
    status: Status
    summary: str
    changes: tuple[Change, ...] = ()
    requests: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class RemediationReport:
    instance_id: str
    dry_run: bool
    correlation_id: str
    results: tuple[ActionResult, ...] = ()
    recovered: tuple[str, ...] = ()  # journal entries of a crashed run, settled first
    remaining: tuple[Finding, ...] = ()  # findings a rescan still shows (apply only)
    stopped: str | None = None  # why nothing was written at all (blast radius)

    @property
    def writes_failed(self) -> bool:
        return any(r.status in (Status.FAILED, Status.REFUSED) for r in self.results if not self.dry_run)


@dataclass(frozen=True)
class RemediateRequest:
    instance_id: str
    trigger: Trigger
    rule_ids: tuple[str, ...] = ()  # empty: every rule with a remediation
    apply: bool = False
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    lease_wait: float = 10.0


class JournalApi(Protocol):
    async def record_intent(
        self,
        instance_id: str,
        *,
        correlation_id: str,
        rule_id: str,
        resource_id: str,
        action: str,
        trigger: Trigger,
        before: str | None,
        after: str | None,
        etag_before: str | None,
    ) -> JournalEntry: ...

    async def record_outcome(
        self, entry: JournalEntry, phase: Phase, *, error: str | None = None, after: str | None = None
    ) -> JournalEntry: ...

    async def unfinished(self, instance_id: str) -> list[JournalEntry]: ...


class Lease(Protocol):
    def assert_held(self) -> None: ...


class LocksApi(Protocol):
    def hold(self, instance_id: str, *, wait: float = ...) -> AbstractAsyncContextManager[Lease]: ...


@dataclass(frozen=True)
class RemediationDeps:
    source: InstanceSource
    arm: ArmApi
    secrets: SecretApi
    journal: JournalApi
    locks: LocksApi
    policy: Policy
    key_vault_url: str | None
    evidence: EvidenceSource  # gateway-log key usage, backend TLS probes: gathered before planning
    today: date | None = None


# -- planning (pure) --------------------------------------------------------------------------


def _describe(step: Step) -> str:
    if isinstance(step, ArmWrite):
        condition = step.describe_condition()
        return step.describe() + (f" {condition}" if condition else "")
    return f"copy the value of {step.named_value_id} into {step.vault_url}/secrets/{step.secret_name}"


def _context(
    policy: Policy, rule_id: str, key_vault_url: str | None, evidence: PlanEvidence, fixed_in_run: frozenset[str]
) -> PlanContext:
    return PlanContext(
        params=policy.params_of(rule_id), key_vault_url=key_vault_url, evidence=evidence, fixed_in_run=fixed_in_run
    )


def plan_findings(
    findings: Sequence[Finding],
    snapshot: Snapshot,
    policy: Policy,
    key_vault_url: str | None,
    *,
    evidence: PlanEvidence | None = None,
    fixed_in_run: frozenset[str] = frozenset(),
) -> list[RemediationPlan | Refusal]:
    """Plans (or refusals) for `findings`, in dependency order, one per finding or one per
    rule where the remediation combines its findings.

    `fixed_in_run`: rules already fixed in this run. A rule planned here counts as fixed for
    the rules planned after it, so a dry run says what the apply would (SEC-001 after ID-001).
    """
    by_rule: dict[str, list[Finding]] = {}
    for finding in findings:
        by_rule.setdefault(finding.rule_id, []).append(finding)
    planned: list[RemediationPlan | Refusal] = []
    fixed = set(fixed_in_run)
    for rule_id in order_rules(list(by_rule)):
        remediation = REMEDIATIONS[rule_id]
        context = _context(policy, rule_id, key_vault_url, evidence or PlanEvidence(), frozenset(fixed))
        if remediation.combine and remediation.combiner is not None:
            results = [remediation.combiner(by_rule[rule_id], snapshot, context)]
        else:
            results = [remediation.plan(f, snapshot, context) for f in by_rule[rule_id]]
        planned.extend(results)
        if any(isinstance(r, RemediationPlan) for r in results):
            fixed.add(rule_id)
    return planned


async def _gather(deps: RemediationDeps, snapshot: Snapshot, chosen: Sequence[Finding]) -> PlanEvidence:
    """Evidence for the chosen findings, the same in a dry run as in an apply."""
    params = {rule_id: deps.policy.params_of(rule_id) for rule_id in {f.rule_id for f in chosen}}
    return await deps.evidence.gather(snapshot, chosen, params)


def _write_count(plans: Sequence[RemediationPlan | Refusal]) -> int:
    return sum(len(p.steps) for p in plans if isinstance(p, RemediationPlan))


def _journal_after(plan: RemediationPlan) -> str:
    """What the journal keeps of a plan: the diff, the requests, the expectations (no secrets:
    plans never hold any)."""
    return json.dumps(
        {
            "summary": plan.summary,
            "changes": [c.__dict__ for c in plan.changes],
            "requests": [_describe(s) for s in plan.steps],
            "expectations": [e.__dict__ for e in plan.expectations],
        }
    )


def _expectations_from(entry: JournalEntry) -> tuple[Expectation, ...]:
    try:
        data: dict[str, Any] = json.loads(entry.after or "{}")
        return tuple(Expectation(**e) for e in data.get("expectations", []))
    except (ValueError, TypeError):
        return ()


# -- the use case -----------------------------------------------------------------------------


async def _resolve(request: RemediateRequest, deps: RemediationDeps) -> InstanceRef:
    refs = await deps.source.discover()
    ref = next((r for r in refs if r.id.lower() == request.instance_id.lower()), None)
    if ref is None or not deps.policy.in_scope(ref.subscription_id, ref.resource_group, dict(ref.tags)):
        raise OutOfScopeError(
            f"not an APIM instance in the configured scope: {request.instance_id} "
            "(check APIMR_SUBSCRIPTION_IDS, APIMR_RESOURCE_GROUPS, APIMR_TAG_SELECTOR and the policy's scope)"
        )
    unknown = [r for r in request.rule_ids if r not in REGISTRY]
    if unknown:
        raise PermanentError(f"unknown rule id(s): {', '.join(unknown)}; known: {', '.join(sorted(REGISTRY))}")
    return ref


def _select(
    findings: Sequence[Finding], request: RemediateRequest, policy: Policy
) -> tuple[list[Finding], list[ActionResult]]:
    """Findings to plan for, and the results explaining the ones left alone."""
    chosen: list[Finding] = []
    left: list[ActionResult] = []
    for f in findings:
        if request.rule_ids and f.rule_id not in request.rule_ids:
            continue
        reason = _skip_reason(f, request, policy)
        if reason is None:
            chosen.append(f)
        else:
            left.append(ActionResult(f.rule_id, f.resource_id, Status.SKIPPED, f.message, detail=reason))
    return chosen, left


def _skip_reason(finding: Finding, request: RemediateRequest, policy: Policy) -> str | None:
    """Why this finding is left alone, or None when it is to be planned."""
    if finding.exemption is not None:
        return f"exempt: {finding.exemption.reason}"
    if finding.rule_id not in REMEDIATIONS or not finding.remediable:
        return "no automatic remediation for this finding"
    mode = policy.mode_of(finding.rule_id)
    if request.apply and mode is not Mode.REMEDIATE:
        return (
            f"{finding.rule_id} is in {mode.value} mode; set rules.{finding.rule_id}.mode: remediate "
            "in the policy to let the product fix it"
        )
    return None


def _would(item: RemediationPlan | Refusal, policy: Policy) -> ActionResult:
    if isinstance(item, Refusal):
        return ActionResult(item.rule_id, item.resource_id, Status.REFUSED, "refused", detail=item.reason)
    mode = policy.mode_of(item.rule_id)
    note = "" if mode is Mode.REMEDIATE else f"{item.rule_id} is in {mode.value} mode: --apply would skip it"
    return ActionResult(
        item.rule_id,
        item.resource_id,
        Status.WOULD,
        item.would(),
        changes=item.changes,
        requests=tuple(_describe(s) for s in item.steps),
        detail=note,
    )


async def remediate(request: RemediateRequest, deps: RemediationDeps) -> RemediationReport:
    ref = await _resolve(request, deps)
    if not request.apply:
        snapshot = await deps.source.read(ref)
        findings = evaluate_snapshot(snapshot, deps.policy, today=deps.today or snapshot.read_at.date())
        chosen, left = _select(findings, request, deps.policy)
        evidence = await _gather(deps, snapshot, chosen)
        plans = plan_findings(chosen, snapshot, deps.policy, deps.key_vault_url, evidence=evidence)
        return RemediationReport(
            instance_id=ref.id,
            dry_run=True,
            correlation_id=request.correlation_id,
            results=tuple([_would(p, deps.policy) for p in plans] + left),
        )
    async with deps.locks.hold(ref.id, wait=request.lease_wait) as lease:
        recovered = await _settle_crashed_runs(ref, deps)
        return await _apply(ref, request, deps, lease, recovered)


async def _settle_crashed_runs(ref: InstanceRef, deps: RemediationDeps) -> tuple[str, ...]:
    """Entries a crashed worker left open: recovered when a re-read shows their planned
    state, abandoned otherwise (this run's fresh plan redoes what is still drifted)."""
    settled = []
    for entry in await deps.journal.unfinished(ref.id):
        expectations = _expectations_from(entry)
        problems = await unmet(expectations, deps.arm) if expectations else ["no expectations recorded"]
        if problems:
            await deps.journal.record_outcome(entry, Phase.ABANDONED, error="; ".join(problems)[:1000])
            settled.append(f"{entry.rule_id} {entry.resource_id}: abandoned ({entry.phase.value}), re-planned")
        else:
            await deps.journal.record_outcome(entry, Phase.RECOVERED)
            settled.append(f"{entry.rule_id} {entry.resource_id}: completed by the crashed run; recorded")
    return tuple(settled)


async def _apply(
    ref: InstanceRef, request: RemediateRequest, deps: RemediationDeps, lease: Lease, recovered: tuple[str, ...]
) -> RemediationReport:
    snapshot = await deps.source.read(ref)
    today = deps.today or snapshot.read_at.date()
    findings = evaluate_snapshot(snapshot, deps.policy, today=today)
    chosen, left = _select(findings, request, deps.policy)
    evidence = await _gather(deps, snapshot, chosen)
    plans = plan_findings(chosen, snapshot, deps.policy, deps.key_vault_url, evidence=evidence)
    cap = deps.policy.max_writes_per_sweep
    writes = _write_count(plans)
    if writes > cap:
        return RemediationReport(
            instance_id=ref.id,
            dry_run=False,
            correlation_id=request.correlation_id,
            results=tuple([_would(p, deps.policy) for p in plans] + left),
            recovered=recovered,
            stopped=(
                f"{writes} writes planned, more than the policy allows in one sweep ({cap}): nothing was "
                "changed. So much drift at once is more likely a deliberate migration; review the plan, "
                "then raise limits.max_writes_per_sweep or remediate rule by rule."
            ),
        )
    results: list[ActionResult] = []
    blocked: set[str] = set()
    fixed: set[str] = set()  # rules fixed so far in this run, for PlanContext.fixed_in_run (issue 8)

    async def check_lease(_: Step) -> None:
        lease.assert_held()

    # Rule by rule, in dependency order, each planned from the freshest snapshot: after a
    # write the instance's ETag has moved (a plan from the old snapshot would only earn a
    # 412), and a dependent (SEC-001 after ID-001) must see what its dependency changed.
    for rule_id in order_rules(sorted({f.rule_id for f in chosen})):
        needs = [d for d in REMEDIATIONS[rule_id].depends_on if d in blocked]
        fresh = [f for f in evaluate_snapshot(snapshot, deps.policy, today=today) if f.rule_id == rule_id]
        current, _ = _select(fresh, request, deps.policy)
        if not current:
            results.append(
                ActionResult(rule_id, ref.id, Status.RESOLVED, rule_id, detail="no longer drifts on a fresh read")
            )
            continue
        wrote = False
        planned = plan_findings(
            current, snapshot, deps.policy, deps.key_vault_url, evidence=evidence, fixed_in_run=frozenset(fixed)
        )
        for item in planned:
            if needs:
                results.append(
                    ActionResult(
                        item.rule_id,
                        item.resource_id,
                        Status.SKIPPED,
                        getattr(item, "summary", item.rule_id),
                        detail=f"needs {', '.join(needs)} first, which did not succeed",
                    )
                )
                blocked.add(rule_id)
                continue
            if isinstance(item, Refusal):
                results.append(_would(item, deps.policy))
                blocked.add(rule_id)
                continue
            result = await _apply_one(item, ref, request, deps, check_lease, evidence, frozenset(fixed))
            if result.status is Status.FIXED:
                wrote = True
                fixed.add(rule_id)
            elif result.status is not Status.RESOLVED:
                blocked.add(rule_id)
            results.append(result)
        if wrote:
            snapshot = await deps.source.read(ref)
    after = await deps.source.read(ref)
    remaining = tuple(f for f in evaluate_snapshot(after, deps.policy, today=today) if not f.exempt)
    return RemediationReport(
        instance_id=ref.id,
        dry_run=False,
        correlation_id=request.correlation_id,
        results=tuple(results + left),
        recovered=recovered,
        remaining=remaining,
    )


async def _apply_one(
    plan: RemediationPlan,
    ref: InstanceRef,
    request: RemediateRequest,
    deps: RemediationDeps,
    check_lease: Callable[[Step], Awaitable[None]],
    evidence: PlanEvidence,
    fixed_in_run: frozenset[str],
) -> ActionResult:
    for attempt in range(1, MAX_REPLANS + 1):
        first = plan.steps[0] if plan.steps else None
        entry = await deps.journal.record_intent(
            ref.id,
            correlation_id=request.correlation_id,
            rule_id=plan.rule_id,
            resource_id=plan.resource_id,
            action=plan.summary,
            trigger=request.trigger,
            before=json.dumps({c.path: c.before for c in plan.changes}),
            after=_journal_after(plan),
            etag_before=first.if_match if isinstance(first, ArmWrite) else None,
        )
        try:
            await apply_plan(plan, deps.arm, deps.secrets, before_each=check_lease)
            entry = await deps.journal.record_outcome(entry, Phase.APPLIED)
            await verify_plan(plan, deps.arm)
        except PreconditionFailed as error:
            await deps.journal.record_outcome(entry, Phase.ABANDONED, error=f"{error}; re-read and re-planned")
            fresh = await _replan(plan, ref, deps, evidence, fixed_in_run)
            if fresh is None:
                return ActionResult(
                    plan.rule_id,
                    plan.resource_id,
                    Status.RESOLVED,
                    plan.summary,
                    detail="the resource changed meanwhile and no longer drifts",
                )
            if isinstance(fresh, Refusal):
                return _would(fresh, deps.policy)
            plan = fresh
            continue
        except RemediatorError as error:
            await deps.journal.record_outcome(entry, Phase.FAILED, error=str(error)[:2000])
            return ActionResult(
                plan.rule_id, plan.resource_id, Status.FAILED, plan.summary, changes=plan.changes, detail=str(error)
            )
        await deps.journal.record_outcome(entry, Phase.VERIFIED)
        return ActionResult(
            plan.rule_id,
            plan.resource_id,
            Status.FIXED,
            plan.summary,
            changes=plan.changes,
            requests=tuple(_describe(s) for s in plan.steps),
            detail=f"verified by re-reading{' after re-planning' if attempt > 1 else ''}",
        )
    return ActionResult(
        plan.rule_id,
        plan.resource_id,
        Status.FAILED,
        plan.summary,
        detail=f"the resource kept changing under us ({MAX_REPLANS} attempts); left for the next sweep",
    )


async def _replan(
    plan: RemediationPlan, ref: InstanceRef, deps: RemediationDeps, evidence: PlanEvidence, fixed_in_run: frozenset[str]
) -> RemediationPlan | Refusal | None:
    """After a 412: re-read, re-evaluate this rule, plan again for the same resource."""
    snapshot = await deps.source.read(ref)
    findings = [
        f
        for f in evaluate_snapshot(snapshot, deps.policy, today=deps.today or snapshot.read_at.date())
        if f.rule_id == plan.rule_id and not f.exempt
    ]
    remediation = REMEDIATIONS[plan.rule_id]
    if remediation.combine:
        if not findings:
            return None
        return plan_findings(
            findings, snapshot, deps.policy, deps.key_vault_url, evidence=evidence, fixed_in_run=fixed_in_run
        )[0]
    same = [f for f in findings if f.resource_id.lower() == plan.resource_id.lower()]
    if not same:
        return None
    return plan_findings(
        same[:1], snapshot, deps.policy, deps.key_vault_url, evidence=evidence, fixed_in_run=fixed_in_run
    )[0]
