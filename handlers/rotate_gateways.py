"""Renew self-hosted gateway tokens through the Key Vault ledger (`shared/gateway_rotation.py`).

The use case behind `apim-remediator rotate --instance ID --gateways [--gateway NAME ...]
[--force] [--apply]` and the Event Grid event `Microsoft.ApiManagement.GatewayTokenNearExpiry`:

- an instance outside the settings' or the policy's scope is refused (`OutOfScopeError`);
- a gateway named that the instance does not have is refused with the reason;
- each gateway's ledger secret (tagged `apim-gateway-id`, `apim-gateway-key-slot`) is
  onboarded when missing, renewed when its token has at most 7 days left (or always, with
  `--force`): regenerate the key the current token was NOT made from, make a 30-day token
  from it, store it as the new current version (`exp` = the token's expiry);
- renewals a crashed run left open are finished first.

The event acts only where the policy puts key rotation (KEY-003) in `remediate` mode, and on
its facts only as pointers: the gateway is read from `gatewayInfo.gatewayId` (or the topic
and subject), scope is checked as for any run, and the vault's current token is read again;
a token renewed already is not due, so the event delivered twice renews once. A renewal
left pending or a busy gateway raises `TransientError` (Event Grid delivers again).

Azure actions:
    Microsoft.ApiManagement/service/read
    Microsoft.ApiManagement/service/*/read
    Microsoft.ApiManagement/service/gateways/listKeys/action
    Microsoft.ApiManagement/service/gateways/regenerateKey/action
    Microsoft.ApiManagement/service/gateways/generateToken/action
and on the ledger vault "Key Vault Secrets Officer" (secrets list, get, set); Storage Table
and Blob Data Contributor on the product's account (journal, per-gateway leases).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handlers.rotate_keys import RotationOutcome, RotationRequest, _outcome, resolve_instance
from handlers.scan import InstanceSource
from shared.errors import PermanentError, TransientError
from shared.gateway_rotation import GatewayResult, GatewayRotator, GatewayTarget, gateway_parts, renew_all
from shared.journal import Trigger, TriggerKind
from shared.model import Mode
from shared.policy import Policy
from shared.rotation import Status

GATEWAY_EVENT = "microsoft.apimanagement.gatewaytokennearexpiry"


@dataclass(frozen=True)
class RotateGatewaysRequest:
    instance_id: str
    trigger: Trigger
    gateways: tuple[str, ...] = ()  # names or ARM ids; empty: every gateway of the instance
    force: bool = False  # renew even tokens that are not near expiry
    apply: bool = False


@dataclass(frozen=True)
class RotateGatewaysReport:
    instance_id: str
    dry_run: bool
    results: tuple[GatewayResult, ...] = ()
    resumed: tuple[GatewayResult, ...] = ()

    @property
    def failed(self) -> bool:
        bad = (Status.REFUSED, Status.FAILED, Status.PENDING, Status.BUSY)
        return any(r.status in bad for r in (*self.results, *self.resumed))


@dataclass(frozen=True)
class GatewayDeps:
    source: InstanceSource
    policy: Policy
    rotator: GatewayRotator | None  # None: no ledger vault configured (APIMR_KEY_VAULT_URL)


def _rotator(deps: GatewayDeps) -> GatewayRotator:
    if deps.rotator is None:
        raise PermanentError("gateway token renewal needs the key-ledger vault: set APIMR_KEY_VAULT_URL")
    return deps.rotator


async def rotate_gateways(request: RotateGatewaysRequest, deps: GatewayDeps) -> RotateGatewaysReport:
    """Renew (or say what would be renewed) the instance's self-hosted gateway tokens."""
    rotator = _rotator(deps)
    ref = await resolve_instance(request.instance_id, deps.source, deps.policy)
    existing = await rotator.api.gateways(ref.id)
    by_name = {g.lower(): g for g in existing} | {g.rsplit("/", 1)[-1].lower(): g for g in existing}
    refused: list[GatewayResult] = []
    chosen: list[str] = []
    for named in request.gateways or tuple(existing):
        found = by_name.get(named.strip().lower())
        if found is None:
            refused.append(
                GatewayResult(
                    named,
                    "renew",
                    Status.REFUSED,
                    f"out of scope: {named!r} is not a gateway of {ref.id}; nothing done",
                )
            )
        elif found not in chosen:
            chosen.append(found)
    targets = [GatewayTarget(ref.id, g, request.trigger, force=request.force) for g in chosen]
    resumed = await rotator.resume_open(ref.id) if request.apply else []
    ledger = await rotator.ledger_of(ref.id)
    results = await renew_all(rotator, targets, apply=request.apply, ledger=ledger)
    return RotateGatewaysReport(ref.id, not request.apply, tuple(refused + results), tuple(resumed))


