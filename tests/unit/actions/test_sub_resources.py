"""Sub-resource remediations planned from `tests.factories` snapshots: the exact requests,
the diff, the expectations, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from shared.actions import (
    APIM_API_VERSION,
    INSIGHTS_API_VERSION,
    REMEDIATIONS,
    ArmWrite,
    CopySecretToVault,
    Digest,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    order_rules,
)
from shared.actions.executor import ArmResponse, PreconditionFailed, apply_plan
from shared.actions.sub_resources import SUSPEND_COMMENT, secure_protocols, vault_secret_name
from shared.evidence import KeyUsage, PlanEvidence, TlsProbe, safe_target
from shared.model import Api, ApimDiagnostic, DiagnosticLog, DiagnosticSetting, Finding, Logger, NamedValue, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import NOW, SERVICE_ID, VAULT, WORKSPACE_ID, compliant, service, sub_id, subscription

NO_CONTEXT = PlanContext(params={}, key_vault_url=None)
DIAG_ID = f"{SERVICE_ID}/diagnostics/azuremonitor"
LOGGER_ID = f"{SERVICE_ID}/loggers/azuremonitor"
SETTING_ID = f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/apim-remediator"
OTHER_WORKSPACE = WORKSPACE_ID.replace("/law", "/law-security")


def unused(sid: str, *, days: int = 30, **changes: Any) -> KeyUsage:
    """Gateway logs that show this subscription's key unused, with logs arriving all along."""
    base = KeyUsage(
        subscription_id=sub_id(sid),
        sid=sid,
        window_days=days,
        workspaces=("law",),
        service_rows=1200,
        logs_since=NOW - timedelta(days=days - 0.5),
        queried_at=NOW,
    )
    return replace(base, **changes)


def fine_evidence(snapshot: Snapshot) -> PlanEvidence:
    """Evidence that lets every fix go ahead: keys unused, backends' certificates valid."""
    return PlanEvidence(
        key_usage=tuple(unused(s.sid) for s in snapshot.subscriptions),
        tls_probes=tuple(TlsProbe(b.id, safe_target(b.url), ok=True) for b in snapshot.backends),
    )


def context(
    rule_id: str, key_vault_url: str | None = None, evidence: PlanEvidence | None = None, **params: Any
) -> PlanContext:
    return PlanContext(
        params={**REGISTRY[rule_id].defaults(), **params},
        key_vault_url=key_vault_url,
        evidence=evidence or PlanEvidence(),
    )


def findings(rule_id: str, snapshot: Snapshot, **params: Any) -> list[Finding]:
    found = evaluate_rule(rule_id, snapshot, params)
    assert found, f"{rule_id} found nothing to fix"
    return found


def plan_one(rule_id: str, snapshot: Snapshot, ctx: PlanContext | None = None, **params: Any) -> RemediationPlan:
    (finding,) = findings(rule_id, snapshot, **params)
    result = REMEDIATIONS[rule_id].plan(
        finding, snapshot, ctx or context(rule_id, evidence=fine_evidence(snapshot), **params)
    )
    assert isinstance(result, RemediationPlan), result
    assert result.rule_id == rule_id
    assert result.instance_id == SERVICE_ID
    return result


def refused(rule_id: str, snapshot: Snapshot, ctx: PlanContext | None = None, **params: Any) -> Refusal:
    (finding,) = findings(rule_id, snapshot, **params)
    result = REMEDIATIONS[rule_id].plan(finding, snapshot, ctx or context(rule_id, **params))
    assert isinstance(result, Refusal), result
    assert result.rule_id == rule_id
    assert result.instance_id == SERVICE_ID
    return result


def only_write(plan: RemediationPlan) -> ArmWrite:
    (step,) = plan.steps
    assert isinstance(step, ArmWrite)
    return step


def guard(resource_id: str, *checks: tuple[str, Any]) -> tuple[Expectation, ...]:
    return tuple(Expectation(resource_id, APIM_API_VERSION, path, value) for path, value in checks)


def test_registered_and_ordered() -> None:
    for rule_id in ("KEY-001", "SEC-001", "API-001", "API-003", "LOG-001", "LOG-002", "LOG-003"):
        assert rule_id in REMEDIATIONS
    for rotation in ("KEY-002", "KEY-003", "KEY-004"):
        assert rotation in REMEDIATIONS  # key rotation (shared/actions/keys.py)
    assert REMEDIATIONS["KEY-003"].depends_on == ("KEY-004",)
    assert REMEDIATIONS["SEC-001"].depends_on == ("ID-001",)
    assert REMEDIATIONS["LOG-003"].combine is True
    ordered = order_rules(["SEC-001", "ID-001", "API-001"])
    assert ordered.index("ID-001") < ordered.index("SEC-001")


# -- KEY-001 --------------------------------------------------------------------------------------


