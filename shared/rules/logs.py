"""LOG family: gateway logs reach Log Analytics, through APIM's own diagnostic, without secrets in them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared.model import ApimDiagnostic, DiagnosticSetting, Finding, Logger, Severity, Snapshot
from shared.rules import Param, ParamFormat, References, Rule, rule

# Category groups that certainly contain GatewayLogs. `audit` is left out: Azure Monitor's
# reference for Microsoft.ApiManagement/service does not say which categories the group
# holds, and a rule that assumes it does would pass an instance whose gateway logs go nowhere.
_QUALIFYING_GROUPS = ("alllogs",)
_GATEWAY_CATEGORY = "gatewaylogs"
_WORKSPACE_ID = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.OperationalInsights/workspaces/[^/]+",
    re.IGNORECASE,
)
# Anything else never equals a setting's workspace id, so every instance would be flagged
# (and the remediation would ask Azure Monitor for a workspace that cannot exist).
_WORKSPACE = ParamFormat(
    "empty, or a Log Analytics workspace id /subscriptions/.../providers/Microsoft.OperationalInsights/workspaces/NAME",
    lambda v: not v.strip() or _WORKSPACE_ID.fullmatch(v.strip()) is not None,
)

_SECRET_HEADERS = (
    "Ocp-Apim-Subscription-Key",
    "Authorization",
    "api-key",
    "Cookie",
    "Set-Cookie",
    "Proxy-Authorization",
)
_HEADER_LISTS = (
    ("frontend.request.headers", "frontend_request_headers"),
    ("frontend.response.headers", "frontend_response_headers"),
    ("backend.request.headers", "backend_request_headers"),
    ("backend.response.headers", "backend_response_headers"),
)


# -- LOG-001 ----------------------------------------------------------------------------------


@rule(
    "LOG-001",
    title="Gateway logs are not sent to Log Analytics",
    severity=Severity.MEDIUM,
    rationale=(
        "Without an Azure Monitor diagnostic setting that sends GatewayLogs to a Log Analytics workspace "
        "there is no record of who called which API, and the product's own log-flow checks have nothing "
        "to query. A setting qualifies when it has a workspace and an enabled log entry for category "
        "GatewayLogs or category group allLogs (compared case-insensitively). The audit group does not "
        "count: Azure Monitor does not document that it contains GatewayLogs for API Management. With "
        "`workspace_id` set, the setting must send to that workspace. Says nothing when the diagnostic "
        "settings could not be read."
    ),
    references=References(
        azure_policy=("567c93f7-3661-494f-a30f-0a94d9bfebf8",),
        mcsb=("LT-3",),
        docs=(
            "https://learn.microsoft.com/azure/api-management/monitor-api-management",
            "https://learn.microsoft.com/azure/azure-monitor/reference/supported-logs/microsoft-apimanagement-service-logs",
        ),
    ),
    params=[
        Param(
            "workspace_id",
            "",
            "ARM id of the Log Analytics workspace the gateway logs must reach; empty accepts any workspace.",
            format=_WORKSPACE,
        )
    ],
    remediable=True,
)
def gateway_logs_not_collected(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not snapshot.readable("diagnostic_settings"):
        return []
    workspace = str(params["workspace_id"]).strip()
    if any(_sends_gateway_logs(s, workspace) for s in snapshot.diagnostic_settings):
        return []
    audit_only = [s.name for s in snapshot.diagnostic_settings if _has_enabled_group(s, "audit")]
    note = f" (category group audit, used by {', '.join(audit_only)}, is not counted)" if audit_only else ""
    where = f"workspace {workspace}" if workspace else "a Log Analytics workspace"
    return [
        rule.finding(
            snapshot,
            message=f"No diagnostic setting of '{snapshot.service.name}' sends GatewayLogs to {where}{note}.",
            path="diagnosticSettings",
            actual=tuple(_describe(s) for s in snapshot.diagnostic_settings) or "(none)",
            expected=f"a setting with GatewayLogs or allLogs enabled to {where}",
        )
    ]


def _sends_gateway_logs(setting: DiagnosticSetting, workspace: str) -> bool:
    if not setting.workspace_id:
        return False
    if workspace and setting.workspace_id.strip().lower() != workspace.lower():
        return False
    return any(
        log.enabled
        and (
            (log.category or "").lower() == _GATEWAY_CATEGORY
            or (log.category_group or "").lower() in _QUALIFYING_GROUPS
        )
        for log in setting.logs
    )


def _has_enabled_group(setting: DiagnosticSetting, group: str) -> bool:
    return any(log.enabled and (log.category_group or "").lower() == group for log in setting.logs)


def _describe(setting: DiagnosticSetting) -> str:
    enabled = [log.category or f"group:{log.category_group}" for log in setting.logs if log.enabled]
    workspace = setting.workspace_id.rsplit("/", 1)[-1] if setting.workspace_id else "no workspace"
    return f"{setting.name} -> {workspace}: {'+'.join(enabled) or 'no logs enabled'}"


# -- LOG-002 ----------------------------------------------------------------------------------


@rule(
    "LOG-002",
    title="APIM azuremonitor diagnostic missing or not wired to its logger",
    severity=Severity.MEDIUM,
    rationale=(
        "APIM's own diagnostic named 'azuremonitor' decides what the gateway emits to Azure Monitor "
        "(sampling, headers, bodies); its loggerId must point at a logger of type azureMonitor. Missing, "
        "or pointing at a logger that does not exist or has another type, the resource logs a diagnostic "
        "setting collects are incomplete or absent. loggerId may be relative (/loggers/azuremonitor) or a "
        "full ARM id; names compare case-insensitively. Says nothing when diagnostics or loggers could "
        "not be read."
    ),
    references=References(
        mcsb=("LT-3",),
        docs=("https://learn.microsoft.com/azure/api-management/monitor-api-management",),
    ),
    remediable=True,
)
def azure_monitor_diagnostic(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not (snapshot.readable("apim_diagnostics") and snapshot.readable("loggers")):
        return []
    diagnostic = next((d for d in snapshot.apim_diagnostics if d.name.lower() == "azuremonitor"), None)
    if diagnostic is None:
        return [
            rule.finding(
                snapshot,
                message=f"'{snapshot.service.name}' has no APIM diagnostic 'azuremonitor'.",
                path="diagnostics/azuremonitor",
                actual="(none)",
                expected="diagnostic 'azuremonitor' with an azureMonitor logger",
            )
        ]
    logger = _logger(snapshot.loggers, diagnostic.logger_id)
    if logger is not None and logger.logger_type.lower() == "azuremonitor":
        return []
    problem = (
        "has no loggerId"
        if not diagnostic.logger_id
        else "points at a logger that does not exist"
        if logger is None
        else f"points at a logger of type {logger.logger_type}"
    )
    return [
        rule.finding(
            snapshot,
            message=f"The APIM diagnostic 'azuremonitor' {problem}.",
            path="loggerId",
            actual=diagnostic.logger_id if logger is None else f"{diagnostic.logger_id} ({logger.logger_type})",
            expected="an existing logger of type azureMonitor",
            resource_id=diagnostic.id,
        )
    ]


def _logger(loggers: tuple[Logger, ...], logger_id: str | None) -> Logger | None:
    if not logger_id:
        return None
    wanted = logger_id.strip().rstrip("/").lower()
    name = wanted.rsplit("/loggers/", 1)[-1] if "/loggers/" in wanted else None
    for logger in loggers:
        if logger.id.lower() == wanted or (name is not None and logger.name.lower() == name):
            return logger
    return None


# -- LOG-003 ----------------------------------------------------------------------------------


@rule(
    "LOG-003",
    workspace_note=(
        "Service-level diagnostics only: workspace diagnostics and loggers are not read, so header names "
        "workspace APIs use are not considered."
    ),
    title="Diagnostic logs secret-bearing headers",
    severity=Severity.HIGH,
    rationale=(
        "Headers named in an APIM diagnostic's frontend/backend request/response header lists are written "
        "to the log destination verbatim, so listing Ocp-Apim-Subscription-Key, Authorization, api-key, "
        "Cookie, Set-Cookie or Proxy-Authorization puts live keys and tokens in Log Analytics or Application "
        "Insights, readable by everyone with log access. The instance's custom subscription-key header names "
        "(subscriptionKeyParameterNames.header of any API) and `extra_headers` count too. Names compare "
        "case-insensitively; one finding per diagnostic, list and header."
    ),
    references=References(
        mcsb=("IM-8",),
        owasp_api=("API8:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/api-management-howto-app-insights",),
    ),
    params=[Param("extra_headers", (), "More header names that carry secrets and must never be logged.")],
    remediable=True,
)
def secret_headers_logged(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not snapshot.readable("apim_diagnostics"):
        return []
    secret = _secret_headers(snapshot, params["extra_headers"])
    findings: list[Finding] = []
    for diagnostic in snapshot.apim_diagnostics:
        findings.extend(_logged_secrets(rule, snapshot, diagnostic, secret))
    return findings


def _secret_headers(snapshot: Snapshot, extra: Any) -> frozenset[str]:
    names = {h.lower() for h in _SECRET_HEADERS}
    names.update(a.subscription_key_header.strip().lower() for a in snapshot.apis if a.subscription_key_header)
    extras = (extra,) if isinstance(extra, str) else tuple(extra or ())
    names.update(str(h).strip().lower() for h in extras if str(h).strip())
    return frozenset(names)


def _logged_secrets(
    rule: Rule, snapshot: Snapshot, diagnostic: ApimDiagnostic, secret: frozenset[str]
) -> list[Finding]:
    findings: list[Finding] = []
    for path, attribute in _HEADER_LISTS:
        headers: tuple[str, ...] = getattr(diagnostic, attribute)
        seen: set[str] = set()
        for header in headers:
            key = header.strip().lower()
            if key not in secret or key in seen:
                continue
            seen.add(key)
            name = header.strip()
            findings.append(
                rule.finding(
                    snapshot,
                    message=f"APIM diagnostic '{diagnostic.name}' logs the secret-bearing header {name} ({path}).",
                    path=path,
                    actual=name,
                    expected="(not logged)",
                    resource_id=diagnostic.id,
                    entry=key,
                )
            )
    return findings
