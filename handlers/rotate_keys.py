"""Rotate APIM subscription keys through the Key Vault key ledger (the design's dual-key scheme).

The use case behind `apim-remediator rotate`, the Event Grid events (Key Vault
`SecretNearExpiry` / `SecretExpired`, APIM `SubscriptionCreated`) and, through the engine,
the KEY-002/003/004 remediations. The state machine, its journal and its per-subscription
lease are `shared/rotation.py`; this module chooses what to rotate and checks scope:

- an instance outside the settings' or the policy's scope is refused (`OutOfScopeError`);
- a subscription named that the instance does not have, or that is not active, is refused
  with the reason (nothing is read or written for it);
- without subscriptions named, the KEY findings choose: KEY-002 onboards, KEY-003 (only
  these with `stale`) and KEY-004 rotate (an out-of-step copy is restored first, a
  mislabelled one refused); exempt findings are left alone.

Dry run unless `apply`. Rotations a crashed run left open are finished first. Results are
typed (`shared.rotation.Status`): refused, failed and pending rotations are the ones an
incident is for; each is also one structured log event (`rotation.<status>`).

Event triggers act only where the policy puts the rule (KEY-003 for expiry, KEY-002 for a new
subscription) in `remediate` mode, and on the event's facts only as pointers: the secret or subscription is
read again, the vault version a `SecretNearExpiry` names must still be the current one (so
the event delivered twice rotates once), and scope is checked as for any run.
`GatewayTokenNearExpiry` goes to `handlers/rotate_gateways.py` (self-hosted gateway tokens,
renewed once through the same ledger vault).

Azure actions:
    Microsoft.ApiManagement/service/read
    Microsoft.ApiManagement/service/*/read
    Microsoft.ApiManagement/service/subscriptions/listSecrets/action
    Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action
    Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action
and on the ledger vault "Key Vault Secrets Officer" (secrets list, get, set); Storage Table
and Blob Data Contributor on the product's account (journal, per-subscription leases).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from handlers.job_incidents import report_rotations
from handlers.scan import InstanceSource
from shared.errors import OutOfScopeError, PermanentError, TransientError
from shared.evaluation import evaluate_snapshot
from shared.gateway_rotation import GatewayRotator
from shared.incidents import IncidentApi
from shared.inventory import InstanceRef
from shared.journal import Trigger, TriggerKind
from shared.model import ApimSubscription, Mode, Snapshot
from shared.policy import Policy
from shared.rotation import (
    Action,
    RotationResult,
    RotationTarget,
    Rotator,
    Status,
    rotate_all,
    subscription_parts,
)

LOG = logging.getLogger("apim_remediator.rotate_keys")
KEY_RULES = ("KEY-002", "KEY-003", "KEY-004")
ACTION_OF_RULE = {"KEY-002": Action.ONBOARD, "KEY-003": Action.ROTATE, "KEY-004": Action.ROTATE}
NEAR_EXPIRY_TYPES = ("microsoft.keyvault.secretnearexpiry", "microsoft.keyvault.secretexpired")
CREATED_TYPE = "microsoft.apimanagement.subscriptioncreated"
GATEWAY_TYPE = "microsoft.apimanagement.gatewaytokennearexpiry"


@dataclass(frozen=True)
class RotateKeysRequest:
    instance_id: str
    trigger: Trigger
    subscriptions: tuple[str, ...] = ()  # names (sid) or ARM ids; empty: what the KEY rules flag
    stale: bool = False  # only the stale or expired keys (KEY-003)
    revoke: bool = False  # a leaked key: rotate, then regenerate the old slot too
    apply: bool = False
    grace_seconds: float = 0.0
    concurrency: int = 8


@dataclass(frozen=True)
class RotateKeysReport:
    instance_id: str
    dry_run: bool
    results: tuple[RotationResult, ...] = ()
    resumed: tuple[RotationResult, ...] = ()  # rotations a crashed run left open, finished first

    @property
    def failed(self) -> bool:
        bad = (Status.REFUSED, Status.FAILED, Status.PENDING, Status.BUSY)
        return any(r.status in bad for r in (*self.results, *self.resumed))


@dataclass(frozen=True)
class RotationDeps:
    source: InstanceSource
    policy: Policy
    rotator: Rotator | None  # None: no key-ledger vault configured (APIMR_KEY_VAULT_URL)
    vault_url: str | None = None
    # Self-hosted gateway tokens (handlers/rotate_gateways.py); None: not configured.
    gateways: GatewayRotator | None = None
    # A rotation that could not finish is an incident; None: only logged (and journaled).
    incidents: IncidentApi | None = None


def _rotator(deps: RotationDeps) -> Rotator:
    if deps.rotator is None:
        raise PermanentError("key rotation needs the key-ledger vault: set APIMR_KEY_VAULT_URL")
    return deps.rotator


async def resolve_instance(instance_id: str, source: InstanceSource, policy: Policy) -> InstanceRef:
    refs = await source.discover()
    ref = next((r for r in refs if r.id.lower() == instance_id.strip().lower()), None)
    if ref is None or not policy.in_scope(ref.subscription_id, ref.resource_group, dict(ref.tags)):
        raise OutOfScopeError(
            f"not an APIM instance in the configured scope: {instance_id} "
            "(check APIMR_SUBSCRIPTION_IDS, APIMR_RESOURCE_GROUPS, APIMR_TAG_SELECTOR and the policy's scope)"
        )
    return ref


def _max_age(policy: Policy) -> float:
    value = policy.params_of("KEY-003")["max_age_days"]
    return float(value) if isinstance(value, int | float) else 90.0


def _refused(subscription: str, action: Action, reason: str) -> RotationResult:
    return RotationResult(subscription, action.value, Status.REFUSED, reason)


def choose_targets(
    request: RotateKeysRequest, snapshot: Snapshot, policy: Policy
) -> tuple[list[RotationTarget], list[RotationResult]]:
    """The rotations a request asks for, and refusals for what it names that cannot be rotated."""
    max_age = _max_age(policy)
    targets: list[RotationTarget] = []
    refused: list[RotationResult] = []
    wanted = Action.REVOKE if request.revoke else Action.ROTATE

    def target(sub_id: str, action: Action, rule_id: str | None) -> RotationTarget:
        return RotationTarget(
            instance_id=snapshot.service.id,
            subscription_id=sub_id,
            action=action,
            trigger=request.trigger,
            max_age_days=max_age,
            grace_seconds=request.grace_seconds,
            rule_id=rule_id,
        )

    if request.subscriptions:
        by_name: dict[str, ApimSubscription] = {}
        for sub in snapshot.subscriptions:
            by_name[sub.sid.lower()] = sub
            by_name[sub.id.lower()] = sub
        for named in request.subscriptions:
            found = by_name.get(named.strip().lower())
            if found is None:
                refused.append(
                    _refused(
                        named,
                        wanted,
                        f"out of scope: {named!r} is not a subscription of {snapshot.service.id}; nothing was done",
                    )
                )
            elif found.state.strip().lower() != "active":
                refused.append(
                    _refused(found.id, wanted, f"the subscription is {found.state}: APIM rejects its keys anyway")
                )
            else:
                targets.append(target(found.id, wanted, None))
        return targets, refused
    rules = ("KEY-003",) if request.stale else KEY_RULES
    findings = evaluate_snapshot(snapshot, policy, today=snapshot.read_at.date())
    chosen: dict[str, RotationTarget] = {}
    for finding in findings:
        if finding.rule_id not in rules or finding.exempt:
            continue
        action = Action.REVOKE if request.revoke else ACTION_OF_RULE[finding.rule_id]
        key = finding.resource_id.lower()
        # One rotation per subscription; a rotation covers onboarding and restoring.
        if key not in chosen or chosen[key].action is Action.ONBOARD:
            chosen[key] = target(finding.resource_id, action, finding.rule_id)
    targets.extend(chosen.values())
    return targets, refused


async def rotate_keys(request: RotateKeysRequest, deps: RotationDeps) -> RotateKeysReport:
    """Choose, then rotate (or say what would be rotated) the instance's subscription keys."""
    rotator = _rotator(deps)
    ref = await resolve_instance(request.instance_id, deps.source, deps.policy)
    snapshot = await deps.source.read(ref)
    if not snapshot.readable("subscriptions"):
        raise TransientError(f"the subscriptions of {ref.id} could not be read; nothing was rotated")
    targets, refused = choose_targets(request, snapshot, deps.policy)
    resumed: list[RotationResult] = []
    if request.apply:
        resumed = await rotator.resume_open(ref.id)
    ledger = await rotator.ledger_of(ref.id)
    results = await rotate_all(rotator, targets, apply=request.apply, concurrency=request.concurrency, ledger=ledger)
    report = RotateKeysReport(
        instance_id=ref.id, dry_run=not request.apply, results=tuple(refused + results), resumed=tuple(resumed)
    )
    if request.apply and deps.incidents is not None:
        await report_rotations(
            (*report.resumed, *report.results), ref.id, deps.incidents, run_id=request.trigger.detail
        )
    return report