def all_apis(sid: str, **changes: Any) -> Snapshot:
    return compliant(subscriptions=(*compliant().subscriptions, subscription(sid, scope="/apis", **changes)))


def test_key_001_suspends_the_all_apis_subscription() -> None:
    plan = plan_one("KEY-001", all_apis("everything"))
    assert plan.resource_id == sub_id("everything")
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=sub_id("everything"),
        api_version=APIM_API_VERSION,
        body={"properties": {"state": "suspended", "stateComment": SUSPEND_COMMENT}},
        if_match=None,
        description="PATCH subscription everything state=suspended",
        etag_from_read=True,
        guard=guard(sub_id("everything"), ("properties.state", "active"), ("properties.scope", "/apis")),
    )
    assert [(c.path, c.before, c.after) for c in plan.changes] == [
        ("properties.state", "active", "suspended"),
        ("properties.stateComment", "(not read)", SUSPEND_COMMENT),
    ]
    assert plan.expectations == (Expectation(sub_id("everything"), APIM_API_VERSION, "properties.state", "suspended"),)
    assert "test console" not in plan.summary
    assert plan.would().startswith("would suspend subscription")


def test_key_001_suspends_the_builtin_subscription_too_and_says_what_it_costs() -> None:
    # Azure allows suspending the built-in all-access subscription (Microsoft Learn).
    snapshot = compliant(
        subscriptions=(subscription("master", display_name="Built-in all-access subscription", scope=f"{SERVICE_ID}/"),)
    )
    plan = plan_one("KEY-001", snapshot)
    assert only_write(plan).resource_id == sub_id("master")
    assert only_write(plan).guard == guard(
        sub_id("master"), ("properties.state", "active"), ("properties.scope", f"{SERVICE_ID}/")
    )
    assert "test console" in plan.summary


def test_key_001_refuses_a_subscription_the_snapshot_does_not_have() -> None:
    snapshot = all_apis("everything")
    (finding,) = evaluate_rule("KEY-001", snapshot)
    result = REMEDIATIONS["KEY-001"].plan(finding, compliant(), context("KEY-001"))
    assert isinstance(result, Refusal)
    assert "not in the snapshot" in result.reason


# KEY-001 acts on evidence (issue 8, "no lock-outs"): gateway logs that show the key unused.


def key_refusal(usage: KeyUsage | None, **params: Any) -> str:
    snapshot = all_apis("everything")
    evidence = PlanEvidence(key_usage=(usage,) if usage else ())
    reason = refused("KEY-001", snapshot, context("KEY-001", evidence=evidence, **params)).reason
    assert "primaryKey" not in reason
    assert "key-value" not in reason
    return reason


def test_key_001_refuses_without_gateway_log_evidence() -> None:
    assert "no gateway-log evidence was gathered for subscription 'everything'" in key_refusal(None)


def test_key_001_refuses_a_key_the_logs_show_in_use_and_says_what_was_seen() -> None:
    reason = key_refusal(unused("everything", uses=42, last_used=NOW - timedelta(days=2)))
    assert "show subscription 'everything' in use: 42 request(s) in the last 30 days" in reason
    assert "last at 2026-11-21 12:00 UTC" in reason
    assert "law" in reason


def test_key_001_refuses_when_the_evidence_is_missing() -> None:
    reason = key_refusal(unused("everything", missing="no diagnostic setting sends the service's GatewayLogs"))
    assert reason.startswith("cannot show subscription 'everything' unused for 30 days: no diagnostic setting")


def test_key_001_silence_is_no_evidence_when_no_logs_arrive() -> None:
    reason = key_refusal(unused("everything", service_rows=0, logs_since=None, queried_at=None))
    assert "no gateway log rows of the service arrived in law in the last 30 days" in reason


def test_key_001_logs_must_cover_the_whole_window() -> None:
    reason = key_refusal(unused("everything", logs_since=NOW - timedelta(days=3)))
    assert "reach back only 3.0 days" in reason
    assert "not the 30 days needed" in reason


def test_key_001_window_is_the_unused_days_parameter() -> None:
    # 30 days of logs: enough for the default window, not for 60.
    short = unused("everything", days=60, logs_since=NOW - timedelta(days=29.5))
    assert "reach back only 29.5 days" in key_refusal(short, unused_days=60)
    snapshot = all_apis("everything")
    evidence = PlanEvidence(key_usage=(unused("everything", days=60, logs_since=NOW - timedelta(days=60)),))
    plan = plan_one("KEY-001", snapshot, context("KEY-001", evidence=evidence, unused_days=60))
    assert "unused for 60 days" in plan.summary


def test_key_001_unused_days_is_a_validated_parameter() -> None:
    (param,) = [p for p in REGISTRY["KEY-001"].params if p.name == "unused_days"]
    assert (param.default, param.minimum, param.type_name) == (30, 1, "integer")


# -- SEC-001 --------------------------------------------------------------------------------------


