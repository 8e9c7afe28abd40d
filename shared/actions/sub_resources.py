"""Remediations that change one APIM sub-resource (subscription, named value, API, backend,
logger, diagnostic) or add an Azure Monitor diagnostic setting to the service.

Each planner reads only the snapshot and returns the exact requests. If-Match: the snapshot
does not carry the ETags of these sub-resources (their list responses have none), while APIM
requires If-Match on every PATCH below. So every PATCH is `etag_from_read`: the executor GETs
the resource just before writing, checks its `guard` — the properties the plan's body was
computed from, as the snapshot showed them — and sends that read's ETag as If-Match. A
concurrent change to what the plan relied on fails the guard (PreconditionFailed: re-plan);
one between that read and the write fails with 412; a concurrent change to any other property
survives because each PATCH sends only what it changes (LOG-003 sends a diagnostic side whole,
so its guard covers the whole side).

Creating PUTs send no If-Match. LOG-002's logger and diagnostic are `create_only` (the
executor checks they are still absent just before); LOG-001's diagnostic setting is the
product's own: see `send_gateway_logs_to_workspace` for why that cannot overwrite someone
else's setting.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from shared.actions import (
    APIM_API_VERSION,
    INSIGHTS_API_VERSION,
    ArmWrite,
    Change,
    CopySecretToVault,
    Digest,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    Step,
    combined_remediation,
    remediation,
)
from shared.evidence import KeyUsage, safe_target
from shared.model import ApimDiagnostic, Finding, Snapshot

BUILTIN_SID = "master"
SUSPEND_COMMENT = "Suspended by apim-remediator: scoped to all APIs (KEY-001)"
DIAGNOSTIC_SETTING_NAME = "apim-remediator"
MAX_DIAGNOSTIC_SETTINGS = 5  # Azure Monitor's limit per resource
AZURE_MONITOR_LOGGER = "azuremonitor"
AZURE_MONITOR_DIAGNOSTIC = "azuremonitor"
_SECURE = {"http": "https", "ws": "wss"}
_VAULT_NAME_INVALID = re.compile(r"[^0-9a-zA-Z-]+")
_VAULT_NAME_MAX = 127
# (finding evidence path, ApimDiagnostic attribute, side, message)
_HEADER_LISTS = (
    ("frontend.request.headers", "frontend_request_headers", "frontend", "request"),
    ("frontend.response.headers", "frontend_response_headers", "frontend", "response"),
    ("backend.request.headers", "backend_request_headers", "backend", "request"),
    ("backend.response.headers", "backend_response_headers", "backend", "response"),
)


def _refuse(finding: Finding, reason: str, resource_id: str | None = None) -> Refusal:
    return Refusal(
        rule_id=finding.rule_id,
        instance_id=finding.instance_id,
        resource_id=resource_id or finding.resource_id,
        reason=reason,
    )


def _gone(finding: Finding, what: str) -> Refusal:
    return _refuse(
        finding,
        f"{what} {finding.resource_id} is not in the snapshot the plan was made from; re-scan and plan again.",
    )


def _same(a: str | None, b: str | None) -> bool:
    return (a or "").strip().lower() == (b or "").strip().lower()


def _guard(resource_id: str, *checks: tuple[str, Any]) -> tuple[Expectation, ...]:
    """What a read just before the write must still show: the state the plan was made from."""
    return tuple(Expectation(resource_id, APIM_API_VERSION, path, value) for path, value in checks)


# -- KEY-001 ------------------------------------------------------------------------------------


@remediation("KEY-001")
def suspend_all_apis_subscription(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """PATCH state=suspended on a subscription whose key opens every API.

    Azure lets any subscription be suspended, the built-in all-access one ("master")
    included (Microsoft Learn, "Subscriptions in Azure API Management": "you can suspend,
    cancel, or delete any subscription (including the built-in all-access subscription)");
    suspending it takes its key away from the portal's test console as well, which the
    summary says. Suspending, not deleting: a person can reactivate it.

    Suspending a key somebody still calls with cuts them off, so the plan needs evidence
    (`context.evidence`): gateway logs that show the key unused for `unused_days` while the
    service's logs were arriving over that whole window. Anything less is a refusal that
    says what was seen or what is missing.
    """
    sub = next((s for s in snapshot.subscriptions if _same(s.id, finding.resource_id)), None)
    if sub is None:
        return _gone(finding, "subscription")
    if sub.state.strip().lower() != "active":
        return _refuse(finding, f"subscription '{sub.sid}' is {sub.state}, not active: nothing to suspend.")
    days = int(context.params.get("unused_days", 30))
    unused = _unused_refusal(finding, sub.sid, days, context.evidence.usage_of(sub.id))
    if unused is not None:
        return unused
    builtin = sub.sid.strip().lower() == BUILTIN_SID
    label = f"'{sub.display_name or sub.sid}' ({sub.sid})"
    summary = f"Suspend subscription {label}, whose key opens every API and was unused for {days} days"
    if builtin:
        summary += " (the built-in all-access subscription: the portal's test console loses its key too)"
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=sub.id,
        summary=summary,
        changes=(
            Change("properties.state", sub.state, "suspended"),
            Change("properties.stateComment", "(not read)", SUSPEND_COMMENT),
        ),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=sub.id,
                api_version=APIM_API_VERSION,
                body={"properties": {"state": "suspended", "stateComment": SUSPEND_COMMENT}},
                if_match=None,
                description=f"PATCH subscription {sub.sid} state=suspended",
                etag_from_read=True,
                guard=_guard(sub.id, ("properties.state", sub.state), ("properties.scope", sub.scope)),
            ),
        ),
        expectations=(Expectation(sub.id, APIM_API_VERSION, "properties.state", "suspended"),),
    )


def _unused_refusal(finding: Finding, sid: str, days: int, usage: KeyUsage | None) -> Refusal | None:
    """None when gateway logs show the key unused for `days`; else a refusal saying why not."""
    what = f"subscription '{sid}'"
    if usage is None:
        return _refuse(
            finding,
            f"no gateway-log evidence was gathered for {what}, so nothing shows its key unused for {days} days; "
            "suspending it could cut its callers off. Plan through the remediation engine, which queries the logs.",
        )
    where = ", ".join(usage.workspaces) or "no workspace"
    if usage.uses > 0:
        last = f", last at {usage.last_used:%Y-%m-%d %H:%M} UTC" if usage.last_used else ""
        return _refuse(
            finding,
            f"gateway logs ({where}) show {what} in use: {usage.uses} request(s) in the last {days} days{last}. "
            "Suspending it would cut those callers off: move them to product- or API-scoped keys first, or exempt it.",
        )
    if usage.missing:
        return _refuse(finding, f"cannot show {what} unused for {days} days: {usage.missing}")
    if usage.service_rows == 0:
        return _refuse(
            finding,
            f"no gateway log rows of the service arrived in {where} in the last {days} days, so seeing no request "
            f"with {what} proves nothing. Check the diagnostic setting sends GatewayLogs, then run again.",
        )
    if usage.logs_since is not None and usage.queried_at is not None:
        covered = usage.queried_at - usage.logs_since
        if covered < timedelta(days=days - 1):
            return _refuse(
                finding,
                f"gateway logs in {where} reach back only {covered.total_seconds() / 86400:.1f} days (oldest row "
                f"{usage.logs_since:%Y-%m-%d %H:%M} UTC), not the {days} days needed to show {what} unused.",
            )
    return None


# -- SEC-001 ------------------------------------------------------------------------------------


def vault_secret_name(service_name: str, named_value: str) -> str:
    """A Key Vault secret name (`^[0-9a-zA-Z-]{1,127}$`) for one named value of one service.

    Deterministic, so a re-plan after a crash writes the same secret. Names that had to be
    changed (characters Key Vault does not allow, or too long) get a short hash of the
    original so two named values never share a secret.
    """
    wanted = f"apim-{service_name}-{named_value}"
    clean = _VAULT_NAME_INVALID.sub("-", wanted).strip("-")
    if clean == wanted and len(clean) <= _VAULT_NAME_MAX:
        return clean
    digest = hashlib.sha256(wanted.encode()).hexdigest()[:8]
    return f"{clean[: _VAULT_NAME_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def _has_system_identity(identity_type: str | None) -> bool:
    return "systemassigned" in (identity_type or "").replace(" ", "").lower().split(",")


@remediation("SEC-001", depends_on=("ID-001",))
def move_secret_named_value_to_key_vault(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Copy a secret named value into Key Vault, then make the named value a reference to it.

    The value never enters the plan: the executor reads it (listValue) and stores it in the
    vault at apply time. APIM resolves the reference with the instance's system-assigned
    identity, which needs "get" on the vault's secrets; the expectation that the reference's
    last status is Success verifies it did.
    """
    nv = next((n for n in snapshot.named_values if _same(n.id, finding.resource_id)), None)
    if nv is None:
        return _gone(finding, "named value")
    if not finding.remediable or not nv.secret:
        return _refuse(
            finding,
            f"named value '{nv.name}' is plain text; only a person can tell whether its value is a secret. If it "
            "is, mark it secret (the next run then moves it into Key Vault) or exempt it.",
        )
    if (nv.key_vault_secret_id or "").strip():
        return _refuse(finding, f"named value '{nv.name}' already references Key Vault: nothing to move.")
    vault = str(context.params.get("vault_url") or context.key_vault_url or "").strip().rstrip("/")
    if "ID-001" in context.fixed_in_run:
        # The system-assigned identity is new in this run: it cannot have been granted the
        # vault yet, and a reference it cannot read would leave APIM without the secret.
        # Checking role assignments (Microsoft.Authorization) comes with another issue; until
        # then the product refuses and names the role to grant.
        principal = snapshot.service.principal_id
        who = (
            f"principal {principal}"
            if principal
            else "the principal of the new system-assigned identity (its id shows once ID-001 has run)"
        )
        return _refuse(
            finding,
            f"the service's system-assigned identity is new in this run (ID-001), so it cannot read "
            f"{vault or 'the Key Vault'} yet: grant 'Key Vault Secrets User' on the vault to {who}. The next run "
            f"moves named value '{nv.name}' once that is granted.",
        )
    identity = snapshot.service.identity_type
    if not _has_system_identity(identity):
        has_user = "userassigned" in (identity or "").replace(" ", "").lower()
        return _refuse(
            finding,
            (
                "the instance has only user-assigned identities and the product does not know which of them may "
                "read the vault; enable the system-assigned identity (ID-001) or switch the named value by hand."
                if has_user
                else "the instance has no managed identity, so APIM could not read a Key Vault reference: needs "
                "ID-001 first (system-assigned identity with get access to the vault's secrets)."
            ),
        )
    if not vault:
        return _refuse(
            finding,
            "no Key Vault is configured to move the secret into: set the product's Key Vault URL "
            "(APIMR_KEY_VAULT_URL).",
        )
    name = vault_secret_name(snapshot.service.name, nv.name)
    identifier = f"{vault}/secrets/{name}"
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=nv.id,
        summary=f"Move secret named value '{nv.display_name or nv.name}' into Key Vault secret '{name}' and "
        "reference it from APIM",
        changes=(
            Change("properties.value", "(secret, kept by APIM)", f"(moved to {identifier})"),
            Change("properties.keyVault.secretIdentifier", "(not set)", identifier),
        ),
        steps=(
            CopySecretToVault(
                named_value_id=nv.id,
                vault_url=vault,
                secret_name=name,
                description=f"copy the value of named value {nv.name} to Key Vault secret {name}",
            ),
            ArmWrite(
                method="PATCH",
                resource_id=nv.id,
                api_version=APIM_API_VERSION,
                body={"properties": {"keyVault": {"secretIdentifier": identifier}, "secret": True}},
                if_match=None,
                description=f"PATCH named value {nv.name} keyVault.secretIdentifier",
                etag_from_read=True,
                # Still a secret held by APIM, not (yet) a vault reference. The secretIdentifier
                # rather than the keyVault object: absent and {"secretIdentifier": null} alike.
                guard=_guard(nv.id, ("properties.secret", True), ("properties.keyVault.secretIdentifier", None)),
            ),
        ),
        expectations=(
            Expectation(nv.id, APIM_API_VERSION, "properties.keyVault.secretIdentifier", identifier),
            Expectation(nv.id, APIM_API_VERSION, "properties.keyVault.lastStatus.code", "Success"),
            Expectation(nv.id, APIM_API_VERSION, "properties.secret", True),
        ),
    )


