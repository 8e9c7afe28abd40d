"""Manual use cases behind the HTTP API: which instances are in scope and what was found on
them, a fresh read-only scan, a remediation plan (dry run), and an apply a person asked for.

Framework-free: handlers/api.py (FastAPI) is the adapter that authenticates the caller,
maps errors onto status codes and renders JSON. Everything here takes the authenticated
`Caller` where it matters: an apply records the caller (oid, appid) as the journal's
trigger detail, and applying a rule the policy keeps in `detect` mode needs
`Remediator.Admin` and the rule named in `force_rule_ids`.

Long work (a scan, an apply) runs as an operation (shared/operations.py) in a background
task of this process (`BackgroundWork`); in Azure a long apply belongs on the work queue,
which survives the instance that accepted the request (see docs/architecture.md).

Azure actions: those of handlers/scan.py (reads) and handlers/remediate.py (applies);
Storage Table Data Contributor on the product's account (findings, operations, journal).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from handlers.backup import BackupJobDeps
from handlers.reconcile import ReconcileDeps, ReconcileRequest, reconcile
from handlers.remediate import RemediateRequest, RemediationDeps, RemediationReport, remediate
from handlers.remediation_report import render_remediation_json
from handlers.scan import InstanceSource, ScanRequest, scan
from shared.actions import APIM_API_VERSION, REMEDIATIONS
from shared.actions.executor import ArmApi
from shared.entra import Caller, Role
from shared.errors import NotFoundError, OutOfScopeError, PermanentError, RemediatorError
from shared.findings_store import InstanceSummary, StoredFinding
from shared.inventory import InstanceRef
from shared.journal import Trigger, TriggerKind
from shared.model import Mode
from shared.operations import Operation, OperationKind
from shared.policy import Policy
from shared.report import render_json
from shared.rules import REGISTRY
from shared.settings import Settings

LOG = logging.getLogger("apim_remediator.api")

SERVICE_ID = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{name}"


class ForbiddenError(PermanentError):
    """The caller is authenticated but its roles do not allow this request (HTTP 403)."""


class InvalidRequestError(PermanentError):
    """A request field names something the product cannot act on (HTTP 422, naming the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FindingsReader(Protocol):
    async def instances(self) -> list[InstanceSummary]: ...

    async def summary(self, instance_id: str) -> InstanceSummary | None: ...

    async def findings(self, instance_id: str, *, include_resolved: bool = False) -> list[StoredFinding]: ...


class OperationsApi(Protocol):
    async def start(
        self, kind: OperationKind, instance_id: str, *, caller_oid: str, caller_appid: str
    ) -> Operation: ...

    async def succeed(self, operation_id: str, result: Any) -> Operation: ...

    async def fail(self, operation_id: str, error: str) -> Operation: ...

    async def get(self, operation_id: str) -> Operation: ...


@dataclass(frozen=True)
class ManualDeps:
    settings: Settings
    policy: Policy
    source: InstanceSource
    arm: ArmApi  # only to tell an instance out of scope (it exists) from an unknown one (404)
    findings: FindingsReader
    operations: OperationsApi
    remediation: RemediationDeps
    reconcile: ReconcileDeps


class BackgroundWork:
    """Tasks the API started in this process, referenced until they end (the event loop
    keeps only weak references to tasks). One per API app, never module state."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait for every started task (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# -- which instance -------------------------------------------------------------------------------


def _in_scope(ref: InstanceRef, policy: Policy) -> bool:
    return policy.in_scope(ref.subscription_id, ref.resource_group, dict(ref.tags))


async def locate(subscription_id: str, resource_group: str, name: str, deps: ManualDeps) -> InstanceRef:
    """The instance a path names: OutOfScopeError outside the configured scope (settings or
    policy), NotFoundError when no such APIM instance exists."""
    instance_id = SERVICE_ID.format(sub=subscription_id, rg=resource_group, name=name)
    outside = OutOfScopeError(
        f"not an APIM instance in the configured scope: {instance_id} "
        "(APIMR_SUBSCRIPTION_IDS, APIMR_RESOURCE_GROUPS, APIMR_TAG_SELECTOR and the policy's scope)"
    )
    if subscription_id.lower() not in deps.settings.subscription_ids:
        raise outside
    groups = deps.settings.scope.resource_groups
    if groups and resource_group.lower() not in groups:
        raise outside
    ref = await deps.source.locate(instance_id)
    if ref is not None:
        if not _in_scope(ref, deps.policy):
            raise outside
        return ref
    # Not discovered: either it is filtered out (tags) or it does not exist.
    found = await deps.arm.send("GET", instance_id, APIM_API_VERSION)
    if found.status == 404:
        raise NotFoundError(f"no APIM instance {instance_id}")
    if found.status >= 400:
        raise PermanentError(f"reading {instance_id}: {found.status}")
    raise outside


# -- reads ---------------------------------------------------------------------------------------


def _summary_json(summary: InstanceSummary | None) -> dict[str, Any]:
    if summary is None:
        return {"reconciled": None, "open": None, "open_total": None, "last_error": None}
    return {
        "reconciled": summary.last_reconciled.isoformat() if summary.last_reconciled else None,
        "open": dict(summary.open_by_severity),
        "open_total": summary.open_total,
        "last_error": summary.last_error,
    }


def _ref_json(ref: InstanceRef) -> dict[str, Any]:
    return {
        "id": ref.id,
        "name": ref.name,
        "subscription_id": ref.subscription_id,
        "resource_group": ref.resource_group,
        "location": ref.location,
    }


async def list_instances(deps: ManualDeps) -> dict[str, Any]:
    """Every instance in scope, with its stored finding counts (null: never reconciled)."""
    refs = [r for r in await deps.source.discover() if _in_scope(r, deps.policy)]
    summaries = {s.instance_id.lower(): s for s in await deps.findings.instances()}
    return {
        "instances": [
            {**_ref_json(ref), **_summary_json(summaries.get(ref.id.lower()))}
            for ref in sorted(refs, key=lambda r: r.id.lower())
        ]
    }


def _stored_json(row: StoredFinding) -> dict[str, Any]:
    return {
        "rule": row.rule_id,
        "severity": row.severity.value,
        "title": row.title,
        "message": row.message,
        "resource": row.resource_id,
        "status": row.status.value,
        "exempt": row.exempt,
        "first_seen": row.first_seen.isoformat(),
        "last_seen": row.last_seen.isoformat(),
    }


async def scan_instance(ref: InstanceRef, deps: ManualDeps) -> dict[str, Any]:
    """A fresh, read-only scan of one instance (nothing stored): its JSON report entry."""
    report = await scan(
        ScanRequest(instance_ids=(ref.id,)), deps.source, deps.policy, policy_file=deps.settings.policy_file
    )
    [result] = json.loads(render_json(report))["instances"]
    return {"instance": ref.id, "source": "scan", **{k: v for k, v in result.items() if k != "id"}}


async def instance_findings(ref: InstanceRef, deps: ManualDeps, *, fresh: bool) -> dict[str, Any]:
    if fresh:
        return await scan_instance(ref, deps)
    summary = await deps.findings.summary(ref.id)
    rows = await deps.findings.findings(ref.id)
    return {
        "instance": ref.id,
        "source": "stored",
        **_summary_json(summary),
        "findings": [_stored_json(r) for r in rows],
    }


# -- remediation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemediationAsk:
    """What a caller asks: a plan (dry run, the default) or an apply of some or all rules."""

    dry_run: bool = True
    rule_ids: tuple[str, ...] = ()
    force_rule_ids: tuple[str, ...] = ()


def check_rules(ask: RemediationAsk, policy: Policy) -> None:
    """Every named rule exists and has a remediation; a forced one is not switched off."""
    for name in ("rule_ids", "force_rule_ids"):
        for index, rule_id in enumerate(getattr(ask, name)):
            where = f"body.{name}[{index}]"
            if rule_id not in REGISTRY:
                raise InvalidRequestError(where, f"unknown rule id {rule_id[:20]!r}")
            if rule_id not in REMEDIATIONS:
                raise InvalidRequestError(where, f"{rule_id} has no automatic remediation")
            if name == "force_rule_ids" and policy.mode_of(rule_id) is Mode.OFF:
                raise InvalidRequestError(where, f"{rule_id} is off in the policy: it is not evaluated")


def authorize(ask: RemediationAsk, caller: Caller, policy: Policy) -> None:
    """Operate plans and applies what the policy puts in remediate mode; applying a rule the
    policy keeps in detect mode is manual remediation: Admin, with the rule named in
    force_rule_ids."""
    if not caller.has(Role.OPERATE):
        raise ForbiddenError(f"planning or applying a remediation needs the {Role.OPERATE.value} role")
    if ask.force_rule_ids and not caller.has(Role.ADMIN):
        raise ForbiddenError(
            f"force_rule_ids (manual remediation of a rule the policy keeps in detect mode) needs the "
            f"{Role.ADMIN.value} role"
        )
    if not ask.dry_run:
        detect = [r for r in ask.rule_ids if policy.mode_of(r) is not Mode.REMEDIATE]
        if detect and not caller.has(Role.ADMIN):
            raise ForbiddenError(
                f"{', '.join(detect)}: the policy does not put it in remediate mode; applying it anyway needs the "
                f"{Role.ADMIN.value} role and the rule named in force_rule_ids"
            )


def _request(ref: InstanceRef, ask: RemediationAsk, caller: Caller, correlation_id: str) -> RemediateRequest:
    return RemediateRequest(
        instance_id=ref.id,
        trigger=Trigger(TriggerKind.HTTP, caller.trigger_detail),
        rule_ids=ask.rule_ids,
        force_rule_ids=ask.force_rule_ids,
        apply=not ask.dry_run,
        correlation_id=correlation_id,
    )


def report_json(report: RemediationReport) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(render_remediation_json(report))
    return body


async def plan(ref: InstanceRef, ask: RemediationAsk, caller: Caller, deps: ManualDeps) -> dict[str, Any]:
    """The dry run: what an apply would do. Reads only."""
    report = await remediate(_request(ref, ask, caller, str(uuid.uuid4())), deps.remediation)
    return report_json(report)


async def apply(ref: InstanceRef, ask: RemediationAsk, caller: Caller, deps: ManualDeps) -> dict[str, Any]:
    """Apply (the engine: lease, journal, If-Match, verify). Without narrowing it is a full
    reconcile, whose rescan also refreshes the stored findings; a narrowed or forced apply
    is not (a later reconcile must still run), so it leaves the store to the next one."""
    correlation_id = str(uuid.uuid4())
    if not ask.rule_ids and not ask.force_rule_ids:
        result = await reconcile(
            ReconcileRequest(
                instance_id=ref.id,
                trigger=Trigger(TriggerKind.HTTP, caller.trigger_detail),
                reason="http",
                correlation_id=correlation_id,
            ),
            deps.reconcile,
        )
        assert result.remediation is not None  # no not_before: never coalesced
        return report_json(result.remediation)
    return report_json(await remediate(_request(ref, ask, caller, correlation_id), deps.remediation))


# -- backups and test-restores -----------------------------------------------------------------


async def backup_now(ref: InstanceRef, jobs: BackupJobDeps) -> dict[str, Any]:
    """One backup of the instance now (not waiting for `backups.every_hours`)."""
    from handlers.backup import BackupRequest, run_backups

    result = await run_backups(BackupRequest(instance_ids=(ref.id,), force=True), jobs)
    return {"correlation_id": result.correlation_id, "instances": [_plain(i) for i in result.instances]}


async def restore_test_now(ref: InstanceRef, jobs: BackupJobDeps) -> dict[str, Any]:
    """One test-restore of the instance's latest backup into its designated target now."""
    from handlers.restore_test import RestoreTestRequest, run_restore_tests

    result = await run_restore_tests(RestoreTestRequest(source_ids=(ref.id,), force=True), jobs)
    return {"correlation_id": result.correlation_id, "sources": [_plain(s) for s in result.sources]}


def _plain(item: Any) -> dict[str, Any]:
    plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(item), default=str))
    return plain


