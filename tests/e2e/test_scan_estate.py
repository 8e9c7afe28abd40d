"""`apim-remediator scan` end to end: the console script, configured like a deployment,
over an estate with one APIM instance per drift and one compliant instance.

Each drifted instance must yield exactly the findings of its drift and the compliant one
none; modes and exemptions change the result as docs/policy.md says; no secret planted in
the estate reaches any output; no ARM read is repeated.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TwinHandle
from twin.apim.certificates import make_certificate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RG = "rg-drift"
VAULT = "kv-drift-ledger"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
WEAK_SUITES = (
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256", "TLS_RSA_WITH_AES_256_CBC_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA", "TLS_RSA_WITH_AES_128_CBC_SHA",
)  # fmt: skip
SECURE = {
    **{GW + f"Security.{side}Protocols.{p}": "false" for side in ("", "Backend.") for p in ("Tls10", "Tls11", "Ssl30")},
    GW + "Security.Ciphers.TripleDes168": "false",
    **{GW + "Security.Ciphers." + suite: "false" for suite in WEAK_SUITES},
}
GLOBAL_POLICY = (
    '<policies><inbound><rate-limit-by-key calls="100" renewal-period="60" '
    'counter-key="@(context.Subscription.Id)" /><base /></inbound><backend><forward-request /></backend>'
    "<outbound /><on-error /></policies>"
)
API_POLICY = "<policies><inbound><base /></inbound><backend><base /></backend><outbound><base /></outbound></policies>"
# Canary secrets: none of these may appear in any output of the product.
CANARY = "CANARY7f3a"


def key(instance: str, sid: str) -> str:
    return f"{CANARY}{instance}{sid}".replace("-", "")[:40].ljust(40, "k")


def compliant(name: str, sub_id: str) -> dict[str, Any]:
    service_id = f"/subscriptions/{sub_id}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{name}"
    return {
        "name": name,
        "sku": {"name": "Premium", "capacity": 1},
        "identity": {"type": "SystemAssigned"},
        "properties": {
            "publicNetworkAccess": "Disabled",
            "privateEndpointConnections": [
                {
                    "name": "pe",
                    "properties": {
                        "privateEndpoint": {
                            "id": f"/subscriptions/{sub_id}/resourceGroups/{RG}/providers/"
                            f"Microsoft.Network/privateEndpoints/pe-{name}"
                        },
                        "privateLinkServiceConnectionState": {"status": "Approved"},
                    },
                }
            ],
            "customProperties": dict(SECURE),
            "apiVersionConstraint": {"minApiVersion": "2021-08-01"},
        },
        "tenant_access": {"enabled": False},
        "git_access": {"enabled": False},
        "portal": {"signup_enabled": False, "signin_enabled": True, "basic_auth_enabled": False},
        "products": [{"id": "mobile", "displayName": "Mobile", "apis": ["orders"]}],
        "apis": [
            {
                "id": "orders",
                "path": "orders",
                "protocols": ["https"],
                "serviceUrl": "https://orders.internal.example",
                "subscriptionRequired": True,
            },
        ],
        "backends": [
            {
                "id": "orders",
                "url": "https://orders.internal.example",
                "protocol": "http",
                "tls": {"validateCertificateChain": True, "validateCertificateName": True},
                "credentials": {"header": {"x-api-key": ["{{backend-key}}"]}},
            },
        ],
        "named_values": [
            {
                "id": "backend-key",
                "displayName": "backend-key",
                "secret": True,
                "keyVault": {"secretIdentifier": f"https://{VAULT}.vault.azure.net/secrets/backend-key"},
            },
            {"id": "region", "displayName": "region", "value": "westeurope"},
        ],
        "loggers": [{"id": "azuremonitor", "loggerType": "azureMonitor"}],
        "diagnostics": [
            {
                "id": "azuremonitor",
                "loggerId": "/loggers/azuremonitor",
                "frontend": {"request": {"headers": ["User-Agent"]}},
            },
        ],
        "policies": {"service": GLOBAL_POLICY, "apis": {"orders": API_POLICY}},
        "subscriptions": [
            {"sid": "master", "scope": "/apis", "state": "suspended"},
            {
                "sid": "orders-mobile",
                "scope": "/products/mobile",
                "state": "active",
                "expirationDate": "2027-06-30T00:00:00Z",
                "primaryKey": key(name, "orders-mobile"),
            },
        ],
        "_ledger": [("orders-mobile", key(name, "orders-mobile"), 10)],
        "_diagnostic_setting": True,
        # Its identity holds "Key Vault Secrets User" on VAULT, as an operator grants it after
        # enabling the identity: APIM reads the backend-key reference with it, and VAULT is
        # also where the product moves secrets to (SEC-001). Learn: "Use named values in
        # Azure API Management policies" (Key vault secrets) and "Provide access to Key Vault
        # keys, certificates, and secrets with Azure role-based access control".
        "_vault_reader": True,
        "_id": service_id,
    }


def with_subscription(spec: dict[str, Any], sid: str, *, scope: str = "/products/mobile", expiry: bool = True,
                      tracked: bool = True, ledger_value: str | None = None, age: int = 10) -> None:  # fmt: skip
    entry: dict[str, Any] = {"sid": sid, "scope": scope, "state": "active", "primaryKey": key(spec["name"], sid)}
    if expiry:
        entry["expirationDate"] = "2027-06-30T00:00:00Z"
    spec["subscriptions"].append(entry)
    if tracked:
        spec["_ledger"].append((sid, ledger_value or key(spec["name"], sid), age))


def drift(rule_id: str, spec: dict[str, Any]) -> None:
    """Change the compliant instance so that exactly this drift is there."""
    props, cp = spec["properties"], spec["properties"]["customProperties"]
    if rule_id == "NET-001":
        props["publicNetworkAccess"] = "Enabled"
    elif rule_id == "NET-002":
        props["publicNetworkAccess"] = "Enabled"  # without any private path, public access is the only one
        props.pop("privateEndpointConnections")
    elif rule_id == "TLS-001":
        cp[GW + "Security.Protocols.Tls10"] = "True"
    elif rule_id == "TLS-002":
        cp[GW + "Security.Backend.Protocols.Tls11"] = "TRUE"
    elif rule_id == "TLS-003":
        cp[GW + "Security.Ciphers.TripleDes168"] = "true"
    elif rule_id == "MGMT-001":
        spec["tenant_access"] = {"enabled": True}
    elif rule_id == "MGMT-002":
        spec["git_access"] = {"enabled": True}
    elif rule_id == "MGMT-003":
        props.pop("apiVersionConstraint")
    elif rule_id == "MGMT-004":
        props["platformVersion"] = "stv1"
    elif rule_id == "ID-001":
        spec.pop("identity")
        spec["_vault_reader"] = False  # no identity, nothing to grant the role to
        # Removed since APIM last read the Key Vault reference (it reads again within 4 hours,
        # and then SEC-002 follows): the twin would otherwise read it now, with no identity.
        spec["named_values"][0]["keyVault"]["lastStatus"] = {"code": "Success"}
    elif rule_id == "ID-002":
        spec["portal"]["signup_enabled"] = True
    elif rule_id == "ID-003":
        spec["portal"]["basic_auth_enabled"] = True
    elif rule_id == "KEY-001":
        with_subscription(spec, "all-apis", scope="/apis")
    elif rule_id == "KEY-002":
        with_subscription(spec, "untracked", tracked=False)
    elif rule_id == "KEY-003":
        with_subscription(spec, "stale", age=120)
    elif rule_id == "KEY-004":
        with_subscription(spec, "regenerated", ledger_value=f"{CANARY}-old-value-kept-in-vault")
    elif rule_id == "KEY-005":
        with_subscription(spec, "forever", expiry=False)
    elif rule_id == "SEC-001":
        spec["named_values"].append({"id": "db-password", "displayName": "db-password", "secret": True,
                                     "value": f"{CANARY}-named-value-secret"})  # fmt: skip
    elif rule_id == "SEC-002":
        spec["named_values"][0]["keyVault"]["lastStatus"] = {
            "code": "Forbidden", "message": "The managed identity has no access to the vault."}  # fmt: skip
    elif rule_id == "API-001":
        spec["apis"][0]["protocols"] = ["http", "https"]
    elif rule_id == "API-002":
        spec["apis"].append({"id": "open", "path": "open", "protocols": ["https"], "subscriptionRequired": False,
                             "serviceUrl": "https://orders.internal.example"})  # fmt: skip
    elif rule_id == "API-003":
        spec["backends"][0]["tls"]["validateCertificateName"] = False
    elif rule_id == "API-004":
        spec["backends"][0].pop("credentials")
    elif rule_id == "API-005":
        spec["policies"]["service"] = (
            "<policies><inbound /><backend><forward-request /></backend><outbound /></policies>"
        )
    elif rule_id == "API-006":
        spec["policies"]["apis"]["orders"] = (
            '<policies><inbound><rate-limit calls="10" renewal-period="60" /></inbound>'
            "<backend><base /></backend><outbound><base /></outbound></policies>"
        )
    elif rule_id == "LOG-001":
        spec["_diagnostic_setting"] = False
    elif rule_id == "LOG-002":
        spec["diagnostics"] = []
    elif rule_id == "LOG-003":
        spec["diagnostics"][0]["frontend"]["request"]["headers"] = ["User-Agent", "ocp-apim-subscription-key"]
    elif rule_id == "CERT-003":
        # A Key Vault-linked backend client certificate: APIM's copy, read two days ago, expires
        # in 10 days; the vault has held a renewed certificate since yesterday.
        secret = f"{spec['name']}-mtls"
        read_at = (datetime.now(UTC) - timedelta(days=2)).isoformat().replace("+00:00", "Z")
        spec["certificates"] = [
            {
                "id": "backend-mtls",
                "subject": "backend-mtls.contoso.example",
                "expires_in_days": 10,
                "keyVault": {
                    "secretIdentifier": f"https://{VAULT}.vault.azure.net/secrets/{secret}",
                    "lastStatus": {"code": "Success", "timeStampUtc": read_at},
                },
            }
        ]
        renewed = make_certificate("backend-mtls.contoso.example", datetime.now(UTC) + timedelta(days=400))
        spec["_vault_secrets"] = [{"name": secret, "value": renewed, "created_days_ago": 1}]
    else:
        raise AssertionError(f"no drift recipe for {rule_id}")


# What each drifted instance must yield: its own rule, and what that drift implies.
EXPECTED: dict[str, set[str]] = {rule_id: {rule_id} for rule_id in (
    "NET-001", "TLS-001", "TLS-002", "TLS-003", "MGMT-001", "MGMT-002", "MGMT-003", "MGMT-004", "ID-001",
    "ID-002", "ID-003", "KEY-001", "KEY-002", "KEY-003", "KEY-004", "KEY-005", "SEC-001", "SEC-002", "API-001",
    "API-002", "API-003", "API-004", "API-005", "API-006", "LOG-001", "LOG-002", "LOG-003",
)}  # fmt: skip
# No private path and public access on: both rules describe the one drift.
EXPECTED["NET-002"] = {"NET-001", "NET-002"}


def instance_name(rule_id: str) -> str:
    return "drift-" + rule_id.lower()


def vault_id(sub_id: str) -> str:
    return f"/subscriptions/{sub_id}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"


def fragment_for(specs: dict[str, dict[str, Any]], sub_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """An estate fragment for these instance specs (label -> spec), with the key ledger,
    the workspace, diagnostic settings and Key Vault role of their identity they ask for;
    and each label's service id."""
    workspace = f"/subscriptions/{sub_id}/resourceGroups/{RG}/providers/Microsoft.OperationalInsights/workspaces/law"
    secrets = []
    settings = []
    apim = []
    grants = []
    ids = {}
    for label, original in specs.items():
        spec = copy.deepcopy(original)
        ids[label] = spec.pop("_id")
        if spec.pop("_vault_reader"):
            grants.append(
                {
                    "principal": {"managed_identity_of": ids[label]},
                    "role": "Key Vault Secrets User",
                    "scope": vault_id(sub_id),
                }
            )
        for sid, value, age in spec.pop("_ledger"):
            secrets.append(
                {
                    "name": f"{spec['name']}--{sid}",
                    "value": value,
                    "created_days_ago": age,
                    "expires_in_days": 90 - age,
                    "tags": {"apim-subscription-id": f"{ids[label]}/subscriptions/{sid}", "apim-key-slot": "primary"},
                }
            )
        secrets.extend(spec.pop("_vault_secrets", []))
        if spec.pop("_diagnostic_setting"):
            settings.append(
                {
                    "resource": ids[label],
                    "name": "to-law",
                    "properties": {
                        "workspaceId": workspace,
                        "logAnalyticsDestinationType": "Dedicated",
                        "logs": [{"category": "GatewayLogs", "enabled": True}],
                    },
                }
            )
        apim.append(spec)
    secrets.append({"name": "backend-key", "value": f"{CANARY}-backend-key"})
    group = {
        "name": RG,
        "location": "westeurope",
        "workspaces": [{"name": "law", "customer_id": "4d5e6f70-0000-4000-8000-0000000000aa"}],
        "key_vaults": [{"name": VAULT, "secrets": secrets}],
        "apim": apim,
        "diagnostic_settings": settings,
    }
    return {"subscriptions": [{"id": sub_id, "resource_groups": [group]}], "role_assignments": grants}, ids