NV_ID = f"{SERVICE_ID}/namedValues/db-password"


def with_named_value(secret: bool = True, name: str = "db-password", **service_changes: Any) -> Snapshot:
    nv = NamedValue(id=f"{SERVICE_ID}/namedValues/{name}", name=name, display_name=name, secret=secret)
    base = compliant()
    return replace(base, named_values=(*base.named_values, nv), service=service(**service_changes))


def test_sec_001_copies_the_value_then_switches_to_a_reference() -> None:
    plan = plan_one("SEC-001", with_named_value(), context("SEC-001", key_vault_url=VAULT + "/"))
    copy, switch = plan.steps
    name = "apim-apim-good-db-password"
    identifier = f"{VAULT}/secrets/{name}"
    assert copy == CopySecretToVault(
        named_value_id=NV_ID,
        vault_url=VAULT,
        secret_name=name,
        description=f"copy the value of named value db-password to Key Vault secret {name}",
    )
    assert switch == ArmWrite(
        method="PATCH",
        resource_id=NV_ID,
        api_version=APIM_API_VERSION,
        body={"properties": {"keyVault": {"secretIdentifier": identifier}, "secret": True}},
        if_match=None,
        description="PATCH named value db-password keyVault.secretIdentifier",
        etag_from_read=True,
        guard=guard(NV_ID, ("properties.secret", True), ("properties.keyVault.secretIdentifier", None)),
    )
    assert plan.expectations == (
        Expectation(NV_ID, APIM_API_VERSION, "properties.keyVault.secretIdentifier", identifier),
        Expectation(NV_ID, APIM_API_VERSION, "properties.keyVault.lastStatus.code", "Success"),
        Expectation(NV_ID, APIM_API_VERSION, "properties.secret", True),
    )
    assert ("properties.keyVault.secretIdentifier", "(not set)", identifier) in [
        (c.path, c.before, c.after) for c in plan.changes
    ]


def test_sec_001_prefers_a_vault_url_parameter() -> None:
    ctx = PlanContext(params={"vault_url": "https://kv-other.vault.azure.net"}, key_vault_url=VAULT)
    plan = plan_one("SEC-001", with_named_value(), ctx)
    assert isinstance(plan.steps[0], CopySecretToVault)
    assert plan.steps[0].vault_url == "https://kv-other.vault.azure.net"


@pytest.mark.parametrize(
    ("identity", "reason"),
    [(None, "needs ID-001 first"), ("None", "needs ID-001 first"), ("UserAssigned", "user-assigned")],
)
def test_sec_001_refuses_without_a_system_identity(identity: str | None, reason: str) -> None:
    snapshot = with_named_value(identity_type=identity)
    assert reason in refused("SEC-001", snapshot, context("SEC-001", key_vault_url=VAULT)).reason


def test_sec_001_works_with_both_identities() -> None:
    snapshot = with_named_value(identity_type="SystemAssigned, UserAssigned")
    plan_one("SEC-001", snapshot, context("SEC-001", key_vault_url=VAULT))


def test_sec_001_refuses_without_a_vault() -> None:
    assert "Key Vault" in refused("SEC-001", with_named_value(), context("SEC-001")).reason


def test_sec_001_refuses_the_name_heuristic_finding() -> None:
    result = refused("SEC-001", with_named_value(secret=False, name="api-token"), context("SEC-001", VAULT))
    assert "only a person can tell" in result.reason


def test_sec_001_right_after_id_001_refuses_and_names_the_role_to_grant() -> None:
    snapshot = with_named_value(principal_id="9f1c0000-0000-4000-8000-0000000000ab")
    ctx = replace(context("SEC-001", key_vault_url=VAULT), fixed_in_run=frozenset({"ID-001"}))
    reason = refused("SEC-001", snapshot, ctx).reason
    assert "new in this run (ID-001)" in reason
    assert "grant 'Key Vault Secrets User' on the vault to principal 9f1c0000-0000-4000-8000-0000000000ab" in reason
    assert VAULT in reason
    assert "next run moves named value 'db-password' once that is granted" in reason


def test_sec_001_in_a_dry_run_with_id_001_planned_says_the_same() -> None:
    # The dry run's snapshot has no identity yet: the refusal still names the role.
    snapshot = with_named_value(identity_type=None)
    ctx = replace(context("SEC-001", key_vault_url=VAULT), fixed_in_run=frozenset({"ID-001"}))
    reason = refused("SEC-001", snapshot, ctx).reason
    assert "grant 'Key Vault Secrets User' on the vault to the principal of the new system-assigned identity" in reason
    assert "next run moves" in reason


@pytest.mark.parametrize(
    ("service_name", "named_value", "expected"),
    [
        ("apim-good", "db-password", "apim-apim-good-db-password"),
        ("apim-good", "DbPassword2", "apim-apim-good-DbPassword2"),
    ],
)
def test_vault_secret_name_keeps_valid_names(service_name: str, named_value: str, expected: str) -> None:
    assert vault_secret_name(service_name, named_value) == expected


