"""Remediate one APIM instance: read, evaluate, plan, and (only with `apply`) journal,
lease, write with If-Match, verify by re-reading, rescan.

Dry run is the default and the first branch: it plans and says what it would do, including
the plans that earlier fixes unlock. With `apply`, only rules the policy puts in `remediate`
mode are acted on, never exempt findings, and the run has a write budget
(`limits.max_writes_per_run`): a projection over it stops the run before any write (so much
drift at once is more likely a migration), and every executed step is charged, re-plans
included; a spent budget stops the remaining fixes. Every write is journaled before it is
made; an entry a crashed worker left open is settled first (recovered if a re-read shows
its planned state, abandoned otherwise — the fresh plan then redoes it). A 412 means
someone changed the resource after we read it: re-read and re-plan, never clobber.

Service-level fixes (public access, TLS, ciphers, API version floor, identity) go out as ONE
PATCH per run, planned from a read taken right before it, never while the service is not
`Succeeded`, and compared after with that read to notice a concurrent change. Azure runs
such an update for up to an hour: the run waits a bounded time, then journals the
operation URL (phase `running`); a later run polls it and verifies.

Azure actions: those of the scan (handlers/scan.py) plus, when remediating
(infra/subscription-role.bicep with allowRemediation=true grants exactly these):
    Microsoft.ApiManagement/service/write
    Microsoft.ApiManagement/service/tenant/write
    Microsoft.ApiManagement/service/portalsettings/write
    Microsoft.ApiManagement/service/portalconfigs/write
    Microsoft.ApiManagement/service/subscriptions/write
    Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action
    Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action
    Microsoft.ApiManagement/service/namedValues/write
    Microsoft.ApiManagement/service/namedValues/listValue/action
    Microsoft.ApiManagement/service/apis/write
    Microsoft.ApiManagement/service/backends/write
    Microsoft.ApiManagement/service/loggers/write
    Microsoft.ApiManagement/service/diagnostics/write
    Microsoft.ApiManagement/service/certificates/refreshSecret/action
    Microsoft.Insights/diagnosticSettings/write
    Microsoft.OperationalInsights/workspaces/sharedKeys/action
    Microsoft.OperationalInsights/workspaces/read
    Microsoft.OperationalInsights/workspaces/query/read
(sharedKeys/action on LOG-001's destination workspace: ARM's linked check on a diagnostic
setting, else LinkedAuthorizationFailed; the last two are reads for KEY-001's evidence:
whether gateway logs show the key unused; API-003's evidence is a TLS handshake to the backend, no Azure action;
CERT-003's evidence lists the versions of the certificate's Key Vault secret: the data action
vaults/secrets/readMetadata/action on that vault, in "Key Vault Secrets User" or "Key Vault Reader")
and "Key Vault Secrets Officer" on the product's vault (SEC-001); Storage Table Data
Contributor and Blob Data Contributor on the product's own storage account (main.bicep).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

from handlers.scan import InstanceSource
from shared.actions import (
    APIM_API_VERSION,
    REMEDIATIONS,
    ArmWrite,
    Change,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    RotateKey,
    Step,
    order_rules,
)
from shared.actions.executor import (
    ArmApi,
    PreconditionFailed,
    SecretApi,
    apply_plan,
    matches,
    read_path,
    unmet,
    verify_plan,
)
from shared.actions.service_settings import combine_service_plans
from shared.errors import LeaseLost, OutOfScopeError, PermanentError, RemediatorError, error_code_and_message
from shared.evaluation import evaluate_snapshot
from shared.evidence import EvidenceSource, PlanEvidence
from shared.inventory import InstanceRef
from shared.journal import JournalApi, JournalEntry, JournalRefused, Phase, Trigger
from shared.model import Finding, Mode, Snapshot
from shared.policy import Policy
from shared.rotation import Action, RotationTarget, Rotator, is_rotation_entry
from shared.rotation import Status as RotationStatus
from shared.rules import REGISTRY
from shared.snapshot import map_service_body

MAX_REPLANS = 3


class Status(StrEnum):
    WOULD = "would"  # dry run: the plan
    FIXED = "fixed"  # written and verified
    REFUSED = "refused"  # unsafe or impossible; the reason says what would unblock it
    SKIPPED = "skipped"  # not acted on (mode, exemption, a dependency failed, nothing left)
    FAILED = "failed"  # the write or its verification failed: an incident
    RESOLVED = "resolved"  # the drift was gone on re-read (someone else fixed it)
    PENDING = "pending"  # Azure accepted the write and is still applying it; a later run verifies it


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
    stopped: str | None = None  # why the run stopped short: the projection or the spent write budget
    writes: int = 0  # write requests the run sent (apply only), charged against the budget
    snapshot: Snapshot | None = None  # the rescan `remaining` comes from (apply only)

    @property
    def writes_failed(self) -> bool:
        return any(r.status in (Status.FAILED, Status.REFUSED) for r in self.results if not self.dry_run)


@dataclass(frozen=True)
class RemediateRequest:
    instance_id: str
    trigger: Trigger
    rule_ids: tuple[str, ...] = ()  # empty: every rule with a remediation
    apply: bool = False
    # Manual remediation: rules the policy keeps in `detect` mode that this run may apply
    # anyway, because a person named them (the HTTP API allows it to Remediator.Admin only).
    # Honoured only for the rules named, never for an exempt finding or a rule switched off;
    # a named rule is selected even when `rule_ids` narrows the run to others.
    force_rule_ids: tuple[str, ...] = ()
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    lease_wait: float = 10.0


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
    # How long one run waits for a service update before journaling its operation URL and
    # leaving it to a later run (Azure may take an hour; a function has minutes).
    service_wait: float = 120.0
    # KEY-002/003/004: key rotation through the ledger vault (None without APIMR_KEY_VAULT_URL).
    rotator: Rotator | None = None


# -- planning (pure) --------------------------------------------------------------------------


def _describe(step: Step) -> str:
    if isinstance(step, ArmWrite):
        condition = step.describe_condition()
        return step.describe() + (f" {condition}" if condition else "")
    if isinstance(step, RotateKey):
        return step.description
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
    """Plans (or refusals) for `findings` from one snapshot, in dependency order, one per
    finding or one per rule where the remediation combines its findings.

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