# -- Event Grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationRequest:
    event_id: str
    event_type: str
    subject: str  # the secret name (Key Vault) or "/subscriptions/{sid}" (APIM)
    source: str  # the event's topic: the vault's or the APIM service's ARM id
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationOutcome:
    status: str  # a shared.rotation.Status value, or ignored / not_configured
    detail: str
    instance_id: str | None = None
    result: RotationResult | None = None  # the rotation the event ran, if it ran one


def _outcome(status: str, detail: str, request: RotationRequest, instance_id: str | None = None) -> RotationOutcome:
    LOG.log(
        logging.WARNING if status in ("refused", "failed", "not_configured") else logging.INFO,
        "%s for %s: %s: %s",
        request.event_type,
        request.subject,
        status,
        detail,
        extra={
            "event": f"rotation.event.{status}",
            "event_id": request.event_id,
            "event_type": request.event_type,
            "resource_id": instance_id or request.source,
        },
    )
    return RotationOutcome(status, detail, instance_id)


async def rotation_not_configured(request: RotationRequest) -> RotationOutcome:
    """What a deployment without the key-ledger vault answers: acknowledged, nothing rotated."""
    return _outcome("not_configured", "no key-ledger vault (APIMR_KEY_VAULT_URL): nothing rotated", request)