def test_vault_secret_name_sanitizes_with_a_hash_that_keeps_names_apart() -> None:
    dotted = vault_secret_name("apim-good", "db.password")
    underscored = vault_secret_name("apim-good", "db_password")
    long = vault_secret_name("apim-good", "x" * 200)
    for name in (dotted, underscored, long):
        assert len(name) <= 127
        assert all(ch.isalnum() or ch == "-" for ch in name), name
    assert dotted.startswith("apim-apim-good-db-password-")
    assert dotted != underscored
    assert long != vault_secret_name("apim-good", "x" * 199)
    assert vault_secret_name("apim-good", "db.password") == dotted  # deterministic


# -- API-001 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocols", "expected"),
    [
        (("http", "https"), ["https"]),
        (("http",), ["https"]),
        (("ws",), ["wss"]),
        (("HTTP", "wss", "ws"), ["https", "wss"]),
    ],
)
def test_secure_protocols(protocols: tuple[str, ...], expected: list[str]) -> None:
    assert secure_protocols(protocols) == expected


def with_api(protocols: tuple[str, ...]) -> Snapshot:
    base = compliant()
    return replace(base, apis=(replace(base.apis[0], protocols=protocols),))


@pytest.mark.parametrize(("protocols", "expected"), [(("http", "https"), ["https"]), (("http",), ["https"])])
def test_api_001_patches_the_protocols(protocols: tuple[str, ...], expected: list[str]) -> None:
    plan = plan_one("API-001", with_api(protocols))
    api_id = f"{SERVICE_ID}/apis/orders"
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=api_id,
        api_version=APIM_API_VERSION,
        body={"properties": {"protocols": expected}},
        if_match=None,
        description="PATCH API orders protocols",
        etag_from_read=True,
        guard=guard(api_id, ("properties.protocols", protocols)),
    )
    assert plan.expectations == (Expectation(api_id, APIM_API_VERSION, "properties.protocols", tuple(expected)),)
    assert [(c.path, c.before, c.after) for c in plan.changes] == [
        ("properties.protocols", ", ".join(protocols), ", ".join(expected))
    ]


def test_api_001_websocket_api_gets_wss() -> None:
    base = compliant()
    ws = Api(id=f"{SERVICE_ID}/apis/chat", name="chat", display_name="Chat", path="chat", protocols=("ws",),
             subscription_required=True, api_type="websocket")  # fmt: skip
    plan = plan_one("API-001", replace(base, apis=(*base.apis, ws)))
    assert only_write(plan).body == {"properties": {"protocols": ["wss"]}}


# -- API-003 --------------------------------------------------------------------------------------


def with_backend(**changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, backends=(replace(base.backends[0], **changes),))


def test_api_003_turns_certificate_validation_on() -> None:
    plan = plan_one("API-003", with_backend(validate_certificate_name=False))
    backend_id = f"{SERVICE_ID}/backends/orders"
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=backend_id,
        api_version=APIM_API_VERSION,
        body={"properties": {"tls": {"validateCertificateChain": True, "validateCertificateName": True}}},
        if_match=None,
        description="PATCH backend orders tls validation",
        etag_from_read=True,
        guard=guard(
            backend_id,
            ("properties.url", Digest.of("https://orders.internal.example")),
            ("properties.tls.validateCertificateChain", True),
            ("properties.tls.validateCertificateName", False),
        ),
    )
    assert plan.expectations == (
        Expectation(backend_id, APIM_API_VERSION, "properties.tls.validateCertificateChain", True),
        Expectation(backend_id, APIM_API_VERSION, "properties.tls.validateCertificateName", True),
    )
    assert [(c.before, c.after) for c in plan.changes] == [("true", "true"), ("false", "true")]


def test_api_003_refuses_a_plain_http_backend() -> None:
    result = refused("API-003", with_backend(url="http://orders.internal.example"))
    assert "serve TLS" in result.reason


CREDENTIAL_URL = "https://svc-user:P4ssw0rd@orders.internal.example:8443/api?code=c0de-CANARY&sig=s1g-CANARY"


def test_api_003_refuses_without_a_tls_probe() -> None:
    reason = refused("API-003", with_backend(validate_certificate_chain=False), context("API-003")).reason
    assert "no TLS handshake to backend 'orders' (https://orders.internal.example:443)" in reason


@pytest.mark.parametrize(
    "problem", ["certificate expired", "self-signed certificate", "unreachable (Connection refused)"]
)
def test_api_003_refuses_when_the_handshake_did_not_validate(problem: str) -> None:
    snapshot = with_backend(validate_certificate_chain=False, url=CREDENTIAL_URL)
    probe = TlsProbe(f"{SERVICE_ID}/backends/orders", safe_target(CREDENTIAL_URL), ok=False, problem=problem)
    reason = refused("API-003", snapshot, context("API-003", evidence=PlanEvidence(tls_probes=(probe,)))).reason
    assert f"(https://orders.internal.example:8443) did not validate: {problem}" in reason
    for canary in ("P4ssw0rd", "svc-user", "CANARY", "sig=", "code="):
        assert canary not in reason