@dataclass(frozen=True)
class ServiceUpdate:
    """The service-level plans of a run and the one PATCH they become."""

    plans: tuple[RemediationPlan, ...]
    combined: RemediationPlan


PlannedItem = RemediationPlan | Refusal | ServiceUpdate


def _is_service_level(rule_id: str) -> bool:
    return rule_id in REMEDIATIONS and REMEDIATIONS[rule_id].service_level


def plan_run(
    findings: Sequence[Finding],
    snapshot: Snapshot,
    policy: Policy,
    key_vault_url: str | None,
    evidence: PlanEvidence | None = None,
) -> list[PlannedItem]:
    """What a run would do, in order: the service-level plans as one update first, then every
    other rule's plans, each dependent planned from the snapshot as its dependencies would
    leave it (a dry run shows what ID-001 unlocks, and the write budget counts it)."""
    service = [f for f in findings if _is_service_level(f.rule_id)]
    others = [f for f in findings if not _is_service_level(f.rule_id)]
    items: list[PlannedItem] = []
    projected = snapshot
    done: set[str] = set()
    service_items = plan_findings(service, snapshot, policy, key_vault_url, evidence=evidence)
    plans = tuple(p for p in service_items if isinstance(p, RemediationPlan))
    items.extend(p for p in service_items if isinstance(p, Refusal))
    if plans:
        items.insert(0, ServiceUpdate(plans, combine_service_plans(plans, snapshot)))
        for plan in plans:
            done.add(plan.rule_id)
            project = REMEDIATIONS[plan.rule_id].project
            if project is not None:
                projected = project(projected)
    by_rule: dict[str, list[Finding]] = {}
    for finding in others:
        by_rule.setdefault(finding.rule_id, []).append(finding)
    for rule_id in order_rules(list(by_rule)):
        rule_items = plan_findings(
            by_rule[rule_id], projected, policy, key_vault_url, evidence=evidence, fixed_in_run=frozenset(done)
        )
        items.extend(rule_items)
        if any(isinstance(i, RemediationPlan) for i in rule_items):
            done.add(rule_id)
            project = REMEDIATIONS[rule_id].project
            if project is not None:
                projected = project(projected)
    return items


def _write_count(items: Sequence[PlannedItem]) -> int:
    return sum(
        len(i.combined.steps) if isinstance(i, ServiceUpdate) else len(i.steps)
        for i in items
        if not isinstance(i, Refusal)
    )