def event_rotator(deps: RotationDeps) -> Callable[[RotationRequest], Awaitable[RotationOutcome]]:
    """The events' rotation route over these dependencies. Raises `TransientError` when Event
    Grid should deliver the event again (a rotation left pending or a busy subscription: the
    journal lets the redelivery finish it)."""

    async def handle(request: RotationRequest) -> RotationOutcome:
        outcome = await route(request)
        if outcome.result is not None and outcome.instance_id and deps.incidents is not None:
            await report_rotations((outcome.result,), outcome.instance_id, deps.incidents, run_id=request.event_id)
        return outcome

    async def route(request: RotationRequest) -> RotationOutcome:
        kind = request.event_type.lower()
        if kind == GATEWAY_TYPE:
            from handlers.rotate_gateways import GatewayDeps, gateway_event

            return await gateway_event(request, GatewayDeps(deps.source, deps.policy, deps.gateways))
        if deps.rotator is None or deps.vault_url is None:
            return await rotation_not_configured(request)
        rule_id = "KEY-003" if kind in NEAR_EXPIRY_TYPES else "KEY-002" if kind == CREATED_TYPE else None
        if rule_id is None:
            return _outcome("ignored", "not a rotation event", request)
        mode = deps.policy.mode_of(rule_id)
        if mode is not Mode.REMEDIATE:
            # An event is an automatic trigger: it acts only where the policy lets the product fix.
            return _outcome(
                "skipped", f"{rule_id} is in {mode.value} mode; set rules.{rule_id}.mode: remediate to act on events",
                request,
            )  # fmt: skip
        if kind in NEAR_EXPIRY_TYPES:
            return await _near_expiry(request, deps, deps.rotator, deps.vault_url)
        return await _created(request, deps, deps.rotator)

    return handle


def _finish(result: RotationResult, request: RotationRequest, instance_id: str) -> RotationOutcome:
    if result.status in (Status.PENDING, Status.BUSY):
        raise TransientError(f"rotation of {result.subscription_id} is {result.status.value}: {result.detail}")
    return replace(_outcome(result.status.value, result.detail, request, instance_id), result=result)


