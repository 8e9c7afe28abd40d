"""LOG family: diagnostic settings to Log Analytics, the azuremonitor diagnostic, secret headers in logs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.model import ApimDiagnostic, DiagnosticLog, DiagnosticSetting, Finding, Logger, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import SERVICE_ID, WORKSPACE_ID, compliant

DIAG_ID = f"{SERVICE_ID}/diagnostics/azuremonitor"
APPINSIGHTS_ID = f"{SERVICE_ID}/diagnostics/applicationinsights"
SETTING_ID = f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/to-law"


def only(findings: list[Finding], rule_id: str, resource_id: str) -> Finding:
    assert len(findings) == 1, findings
    assert findings[0].rule_id == rule_id
    assert findings[0].resource_id == resource_id
    assert findings[0].instance_id == SERVICE_ID
    return findings[0]


def setting(*logs: DiagnosticLog, workspace_id: str | None = WORKSPACE_ID, name: str = "to-law") -> DiagnosticSetting:
    return DiagnosticSetting(
        id=f"{SERVICE_ID}/providers/Microsoft.Insights/diagnosticSettings/{name}",
        name=name,
        workspace_id=workspace_id,
        destination_type="Dedicated",
        logs=logs,
    )


def log(category: str | None = None, group: str | None = None, *, enabled: bool = True) -> DiagnosticLog:
    return DiagnosticLog(category=category, category_group=group, enabled=enabled)


def with_settings(*settings: DiagnosticSetting) -> Snapshot:
    return replace(compliant(), diagnostic_settings=settings)


def with_diagnostic(**changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, apim_diagnostics=(replace(base.apim_diagnostics[0], **changes),))


@pytest.mark.parametrize("rule_id", ["LOG-001", "LOG-002", "LOG-003"])
def test_compliant_snapshot_passes(rule_id: str) -> None:
    assert evaluate_rule(rule_id, compliant()) == []


@pytest.mark.parametrize(
    ("rule_id", "part"),
    [
        ("LOG-001", "diagnostic_settings"),
        ("LOG-002", "apim_diagnostics"),
        ("LOG-002", "loggers"),
        ("LOG-003", "apim_diagnostics"),
    ],
)
def test_unreadable_input_says_nothing(rule_id: str, part: str) -> None:
    drifted = {
        "LOG-001": lambda: with_settings(),
        "LOG-002": lambda: replace(compliant(), apim_diagnostics=()),
        "LOG-003": lambda: with_diagnostic(frontend_request_headers=("Authorization",)),
    }[rule_id]()
    assert evaluate_rule(rule_id, drifted), "the drifted snapshot must fail the rule while readable"
    assert evaluate_rule(rule_id, replace(drifted, unreadable=(f"{part}: 403 AuthorizationFailed",))) == []


def test_rules_declare_remediation_and_severity() -> None:
    assert {r: (REGISTRY[r].severity.value, REGISTRY[r].remediable) for r in ("LOG-001", "LOG-002", "LOG-003")} == {
        "LOG-001": ("medium", True),
        "LOG-002": ("medium", True),
        "LOG-003": ("high", True),
    }


# -- LOG-001 ----------------------------------------------------------------------------------


def test_log001_flags_instance_without_settings() -> None:
    finding = only(evaluate_rule("LOG-001", with_settings()), "LOG-001", SERVICE_ID)
    assert finding.evidence.path == "diagnosticSettings"
    assert finding.evidence.actual == "(none)"
    assert finding.evidence.expected == "a setting with GatewayLogs or allLogs enabled to a Log Analytics workspace"
    assert finding.remediable


@pytest.mark.parametrize(
    ("settings", "actual"),
    [
        ((setting(log("GatewayLogs", enabled=False)),), "[to-law -> law: no logs enabled]"),
        ((setting(log("WebSocketConnectionLogs")),), "[to-law -> law: WebSocketConnectionLogs]"),
        ((setting(log("GatewayLogs"), workspace_id=None),), "[to-law -> no workspace: GatewayLogs]"),
        ((setting(log(group="allLogs"), workspace_id=""),), "[to-law -> no workspace: group:allLogs]"),
    ],
    ids=["disabled", "other-category", "storage-only", "empty-workspace"],
)
def test_log001_flags_settings_that_do_not_qualify(settings: tuple[DiagnosticSetting, ...], actual: str) -> None:
    finding = only(evaluate_rule("LOG-001", with_settings(*settings)), "LOG-001", SERVICE_ID)
    assert finding.evidence.actual == actual


@pytest.mark.parametrize(
    "entry",
    [log("GatewayLogs"), log("gatewaylogs"), log("GATEWAYLOGS"), log(group="allLogs"), log(group="ALLLOGS")],
    ids=["category", "lower", "upper", "allLogs", "allLogs-upper"],
)
def test_log001_passes_gateway_logs_or_all_logs(entry: DiagnosticLog) -> None:
    assert (
        evaluate_rule("LOG-001", with_settings(setting(log("GatewayLogs", enabled=False)), setting(entry, name="b")))
        == []
    )


def test_log001_audit_group_does_not_count_and_says_so() -> None:
    finding = only(evaluate_rule("LOG-001", with_settings(setting(log(group="audit")))), "LOG-001", SERVICE_ID)
    assert "category group audit, used by to-law, is not counted" in finding.message


def test_log001_workspace_parameter() -> None:
    snapshot = compliant()
    assert evaluate_rule("LOG-001", snapshot, {"workspace_id": WORKSPACE_ID.upper()}) == []
    other = WORKSPACE_ID.replace("/law", "/other-law")
    finding = only(evaluate_rule("LOG-001", snapshot, {"workspace_id": other}), "LOG-001", SERVICE_ID)
    assert other in finding.message
    assert finding.evidence.expected == f"a setting with GatewayLogs or allLogs enabled to workspace {other}"


# -- LOG-002 ----------------------------------------------------------------------------------


def test_log002_flags_missing_azuremonitor_diagnostic() -> None:
    appinsights = ApimDiagnostic(id=APPINSIGHTS_ID, name="applicationinsights", logger_id=f"{SERVICE_ID}/loggers/ai")
    finding = only(
        evaluate_rule("LOG-002", replace(compliant(), apim_diagnostics=(appinsights,))), "LOG-002", SERVICE_ID
    )
    assert finding.evidence.path == "diagnostics/azuremonitor"
    assert finding.evidence.actual == "(none)"
    assert finding.remediable


@pytest.mark.parametrize(
    "logger_id",
    ["/loggers/azuremonitor", "/loggers/AzureMonitor/", f"{SERVICE_ID.upper()}/loggers/azuremonitor"],
    ids=["relative", "relative-case", "arm-id-case"],
)
def test_log002_passes_logger_reference_variants(logger_id: str) -> None:
    assert evaluate_rule("LOG-002", with_diagnostic(logger_id=logger_id, name="AzureMonitor")) == []


@pytest.mark.parametrize(
    ("logger_id", "loggers", "actual", "problem"),
    [
        (None, None, "(not set)", "has no loggerId"),
        ("/loggers/gone", None, "/loggers/gone", "points at a logger that does not exist"),
        (
            "/loggers/azuremonitor",
            (Logger(id=f"{SERVICE_ID}/loggers/azuremonitor", name="azuremonitor", logger_type="applicationInsights"),),
            "/loggers/azuremonitor (applicationInsights)",
            "points at a logger of type applicationInsights",
        ),
    ],
    ids=["no-logger-id", "dangling", "wrong-type"],
)
def test_log002_flags_unwired_diagnostic(
    logger_id: str | None, loggers: tuple[Logger, ...] | None, actual: str, problem: str
) -> None:
    snapshot = with_diagnostic(logger_id=logger_id)
    if loggers is not None:
        snapshot = replace(snapshot, loggers=loggers)
    finding = only(evaluate_rule("LOG-002", snapshot), "LOG-002", DIAG_ID)
    assert finding.evidence.path == "loggerId"
    assert finding.evidence.actual == actual
    assert finding.evidence.expected == "an existing logger of type azureMonitor"
    assert problem in finding.message


# -- LOG-003 ----------------------------------------------------------------------------------


def test_log003_one_finding_per_header_and_list() -> None:
    snapshot = with_diagnostic(
        frontend_request_headers=("User-Agent", "authorization", "OCP-APIM-SUBSCRIPTION-KEY", "Authorization"),
        backend_response_headers=("Set-Cookie",),
        backend_request_headers=(" Api-Key ",),
        frontend_response_headers=("Content-Type",),
    )
    findings = evaluate_rule("LOG-003", snapshot)
    assert [(f.rule_id, f.resource_id, f.evidence.path, f.evidence.actual, f.evidence.expected) for f in findings] == [
        ("LOG-003", DIAG_ID, "frontend.request.headers", "authorization", "(not logged)"),
        ("LOG-003", DIAG_ID, "frontend.request.headers", "OCP-APIM-SUBSCRIPTION-KEY", "(not logged)"),
        ("LOG-003", DIAG_ID, "backend.request.headers", "Api-Key", "(not logged)"),
        ("LOG-003", DIAG_ID, "backend.response.headers", "Set-Cookie", "(not logged)"),
    ]
    assert all(f.remediable for f in findings)


@pytest.mark.parametrize("header", ["Cookie", "Proxy-Authorization"])
def test_log003_other_default_headers(header: str) -> None:
    finding = only(evaluate_rule("LOG-003", with_diagnostic(frontend_request_headers=(header,))), "LOG-003", DIAG_ID)
    assert header in finding.message


def test_log003_covers_application_insights_and_custom_key_header() -> None:
    base = compliant()
    api = replace(base.apis[0], subscription_key_header="X-Orders-Key")
    appinsights = ApimDiagnostic(
        id=APPINSIGHTS_ID,
        name="applicationinsights",
        logger_id=f"{SERVICE_ID}/loggers/ai",
        frontend_request_headers=("x-orders-key",),
    )
    snapshot = replace(base, apis=(api,), apim_diagnostics=(*base.apim_diagnostics, appinsights))
    finding = only(evaluate_rule("LOG-003", snapshot), "LOG-003", APPINSIGHTS_ID)
    assert finding.evidence.actual == "x-orders-key"


def test_log003_extra_headers_parameter() -> None:
    snapshot = with_diagnostic(frontend_request_headers=("X-Functions-Key", "User-Agent"))
    assert evaluate_rule("LOG-003", snapshot) == []
    finding = only(evaluate_rule("LOG-003", snapshot, {"extra_headers": ["x-functions-key"]}), "LOG-003", DIAG_ID)
    assert finding.evidence.actual == "X-Functions-Key"