def _gateway_of(request: RotationRequest) -> str:
    """The gateway's ARM id from the event: `gatewayInfo.gatewayId` when it is one, else the
    topic (the service) and the subject (`/gateways/{name}`)."""
    info = request.data.get("gatewayInfo") or request.data.get("gateway")
    named = str(info.get("gatewayId") or "") if isinstance(info, Mapping) else ""
    if named.lower().startswith("/subscriptions/"):
        return named
    subject = request.subject if request.subject.lower().startswith("/gateways/") else ""
    if subject:
        return request.source.rstrip("/") + subject
    if named:
        return f"{request.source.rstrip('/')}/gateways/{named}"
    raise PermanentError("the event names no gateway (gatewayInfo.gatewayId or a /gateways/{name} subject)")


async def gateway_event(request: RotationRequest, deps: GatewayDeps) -> RotationOutcome:
    """`GatewayTokenNearExpiry`: renew the gateway's ledger token once."""
    if deps.rotator is None:
        return _outcome("not_configured", "no key-ledger vault (APIMR_KEY_VAULT_URL): nothing renewed", request)
    mode = deps.policy.mode_of("KEY-003")
    if mode is not Mode.REMEDIATE:
        return _outcome(
            "skipped",
            f"key rotation (KEY-003) is in {mode.value} mode; set rules.KEY-003.mode: remediate to act on events",
            request,
        )
    try:
        gateway_id = _gateway_of(request)
        service_id, _ = gateway_parts(gateway_id)
        ref = await resolve_instance(service_id, deps.source, deps.policy)
    except PermanentError as error:
        return _outcome("refused", str(error), request)
    target = GatewayTarget(ref.id, gateway_id, Trigger(TriggerKind.EVENT, f"{request.event_type} {request.event_id}"))
    result = await deps.rotator.renew(target, apply=True)
    if result.status in (Status.PENDING, Status.BUSY):
        raise TransientError(f"renewal of {gateway_id} is {result.status.value}: {result.detail}")
    return _outcome(result.status.value, result.detail, request, ref.id)


def render_gateways(report: RotateGatewaysReport, form: str = "table") -> str:
    """The report as a table or JSON: statuses, gateways, reasons and steps, never a key or token."""
    rows = [*((True, r) for r in report.resumed), *((False, r) for r in report.results)]
    if form == "json":
        body: dict[str, Any] = {
            "instance": report.instance_id,
            "dry_run": report.dry_run,
            "gateways": [
                {
                    "gateway": r.gateway_id,
                    "action": r.action,
                    "status": r.status.value,
                    "detail": r.detail,
                    "op_id": r.op_id,
                    "steps": list(r.steps),
                    "resumed": note or r.resumed,
                }
                for note, r in rows
            ],
        }
        return json.dumps(body, indent=2) + "\n"
    lines = [
        f"gateway token renewal for {report.instance_id}"
        + (" — dry run (nothing changed; --apply to act)" if report.dry_run else "")
    ]
    if not rows:
        lines.append("  no self-hosted gateways")
    for note, r in rows:
        name = r.gateway_id.rsplit("/", 1)[-1]
        lines.append(f"  {r.status.value.upper():<9} {r.action:<8} {name}: {r.detail}" + (" (resumed)" if note else ""))
        lines.extend(f"      - {step}" for step in r.steps)
    return "\n".join(lines) + "\n"
