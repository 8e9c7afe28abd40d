"""The KQL the runtime signals run against Log Analytics: named, parameterised constants.

Every query is a gateway-log *source* (one of the two table shapes a diagnostic setting can
write) followed by one signal's *tail*. The source normalises the columns, so a tail reads
the same names whichever table the instance's logs land in:

- resource-specific (`destination type: Dedicated`): `ApiManagementGatewayLogs`;
- legacy (`AzureDiagnostics` mode): `AzureDiagnostics` rows of category GatewayLogs, with
  the gateway's properties flattened into `url_s`, `responseCode_d`, `apiId_s`, ...

Parameters are substituted with `str.format` from values the product computes (integers,
and the service id quoted by `kql_string`), never from log content. Windows are relative to
the workspace's own `now()`, so a query means the same whenever it runs; the `timespan`
sent with each query only bounds what Log Analytics scans.

Nothing here selects a key, a header or a body: the columns are caller IP, response code,
URL path, APIM subscription id (the subscription's name, not its key), API and operation.
"""

from __future__ import annotations

from datetime import timedelta

GATEWAY_TABLE = "ApiManagementGatewayLogs"
LEGACY_TABLE = "AzureDiagnostics"
LLM_TABLE = "ApiManagementGatewayLlmLog"

# The columns every tail may use.
SOURCE_RESOURCE_SPECIFIC = """ApiManagementGatewayLogs
| where _ResourceId =~ {service}
| project TimeGenerated, CallerIpAddress, ResponseCode, Url, ApimSubscriptionId, ApiId, OperationId"""

SOURCE_AZURE_DIAGNOSTICS = """AzureDiagnostics
| where ResourceProvider == 'MICROSOFT.APIMANAGEMENT' and Category == 'GatewayLogs' and _ResourceId =~ {service}
| project TimeGenerated, CallerIpAddress = CallerIPAddress, ResponseCode = toint(responseCode_d), Url = url_s,
    ApimSubscriptionId = apimSubscriptionId_s, ApiId = apiId_s, OperationId = operationId_s"""

# LOG-004: do gateway log rows still arrive? Rows in the last {window} and the newest row
# over the whole lookback (the query's timespan), with the workspace's clock.
LOG_FLOW = """{source}
| summarize rows = countif(TimeGenerated > ago({window})), last_seen = max(TimeGenerated)
| extend queried_at = now()"""

# THR-001: requests in the last {window}, and in the same window on each of the previous
# days (days_back 1..N; a day without rows has no row). The rule takes the median.
REQUEST_RATE = """{source}
| extend age = now() - TimeGenerated
| extend days_back = toint(age / 1d)
| where age - days_back * 1d < {window}
| summarize requests = count() by days_back"""

# THR-002: 401 and 403 answers in the last {window} per caller IP and APIM subscription
# (the rule adds them up per IP and per subscription).
AUTH_FAILURES = """{source}
| where TimeGenerated > ago({window}) and ResponseCode in (401, 403)
| summarize failures = count() by CallerIpAddress, ApimSubscriptionId
| top {limit} by failures desc"""

# THR-003: distinct client IPs per APIM subscription in the last {window}.
KEY_SPREAD = """{source}
| where TimeGenerated > ago({window}) and isnotempty(ApimSubscriptionId)
| summarize ips = dcount(CallerIpAddress), requests = count(), sample_ips = make_set(CallerIpAddress, 10)
    by ApimSubscriptionId
| top {limit} by ips desc"""

# THR-004: distinct URL paths (the object ids in the path; the query string cut off) one
# caller requested on one operation in the last {window}.
OBJECT_WALK = """{source}
| where TimeGenerated > ago({window}) and isnotempty(OperationId)
| extend cut = indexof(Url, '?')
| extend path = iff(cut < 0, Url, substring(Url, 0, cut))
| summarize ids = dcount(path), requests = count(), subscriptions = make_set(ApimSubscriptionId, 5)
    by CallerIpAddress, ApiId, OperationId
| top {limit} by ids desc"""

# THR-005 (callers): distinct client IPs per API in the last {window}; the rule keeps the AI APIs.
API_CALLERS = """{source}
| where TimeGenerated > ago({window})
| summarize ips = dcount(CallerIpAddress), requests = count(), sample_ips = make_set(CallerIpAddress, 10) by ApiId
| top {limit} by ips desc"""

# THR-005 (tokens): language-model tokens in the last {window} and in the same window on
# each previous day, from the LLM log (GatewayLlmLogs category; resource-specific only).
LLM_TOKENS = """ApiManagementGatewayLlmLog
| where _ResourceId =~ {service}
| extend age = now() - TimeGenerated
| extend days_back = toint(age / 1d)
| where age - days_back * 1d < {window}
| summarize tokens = sum(TotalTokens), requests = count() by days_back"""

TOP_LIMIT = 100  # rows a per-caller query returns at most: the top offenders


def kql_string(value: str) -> str:
    """A KQL string literal of `value` (single-quoted, backslash and quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def kql_timespan(minutes: int) -> str:
    """A KQL timespan literal for whole minutes: 90 -> '90m'."""
    return f"{int(minutes)}m"


def source(service_id: str, *, legacy: bool) -> str:
    """The gateway-log source for one service in the given table shape."""
    template = SOURCE_AZURE_DIAGNOSTICS if legacy else SOURCE_RESOURCE_SPECIFIC
    return template.format(service=kql_string(service_id))


def build(template: str, service_id: str, *, legacy: bool, window_minutes: int) -> str:
    """One signal query: `template` over the service's gateway logs in the given shape."""
    return template.format(
        source=source(service_id, legacy=legacy),
        service=kql_string(service_id),
        window=kql_timespan(window_minutes),
        limit=TOP_LIMIT,
    )


def lookback(window_minutes: int, days: int = 0) -> timedelta:
    """What Log Analytics must scan for a window reaching `days` back (a minute of slack)."""
    return timedelta(days=days, minutes=int(window_minutes) + 1)
