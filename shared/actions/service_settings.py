"""Remediations that change the APIM service resource or its tenant-level settings.

Each planner reads only the snapshot, returns the exact request with the snapshot's ETag
as If-Match, and says what a re-read must show. A write the snapshot carries no ETag for is
refused (it could not be guarded against a concurrent change), except portal sign-up, whose
ETag the snapshot does not read: its write takes the ETag of a read just before it, guarded
by the state the plan was made from (see `disable_portal_signup`).

Service-level rules (NET-001, TLS-001/002/003, MGMT-003, ID-001) each plan one PATCH of
the service resource, but the engine never sends them one by one: `combine_service_plans`
folds every service-level plan of a run into ONE PATCH, planned from a read taken right
before writing. The spec gives the service PATCH no If-Match (Azure does not evaluate it),
and APIM documents that protocol and cipher changes can take an hour or more and block
other infrastructure changes meanwhile: one guarded update per run, not six racing ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from shared.actions import (
    APIM_API_VERSION,
    PRODUCT_APIM_API_VERSIONS,
    ArmWrite,
    Change,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    combined_remediation,
    remediation,
)
from shared.model import AccessSetting, Finding, Snapshot
from shared.rules.mgmt import api_version_date
from shared.rules.tls import GW

CUSTOM_PROPERTIES = "properties.customProperties"
DEFAULT_MIN_API_VERSION = "2019-12-01"  # MGMT-003's parameter default


def _refuse(finding: Finding, snapshot: Snapshot, reason: str) -> Refusal:
    return Refusal(
        rule_id=finding.rule_id, instance_id=snapshot.service.id, resource_id=finding.resource_id, reason=reason
    )


def _no_service_etag(finding: Finding, snapshot: Snapshot) -> Refusal | None:
    if snapshot.service.etag:
        return None
    return _refuse(
        finding,
        snapshot,
        "the snapshot carries no ETag for the service, so the write could not be made conditional (If-Match) "
        "and might overwrite a concurrent change. Re-scan the instance; Azure returns an ETag on every service GET.",
    )


# -- NET-001 -----------------------------------------------------------------------------------


def _service_patch(
    rule_id: str,
    snapshot: Snapshot,
    *,
    summary: str,
    changes: tuple[Change, ...],
    body: dict[str, Any],
    what: str,
    expectations: tuple[tuple[str, Any], ...],
) -> RemediationPlan:
    """One PATCH of the service resource, planned from the snapshot (its ETag goes along as
    If-Match, which Azure does not evaluate on this PATCH: see `combine_service_plans`).
    A dict expectation checks only the keys it names (`subset`)."""
    service = snapshot.service
    return RemediationPlan(
        rule_id=rule_id,
        instance_id=service.id,
        resource_id=service.id,
        summary=summary,
        changes=changes,
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=service.id,
                api_version=APIM_API_VERSION,
                body=body,
                if_match=service.etag,
                description=f"PATCH service {what}",
            ),
        ),
        expectations=tuple(
            Expectation(service.id, APIM_API_VERSION, path, value, subset=isinstance(value, dict))
            for path, value in expectations
        ),
    )


GATEWAY_ONLY_NOTE = (
    "an inbound private endpoint carries only the gateway: with public network access disabled the "
    "developer portal and the management API endpoint become unreachable to everyone"
)


@remediation("NET-001", service_level=True)
def disable_public_network_access(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """PATCH publicNetworkAccess=Disabled — only when clients have another way in.

    A private endpoint is a way in for the gateway only (Microsoft Learn, "Connect privately
    to API Management using an inbound private endpoint"): the portal and the management
    endpoint go dark. So over a private endpoint (not an internal VNet, where every endpoint
    stays reachable inside the network) the policy must acknowledge that explicitly with
    `acknowledge_gateway_only: true`, or the fix is refused saying so.
    """
    service = snapshot.service
    approved = [pe for pe in service.private_endpoints if (pe.status or "").lower() == "approved"]
    internal = (service.virtual_network_type or "").lower() == "internal"
    if not approved and not internal:
        return _refuse(
            finding,
            snapshot,
            "disabling public network access would cut every client off: the instance has no approved "
            "private endpoint and no internal VNet integration. Add a private endpoint first, or exempt "
            "NET-001 for this instance.",
        )
    if not internal and not context.params.get("acknowledge_gateway_only", False):
        return _refuse(
            finding,
            snapshot,
            f"clients could still reach the gateway through private endpoint {approved[0].name}, but "
            f"{GATEWAY_ONLY_NOTE}. If that is intended, set rules.NET-001.params.acknowledge_gateway_only: true "
            "in the policy; otherwise exempt NET-001 for this instance.",
        )
    if (refusal := _no_service_etag(finding, snapshot)) is not None:
        return refusal
    path = f"the approved private endpoint {approved[0].name}" if approved else "the internal virtual network"
    return _service_patch(
        finding.rule_id,
        snapshot,
        summary=f"Disable public network access (clients use {path}"
        + (f"; acknowledged: {GATEWAY_ONLY_NOTE})" if approved and not internal else ")"),
        changes=(
            Change("properties.publicNetworkAccess", service.public_network_access or "(not set: Enabled)", "Disabled"),
        ),
        body={"properties": {"publicNetworkAccess": "Disabled"}},
        what="publicNetworkAccess",
        expectations=(("properties.publicNetworkAccess", "Disabled"),),
    )


# -- TLS-001, TLS-002, TLS-003 -------------------------------------------------------------------


def _switch_label(key: str) -> str:
    """'TLS 1.0' style for protocols, the suite name for ciphers."""
    name = key.rsplit(".", 1)[-1]
    return {"Tls10": "TLS 1.0", "Tls11": "TLS 1.1", "Ssl30": "SSL 3.0"}.get(name, name)


def _disable_switches(
    findings: Sequence[Finding], snapshot: Snapshot, what: str, family: str
) -> RemediationPlan | Refusal:
    """One PATCH of the WHOLE customProperties map: the snapshot's map with the findings' switches
    set to "False". A map that leaves a switch out resets it to Azure's default, so every other
    switch is sent exactly as read, and the re-read must show exactly the map that was sent."""
    if not findings:
        raise ValueError("a TLS remediation needs at least one finding")
    first = findings[0]
    service = snapshot.service
    prefix = (GW + family).lower()
    for finding in findings:
        if not finding.evidence.path.lower().startswith(prefix):
            return _refuse(
                finding,
                snapshot,
                f"the finding names {finding.evidence.path!r}, not a switch under {GW + family}: nothing to plan. "
                "Re-scan the instance.",
            )
    if (refusal := _no_service_etag(first, snapshot)) is not None:
        return refusal
    sent = dict(service.custom_properties)
    spelled = {key.lower(): key for key in sent}
    changes = []
    labels = []
    owned: list[str] = []
    for finding in findings:
        key = spelled.get(finding.evidence.path.lower(), finding.evidence.path)
        if key in sent and sent[key] == "False":
            continue  # two findings for one switch
        changes.append(Change(f"{CUSTOM_PROPERTIES}.{key}", sent.get(key, finding.evidence.actual), "False"))
        labels.append(_switch_label(key))
        owned.append(key)
        sent[key] = "False"
    if not changes:
        return _refuse(first, snapshot, "every switch the findings name is already False: the findings are stale.")
    unchanged = len(sent) - len(changes)
    return _service_patch(
        first.rule_id,
        snapshot,
        summary=(
            f"Disable {what.format(', '.join(labels))} (the whole customProperties map is sent: "
            f"{unchanged} other switch{'es' if unchanged != 1 else ''} as read)"
        ),
        changes=tuple(changes),
        body={"properties": {"customProperties": sent}},
        what="customProperties (whole map)",
        # The keys this fix owns must read back False, keys and values compared
        # case-insensitively (Azure answers "False" to "false"). Keys contain dots, which a
        # dotted path cannot address one by one: one subset expectation on the map. The other
        # switches are checked after the write as a concurrent change, not as this fix's work.
        expectations=((CUSTOM_PROPERTIES, dict.fromkeys(owned, "False")),),
    )


@combined_remediation("TLS-001", service_level=True)
def disable_client_legacy_protocols(
    findings: Sequence[Finding], snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Set the client-side SSL 3.0 / TLS 1.0 / TLS 1.1 switches to False."""
    return _disable_switches(findings, snapshot, "{} for clients of the gateway", "Security.Protocols.")


@combined_remediation("TLS-002", service_level=True)
def disable_backend_legacy_protocols(
    findings: Sequence[Finding], snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Set the backend-side SSL 3.0 / TLS 1.0 / TLS 1.1 switches to False."""
    return _disable_switches(findings, snapshot, "{} towards backends", "Security.Backend.Protocols.")


@combined_remediation("TLS-003", service_level=True)
def disable_weak_ciphers(
    findings: Sequence[Finding], snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Set the weak cipher suites' switches to False."""
    return _disable_switches(findings, snapshot, "the cipher suites {}", "Security.Ciphers.")


# -- MGMT-001, MGMT-002, MGMT-003 -----------------------------------------------------------------


def _disable_access(
    finding: Finding, snapshot: Snapshot, setting: AccessSetting | None, what: str
) -> RemediationPlan | Refusal:
    if setting is None:
        return _refuse(finding, snapshot, f"the snapshot holds no {what} setting (it was not read). Re-scan.")
    if not setting.etag:
        return _refuse(
            finding,
            snapshot,
            f"the snapshot carries no ETag for {setting.id}; Azure requires If-Match on this PATCH and the "
            "change must be made against the state that was read. Re-scan.",
        )
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=setting.id,
        summary=f"Disable the {what}",
        changes=(Change("properties.enabled", str(setting.enabled), "False"),),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=setting.id,
                api_version=APIM_API_VERSION,
                body={"properties": {"enabled": False}},
                if_match=setting.etag,
                description=f"PATCH {setting.id.rsplit('/', 2)[-2]}/{setting.id.rsplit('/', 1)[-1]} enabled=false",
            ),
        ),
        expectations=(Expectation(setting.id, APIM_API_VERSION, "properties.enabled", False),),
    )