def estate(sub_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    specs = {"compliant": compliant("compliant", sub_id)}
    for rule_id in EXPECTED:
        spec = compliant(instance_name(rule_id), sub_id)
        drift(rule_id, spec)
        specs[rule_id] = spec
    return fragment_for(specs, sub_id)


def run_scan(
    twin: TwinHandle, tmp_path: Path, policy: str | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    env.update(twin.env)
    env["APIMR_KEY_VAULT_URL"] = twin.urls[f"vault:{VAULT}"]
    env["APIMR_RESOURCE_GROUPS"] = RG
    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
        env["APIMR_POLICY_FILE"] = str(path)
    command = [str(Path(sys.executable).with_name("apim-remediator")), "scan", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.fixture
def drift_estate(twin: TwinHandle) -> dict[str, str]:
    fragment, ids = estate(twin.subscription_id)
    twin.seed(fragment)
    return ids


def findings_by_instance(output: str) -> dict[str, list[dict[str, Any]]]:
    body = json.loads(output)
    assert all(i["error"] is None for i in body["instances"]), [i["error"] for i in body["instances"]]
    assert all(not i["unreadable"] for i in body["instances"]), [i["unreadable"] for i in body["instances"]]
    return {i["id"].rsplit("/", 1)[-1]: i["findings"] for i in body["instances"]}


def test_each_drift_found_exactly_once_and_nothing_on_the_compliant_instance(
    twin: TwinHandle, drift_estate: dict[str, str], tmp_path: Path
) -> None:
    twin.control("DELETE", "/_twin/log")
    result = run_scan(twin, tmp_path, None, "--format", "json")
    assert result.returncode == 0, result.stderr
    found = findings_by_instance(result.stdout)
    assert found.pop("compliant") == []
    for rule_id, expected in EXPECTED.items():
        rules = [f["rule"] for f in found.pop(instance_name(rule_id))]
        assert sorted(rules) == sorted(expected), (rule_id, rules)
    assert found == {}  # no other instance in the resource group
    # Progress went to stderr, one line per instance.
    assert result.stderr.count("scanned ") == len(EXPECTED) + 1
    # No ARM read was made twice.
    _, log = twin.control("GET", "/_twin/log?service=arm")
    reads = Counter((e["method"], e["path"].lower(), e["query"]) for e in log["entries"] if e["method"] == "GET")
    assert [r for r, n in reads.items() if n > 1] == []
    # Canary secrets (subscription keys, Key Vault values, a named value) and the client
    # secret appear nowhere in what the product printed.
    for output in (result.stdout, result.stderr):
        assert CANARY not in output
        assert twin.client_secret not in output


def test_fail_on_and_sarif(twin: TwinHandle, drift_estate: dict[str, str], tmp_path: Path) -> None:
    result = run_scan(twin, tmp_path, None, "--format", "sarif", "--fail-on", "high", "--quiet",
                      "--output", str(tmp_path / "scan.sarif"))  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == ""
    sarif = json.loads((tmp_path / "scan.sarif").read_text())
    results = sarif["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == set().union(*EXPECTED.values())
    assert CANARY not in (tmp_path / "scan.sarif").read_text()


def test_modes_and_exemptions_as_documented(twin: TwinHandle, drift_estate: dict[str, str], tmp_path: Path) -> None:
    policy = f"""version: 1
rules:
  TLS-001: {{mode: "off"}}
exemptions:
  - rule: MGMT-001
    resource: "{drift_estate["MGMT-001"]}"
    reason: "direct management API needed until the CI moves to ARM (OPS-42)"
    expires: 2099-12-31
  - rule: "*"
    resource: "**/drift-api-00*"
    reason: "API team exemption, all rules"
    expires: 2099-12-31
"""
    result = run_scan(twin, tmp_path, policy, "--format", "json", "--instance", drift_estate["MGMT-001"],
                      "--instance", drift_estate["TLS-001"], "--instance", drift_estate["API-001"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = findings_by_instance(result.stdout)
    assert set(found) == {"drift-mgmt-001", "drift-tls-001", "drift-api-001"}
    assert found["drift-tls-001"] == []  # the rule is off
    [mgmt] = found["drift-mgmt-001"]
    assert mgmt["exemption"]["reason"].startswith("direct management API needed")
    [api] = found["drift-api-001"]
    assert api["exemption"]["reason"] == "API team exemption, all rules"


def test_instance_outside_scope_is_refused(twin: TwinHandle, drift_estate: dict[str, str], tmp_path: Path) -> None:
    elsewhere = drift_estate["compliant"].replace(RG, "rg-elsewhere")
    result = run_scan(twin, tmp_path, None, "--instance", elsewhere)
    assert result.returncode == 2
    assert "not an APIM instance in the configured scope" in result.stderr
    assert elsewhere in result.stderr