def test_api_003_guards_a_credential_url_by_hash_and_shows_no_secret() -> None:
    snapshot = with_backend(validate_certificate_name=False, url=CREDENTIAL_URL)
    plan = plan_one("API-003", snapshot)
    step = only_write(plan)
    assert step.guard[0] == Expectation(
        f"{SERVICE_ID}/backends/orders", APIM_API_VERSION, "properties.url", Digest.of(CREDENTIAL_URL)
    )
    shown = " ".join(
        [
            plan.summary,
            step.describe(),
            step.describe_condition(),
            repr(plan),
            json.dumps([c.__dict__ for c in plan.changes]),
        ]
    )
    assert "properties.url unchanged (compared by SHA-256)" in step.describe_condition()
    for canary in ("P4ssw0rd", "svc-user", "CANARY", "sig=", "code=", Digest.of(CREDENTIAL_URL).sha256):
        assert canary not in shown


# -- LOG-001 --------------------------------------------------------------------------------------


def test_log_001_puts_a_diagnostic_setting_to_the_policy_workspace() -> None:
    snapshot = compliant(diagnostic_settings=())
    plan = plan_one("LOG-001", snapshot, workspace_id=WORKSPACE_ID)
    assert plan.resource_id == SERVICE_ID
    assert only_write(plan) == ArmWrite(
        method="PUT",
        resource_id=SETTING_ID,
        api_version=INSIGHTS_API_VERSION,
        body={
            "properties": {
                "workspaceId": WORKSPACE_ID,
                "logAnalyticsDestinationType": "Dedicated",
                "logs": [{"category": "GatewayLogs", "enabled": True}],
                "metrics": [{"category": "AllMetrics", "enabled": True}],
            }
        },
        if_match=None,
        description="PUT diagnostic setting apim-remediator",
    )
    assert plan.expectations == (
        Expectation(SETTING_ID, INSIGHTS_API_VERSION, "properties.workspaceId", WORKSPACE_ID),
        Expectation(SETTING_ID, INSIGHTS_API_VERSION, "properties.logAnalyticsDestinationType", "Dedicated"),
    )


def test_log_001_leaves_metrics_out_when_another_setting_sends_to_that_workspace() -> None:
    # The existing setting sends only metrics to the workspace: AllMetrics again would be a 409.
    metrics_only = DiagnosticSetting(
        id=f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/metrics",
        name="metrics",
        workspace_id=WORKSPACE_ID,
        destination_type=None,
        logs=(DiagnosticLog(category="GatewayLogs", category_group=None, enabled=False),),
    )
    plan = plan_one("LOG-001", compliant(diagnostic_settings=(metrics_only,)), workspace_id=WORKSPACE_ID)
    body = only_write(plan).body
    assert body is not None
    assert "metrics" not in body["properties"]


def test_log_001_refuses_without_a_workspace() -> None:
    result = refused("LOG-001", compliant(diagnostic_settings=()))
    assert "rules.LOG-001.params.workspace_id" in result.reason
    assert result.resource_id == SERVICE_ID


def test_log_001_refuses_at_the_settings_limit() -> None:
    full = tuple(
        DiagnosticSetting(
            id=f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/s{i}",
            name=f"s{i}",
            workspace_id=OTHER_WORKSPACE,
            destination_type="Dedicated",
            logs=(DiagnosticLog(category="GatewayLogs", category_group=None, enabled=True),),
        )
        for i in range(5)
    )
    result = refused("LOG-001", compliant(diagnostic_settings=full), workspace_id=WORKSPACE_ID)
    assert "limit" in result.reason


# -- LOG-002 --------------------------------------------------------------------------------------


DIAGNOSTIC_BODY = {
    "properties": {
        "loggerId": LOGGER_ID,
        "logClientIp": True,
        "verbosity": "information",
        "sampling": {"samplingType": "fixed", "percentage": 100},
    }
}


def test_log_002_creates_logger_and_diagnostic() -> None:
    plan = plan_one("LOG-002", compliant(apim_diagnostics=(), loggers=()))
    assert plan.steps == (
        ArmWrite(
            method="PUT",
            resource_id=LOGGER_ID,
            api_version=APIM_API_VERSION,
            body={"properties": {"loggerType": "azureMonitor", "isBuffered": True}},
            if_match=None,
            description="PUT logger azuremonitor (azureMonitor)",
            create_only=True,  # a logger somebody created meanwhile is not replaced either
        ),
        ArmWrite(
            method="PUT",
            resource_id=DIAG_ID,
            api_version=APIM_API_VERSION,
            body=DIAGNOSTIC_BODY,
            if_match=None,
            description="PUT diagnostic azuremonitor",
            create_only=True,  # somebody's diagnostic created meanwhile is not replaced
        ),
    )
    assert plan.expectations == (
        Expectation(LOGGER_ID, APIM_API_VERSION, "properties.loggerType", "azureMonitor"),
        Expectation(DIAG_ID, APIM_API_VERSION, "properties.loggerId", LOGGER_ID),
    )