@remediation("MGMT-001")
def disable_direct_management_api(
    finding: Finding, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """PATCH tenant/access enabled=false with the access setting's ETag."""
    return _disable_access(finding, snapshot, snapshot.tenant_access, "direct management API (tenant access)")


@remediation("MGMT-002")
def disable_git_configuration(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH tenant/gitAccess enabled=false with the Git access setting's ETag."""
    return _disable_access(finding, snapshot, snapshot.git_access, "Git configuration endpoint (tenant gitAccess)")


@remediation("MGMT-003", service_level=True)
def set_min_api_version(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH apiVersionConstraint.minApiVersion to the rule's `min_api_version` parameter.

    Deliberately the policy's floor, not the newest version: ARM then refuses control-plane calls
    with older api-versions, which breaks clients (scripts, IaC pipelines) still on them — that is
    the point, and how far to raise the floor is the policy owner's decision.
    """
    floor = str(context.params.get("min_api_version", DEFAULT_MIN_API_VERSION))
    wanted = api_version_date(floor)
    if wanted is None:
        return _refuse(finding, snapshot, f"the policy's min_api_version {floor!r} is not an api-version (YYYY-MM-DD).")
    oldest_own = min(PRODUCT_APIM_API_VERSIONS)
    own = api_version_date(oldest_own)
    if own is not None and wanted > own:
        return _refuse(
            finding,
            snapshot,
            f"the policy's min_api_version {floor} is newer than api-version {oldest_own}, which this product "
            "itself calls the management API with: the instance would refuse the product's own reads and fixes. "
            f"Use {oldest_own} or older.",
        )
    if (refusal := _no_service_etag(finding, snapshot)) is not None:
        return refusal
    path = "properties.apiVersionConstraint.minApiVersion"
    return _service_patch(
        finding.rule_id,
        snapshot,
        summary=f"Refuse management API calls older than api-version {floor}",
        changes=(Change(path, snapshot.service.min_api_version or "(not set)", floor),),
        body={"properties": {"apiVersionConstraint": {"minApiVersion": floor}}},
        what="apiVersionConstraint.minApiVersion",
        expectations=((path, floor),),
    )


# -- ID-001, ID-002, ID-003 ------------------------------------------------------------------------


def _with_system_identity(snapshot: Snapshot) -> Snapshot:
    """The snapshot as it reads once ID-001's PATCH has landed (for planning what it unlocks)."""
    return replace(snapshot, service=replace(snapshot.service, identity_type="SystemAssigned"))


@remediation("ID-001", service_level=True, project=_with_system_identity)
def enable_system_identity(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH identity type SystemAssigned on a service that has no managed identity."""
    service = snapshot.service
    current = (service.identity_type or "").strip()
    if "userassigned" in current.lower():
        # identity is replaced as a whole: "SystemAssigned, UserAssigned" must list every
        # userAssignedIdentities entry, and the snapshot does not carry that map.
        return _refuse(
            finding,
            snapshot,
            f"the service has a user-assigned identity ({current}); adding the system-assigned one means "
            "sending its userAssignedIdentities map unchanged, which the snapshot does not carry, and sending "
            "less would detach those identities. Add the system-assigned identity by hand.",
        )
    if "systemassigned" in current.lower():
        return _refuse(finding, snapshot, "the service already has a system-assigned identity: the finding is stale.")
    if (refusal := _no_service_etag(finding, snapshot)) is not None:
        return refusal
    return _service_patch(
        finding.rule_id,
        snapshot,
        summary="Enable the system-assigned managed identity",
        changes=(Change("identity.type", current or "(not set)", "SystemAssigned"),),
        body={"identity": {"type": "SystemAssigned"}},
        what="identity SystemAssigned",
        expectations=(("identity.type", "SystemAssigned"),),
    )


@remediation("ID-002")
def disable_portal_signup(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH portalsettings/signup enabled=false (204).

    Azure requires If-Match and the snapshot does not read this resource's ETag, so the
    executor reads it just before writing (`etag_from_read`), checks sign-up is still enabled
    (what the plan was made from) and sends that read's ETag. The PATCH sets one boolean and
    leaves termsOfService alone, so a concurrent change to the terms survives.
    """
    service = snapshot.service
    resource_id = f"{service.id}/portalsettings/signup"
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=service.id,
        resource_id=resource_id,
        summary="Disable self sign-up to the developer portal",
        changes=(Change("properties.enabled", str(snapshot.portal.signup_enabled), "False"),),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=resource_id,
                api_version=APIM_API_VERSION,
                body={"properties": {"enabled": False}},
                if_match=None,
                description="PATCH portalsettings/signup enabled=false",
                etag_from_read=True,
                guard=(Expectation(resource_id, APIM_API_VERSION, "properties.enabled", True),),
            ),
        ),
        expectations=(Expectation(resource_id, APIM_API_VERSION, "properties.enabled", False),),
    )


@remediation("ID-003")
def disable_portal_basic_auth(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    """PATCH portalconfigs/default enableBasicAuth=false (what Azure Policy 1b0d74ac's Modify sets)."""
    portal = snapshot.portal
    resource_id = portal.portal_config_id or finding.resource_id
    if not portal.portal_config_etag:
        return _refuse(
            finding,
            snapshot,
            f"the snapshot carries no ETag for {resource_id}; Azure requires If-Match on this PATCH and the "
            "change must be made against the state that was read. Re-scan.",
        )
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=snapshot.service.id,
        resource_id=resource_id,
        summary="Disable username/password sign-in to the developer portal",
        changes=(Change("properties.enableBasicAuth", str(portal.basic_auth_enabled), "False"),),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=resource_id,
                api_version=APIM_API_VERSION,
                body={"properties": {"enableBasicAuth": False}},
                if_match=portal.portal_config_etag,
                description="PATCH portalconfigs/default enableBasicAuth=false",
            ),
        ),
        expectations=(Expectation(resource_id, APIM_API_VERSION, "properties.enableBasicAuth", False),),
    )