# -- API-001 ------------------------------------------------------------------------------------


def secure_protocols(protocols: Sequence[str]) -> list[str]:
    """https/wss in place of http/ws, order kept, duplicates dropped."""
    secured: list[str] = []
    for protocol in protocols:
        secure = _SECURE.get(protocol.strip().lower(), protocol.strip().lower())
        if secure not in secured:
            secured.append(secure)
    return secured


@remediation("API-001")
def api_https_only(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH protocols to https/wss only (http -> https, ws -> wss)."""
    api = next((a for a in snapshot.apis if _same(a.id, finding.resource_id)), None)
    if api is None:
        return _gone(finding, "API")
    secured = secure_protocols(api.protocols)
    if not secured or secured == [p.lower() for p in api.protocols]:
        return _refuse(finding, f"API '{api.name}' already accepts only {', '.join(api.protocols) or 'nothing'}.")
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=api.id,
        summary=f"Accept only {' and '.join(secured)} on API '{api.display_name or api.name}'",
        changes=(Change("properties.protocols", ", ".join(api.protocols), ", ".join(secured)),),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=api.id,
                api_version=APIM_API_VERSION,
                body={"properties": {"protocols": secured}},
                if_match=None,
                description=f"PATCH API {api.name} protocols",
                etag_from_read=True,
                guard=_guard(api.id, ("properties.protocols", tuple(api.protocols))),
            ),
        ),
        expectations=(Expectation(api.id, APIM_API_VERSION, "properties.protocols", tuple(secured)),),
    )


# -- API-003 ------------------------------------------------------------------------------------


@remediation("API-003")
def backend_validates_certificates(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """PATCH tls.validateCertificateChain/Name=true on an https backend.

    Only on evidence (`context.evidence`): a TLS handshake from the product to the backend's
    host:port verified the chain (system store plus APIMR_CA_BUNDLE) and the host name. It is
    the product's view, not the gateway's: APIM trusts its own store plus the CA certificates
    uploaded to it. The guard compares the URL by hash: it may carry credentials or a SAS.
    """
    backend = next((b for b in snapshot.backends if _same(b.id, finding.resource_id)), None)
    if backend is None:
        return _gone(finding, "backend")
    if not finding.remediable:
        return _refuse(
            finding,
            f"backend '{backend.name}' is called over plain http: moving it to https needs the backend to serve "
            "TLS, which only its owner can arrange. Change the backend URL once it does, or exempt the backend.",
        )

    target = safe_target(backend.url)
    probe = context.evidence.probe_of(backend.id)
    if probe is None:
        return _refuse(
            finding,
            f"no TLS handshake to backend '{backend.name}' ({target}) was made before planning, so nothing shows "
            "its certificate validates; turning validation on could cut the API's callers off. Plan through the "
            "remediation engine, which probes the backend first.",
        )
    if not probe.ok:
        return _refuse(
            finding,
            f"a TLS handshake to backend '{backend.name}' ({probe.target}) did not validate: {probe.problem}. "
            "With validation on APIM would refuse the backend and the API's callers would get errors: fix the "
            "backend's certificate (or give APIM its CA), and the next run turns validation on.",
        )

    def shown(value: bool | None) -> str:
        return "(not set)" if value is None else str(value).lower()

    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=backend.id,
        summary=f"Validate the certificate chain and name of backend '{backend.name}' (a TLS handshake to "
        f"{probe.target} validated both)",
        changes=(
            Change("properties.tls.validateCertificateChain", shown(backend.validate_certificate_chain), "true"),
            Change("properties.tls.validateCertificateName", shown(backend.validate_certificate_name), "true"),
        ),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=backend.id,
                api_version=APIM_API_VERSION,
                body={"properties": {"tls": {"validateCertificateChain": True, "validateCertificateName": True}}},
                if_match=None,
                description=f"PATCH backend {backend.name} tls validation",
                etag_from_read=True,
                # The flags as planned from, and the https URL that made the finding remediable
                # (and that was probed) — by its hash: the URL may carry user:password@ or ?sig=.
                guard=_guard(
                    backend.id,
                    ("properties.url", Digest.of(backend.url or "")),
                    ("properties.tls.validateCertificateChain", backend.validate_certificate_chain),
                    ("properties.tls.validateCertificateName", backend.validate_certificate_name),
                ),
            ),
        ),
        expectations=(
            Expectation(backend.id, APIM_API_VERSION, "properties.tls.validateCertificateChain", True),
            Expectation(backend.id, APIM_API_VERSION, "properties.tls.validateCertificateName", True),
        ),
    )


# -- LOG-001 ------------------------------------------------------------------------------------


@remediation("LOG-001")
def send_gateway_logs_to_workspace(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """PUT the diagnostic setting 'apim-remediator': GatewayLogs to the policy's workspace, Dedicated tables.

    No If-Match and no If-None-Match: Azure Monitor diagnostic settings carry no ETag and
    their PUT takes neither header, so the write cannot be made conditional. It cannot
    overwrite a person's setting: it writes only the setting named 'apim-remediator', the
    product's own (a person's settings have other names and are never touched); if ours
    already exists it is replaced as a whole, which the diff says. AllMetrics goes along only
    when no other setting of the service sends to the same workspace: Azure Monitor refuses
    (409) a category that another setting already sends to the same destination, and the
    snapshot does not say which metrics the others send.
    """
    service = snapshot.service
    workspace = str(context.params.get("workspace_id") or "").strip()
    if not workspace:
        return _refuse(
            finding,
            "no Log Analytics workspace is configured: set rules.LOG-001.params.workspace_id in the policy.",
            service.id,
        )
    others = [s for s in snapshot.diagnostic_settings if not _same(s.name, DIAGNOSTIC_SETTING_NAME)]
    if len(others) >= MAX_DIAGNOSTIC_SETTINGS:
        return _refuse(
            finding,
            f"the instance already has {len(others)} diagnostic settings, Azure Monitor's limit: enable GatewayLogs "
            f"to {workspace} in one of them by hand.",
            service.id,
        )
    ours = next((s for s in snapshot.diagnostic_settings if _same(s.name, DIAGNOSTIC_SETTING_NAME)), None)
    setting_id = f"{service.id}/providers/Microsoft.Insights/diagnosticSettings/{DIAGNOSTIC_SETTING_NAME}"
    properties: dict[str, Any] = {
        "workspaceId": workspace,
        "logAnalyticsDestinationType": "Dedicated",
        "logs": [{"category": "GatewayLogs", "enabled": True}],
    }
    with_metrics = not any(_same(s.workspace_id, workspace) for s in others)
    if with_metrics:
        properties["metrics"] = [{"category": "AllMetrics", "enabled": True}]
    where = f"diagnosticSettings/{DIAGNOSTIC_SETTING_NAME}"
    changes = [
        Change(where, "(none)" if ours is None else "(replaced as a whole)", "GatewayLogs to the workspace"),
        Change(f"{where}.workspaceId", "(none)" if ours is None else ours.workspace_id or "(none)", workspace),
        Change(
            f"{where}.logAnalyticsDestinationType",
            "(none)" if ours is None else ours.destination_type or "(none)",
            "Dedicated",
        ),
    ]
    if with_metrics:
        changes.append(Change(f"{where}.metrics", "(none)" if ours is None else "(not read)", "AllMetrics"))
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=service.id,
        resource_id=service.id,
        summary=f"Send gateway logs of '{service.name}' to workspace {workspace.rsplit('/', 1)[-1]} "
        "(resource-specific tables)",
        changes=tuple(changes),
        steps=(
            ArmWrite(
                method="PUT",
                resource_id=setting_id,
                api_version=INSIGHTS_API_VERSION,
                body={"properties": properties},
                if_match=None,
                description=f"PUT diagnostic setting {DIAGNOSTIC_SETTING_NAME}",
            ),
        ),
        expectations=(
            Expectation(setting_id, INSIGHTS_API_VERSION, "properties.workspaceId", workspace),
            Expectation(setting_id, INSIGHTS_API_VERSION, "properties.logAnalyticsDestinationType", "Dedicated"),
        ),
    )


# -- LOG-002 ------------------------------------------------------------------------------------


def _azure_monitor_diagnostic_body(logger_id: str) -> dict[str, Any]:
    return {
        "properties": {
            "loggerId": logger_id,
            "logClientIp": True,
            "verbosity": "information",
            "sampling": {"samplingType": "fixed", "percentage": 100},
        }
    }


@remediation("LOG-002")
def wire_azure_monitor_diagnostic(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Create the 'azuremonitor' logger if missing, then create the 'azuremonitor' diagnostic
    pointing at it, or re-point an existing one (PATCH loggerId; nothing else of it changes).

    The re-pointing PATCH is guarded: it goes out only if the diagnostic still points where
    the snapshot said. The creating PUTs are `create_only`: APIM's logger and diagnostic PUT
    take If-Match only to update (REST spec: "not required when creating an entity") and no
    If-None-Match, so the executor reads each just before and writes only while it is still
    absent; a logger or diagnostic a person created meanwhile is left as it is and the plan
    is made again from a fresh read (which then reuses or re-points it). What remains is the
    moment between that read and the PUT.
    """
    service = snapshot.service
    logger_id = f"{service.id}/loggers/{AZURE_MONITOR_LOGGER}"
    logger = next((g for g in snapshot.loggers if _same(g.name, AZURE_MONITOR_LOGGER)), None)
    if logger is not None and not _same(logger.logger_type, "azureMonitor"):
        return _refuse(
            finding,
            f"logger '{logger.name}' has type {logger.logger_type}, but APIM reserves that name for its "
            "azureMonitor logger; rename or delete it by hand.",
        )
    steps: list[Step] = []
    changes: list[Change] = []
    expectations: list[Expectation] = []
    if logger is None:
        logger_id_written = logger_id
        steps.append(
            ArmWrite(
                method="PUT",
                resource_id=logger_id,
                api_version=APIM_API_VERSION,
                body={"properties": {"loggerType": "azureMonitor", "isBuffered": True}},
                if_match=None,
                description=f"PUT logger {AZURE_MONITOR_LOGGER} (azureMonitor)",
                create_only=True,
            )
        )
        changes.append(Change(f"loggers/{AZURE_MONITOR_LOGGER}", "(none)", "azureMonitor logger"))
        expectations.append(Expectation(logger_id, APIM_API_VERSION, "properties.loggerType", "azureMonitor"))
    else:
        logger_id_written = logger.id or logger_id
    diagnostic = next((d for d in snapshot.apim_diagnostics if _same(d.name, AZURE_MONITOR_DIAGNOSTIC)), None)
    diagnostic_id = diagnostic.id if diagnostic is not None else f"{service.id}/diagnostics/{AZURE_MONITOR_DIAGNOSTIC}"
    if diagnostic is None:
        steps.append(
            ArmWrite(
                method="PUT",
                resource_id=diagnostic_id,
                api_version=APIM_API_VERSION,
                body=_azure_monitor_diagnostic_body(logger_id_written),
                if_match=None,
                description=f"PUT diagnostic {AZURE_MONITOR_DIAGNOSTIC}",
                create_only=True,
            )
        )
        changes.append(
            Change(
                f"diagnostics/{AZURE_MONITOR_DIAGNOSTIC}",
                "(none)",
                f"loggerId {logger_id_written}, sampling 100%, verbosity information, client IP logged",
            )
        )
        summary = f"Create the APIM diagnostic '{AZURE_MONITOR_DIAGNOSTIC}' with an azureMonitor logger"
    else:
        steps.append(
            ArmWrite(
                method="PATCH",
                resource_id=diagnostic_id,
                api_version=APIM_API_VERSION,
                body={"properties": {"loggerId": logger_id_written}},
                if_match=None,
                description=f"PATCH diagnostic {diagnostic.name} loggerId",
                etag_from_read=True,
                guard=_guard(diagnostic.id, ("properties.loggerId", diagnostic.logger_id)),
            )
        )
        changes.append(Change("properties.loggerId", diagnostic.logger_id or "(not set)", logger_id_written))
        summary = f"Point the APIM diagnostic '{diagnostic.name}' at the azureMonitor logger"
    expectations.append(Expectation(diagnostic_id, APIM_API_VERSION, "properties.loggerId", logger_id_written))
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=service.id,
        resource_id=diagnostic_id,
        summary=summary,
        changes=tuple(changes),
        steps=tuple(steps),
        expectations=tuple(expectations),
    )


