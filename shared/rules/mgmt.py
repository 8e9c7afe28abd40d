"""Management-plane rules: side doors into the configuration and the platform the instance runs on."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from shared.model import AccessSetting, Finding, Severity, Snapshot
from shared.rules import Param, ParamFormat, References, Rule, rule

_DOCS = "https://learn.microsoft.com/azure/api-management/"
_API_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _sku_in(snapshot: Snapshot, skus: Sequence[str]) -> bool:
    return snapshot.service.sku_name.lower() in {s.lower() for s in skus}


def _access_finding(
    rule: Rule, snapshot: Snapshot, part: str, setting: AccessSetting | None, what: str
) -> list[Finding]:
    # Not read, or Azure did not say: nothing to report.
    if not snapshot.readable(part) or setting is None or setting.enabled is not True:
        return []
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} has the {what} enabled.",
            path="properties.enabled",
            actual=True,
            expected=False,
            resource_id=setting.id,
        )
    ]


def api_version_date(value: str) -> date | None:
    """The date of an ARM api-version ("2021-08-01", "2022-04-01-preview"); None if it is not one."""
    text = value.strip().lower().removesuffix("-preview")
    if not _API_DATE.match(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


@rule(
    "MGMT-001",
    title="Direct management API enabled",
    severity=Severity.HIGH,
    rationale=(
        "The direct management REST API (https://{name}.management.azure-api.net, tenant access) accepts "
        "SAS tokens derived from the tenant access keys, bypassing Azure RBAC, Entra ID sign-in, ARM "
        "throttling and the Azure activity log. HIGH: a leaked key grants full configuration control "
        "with no audit trail. Microsoft retired the API on 15 March 2025, so nothing legitimate needs it. "
        "A tenant access setting that was not read, or has no 'enabled', gives no finding."
    ),
    references=References(
        azure_policy=(
            "b741306c-968e-4b67-b916-5675e5c709f4",
            "df73bd95-24da-4a4f-96b9-4e8b94b402bd",
            "7ca8c8ac-3a6e-493d-99ba-c5fa35347ff2",
        ),
        mcsb=("PV-2",),
        owasp_api=("API8:2023",),
        docs=(_DOCS + "breaking-changes/direct-management-api-retirement-march-2025",),
    ),
    remediable=True,
)
def direct_management_api(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    return _access_finding(rule, snapshot, "tenant_access", snapshot.tenant_access, "direct management API")


@rule(
    "MGMT-002",
    title="Git configuration endpoint enabled",
    severity=Severity.HIGH,
    rationale=(
        "The Git configuration repository (https://{name}.scm.azure-api.net) lets anyone holding "
        "credentials generated from the tenant Git keys push a whole new configuration (APIs, policies, "
        "products) outside ARM RBAC and the activity log, and keeps any secret not held in a named value "
        "in its history. HIGH for the same reasons as MGMT-001. Microsoft retired the feature on "
        "15 March 2025. A Git access setting that was not read, or has no 'enabled', gives no finding. "
        "Azure Policy df73bd95/7ca8c8ac cover it with endpointType 'Git'."
    ),
    references=References(
        azure_policy=("df73bd95-24da-4a4f-96b9-4e8b94b402bd", "7ca8c8ac-3a6e-493d-99ba-c5fa35347ff2"),
        owasp_api=("API8:2023",),
        docs=(_DOCS + "api-management-configuration-repository-git",),
    ),
    remediable=True,
)
def git_configuration(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    return _access_finding(rule, snapshot, "git_access", snapshot.git_access, "Git configuration endpoint")


@rule(
    "MGMT-003",
    title="Minimum management API version unset or too old",
    severity=Severity.LOW,
    rationale=(
        "apiVersionConstraint.minApiVersion makes ARM refuse control-plane calls with older api-versions; "
        "versions before 2019-12-01 returned service secrets to read-only users. Unset means no floor, "
        "so it is reported (the rule's one use of an absent property). Versions compare as dates, "
        "ignoring a -preview suffix; an unparseable value gives no finding. LOW: Microsoft has retired "
        "every api-version before 2021-08-01 and deprecated the matching Azure Policy (549814b6), so "
        "this is hygiene now. Consumption is skipped as that policy did (parameter skip_skus)."
    ),
    references=References(
        azure_policy=("549814b6-3212-4203-bdc8-1548d342fb67",),
        mcsb=("IM-8",),
        owasp_api=("API8:2023",),
        docs=(_DOCS + "breaking-changes/api-version-retirement-sep-2023",),
    ),
    params=[
        Param(
            "min_api_version",
            "2019-12-01",
            "Oldest acceptable minApiVersion (YYYY-MM-DD).",
            format=ParamFormat("an api-version date YYYY-MM-DD", lambda v: api_version_date(v) is not None),
        ),
        Param("skip_skus", ("Consumption",), "SKUs not evaluated."),
    ],
    remediable=True,
)
def min_api_version(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    floor = api_version_date(str(params["min_api_version"]))
    if floor is None:
        raise ValueError(f"MGMT-003: min_api_version must be YYYY-MM-DD, got {params['min_api_version']!r}")
    if _sku_in(snapshot, params["skip_skus"]):
        return []
    actual = snapshot.service.min_api_version
    if actual is not None and actual.strip():
        found = api_version_date(actual)
        if found is None or found >= floor:
            return []
        problem = f"allows management API versions older than {floor.isoformat()} ({actual})"
    else:
        actual = None
        problem = "sets no minimum management API version"
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} {problem}.",
            path="properties.apiVersionConstraint.minApiVersion",
            actual=actual,
            expected=f">= {floor.isoformat()}",
        )
    ]


@rule(
    "MGMT-004",
    title="Instance on the retired stv1 platform",
    severity=Severity.HIGH,
    rationale=(
        "The stv1 compute platform was retired on 31 August 2024 (24 February 2025 in Azure Government "
        "and Azure in China): it has no SLA, receives no fixes and Microsoft may shut it down. HIGH: an "
        "unsupported runtime in front of every API. Not remediable automatically: migrating to stv2 "
        "changes IP addresses and, in a VNet, needs a new subnet, which is an operator's decision. "
        "Consumption reports mtv1 and is never flagged; an absent platformVersion gives no finding."
    ),
    references=References(
        azure_policy=("1dc2fc00-2245-4143-99f4-874c937f13ef",),
        owasp_api=("API8:2023",),
        docs=(_DOCS + "breaking-changes/stv1-platform-retirement-august-2024",),
    ),
    remediable=False,
)
def stv1_platform(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    version = snapshot.service.platform_version
    if version is None or version.strip().lower() != "stv1":
        return []
    return [
        rule.finding(
            snapshot,
            message=f"APIM instance {snapshot.service.name} runs on the retired stv1 compute platform.",
            path="properties.platformVersion",
            actual=version,
            expected="stv2",
        )
    ]