def test_log_002_reuses_an_existing_logger() -> None:
    plan = plan_one("LOG-002", compliant(apim_diagnostics=()))
    assert [(s.method, s.resource_id) for s in plan.steps if isinstance(s, ArmWrite)] == [("PUT", DIAG_ID)]


def test_log_002_repoints_an_existing_diagnostic() -> None:
    base = compliant()
    elsewhere = f"{SERVICE_ID}/loggers/gone"
    snapshot = replace(base, apim_diagnostics=(replace(base.apim_diagnostics[0], logger_id=elsewhere),))
    plan = plan_one("LOG-002", snapshot)
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=DIAG_ID,
        api_version=APIM_API_VERSION,
        body={"properties": {"loggerId": LOGGER_ID}},
        if_match=None,
        description="PATCH diagnostic azuremonitor loggerId",
        etag_from_read=True,
        guard=guard(DIAG_ID, ("properties.loggerId", elsewhere)),
    )
    assert [(c.path, c.before, c.after) for c in plan.changes] == [("properties.loggerId", elsewhere, LOGGER_ID)]


def test_log_002_refuses_a_foreign_logger_in_the_reserved_name() -> None:
    foreign = Logger(id=LOGGER_ID, name="azuremonitor", logger_type="applicationInsights")
    result = refused("LOG-002", compliant(loggers=(foreign,)))
    assert "rename or delete it by hand" in result.reason


# -- LOG-003 --------------------------------------------------------------------------------------


def with_headers(**lists: Any) -> Snapshot:
    base = compliant()
    return replace(base, apim_diagnostics=(replace(base.apim_diagnostics[0], **lists),))


def combined(snapshot: Snapshot, **params: Any) -> RemediationPlan | Refusal:
    combiner = REMEDIATIONS["LOG-003"].combiner
    assert combiner is not None
    return combiner(findings("LOG-003", snapshot, **params), snapshot, context("LOG-003", **params))


def test_log_003_removes_every_secret_header_in_one_patch_and_keeps_the_rest() -> None:
    snapshot = with_headers(
        frontend_request_headers=("User-Agent", "Authorization", "ocp-apim-subscription-key", "X-Request-Id"),
        frontend_response_headers=("Set-Cookie", "Content-Type"),
        backend_request_headers=("X-Trace",),
    )
    plan = combined(snapshot)
    assert isinstance(plan, RemediationPlan)
    assert plan.resource_id == DIAG_ID
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=DIAG_ID,
        api_version=APIM_API_VERSION,
        body={
            "properties": {
                "frontend": {
                    "request": {"headers": ["User-Agent", "X-Request-Id"]},
                    "response": {"headers": ["Content-Type"]},
                }
            }
        },
        if_match=None,
        description="PATCH diagnostic azuremonitor logged headers",
        etag_from_read=True,
        # No side objects in this snapshot: the header lists as read are the guard.
        guard=guard(
            DIAG_ID,
            (
                "properties.frontend.request.headers",
                ("User-Agent", "Authorization", "ocp-apim-subscription-key", "X-Request-Id"),
            ),
            ("properties.frontend.response.headers", ("Set-Cookie", "Content-Type")),
        ),
    )
    assert set(plan.expectations) == {
        Expectation(DIAG_ID, APIM_API_VERSION, "properties.frontend.request.headers", ("User-Agent", "X-Request-Id")),
        Expectation(DIAG_ID, APIM_API_VERSION, "properties.frontend.response.headers", ("Content-Type",)),
    }
    assert [(c.path, c.after) for c in plan.changes] == [
        ("diagnostics/azuremonitor.properties.frontend.request.headers", "User-Agent, X-Request-Id"),
        ("diagnostics/azuremonitor.properties.frontend.response.headers", "Content-Type"),
    ]


def test_log_003_sends_the_untouched_list_of_a_side_it_changes() -> None:
    # A side's object is replaced as a whole: its other header list goes along unchanged.
    plan = combined(with_headers(backend_request_headers=("api-key",), backend_response_headers=("X-Cache",)))
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan).body == {
        "properties": {"backend": {"request": {"headers": []}, "response": {"headers": ["X-Cache"]}}}
    }


def test_log_003_extra_headers_and_case_variants() -> None:
    snapshot = with_headers(frontend_request_headers=("X-Internal-Token", "authorization", "Authorization"))
    plan = combined(snapshot, extra_headers=("x-internal-token",))
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan).body == {
        "properties": {"frontend": {"request": {"headers": []}, "response": {"headers": []}}}
    }