async def _near_expiry(
    request: RotationRequest, deps: RotationDeps, rotator: Rotator, vault_url: str
) -> RotationOutcome:
    name = str(request.data.get("ObjectName") or request.subject)
    version = str(request.data.get("Version") or "") or None
    # The secret's id names its vault (https://{vault}/secrets/{name}/{version}): only the ledger's.
    secret_id = str(request.data.get("Id") or "")
    if not secret_id.lower().startswith(vault_url.rstrip("/").lower() + "/secrets/"):
        vault = str(request.data.get("VaultName") or "")
        return _outcome("ignored", f"a secret of vault {vault!r}, not of the key-ledger vault", request)
    copy = await rotator.vault.current(name)
    if copy is None or not copy.subscription_id:
        return _outcome("ignored", f"secret {name!r} is not a ledger secret (no {'apim-subscription-id'} tag)", request)
    try:
        service_id, _ = subscription_parts(copy.subscription_id)
        ref = await resolve_instance(service_id, deps.source, deps.policy)
    except PermanentError as error:
        return _outcome("refused", str(error), request)
    target = RotationTarget(
        instance_id=ref.id,
        subscription_id=copy.subscription_id,
        action=Action.ROTATE,
        trigger=Trigger(TriggerKind.EVENT, f"{request.event_type} {request.event_id}"),
        max_age_days=_max_age(deps.policy),
        only_if_version=version,
        rule_id="KEY-003",
    )
    return _finish(await rotator.rotate(target, apply=True), request, ref.id)


async def _created(request: RotationRequest, deps: RotationDeps, rotator: Rotator) -> RotationOutcome:
    resource = request.data.get("resourceUri")
    subscription_id = resource if isinstance(resource, str) else f"{request.source}{request.subject}"
    try:
        service_id, _ = subscription_parts(subscription_id)
        ref = await resolve_instance(service_id, deps.source, deps.policy)
    except PermanentError as error:
        return _outcome("refused", str(error), request)
    target = RotationTarget(
        instance_id=ref.id,
        subscription_id=subscription_id,
        action=Action.ONBOARD,
        trigger=Trigger(TriggerKind.EVENT, f"{request.event_type} {request.event_id}"),
        max_age_days=_max_age(deps.policy),
        rule_id="KEY-002",
    )
    return _finish(await rotator.rotate(target, apply=True), request, ref.id)


# -- rendering -----------------------------------------------------------------------------------


def render_rotation(report: RotateKeysReport, form: str = "table") -> str:
    """The report as a table or JSON: statuses, subscriptions, reasons and steps, never a key."""
    rows = [*(("resumed", r) for r in report.resumed), *(("", r) for r in report.results)]
    if form == "json":
        return (
            json.dumps(
                {
                    "instance": report.instance_id,
                    "dry_run": report.dry_run,
                    "results": [
                        {
                            "subscription": r.subscription_id,
                            "action": r.action,
                            "status": r.status.value,
                            "detail": r.detail,
                            "op_id": r.op_id,
                            "steps": list(r.steps),
                            "resumed": bool(note) or r.resumed,
                        }
                        for note, r in rows
                    ],
                },
                indent=2,
            )
            + "\n"
        )
    lines = [
        f"key rotation for {report.instance_id}"
        + (" — dry run (nothing changed; --apply to act)" if report.dry_run else "")
    ]
    if not rows:
        lines.append("  nothing to do")
    for note, r in rows:
        name = r.subscription_id.rsplit("/", 1)[-1]
        lines.append(
            f"  {r.status.value.upper():<9} {r.action:<19} {name}: {r.detail}" + (" (resumed)" if note else "")
        )
        lines.extend(f"      - {step}" for step in r.steps)
    return "\n".join(lines) + "\n"


def rotation_json(report: RotateKeysReport) -> dict[str, Any]:
    """The report as the HTTP API answers it (the same document as `--format json`)."""
    body: dict[str, Any] = json.loads(render_rotation(report, "json"))
    return body