# -- one service update per run ----------------------------------------------------------------------


def _merge(ours: Mapping[str, Any], theirs: Mapping[str, Any], base: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Two PATCH bodies as one. Where both set a value, the one that differs from `base` (what
    the service read showed) wins: each TLS plan sends the whole customProperties map with only
    its own switches changed. Two different changes of one value cannot be merged."""
    merged = dict(ours)
    for key, value in theirs.items():
        path = f"{where}.{key}" if where else key
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            below = base.get(key)
            merged[key] = _merge(merged[key], value, below if isinstance(below, Mapping) else {}, path)
        elif merged[key] != value:
            if key in base and merged[key] == base[key]:
                merged[key] = value
            elif not (key in base and value == base[key]):
                raise ValueError(f"two service-level fixes set {path} differently: {merged[key]!r} and {value!r}")
    return merged


def combine_service_plans(plans: Sequence[RemediationPlan], snapshot: Snapshot) -> RemediationPlan:
    """Every service-level plan of a run as ONE PATCH of the service resource.

    The plans must all come from `snapshot`, which the engine reads right before writing.
    The result carries every plan's changes and expectations; its rule id joins theirs
    (e.g. "ID-001+TLS-001"), which is how the journal names the combined write.
    """
    if not plans:
        raise ValueError("no service-level plan to combine")
    service = snapshot.service
    base: dict[str, Any] = {"properties": {"customProperties": dict(service.custom_properties)}}
    body: dict[str, Any] = {}
    for plan in plans:
        writes = [s for s in plan.steps if isinstance(s, ArmWrite)]
        if len(writes) != 1 or len(plan.steps) != 1 or writes[0].method != "PATCH" or writes[0].body is None:
            raise ValueError(f"{plan.rule_id} is not a single service PATCH and cannot be combined")
        if writes[0].resource_id.lower() != service.id.lower():
            raise ValueError(f"{plan.rule_id} writes {writes[0].resource_id}, not the service {service.id}")
        body = _merge(body, writes[0].body, base, "")
    if len(plans) == 1:
        return plans[0]
    rule_ids = [p.rule_id for p in plans]
    return RemediationPlan(
        rule_id="+".join(rule_ids),
        instance_id=service.id,
        resource_id=service.id,
        summary="One service update: " + "; ".join(p.summary[0].lower() + p.summary[1:] for p in plans),
        changes=tuple(c for p in plans for c in p.changes),
        steps=(
            ArmWrite(
                method="PATCH",
                resource_id=service.id,
                api_version=APIM_API_VERSION,
                body=body,
                if_match=service.etag,
                description=f"PATCH service ({', '.join(rule_ids)})",
            ),
        ),
        expectations=tuple(e for p in plans for e in p.expectations),
    )