# -- LOG-003 ------------------------------------------------------------------------------------


def _kept(headers: Sequence[str], removed: set[str]) -> list[str]:
    return [h for h in headers if h.strip().lower() not in removed]


def _side_object(diagnostic: ApimDiagnostic, side: str) -> dict[str, Any]:
    """One side's settings as the snapshot read them (wire names), or {} when it had none."""
    text = diagnostic.frontend_json if side == "frontend" else diagnostic.backend_json
    loaded = json.loads(text) if text else {}
    return loaded if isinstance(loaded, dict) else {}


def _holds_objects(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(item, dict) for item in value)


def _leaves(node: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Dotted paths to every value of a JSON object, for a guard.

    Scalars and lists of scalars are leaves (lists as tuples, which the executor compares
    order-insensitively); an object that holds a list of objects (dataMasking's queryParams
    and headers entries) is one leaf, compared as a whole (dict equality ignores key order).
    """
    found: list[tuple[str, Any]] = []
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and not any(_holds_objects(v) for v in value.values()):
            found.extend(_leaves(value, path))
        elif isinstance(value, list) and not _holds_objects(value):
            found.append((path, tuple(value)))
        else:
            found.append((path, value))
    return found


def _header_patch(
    diagnostic: ApimDiagnostic, removals: Mapping[str, set[str]]
) -> tuple[dict[str, Any], list[Change], tuple[Expectation, ...]]:
    """The `frontend`/`backend` objects for a PATCH, the diff lines, and the write's guard.

    APIM replaces a side's object as a whole, so a side is sent whole: its settings as the
    snapshot read them (body bytes, dataMasking, ...) with both header lists (request and
    response), each the current list less the secret-bearing headers. The guard is that
    side as the snapshot read it, every value of it, header lists included (None where a
    list was absent), so a concurrent change to any part of a side we send is never lost.
    """
    body: dict[str, Any] = {}
    changes: list[Change] = []
    checks: dict[str, Any] = {}
    read_whole: dict[str, bool] = {}
    for path, attribute, side, message in _HEADER_LISTS:
        if not any(p.startswith(side + ".") for p in removals):
            continue
        if side not in body:
            body[side] = _side_object(diagnostic, side)
            read_whole[side] = bool(body[side])
            checks.update(_leaves(body[side], f"properties.{side}"))
        current: tuple[str, ...] = getattr(diagnostic, attribute)
        kept = _kept(current, removals.get(path, set()))
        found = body[side].get(message)
        part: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
        headers_path = f"properties.{path}"
        if read_whole[side]:
            # As read: a list (already among the side's leaves) or absent, which must stay absent.
            checks.setdefault(headers_path, None)
        else:  # no side object read (a snapshot without it): the header lists are all there is
            checks[headers_path] = tuple(current) or None
        part["headers"] = kept
        body[side][message] = part
        if kept != list(current):
            changes.append(Change(headers_path, ", ".join(current), ", ".join(kept) or "(none)"))
    return body, changes, _guard(diagnostic.id, *sorted(checks.items()))


@combined_remediation("LOG-003")
def stop_logging_secret_headers(
    findings: Sequence[Finding], snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """One PATCH per diagnostic removing every secret-bearing header the findings name.

    All other headers stay. Each side sent (frontend/backend) goes whole, as the snapshot read
    it: its body-logging and data-masking settings are sent back unchanged.
    """
    first = findings[0]
    by_diagnostic: dict[str, dict[str, set[str]]] = {}
    for finding in findings:
        key = finding.resource_id.strip().lower()
        by_diagnostic.setdefault(key, {}).setdefault(finding.evidence.path, set()).add(
            finding.evidence.actual.strip().lower()
        )
    steps: list[Step] = []
    changes: list[Change] = []
    expectations: list[Expectation] = []
    names: list[str] = []
    for key, removals in by_diagnostic.items():
        diagnostic = next((d for d in snapshot.apim_diagnostics if d.id.strip().lower() == key), None)
        if diagnostic is None:
            missing = next(f for f in findings if f.resource_id.strip().lower() == key)
            return _gone(missing, "diagnostic")
        body, diff, guard = _header_patch(diagnostic, removals)
        if not diff:
            continue
        names.append(diagnostic.name)
        steps.append(
            ArmWrite(
                method="PATCH",
                resource_id=diagnostic.id,
                api_version=APIM_API_VERSION,
                body={"properties": body},
                if_match=None,
                description=f"PATCH diagnostic {diagnostic.name} logged headers",
                etag_from_read=True,
                guard=guard,
            )
        )
        changes.extend(Change(f"diagnostics/{diagnostic.name}.{c.path}", c.before, c.after) for c in diff)
        for side, messages in body.items():
            for message, part in messages.items():
                expectations.append(
                    Expectation(
                        diagnostic.id, APIM_API_VERSION, f"properties.{side}.{message}.headers", tuple(part["headers"])
                    )
                )
    if not steps:
        return _refuse(first, "the headers the findings name are no longer in the snapshot's diagnostics.")
    only_one = len(by_diagnostic) == 1
    return RemediationPlan(
        rule_id=first.rule_id,
        instance_id=snapshot.service.id,
        resource_id=first.resource_id if only_one else snapshot.service.id,
        summary=f"Stop logging secret-bearing headers in APIM diagnostic{'' if only_one else 's'} {', '.join(names)}",
        changes=tuple(changes),
        steps=tuple(steps),
        expectations=tuple(expectations),
    )