# -- operations ----------------------------------------------------------------------------------


async def run_operation(operation: Operation, work: Callable[[], Awaitable[Any]], deps: ManualDeps) -> None:
    """Run `work` and record its end on the operation; never raises (it runs unawaited)."""
    try:
        result = await work()
    except RemediatorError as error:
        LOG.warning("operation %s failed: %s", operation.id, error, extra={"operation_id": operation.id})
        await _record(deps.operations.fail(operation.id, str(error)), operation)
    except Exception:
        LOG.exception("operation %s failed unexpectedly", operation.id, extra={"operation_id": operation.id})
        message = f"internal error (operation {operation.id}: see the Function App's log)"
        await _record(deps.operations.fail(operation.id, message), operation)
    else:
        await _record(deps.operations.succeed(operation.id, result), operation)


async def _record(step: Awaitable[Operation], operation: Operation) -> None:
    try:
        await step
    except Exception:
        # The operation stays `running`: its poller sees no end, the log says why.
        LOG.exception("could not record the end of operation %s", operation.id, extra={"operation_id": operation.id})


async def start(
    kind: OperationKind,
    ref: InstanceRef,
    caller: Caller,
    work: Callable[[], Awaitable[Any]],
    deps: ManualDeps,
    background: BackgroundWork,
) -> Operation:
    operation = await deps.operations.start(kind, ref.id, caller_oid=caller.object_id, caller_appid=caller.app_id)
    background.start(run_operation(operation, work, deps))
    return operation
