"""Scan: find the APIM instances in scope, read each one's snapshot, run the catalogue.

Read-only. Azure actions (infra/subscription-role.bicep grants exactly these):
    Microsoft.Resources/subscriptions/read
    Microsoft.ResourceGraph/resources/read
    Microsoft.ApiManagement/service/read
    Microsoft.ApiManagement/service/*/read
    Microsoft.ApiManagement/service/subscriptions/listSecrets/action
        (only for subscriptions tracked in the key ledger, to compare keyed hashes)
    Microsoft.Insights/diagnosticSettings/read
and "Key Vault Secrets User" on the key-ledger vault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

from shared.errors import OutOfScopeError, RemediatorError
from shared.evaluation import evaluate
from shared.inventory import InstanceRef
from shared.model import Snapshot
from shared.policy import Policy
from shared.report import InstanceResult, ScanReport

# Instances read at once: each reads its sub-resources concurrently too, and ARM's read
# budget (250, refilling 25/s per principal and subscription) is shared by all of them.
MAX_PARALLEL_INSTANCES = 4


class InstanceSource(Protocol):
    """What a scan needs from Azure."""

    async def discover(self) -> tuple[InstanceRef, ...]: ...

    async def locate(self, instance_id: str) -> InstanceRef | None:
        """One instance in the settings' scope by id (None: not there), without listing
        the estate."""
        ...

    async def read(self, ref: InstanceRef) -> Snapshot: ...


@dataclass(frozen=True)
class ScanRequest:
    """Narrow the configured scope; never widen it."""

    subscription_ids: tuple[str, ...] = ()
    resource_groups: tuple[str, ...] = ()
    instance_ids: tuple[str, ...] = ()


Progress = Callable[[int, int, str], None]


def _selected(ref: InstanceRef, request: ScanRequest, policy: Policy) -> bool:
    if request.subscription_ids and ref.subscription_id.lower() not in {s.lower() for s in request.subscription_ids}:
        return False
    if request.resource_groups and ref.resource_group.lower() not in {g.lower() for g in request.resource_groups}:
        return False
    if request.instance_ids and ref.id.lower() not in {i.lower() for i in request.instance_ids}:
        return False
    return policy.in_scope(ref.subscription_id, ref.resource_group, dict(ref.tags))


async def scan(
    request: ScanRequest,
    source: InstanceSource,
    policy: Policy,
    *,
    policy_file: str,
    today: date | None = None,
    progress: Progress | None = None,
    on_result: Callable[[InstanceResult], None] | None = None,
) -> ScanReport:
    """Scan every instance in scope; one instance's failure never stops the others.

    With `on_result`, each instance's result is handed over as soon as it is ready and not
    kept (the report's `instances` stays empty): a large estate streams to its report
    (`shared/report_stream.py`) instead of accumulating in memory.

    An instance that cannot be read (`RemediatorError`) becomes a result with its error;
    a rule that raises becomes a rule failure in that instance's result. Anything else is a
    bug: the task group cancels the other instances' reads (none is left running against
    Azure after the scan has failed) and the error propagates.
    """
    started = datetime.now(UTC)
    if request.instance_ids:
        # Named instances are read one GET each instead of listing the whole estate.
        located = [await source.locate(i) for i in dict.fromkeys(i.lower() for i in request.instance_ids)]
        refs = tuple(ref for ref in located if ref is not None)
    else:
        refs = await source.discover()
    known = {ref.id.lower() for ref in refs}
    missing = [i for i in request.instance_ids if i.lower() not in known]
    if missing:
        raise OutOfScopeError(
            f"not an APIM instance in the configured scope: {', '.join(missing)} "
            "(check APIMR_SUBSCRIPTION_IDS, APIMR_RESOURCE_GROUPS, APIMR_TAG_SELECTOR and the policy's scope)"
        )
    selected = [ref for ref in refs if _selected(ref, request, policy)]
    gate = asyncio.Semaphore(MAX_PARALLEL_INSTANCES)
    done = 0

    async def one(ref: InstanceRef) -> InstanceResult | None:
        nonlocal done
        async with gate:
            try:
                snapshot = await source.read(ref)
            except RemediatorError as error:
                result = InstanceResult(instance_id=ref.id, error=str(error))
            else:
                evaluation = evaluate(snapshot, policy, today=today or snapshot.read_at.date())
                result = InstanceResult(
                    instance_id=ref.id,
                    findings=evaluation.findings,
                    unreadable=snapshot.unreadable,
                    not_configured=snapshot.not_configured,
                    notes=tuple(policy.tag_problems(dict(snapshot.service.tags))),
                    rule_failures=evaluation.failures,
                )
        done += 1
        if progress is not None:
            progress(done, len(selected), ref.id)
        if on_result is not None:
            on_result(result)
            return None
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(ref)) for ref in selected]
    except BaseExceptionGroup as failed:
        # The first error as itself (not wrapped in a group), with its own cause.
        error = failed.exceptions[0]
        raise error from error.__cause__
    results = [result for task in tasks if (result := task.result()) is not None]
    return ScanReport(
        started=started,
        finished=datetime.now(UTC),
        policy_file=policy_file,
        instances=tuple(sorted(results, key=lambda r: r.instance_id.lower())),
        custom_rules=policy.custom_rules,
    )
