"""Custom rules end to end: `apim-remediator scan` over the twin with the policy examples of
docs/policy.md plus one rule per remaining resource kind, read by the real snapshot.

One instance satisfies every custom rule, the other breaks each in a known place: each rule
fires exactly there (one exempt, as the example's exemption says) and nowhere else. A
malformed custom rule stops the scan before any read with its file:line and exit 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, compliant, findings_by_instance, fragment_for, run_scan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JWT = (
    '<validate-jwt header-name="Authorization" failed-validation-httpcode="401">'
    '<openid-config url="https://login.example/tenant/v2.0/.well-known/openid-configuration" /></validate-jwt>'
)
GOOD_API_POLICY = (
    f"<policies><inbound><base />{JWT}</inbound><backend><base /></backend><outbound><base /></outbound></policies>"
)
# Without <base /> in inbound: the global policy no longer runs for the API (X-POL-001 below).
NO_BASE_API_POLICY = (
    f"<policies><inbound>{JWT}</inbound><backend><base /></backend><outbound><base /></outbound></policies>"
)

# One rule per resource kind the docs example does not cover, each with another operator.
MORE_RULES = """\
  - id: X-SVC-001
    title: Every instance names its owner
    severity: low
    rationale: Someone must answer for an instance.
    resource: service
    require: {field: tags, contains: owner}
  - id: X-NV-001
    title: Secret named values come from Key Vault
    severity: high
    rationale: A secret typed into APIM has no rotation and no audit.
    resource: named_values
    where: {field: secret, eq: true}
    require: {field: keyVault.secretIdentifier, present: true}
  - id: X-BE-001
    title: Backends are called over HTTPS
    severity: high
    rationale: Traffic to backends leaves the gateway.
    resource: backends
    require: {field: url, regex: "^https://"}
  - id: X-LOGR-001
    title: Loggers go to Azure Monitor only
    severity: medium
    rationale: One log destination with one retention policy.
    resource: loggers
    require: {field: loggerType, eq: azureMonitor}
  - id: X-POL-001
    title: API policies keep the global policy in their inbound chain
    severity: high
    rationale: Dropping <base /> drops the global limits and checks.
    resource: policies
    where: {field: scope, eq: api}
    require: {field: policy.inbound, contains: base}
"""


def docs_custom_rules() -> str:
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    [block] = re.findall(r"^```yaml custom-rules\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    return str(block)


def policy_text() -> str:
    text = docs_custom_rules()
    head, rest = text.split("rules:\n  X-NAME-001", 1)
    return head + MORE_RULES + "rules:\n  X-NAME-001" + rest


def good(name: str, sub_id: str) -> dict[str, Any]:
    spec = compliant(name, sub_id)
    spec["tags"] = {"owner": "platform-team"}
    spec["products"][0]["approvalRequired"] = True
    spec["diagnostics"][0]["sampling"] = {"samplingType": "fixed", "percentage": 100}
    spec["policies"]["apis"]["orders"] = GOOD_API_POLICY
    return spec


def bad(name: str, sub_id: str) -> dict[str, Any]:
    spec = good(name, sub_id)
    spec.pop("tags")
    spec["apis"].append(
        {"id": "legacy", "path": "legacy", "protocols": ["https"], "subscriptionRequired": True,
         "serviceUrl": "https://orders.internal.example"}
    )  # fmt: skip
    spec["products"] += [
        {"id": "starter", "displayName": "Starter", "subscriptionRequired": True, "approvalRequired": False},
        {"id": "partners", "displayName": "Partners", "subscriptionRequired": True, "approvalRequired": False},
    ]
    spec["subscriptions"] += [
        {"sid": "forever", "scope": "/products/mobile", "state": "active"},
        {"sid": "old", "scope": "/products/mobile", "state": "active", "createdDate": "2020-01-01T00:00:00Z",
         "expirationDate": "2027-06-30T00:00:00Z"},
    ]  # fmt: skip
    spec["diagnostics"][0]["sampling"] = {"samplingType": "fixed", "percentage": 50}
    spec["named_values"].append(
        {"id": "db-password", "displayName": "db-password", "secret": True, "value": f"{CANARY}-db-password"}
    )
    spec["backends"].append({"id": "legacy", "url": "http://legacy.internal.example", "protocol": "http"})
    spec["loggers"].append(
        {"id": "appinsights", "loggerType": "applicationInsights", "credentials": {"instrumentationKey": CANARY}}
    )
    spec["policies"]["apis"]["orders"] = NO_BASE_API_POLICY
    return spec


EXPECTED_BAD = {
    ("X-JWT-001", "apis/legacy", False),  # no JWT anywhere in global -> legacy
    ("X-NAME-001", "apis/legacy", False),
    ("X-PROD-001", "products/starter", True),  # the docs example exempts starter
    ("X-PROD-001", "products/partners", False),
    ("X-SUB-001", "subscriptions/forever", False),  # no expiry
    ("X-SUB-001", "subscriptions/old", False),  # created more than 365 days ago
    ("X-LOG-001", "diagnostics/azuremonitor", False),
    ("X-SVC-001", "", False),
    ("X-NV-001", "namedValues/db-password", False),
    ("X-BE-001", "backends/legacy", False),
    ("X-LOGR-001", "loggers/appinsights", False),
    ("X-POL-001", "apis/orders/policies/policy", False),
}


def test_each_custom_rule_fires_exactly_where_it_should(twin: TwinHandle, tmp_path: Path) -> None:
    fragment, ids = fragment_for(
        {"good": good("custom-good", twin.subscription_id), "bad": bad("custom-bad", twin.subscription_id)},
        twin.subscription_id,
    )
    twin.seed(fragment)
    result = run_scan(twin, tmp_path, policy_text(), "--format", "json", "--instance", ids["good"],
                      "--instance", ids["bad"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = findings_by_instance(result.stdout)
    assert [f for f in found["custom-good"] if f["rule"].startswith("X-")] == []
    got = {
        (f["rule"], f["resource"][len(ids["bad"]) + 1 :], f["exemption"] is not None)
        for f in found["custom-bad"]
        if f["rule"].startswith("X-")
    }
    assert got == EXPECTED_BAD
    assert len([f for f in found["custom-bad"] if f["rule"].startswith("X-")]) == len(EXPECTED_BAD)
    for output in (result.stdout, result.stderr):
        assert CANARY not in output

    sarif = run_scan(twin, tmp_path, policy_text(), "--format", "sarif", "--quiet", "--instance", ids["bad"])
    assert sarif.returncode == 0, sarif.stderr
    assert '"id": "X-POL-001"' in sarif.stdout
    assert '"ruleId": "X-POL-001"' in sarif.stdout
    assert CANARY not in sarif.stdout


def test_a_malformed_custom_rule_stops_the_scan_with_file_line_and_exit_2(twin: TwinHandle, tmp_path: Path) -> None:
    broken = policy_text().replace('regex: "^https://"', 'regex: "^https(://"')
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if "^https(://" in text)
    twin.control("DELETE", "/_twin/log")
    result = run_scan(twin, tmp_path, broken, "--format", "json")
    assert result.returncode == 2
    assert result.stdout == ""
    policy_file = tmp_path / "policy.yaml"
    assert f"{policy_file}:{line}: custom_rules[7].require.regex: bad regular expression '^https(://'" in result.stderr
    _, log = twin.control("GET", "/_twin/log?service=arm")
    assert log["entries"] == []  # nothing was read