def test_log_003_one_write_per_diagnostic() -> None:
    base = compliant()
    insights = ApimDiagnostic(
        id=f"{SERVICE_ID}/diagnostics/applicationinsights",
        name="applicationinsights",
        logger_id=f"{SERVICE_ID}/loggers/ai",
        frontend_request_headers=("Cookie",),
    )
    first = replace(base.apim_diagnostics[0], frontend_request_headers=("Authorization",))
    plan = combined(replace(base, apim_diagnostics=(first, insights)))
    assert isinstance(plan, RemediationPlan)
    assert plan.resource_id == SERVICE_ID
    assert [s.resource_id for s in plan.steps if isinstance(s, ArmWrite)] == [DIAG_ID, insights.id]


def test_log_003_single_planner_plans_one_finding() -> None:
    snapshot = with_headers(frontend_request_headers=("Authorization", "User-Agent"))
    (finding,) = findings("LOG-003", snapshot)
    plan = REMEDIATIONS["LOG-003"].plan(finding, snapshot, context("LOG-003"))
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan).body == {
        "properties": {"frontend": {"request": {"headers": ["User-Agent"]}, "response": {"headers": []}}}
    }


MASKING = {"queryParams": [{"value": "sig", "mode": "Hide"}], "headers": [{"value": "X-User", "mode": "Mask"}]}
FRONTEND = {
    "request": {"headers": ["Authorization", "User-Agent"], "body": {"bytes": 512}, "dataMasking": MASKING},
    "response": {"body": {"bytes": 128}},
}


def with_sides(frontend: dict[str, Any], backend: dict[str, Any] | None = None) -> Snapshot:
    """A diagnostic as the snapshot maps it: the header lists and each side's JSON."""

    def headers(side: dict[str, Any] | None, message: str) -> tuple[str, ...]:
        return tuple(((side or {}).get(message) or {}).get("headers") or ())

    return with_headers(
        frontend_request_headers=headers(frontend, "request"),
        frontend_response_headers=headers(frontend, "response"),
        backend_request_headers=headers(backend, "request"),
        backend_response_headers=headers(backend, "response"),
        frontend_json=json.dumps(frontend, sort_keys=True),
        backend_json=None if backend is None else json.dumps(backend, sort_keys=True),
    )


def test_log_003_sends_a_side_back_whole_keeping_data_masking_and_body() -> None:
    plan = combined(with_sides(FRONTEND, {"request": {"headers": ["X-Trace"]}}))
    assert isinstance(plan, RemediationPlan)
    write = only_write(plan)
    assert write.body == {
        "properties": {
            "frontend": {
                "request": {"headers": ["User-Agent"], "body": {"bytes": 512}, "dataMasking": MASKING},
                "response": {"headers": [], "body": {"bytes": 128}},
            }
        }
    }  # the backend side has nothing to remove and is not sent
    # The guard: the whole side as read; an absent header list must still be absent.
    assert write.etag_from_read
    assert write.if_match is None
    assert write.guard == guard(
        DIAG_ID,
        ("properties.frontend.request.body.bytes", 512),
        ("properties.frontend.request.dataMasking", MASKING),
        ("properties.frontend.request.headers", ("Authorization", "User-Agent")),
        ("properties.frontend.response.body.bytes", 128),
        ("properties.frontend.response.headers", None),
    )
    assert [(c.path, c.before, c.after) for c in plan.changes] == [
        ("diagnostics/azuremonitor.properties.frontend.request.headers", "Authorization, User-Agent", "User-Agent")
    ]


def test_log_003_both_sides_with_their_settings() -> None:
    backend = {"request": {"headers": ["api-key"], "body": {"bytes": 0}}, "response": {"headers": ["X-Cache"]}}
    plan = combined(with_sides({"request": {"headers": ["Cookie"]}}, backend))
    assert isinstance(plan, RemediationPlan)
    write = only_write(plan)
    assert write.body == {
        "properties": {
            "frontend": {"request": {"headers": []}, "response": {"headers": []}},
            "backend": {"request": {"headers": [], "body": {"bytes": 0}}, "response": {"headers": ["X-Cache"]}},
        }
    }
    assert {g.path: g.value for g in write.guard} == {
        "properties.frontend.request.headers": ("Cookie",),
        "properties.frontend.response.headers": None,
        "properties.backend.request.headers": ("api-key",),
        "properties.backend.request.body.bytes": 0,
        "properties.backend.response.headers": ("X-Cache",),
    }