def _journal_after(plan: RemediationPlan, *, service_update: bool = False) -> str:
    """What the journal keeps of a plan: the diff, the requests, the expectations (no secrets:
    plans never hold any)."""
    return json.dumps(
        {
            "summary": plan.summary,
            "changes": [c.__dict__ for c in plan.changes],
            "requests": [_describe(s) for s in plan.steps],
            "expectations": [e.__dict__ for e in plan.expectations],
            "service_update": service_update,
        }
    )


def _journal_data(entry: JournalEntry) -> dict[str, Any]:
    try:
        data = json.loads(entry.after or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _expectations_from(entry: JournalEntry) -> tuple[Expectation, ...]:
    try:
        return tuple(Expectation(**e) for e in _journal_data(entry).get("expectations", []))
    except TypeError:
        return ()


# -- the write budget ---------------------------------------------------------------------------


class WriteBudget:
    """The writes one run may still make (`limits.max_writes_per_run`).

    Charged per executed step: a re-plan after a 412, a plan an earlier fix unlocked and a
    finding that appeared mid-run all cost what they send. Per run today; once sweeps fan
    out over a queue, one budget shared across a sweep takes this one's place.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def allows(self, writes: int) -> bool:
        return self.spent + writes <= self.limit

    def charge(self, writes: int = 1) -> None:
        self.spent += writes

    def spent_note(self, left: int) -> str:
        return (
            f"the write budget of this run is spent ({self.spent} of {self.limit} writes): {left} fix(es) left "
            "for the next run (limits.max_writes_per_run)"
        )


# -- the use case -----------------------------------------------------------------------------


async def _resolve(request: RemediateRequest, deps: RemediationDeps) -> InstanceRef:
    ref = await deps.source.locate(request.instance_id)  # one GET, not a listing of the estate
    if ref is None or not deps.policy.in_scope(ref.subscription_id, ref.resource_group, dict(ref.tags)):
        raise OutOfScopeError(
            f"not an APIM instance in the configured scope: {request.instance_id} "
            "(check APIMR_SUBSCRIPTION_IDS, APIMR_RESOURCE_GROUPS, APIMR_TAG_SELECTOR and the policy's scope)"
        )
    unknown = [r for r in (*request.rule_ids, *request.force_rule_ids) if r not in REGISTRY]
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
        if request.rule_ids and f.rule_id not in request.rule_ids and f.rule_id not in request.force_rule_ids:
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
    forced = mode is Mode.DETECT and finding.rule_id in request.force_rule_ids
    if request.apply and mode is not Mode.REMEDIATE and not forced:
        return (
            f"{finding.rule_id} is in {mode.value} mode; set rules.{finding.rule_id}.mode: remediate "
            "in the policy to let the product fix it"
        )
    return None


def _would(
    item: RemediationPlan | Refusal,
    policy: Policy,
    *,
    requests: tuple[str, ...] | None = None,
    forced: Sequence[str] = (),
) -> ActionResult:
    if isinstance(item, Refusal):
        return ActionResult(item.rule_id, item.resource_id, Status.REFUSED, "refused", detail=item.reason)
    mode = policy.mode_of(item.rule_id)
    if mode is Mode.REMEDIATE:
        note = ""
    elif item.rule_id in forced:
        note = f"{item.rule_id} is in {mode.value} mode; named for manual remediation, so an apply acts on it"
    else:
        note = f"{item.rule_id} is in {mode.value} mode: --apply would skip it"
    return ActionResult(
        item.rule_id,
        item.resource_id,
        Status.WOULD,
        item.would(),
        changes=item.changes,
        requests=requests if requests is not None else tuple(_describe(s) for s in item.steps),
        detail=note,
    )


def _would_all(items: Sequence[PlannedItem], policy: Policy, forced: Sequence[str] = ()) -> list[ActionResult]:
    results: list[ActionResult] = []
    for item in items:
        if isinstance(item, ServiceUpdate):
            requests = tuple(_describe(s) for s in item.combined.steps)
            for plan in item.plans:
                result = _would(plan, policy, requests=requests, forced=forced)
                if len(item.plans) > 1:
                    joined = f"one service update with {item.combined.rule_id}"
                    result = replace(result, detail=f"{result.detail}; {joined}" if result.detail else joined)
                results.append(result)
        else:
            results.append(_would(item, policy, forced=forced))
    return results


async def remediate(request: RemediateRequest, deps: RemediationDeps) -> RemediationReport:
    ref = await _resolve(request, deps)
    if not request.apply:
        snapshot = await deps.source.read(ref)
        findings = evaluate_snapshot(snapshot, deps.policy, today=deps.today or snapshot.read_at.date())
        chosen, left = _select(findings, request, deps.policy)
        evidence = await _gather(deps, snapshot, chosen)
        items = plan_run(chosen, snapshot, deps.policy, deps.key_vault_url, evidence)
        return RemediationReport(
            instance_id=ref.id,
            dry_run=True,
            correlation_id=request.correlation_id,
            results=tuple(_would_all(items, deps.policy, request.force_rule_ids) + left),
        )
    async with deps.locks.hold(ref.id, wait=request.lease_wait) as lease:
        settled = await _settle_earlier_runs(ref, deps, lease)
        return await _apply(ref, request, deps, lease, settled)


@dataclass(frozen=True)
class Settlement:
    """What settling the journal left: notes for the report, and why service-level fixes
    must wait this run (an update still running), if they must."""

    notes: tuple[str, ...] = ()
    service_busy: str | None = None


async def _service_state(ref: InstanceRef, deps: RemediationDeps) -> str:
    response = await deps.arm.send("GET", ref.id, APIM_API_VERSION)
    if response.status >= 400:
        raise PermanentError(f"reading {ref.id}: {response.status}")
    return str(read_path(response.body, "properties.provisioningState") or "")


async def _settle_earlier_runs(ref: InstanceRef, deps: RemediationDeps, lease: Lease) -> Settlement:
    """Entries an earlier run left open. A service update with an operation URL is polled:
    still running -> left open (service-level fixes wait); finished -> verified or failed.
    Any other entry is recovered when a re-read shows its planned state, abandoned otherwise
    (this run's fresh plan redoes what is still drifted) — but never while the service is
    still updating, since Azure may yet apply it."""
    notes: list[str] = []
    busy: str | None = None
    state: str | None = None
    rotations = False
    for entry in await deps.journal.unfinished(ref.id):
        if is_rotation_entry(entry):
            # A key rotation is judged step by step from Azure's state, by the rotator.
            rotations = True
            continue
        expectations = _expectations_from(entry)
        label = f"{entry.rule_id} {entry.resource_id}"
        if entry.operation_url:
            operation = await deps.arm.operation_status(entry.operation_url)
            if operation.running:
                busy = f"the service update of an earlier run ({entry.rule_id}) is still running in Azure"
                notes.append(f"{label}: still running in Azure; service-level fixes wait")
                continue
            if operation.status in ("Failed", "Canceled"):
                lease.assert_held()
                await deps.journal.record_outcome(
                    entry, Phase.FAILED, error=f"the operation ended {operation.status}: {operation.error}"[:1000]
                )
                notes.append(f"{label}: the service update ended {operation.status}; re-planned")
                continue
        if _journal_data(entry).get("service_update"):
            state = state if state is not None else await _service_state(ref, deps)
            if state.lower() != "succeeded":
                busy = f"the service is {state or 'in an unknown state'} (an update may still be applying)"
                notes.append(f"{label}: the service is {state}; left open until the update ends")
                continue
        problems = await unmet(expectations, deps.arm) if expectations else ["no expectations recorded"]
        lease.assert_held()
        if not problems:
            phase = Phase.VERIFIED if entry.operation_url else Phase.RECOVERED
            await deps.journal.record_outcome(entry, phase)
            notes.append(
                f"{label}: the service update an earlier run started has landed; verified"
                if entry.operation_url
                else f"{label}: completed by the crashed run; recorded"
            )
        else:
            await deps.journal.record_outcome(entry, Phase.ABANDONED, error="; ".join(problems)[:1000])
            notes.append(f"{label}: abandoned ({entry.phase.value}), re-planned")
    if rotations and deps.rotator is not None:
        lease.assert_held()
        for result in await deps.rotator.resume_open(ref.id):
            notes.append(f"key rotation of {result.subscription_id}: {result.status.value}: {result.detail}")
    return Settlement(tuple(notes), busy)


async def _apply(
    ref: InstanceRef, request: RemediateRequest, deps: RemediationDeps, lease: Lease, settled: Settlement
) -> RemediationReport:
    snapshot = await deps.source.read(ref)
    today = deps.today or snapshot.read_at.date()
    findings = evaluate_snapshot(snapshot, deps.policy, today=today)
    chosen, left = _select(findings, request, deps.policy)
    evidence = await _gather(deps, snapshot, chosen)
    items = plan_run(chosen, snapshot, deps.policy, deps.key_vault_url, evidence)
    budget = WriteBudget(deps.policy.max_writes_per_run)
    projected = _write_count(items)
    if not budget.allows(projected):
        return RemediationReport(
            instance_id=ref.id,
            dry_run=False,
            correlation_id=request.correlation_id,
            results=tuple(_would_all(items, deps.policy, request.force_rule_ids) + left),
            recovered=settled.notes,
            stopped=(
                f"{projected} writes planned (fixes that earlier ones unlock included), more than the policy "
                f"allows in one run ({budget.limit}): nothing was changed. So much drift at once is more likely "
                "a deliberate migration; review the plan, then raise limits.max_writes_per_run or remediate "
                "rule by rule."
            ),
        )
    results: list[ActionResult] = []
    blocked: set[str] = set()
    fixed: set[str] = set()
    stopped: str | None = None

    service_rules = sorted({f.rule_id for f in chosen if _is_service_level(f.rule_id)})
    if service_rules:
        if settled.service_busy:
            results.extend(
                ActionResult(r, ref.id, Status.SKIPPED, r, detail=f"{settled.service_busy}; the next run retries")
                for r in service_rules
            )
            blocked.update(service_rules)
        else:
            outcome = await _apply_service_update(ref, service_rules, snapshot, request, deps, lease, budget)
            results.extend(outcome)
            for result in outcome:
                (fixed if result.status is Status.FIXED else blocked).add(result.rule_id)
            if not budget.allows(1) and any(r.status is Status.SKIPPED for r in outcome):
                stopped = budget.spent_note(len(service_rules))
            snapshot = await deps.source.read(ref)  # re-read after any attempted write

    # Rule by rule, in dependency order, each planned from the freshest snapshot: a dependent
    # (SEC-001 after ID-001) must see what its dependency changed, and after any attempted
    # write the state may have moved.
    others = order_rules(sorted({f.rule_id for f in chosen if not _is_service_level(f.rule_id)}))
    for rule_id in others:
        needs = [d for d in REMEDIATIONS[rule_id].depends_on if d in blocked]
        fresh = [f for f in evaluate_snapshot(snapshot, deps.policy, today=today) if f.rule_id == rule_id]
        current, _ = _select(fresh, request, deps.policy)
        if not current:
            results.append(
                ActionResult(rule_id, ref.id, Status.RESOLVED, rule_id, detail="no longer drifts on a fresh read")
            )
            continue
        attempted = False
        planned = plan_findings(
            current, snapshot, deps.policy, deps.key_vault_url, evidence=evidence, fixed_in_run=frozenset(fixed)
        )
        for item in planned:
            summary = getattr(item, "summary", item.rule_id)
            if needs:
                detail = f"needs {', '.join(needs)} first, which did not succeed"
                results.append(ActionResult(item.rule_id, item.resource_id, Status.SKIPPED, summary, detail=detail))
                blocked.add(rule_id)
                continue
            if isinstance(item, Refusal):
                results.append(_would(item, deps.policy))
                blocked.add(rule_id)
                continue
            if not budget.allows(len(item.steps)):
                stopped = stopped or budget.spent_note(1)
                detail = f"not started: {budget.spent_note(1)}"
                results.append(ActionResult(item.rule_id, item.resource_id, Status.SKIPPED, summary, detail=detail))
                blocked.add(rule_id)
                continue
            attempted = True
            if item.steps and all(isinstance(step, RotateKey) for step in item.steps):
                result = await _apply_rotation(item, ref, request, deps, lease, budget)
            else:
                result = await _apply_one(item, ref, request, deps, lease, budget, evidence, frozenset(fixed))
            if result.status is Status.FIXED:
                fixed.add(rule_id)
            elif result.status is not Status.RESOLVED:
                blocked.add(rule_id)
            results.append(result)
        if attempted:
            snapshot = await deps.source.read(ref)
    # A run that sent nothing and settled nothing leaves the instance as it read it: no rescan.
    after = snapshot if budget.spent == 0 and not settled.notes else await deps.source.read(ref)
    remaining = tuple(f for f in evaluate_snapshot(after, deps.policy, today=today) if not f.exempt)
    return RemediationReport(
        instance_id=ref.id,
        dry_run=False,
        correlation_id=request.correlation_id,
        results=tuple(results + left),
        recovered=settled.notes,
        remaining=remaining,
        stopped=stopped,
        writes=budget.spent,
        snapshot=after,
    )


async def _journal_intent(
    plan: RemediationPlan,
    ref: InstanceRef,
    request: RemediateRequest,
    deps: RemediationDeps,
    lease: Lease,
    *,
    service_update: bool = False,
) -> JournalEntry:
    first = plan.steps[0] if plan.steps else None
    lease.assert_held()  # no journal row without the lease
    return await deps.journal.record_intent(
        ref.id,
        correlation_id=request.correlation_id,
        rule_id=plan.rule_id,
        resource_id=plan.resource_id,
        action=plan.summary,
        trigger=request.trigger,
        before=json.dumps({c.path: c.before for c in plan.changes}),
        after=_journal_after(plan, service_update=service_update),
        etag_before=first.if_match if isinstance(first, ArmWrite) else None,
    )


def _refused_by_journal(plan: RemediationPlan, error: JournalRefused) -> ActionResult:
    return ActionResult(
        plan.rule_id,
        plan.resource_id,
        Status.FAILED,
        plan.summary,
        changes=plan.changes,
        detail=f"not changed: the journal refused to record the intent ({error}); a change that cannot be "
        "journaled is not made",
    )


async def _apply_one(
    plan: RemediationPlan,
    ref: InstanceRef,
    request: RemediateRequest,
    deps: RemediationDeps,
    lease: Lease,
    budget: WriteBudget,
    evidence: PlanEvidence,
    fixed_in_run: frozenset[str],
) -> ActionResult:
    async def before_each(_: Step) -> None:
        lease.assert_held()
        budget.charge()

    for attempt in range(1, MAX_REPLANS + 1):
        try:
            entry = await _journal_intent(plan, ref, request, deps, lease)
        except JournalRefused as error:
            return _refused_by_journal(plan, error)
        try:
            await apply_plan(plan, deps.arm, deps.secrets, before_each=before_each)
            lease.assert_held()
            entry = await deps.journal.record_outcome(entry, Phase.APPLIED, steps_done=len(plan.steps))
            await verify_plan(plan, deps.arm)
        except LeaseLost:
            raise  # the run ends here: another worker may hold the instance now
        except PreconditionFailed as error:
            lease.assert_held()
            # Some steps may have taken effect before the refused one (SEC-001's copy to the
            # vault before its named value's 412): that is a partial change, not an abandoned one.
            phase = Phase.PARTIAL if error.steps_done else Phase.ABANDONED
            await deps.journal.record_outcome(
                entry, phase, error=f"{error}; re-read and re-planned", steps_done=error.steps_done
            )
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
            if not budget.allows(len(fresh.steps)):
                return ActionResult(
                    plan.rule_id,
                    plan.resource_id,
                    Status.SKIPPED,
                    plan.summary,
                    detail=f"re-planned after a concurrent change, but {budget.spent_note(1)}",
                )
            plan = fresh
            continue
        except RemediatorError as error:
            lease.assert_held()
            steps = error.steps_done if entry.phase is Phase.INTENT else len(plan.steps)
            await deps.journal.record_outcome(entry, Phase.FAILED, error=str(error)[:2000], steps_done=steps)
            return ActionResult(
                plan.rule_id, plan.resource_id, Status.FAILED, plan.summary, changes=plan.changes, detail=str(error)
            )
        lease.assert_held()
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


_ROTATION_STATUS = {
    RotationStatus.DONE: Status.FIXED,
    RotationStatus.SKIPPED: Status.RESOLVED,
    RotationStatus.REFUSED: Status.REFUSED,
    RotationStatus.FAILED: Status.FAILED,
    RotationStatus.PENDING: Status.PENDING,
    RotationStatus.BUSY: Status.SKIPPED,
}


async def _apply_rotation(
    plan: RemediationPlan,
    ref: InstanceRef,
    request: RemediateRequest,
    deps: RemediationDeps,
    lease: Lease,
    budget: WriteBudget,
) -> ActionResult:
    """A KEY plan: one rotation by the rotator, which journals every step before it runs and
    holds the subscription's lease besides this run's instance lease."""
    if deps.rotator is None:
        return ActionResult(
            plan.rule_id, plan.resource_id, Status.FAILED, plan.summary, detail="key rotation needs APIMR_KEY_VAULT_URL"
        )
    first = plan.steps[0]
    assert isinstance(first, RotateKey)

    def before_write() -> None:
        lease.assert_held()
        budget.charge()

    max_age = deps.policy.params_of("KEY-003")["max_age_days"]
    target = RotationTarget(
        instance_id=ref.id,
        subscription_id=first.subscription_id,
        action=Action(first.action),
        trigger=request.trigger,
        max_age_days=float(max_age) if isinstance(max_age, int | float) else 90.0,
        rule_id=plan.rule_id,
    )
    lease.assert_held()
    outcome = await deps.rotator.rotate(target, apply=True, before_write=before_write)
    return ActionResult(
        plan.rule_id,
        plan.resource_id,
        _ROTATION_STATUS[outcome.status],
        plan.summary,
        changes=plan.changes,
        requests=outcome.steps or tuple(_describe(s) for s in plan.steps),
        detail=outcome.detail,
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


# -- the one service update of a run ----------------------------------------------------------

# What a service read may change on its own while an update runs: not a concurrent change.
_VOLATILE = frozenset({"provisioningstate", "targetprovisioningstate", "etag", "systemdata", "createdatutc"})


def _expected_after(before: Any, patch: Any) -> Any:
    """`before` with `patch` merged in, the way a PATCH merges (objects merge, values replace)."""
    if isinstance(before, dict) and isinstance(patch, Mapping):
        merged = dict(before)
        for key, value in patch.items():
            match = next((k for k in merged if k.lower() == str(key).lower()), key)
            merged[match] = _expected_after(merged.get(match), value)
        return merged
    return patch


def _differences(expected: Any, actual: Any, path: str) -> list[str]:
    """Paths where `actual` differs from `expected` (keys and strings case-insensitively)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found: list[str] = []
        actual_keys = {str(k).lower(): k for k in actual}
        expected_keys = {str(k).lower(): k for k in expected}
        for lowered in sorted(set(actual_keys) | set(expected_keys)):
            if lowered in _VOLATILE:
                continue
            a = actual.get(actual_keys[lowered]) if lowered in actual_keys else None
            e = expected.get(expected_keys[lowered]) if lowered in expected_keys else None
            name = expected_keys.get(lowered) or actual_keys[lowered]
            found.extend(_differences(e, a, f"{path}.{name}" if path else str(name)))
        return found
    if expected is None and actual in (None, {}, []):
        return []
    return [] if matches(actual, expected) else [path]


def concurrent_changes(before: Mapping[str, Any], patch: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Service paths a read after our update shows differently from the read before it with
    our PATCH applied: somebody (or Azure itself) changed them meanwhile. Paths only, never
    values."""
    sections = ("properties", "identity", "sku", "tags")
    expected = _expected_after({k: before.get(k) for k in sections}, patch)
    actual = {k: after.get(k) for k in sections}
    if "identity" in patch:
        # Azure fills these in when our PATCH gives the service an identity: our change, not another's.
        for side in (expected, actual):
            identity = side.get("identity")
            if isinstance(identity, dict):
                side["identity"] = {k: v for k, v in identity.items() if k.lower() not in ("principalid", "tenantid")}
    return _differences(expected, actual, "")


async def _apply_service_update(
    ref: InstanceRef,
    rule_ids: Sequence[str],
    snapshot: Snapshot,
    request: RemediateRequest,
    deps: RemediationDeps,
    lease: Lease,
    budget: WriteBudget,
) -> list[ActionResult]:
    """Every service-level fix of the run as one PATCH planned from a read right before it."""

    def each(status: Status, detail: str, rules: Sequence[str] = rule_ids) -> list[ActionResult]:
        return [ActionResult(r, ref.id, status, r, detail=detail) for r in rules]

    read = await deps.arm.send("GET", ref.id, APIM_API_VERSION)
    if read.status >= 400 or not isinstance(read.body, dict):
        return each(Status.FAILED, f"reading the service right before its update: {read.status}")
    state = str(read_path(read.body, "properties.provisioningState") or "")
    if state.lower() != "succeeded":
        return each(
            Status.SKIPPED,
            f"the service is {state or 'in an unknown state'}: an operation is running on it (Azure runs one "
            "infrastructure change at a time); service-level fixes wait for the next run",
        )
    fresh = replace(snapshot, service=map_service_body(read.body, ref, read.etag))
    findings = [
        f
        for f in evaluate_snapshot(fresh, deps.policy, today=deps.today or fresh.read_at.date())
        if f.rule_id in rule_ids
    ]
    current, _ = _select(findings, request, deps.policy)
    results: list[ActionResult] = []
    resolved = [r for r in rule_ids if r not in {f.rule_id for f in current}]
    results.extend(each(Status.RESOLVED, "no longer drifts on the read right before the update", resolved))
    plans: list[RemediationPlan] = []
    for item in plan_findings(current, fresh, deps.policy, deps.key_vault_url):
        if isinstance(item, Refusal):
            results.append(_would(item, deps.policy))
        else:
            plans.append(item)
    if not plans:
        return results
    members = [p.rule_id for p in plans]
    combined = combine_service_plans(plans, fresh)
    step = combined.steps[0]
    assert isinstance(step, ArmWrite)
    if not budget.allows(1):
        return results + each(Status.SKIPPED, f"not started: {budget.spent_note(len(members))}", members)
    try:
        entry = await _journal_intent(combined, ref, request, deps, lease, service_update=True)
    except JournalRefused as error:
        refused = _refused_by_journal(combined, error)
        return results + each(Status.FAILED, refused.detail, members)
    lease.assert_held()
    budget.charge()
    try:
        response = await deps.arm.send(
            "PATCH", ref.id, APIM_API_VERSION, body=step.body, if_match=step.if_match, max_wait=deps.service_wait
        )
    except LeaseLost:
        raise
    except RemediatorError as error:
        lease.assert_held()
        await deps.journal.record_outcome(entry, Phase.FAILED, error=str(error)[:2000])
        return results + each(Status.FAILED, str(error), members)
    lease.assert_held()
    if response.operation_url:
        await deps.journal.record_outcome(entry, Phase.RUNNING, operation_url=response.operation_url)
        return results + each(
            Status.PENDING,
            f"Azure accepted the service update and is still applying it after {deps.service_wait:.0f} s (it can "
            "take an hour); its operation is journaled and the next run verifies it",
            members,
        )
    if response.status >= 400:
        code, _ = error_code_and_message(response.body)
        await deps.journal.record_outcome(
            entry,
            Phase.ABANDONED if response.status in (409, 412) else Phase.FAILED,
            error=f"{response.status} {code}".strip(),
        )
        if response.status in (409, 412):
            return results + each(
                Status.SKIPPED,
                f"the service changed or is busy ({response.status} {code}); the next run plans again",
                members,
            )
        message = str(read_path(response.body, "error.message") or "")[:1000]
        refusal = f"{response.status} {code}: {message}" if message else f"{response.status} {code}"
        return results + each(Status.FAILED, f"the service update was refused: {refusal}".strip(), members)
    try:
        entry = await deps.journal.record_outcome(entry, Phase.APPLIED, steps_done=1)
        await verify_plan(combined, deps.arm)
    except LeaseLost:
        raise
    except RemediatorError as error:
        lease.assert_held()
        await deps.journal.record_outcome(entry, Phase.FAILED, error=str(error)[:2000])
        return results + each(Status.FAILED, str(error), members)
    after = await deps.arm.send("GET", ref.id, APIM_API_VERSION)
    others = concurrent_changes(read.body, step.body or {}, after.body if isinstance(after.body, dict) else {})
    note = (
        f"; the service also changed meanwhile at {', '.join(others)} (not by this fix: review the Activity Log)"
        if others
        else ""
    )
    lease.assert_held()
    await deps.journal.record_outcome(entry, Phase.VERIFIED, error=note.lstrip("; ") or None)
    requests = tuple(_describe(s) for s in combined.steps)
    for plan in plans:
        together = f" in one service update with {combined.rule_id}" if len(plans) > 1 else ""
        results.append(
            ActionResult(
                plan.rule_id,
                plan.resource_id,
                Status.FIXED,
                plan.summary,
                changes=plan.changes,
                requests=requests,
                detail=f"verified by re-reading{together}{note}",
            )
        )
    return results