def test_every_patch_is_guarded_and_none_is_unconditional() -> None:
    # Every write of these plans is conditional: a real ETag, read just before the write and
    # guarded by what the plan was made from; only a creating PUT goes without If-Match.
    base = compliant()
    snapshots = {
        "KEY-001": all_apis("everything"),
        "SEC-001": with_named_value(),
        "API-001": with_api(("http",)),
        "API-003": with_backend(validate_certificate_chain=False),
        "LOG-001": compliant(diagnostic_settings=()),
        "LOG-002": replace(
            base, apim_diagnostics=(replace(base.apim_diagnostics[0], logger_id=f"{SERVICE_ID}/loggers/x"),)
        ),
        "LOG-003": with_sides(FRONTEND),
    }
    for rule_id, snapshot in snapshots.items():
        ctx = context(rule_id, key_vault_url=VAULT, evidence=fine_evidence(snapshot), workspace_id=WORKSPACE_ID)
        found = findings(rule_id, snapshot, **({"workspace_id": WORKSPACE_ID} if rule_id == "LOG-001" else {}))
        remediation = REMEDIATIONS[rule_id]
        plan = (
            remediation.combiner(found, snapshot, ctx)
            if remediation.combiner
            else remediation.plan(found[0], snapshot, ctx)
        )
        assert isinstance(plan, RemediationPlan), (rule_id, plan)
        for step in plan.steps:
            if not isinstance(step, ArmWrite):
                continue
            assert step.if_match != "*", rule_id
            if step.method == "PUT":
                assert (step.if_match, step.etag_from_read, step.guard) == (None, False, ()), rule_id
            else:
                assert step.etag_from_read, rule_id
                assert step.guard, rule_id
                assert all(g.resource_id == step.resource_id for g in step.guard), rule_id


class OneResource:
    """An ArmApi fake holding one resource: GET returns it with its ETag; writes are recorded."""

    def __init__(self, body: dict[str, Any], etag: str = '"fresh"') -> None:
        self.body, self.etag = body, etag
        self.writes: list[tuple[str, str, str | None]] = []

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
    ) -> ArmResponse:
        if method == "GET":
            return ArmResponse(200, self.etag, self.body)
        self.writes.append((method, path, if_match))
        return ArmResponse(200, '"after"', None)


def as_azure_returns(side: dict[str, Any]) -> dict[str, Any]:
    # Another key order than the snapshot's sorted JSON, and case differences in the path.
    request = side["request"]
    return {
        "Request": {
            "dataMasking": {
                "headers": request["dataMasking"]["headers"],
                "queryParams": [{"mode": "Hide", "value": "sig"}],
            },
            "body": request["body"],
            "headers": list(reversed(request["headers"])),
        },
        "response": side["response"],
    }


async def test_log_003_guard_holds_against_the_same_side_read_back() -> None:
    plan = combined(with_sides(FRONTEND))
    assert isinstance(plan, RemediationPlan)
    arm = OneResource({"properties": {"loggerId": LOGGER_ID, "frontend": as_azure_returns(FRONTEND)}})
    await apply_plan(plan, arm, NoSecrets())
    assert arm.writes == [("PATCH", DIAG_ID, '"fresh"')]  # the ETag of the read, never "*"


@pytest.mark.parametrize(
    "human",
    [
        {"dataMasking": {"queryParams": [{"value": "sig", "mode": "Mask"}], "headers": MASKING["headers"]}},
        {"body": {"bytes": 8192}},
        {"headers": ["Authorization", "User-Agent", "X-New"]},
    ],
)
async def test_log_003_a_concurrent_change_to_the_side_stops_the_write(human: dict[str, Any]) -> None:
    plan = combined(with_sides(FRONTEND))
    assert isinstance(plan, RemediationPlan)
    changed = {**FRONTEND, "request": {**FRONTEND["request"], **human}}
    arm = OneResource({"properties": {"loggerId": LOGGER_ID, "frontend": changed}})
    with pytest.raises(PreconditionFailed, match="changed since the plan was made"):
        await apply_plan(plan, arm, NoSecrets())
    assert arm.writes == []


async def test_log_003_a_concurrent_response_header_list_stops_the_write() -> None:
    # The response had no header list when planned; one added since would be overwritten by [].
    plan = combined(with_sides(FRONTEND))
    assert isinstance(plan, RemediationPlan)
    changed = {**FRONTEND, "response": {"body": {"bytes": 128}, "headers": ["X-Added"]}}
    arm = OneResource({"properties": {"frontend": changed}})
    with pytest.raises(PreconditionFailed, match=r"response\.headers"):
        await apply_plan(plan, arm, NoSecrets())
    assert arm.writes == []


class NoSecrets:
    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        raise AssertionError("no secret is copied here")


def test_planners_are_deterministic() -> None:
    # Plans are values: planning twice gives equal plans (no clock, no randomness).
    snapshot = with_named_value()
    a = plan_one("SEC-001", snapshot, context("SEC-001", key_vault_url=VAULT))
    b = plan_one("SEC-001", snapshot, context("SEC-001", key_vault_url=VAULT))
    assert a == b
