"""Least privilege by use, not by comparing lists: `apim-remediator scan` and `remediate
--apply` run against the twin (which enforces Azure RBAC) as a principal that holds ONLY the
product's custom role, read from infra/subscription-role.bicep as Azure would deploy it
(allowRemediation=true, at subscription scope), plus "Key Vault Secrets Officer" on its
key-ledger vault (the data role that file's closing comment names). Every remediation that
needs a write action succeeds; then, for each action of the role, the same run with that
one action taken out of the role fails with Azure's 403 naming exactly that action.

Reads surface as they would in Azure: without Microsoft.ResourceGraph/resources/read or
Microsoft.Resources/subscriptions/read Resource Graph leaves the subscription out and the scan
stops with the inventory error naming both; without Microsoft.ApiManagement/service/read
Resource Graph leaves the instance out, and ARM's list (asked because Graph showed the
subscription empty) refuses naming the action; without service/*/read, listSecrets or
diagnosticSettings/read the scan marks the part it could not read UNREAD with the 403 naming
the action.
"""

from __future__ import annotations

import io
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from handlers.cli import main
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import RG, VAULT, compliant, drift, fragment_for
from tests.integration.test_remediate_lockouts import leaf_context, tls_backend
from twin.rbac import bicep_actions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROLE = bicep_actions(ROOT / "infra" / "subscription-role.bicep")
READS, WRITES = ROLE["readActions"], ROLE["writeActions"]
PRINCIPAL = {
    "name": "least-privilege",
    "client_id": "0b5e0c1a-0000-4000-8000-0000000000a7",
    "client_secret": "twin-test-secret-least-privilege",
    "object_id": "5f1d2e3c-0000-4000-8000-0000000000a7",
}

# The remediation whose run needs each write action (and the two reads only KEY-001's evidence
# uses). Every write action of the role must be here: one no remediation needs is a surplus.
USED_BY: dict[str, str] = {
    "Microsoft.ApiManagement/service/write": "TLS-001",
    "Microsoft.ApiManagement/service/tenant/write": "MGMT-001",
    "Microsoft.ApiManagement/service/portalsettings/write": "ID-002",
    "Microsoft.ApiManagement/service/portalconfigs/write": "ID-003",
    "Microsoft.ApiManagement/service/subscriptions/write": "KEY-001",
    # Key rotation regenerates the slot clients do not use: KEY-004's ledger (tagged primary)
    # is restored, then the secondary regenerated; KEY-003's is seeded tagged secondary here.
    "Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action": "KEY-003",
    "Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action": "KEY-004",
    "Microsoft.ApiManagement/service/namedValues/write": "SEC-001",
    "Microsoft.ApiManagement/service/namedValues/listValue/action": "SEC-001",
    "Microsoft.ApiManagement/service/apis/write": "API-001",
    "Microsoft.ApiManagement/service/backends/write": "API-003",
    "Microsoft.ApiManagement/service/loggers/write": "LOG-002",
    "Microsoft.ApiManagement/service/diagnostics/write": "LOG-003",
    "Microsoft.ApiManagement/service/certificates/refreshSecret/action": "CERT-003",
    "Microsoft.Insights/diagnosticSettings/write": "LOG-001",
    "Microsoft.OperationalInsights/workspaces/sharedKeys/action": "LOG-001",
    "Microsoft.OperationalInsights/workspaces/read": "KEY-001",
    "Microsoft.OperationalInsights/workspaces/query/read": "KEY-001",
}
# The write actions only the jobs and event-driven use cases use: the backup jobs
# (tests/integration/test_backup_jobs.py) and the renewal of self-hosted gateway tokens
# (`rotate --gateways`, also what GatewayTokenNearExpiry runs). Each is proven below by
# running that job under the role without it and seeing the 403 that names it.
USED_BY_JOBS: dict[str, str] = {
    "Microsoft.ApiManagement/service/backup/action": "backup",
    "Microsoft.ApiManagement/service/restore/action": "restore-test",
    "Microsoft.ApiManagement/service/gateways/listKeys/action": "rotate --gateways",
    "Microsoft.ApiManagement/service/gateways/regenerateKey/action": "rotate --gateways",
    "Microsoft.ApiManagement/service/gateways/generateToken/action": "rotate --gateways",
}
FIXABLE = sorted(set(USED_BY.values()) | {"NET-001", "TLS-002", "TLS-003", "MGMT-002", "MGMT-003", "ID-001"})


def workspace_id(twin: TwinHandle) -> str:
    group = f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}"
    return f"{group}/providers/Microsoft.OperationalInsights/workspaces/law"


def policy(twin: TwinHandle) -> str:
    rules = {rule: {"mode": "remediate"} for rule in FIXABLE}
    rules["NET-001"]["params"] = {"acknowledge_gateway_only": True}
    rules["LOG-001"]["params"] = {"workspace_id": workspace_id(twin)}
    return json.dumps({"version": 1, "rules": rules, "limits": {"max_writes_per_run": 50}})


def seed(twin: TwinHandle, rules: list[str], backend_port: int, actions: tuple[str, ...]) -> dict[str, str]:
    """One drifted instance per rule (fresh names: the journal in Azurite outlives a reset),
    gateway logs that show KEY-001's key unused, and the principal with a role of `actions`."""
    suffix = uuid.uuid4().hex[:6]
    if "CERT-003" in rules and f"vault:{VAULT}" not in twin.urls:
        # The vault's own URL (its port) exists once the vault does: CERT-003's certificate names it.
        vault_only = {"name": RG, "location": "westeurope", "key_vaults": [{"name": VAULT, "secrets": []}]}
        twin.seed({"subscriptions": [{"id": twin.subscription_id, "resource_groups": [vault_only]}]})
    specs = {}
    for rule in rules:
        spec = compliant(f"lp-{rule.lower()}-{suffix}", twin.subscription_id)
        drift(rule, spec)
        if rule == "API-003":
            spec["backends"][0]["url"] = f"https://127.0.0.1:{backend_port}/api"
        if rule == "LOG-002":
            spec["loggers"] = []  # so the fix creates the azureMonitor logger too
        if rule == "KEY-003":
            # Clients use the secondary key: the rotation regenerates the primary.
            stale = next(s for s in spec["subscriptions"] if s["sid"] == "stale")
            stale["secondaryKey"] = stale["primaryKey"][::-1]
            spec["_ledger"] = [(sid, stale["secondaryKey"] if sid == "stale" else v, age)
                               for sid, v, age in spec["_ledger"]]  # fmt: skip
        if rule == "CERT-003":
            # The product lists the secret's versions (its evidence) at the vault's own URL.
            for cert in spec["certificates"]:
                name = cert["keyVault"]["secretIdentifier"].rsplit("/", 1)[1]
                cert["keyVault"]["secretIdentifier"] = f"{twin.urls[f'vault:{VAULT}']}/secrets/{name}"
        specs[rule] = spec
    fragment, ids = fragment_for(specs, twin.subscription_id)
    [group] = fragment["subscriptions"][0]["resource_groups"]
    for secret in group["key_vaults"][0]["secrets"]:
        if secret["name"].endswith("--stale"):
            secret["tags"]["apim-key-slot"] = "secondary"
    if "KEY-001" in ids:
        rows = [
            {"ago": "29.9d", "ApimSubscriptionId": "orders-mobile"},
            {"ago": "1h", "ApimSubscriptionId": "orders-mobile"},
        ]
        group["workspaces"][0]["tables"] = {
            "ApiManagementGatewayLogs": {"rows": [{"_ResourceId": ids["KEY-001"], **r} for r in rows]}
        }
    vault = f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"
    role = f"APIM Remediator under test {suffix}"
    fragment.update(
        principals=[PRINCIPAL],
        custom_roles=[{"name": role, "actions": list(actions)}],
        role_assignments=[
            # fragment_for's: each instance's identity reads the vault (APIM's Key Vault references)
            *fragment["role_assignments"],
            {"principal": PRINCIPAL["name"], "role": role, "scope": f"/subscriptions/{twin.subscription_id}"},
            {"principal": PRINCIPAL["name"], "role": "Key Vault Secrets Officer", "scope": vault},
        ],
    )
    twin.seed(fragment)
    return ids


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[int, trustme.CA]]:
    """A backend that completes TLS handshakes, so API-003's evidence can validate it."""
    ca = trustme.CA()
    context: ssl.SSLContext = leaf_context(ca, tmp_path)
    with tls_backend(context) as port:
        yield port, ca


@pytest.fixture
def as_least_privilege(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: tuple[int, trustme.CA]
) -> None:
    """The product's settings, signed in as PRINCIPAL instead of the product's identity."""
    for key, value in twin.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AZURE_CLIENT_ID", PRINCIPAL["client_id"])
    monkeypatch.setenv("AZURE_CLIENT_SECRET", PRINCIPAL["client_secret"])
    monkeypatch.setenv("APIMR_RESOURCE_GROUPS", RG)
    monkeypatch.setenv("APIMR_SUBSCRIPTION_IDS", twin.subscription_id)
    monkeypatch.setenv("APIMR_RETRY_TOTAL", "0")
    monkeypatch.setenv("APIMR_LEASE_SECONDS", "15")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(twin.env["APIMR_CA_BUNDLE"]).read_bytes() + b"\n" + backend[1].cert_pem.bytes())
    monkeypatch.setenv("APIMR_CA_BUNDLE", str(bundle))
    path = tmp_path / "policy.yaml"
    path.write_text(policy(twin))
    monkeypatch.setenv("APIMR_POLICY_FILE", str(path))


def run(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def set_vault_url(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIMR_KEY_VAULT_URL", twin.urls[f"vault:{VAULT}"])


def scan_json(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    code, text = run("scan", "--format", "json", "--quiet", *args)
    try:
        return code, json.loads(text[: text.rindex("}") + 1]), text
    except ValueError:
        return code, None, text


def remediate(service_id: str, rule: str) -> tuple[int, str]:
    return run("remediate", "--instance", service_id, "--rule", rule, "--apply", "--format", "json")


def test_every_write_action_of_the_role_is_used_by_a_remediation() -> None:
    """writeActions (with the two reads only KEY-001's evidence needs) is exactly USED_BY, with
    the actions of the jobs (backup, restore-test, gateway token renewal), and every job action
    has its own run-without-it test below."""
    assert set(WRITES) == set(USED_BY) | set(USED_BY_JOBS)
    assert not set(USED_BY) & set(USED_BY_JOBS)
    proven = {"backup", "restore-test", "rotate --gateways"}
    assert set(USED_BY_JOBS.values()) == proven


@pytest.mark.usefixtures("as_least_privilege")
def test_scan_and_every_remediation_pass_with_only_the_products_role(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, backend: tuple[int, trustme.CA]
) -> None:
    """The role as deployed (readActions + writeActions) is enough for scan and every fix."""
    ids = seed(twin, FIXABLE, backend[0], READS + WRITES)
    set_vault_url(twin, monkeypatch)
    code, report, text = scan_json()
    assert code == 0, text
    assert report is not None, text
    seen = {i["id"].lower(): i for i in report["instances"]}
    for rule, service_id in ids.items():
        instance = seen[service_id.lower()]
        assert instance["error"] is None, (rule, instance)
        assert not instance["unreadable"], (rule, instance)
        assert rule in {f["rule"] for f in instance["findings"]}, (rule, instance["findings"])
    for rule, service_id in ids.items():
        code, text = remediate(service_id, rule)
        assert code == 0, (rule, text)
        statuses = {(r["rule"], r["status"]) for r in json.loads(text[: text.rindex("}") + 1])["results"]}
        assert (rule, "fixed") in statuses or (rule, "pending") in statuses, (rule, text)


@pytest.mark.parametrize("action", sorted(USED_BY))
@pytest.mark.usefixtures("as_least_privilege")
def test_without_one_action_the_remediation_that_needs_it_fails_naming_it(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, backend: tuple[int, trustme.CA], action: str
) -> None:
    rule = USED_BY[action]
    ids = seed(twin, [rule], backend[0], tuple(a for a in READS + WRITES if a != action))
    set_vault_url(twin, monkeypatch)
    code, text = remediate(ids[rule], rule)
    assert code != 0, text
    assert "403" in text or "AuthorizationFailed" in text or "InsufficientAccess" in text, text
    assert f"'{action}'" in text, text


@pytest.mark.parametrize("action", READS)
@pytest.mark.usefixtures("as_least_privilege")
def test_without_one_read_action_the_scan_fails_and_says_why(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, backend: tuple[int, trustme.CA], action: str
) -> None:
    """Reads show as Azure shows them: an inventory error, a missing instance, or UNREAD parts
    whose 403 names the action."""
    # KEY-004's instance: the key ledger holds its key, so the scan needs listSecrets to compare.
    ids = seed(twin, ["KEY-004"], backend[0], tuple(a for a in READS + WRITES if a != action))
    set_vault_url(twin, monkeypatch)
    code, report, text = scan_json("--fail-on", "critical")
    if action in ("Microsoft.ResourceGraph/resources/read", "Microsoft.Resources/subscriptions/read"):
        # Resource Graph leaves the subscription's row out: the inventory says so and names both.
        assert code == 2, text
        assert "Resource Graph cannot see subscription(s)" in text, text
        assert f"'{action}'" in text, text
        return
    if action == "Microsoft.ApiManagement/service/read":
        # Resource Graph leaves the instance out; ARM's list, asked because Graph showed none,
        # refuses with the action.
        assert code == 2, text
        assert f"403 AuthorizationFailed (needs '{action}')" in text, text
        return
    assert report is not None, text
    found = {i["id"].lower(): i for i in report["instances"]}
    instance = found[ids["KEY-004"].lower()]
    assert code == 1, text  # a partial read fails the gate
    assert any("403 AuthorizationFailed" in u for u in instance["unreadable"]), instance["unreadable"]
    if action != "Microsoft.ApiManagement/service/*/read":
        assert any(f"needs '{action}'" in u for u in instance["unreadable"]), instance["unreadable"]
    else:  # the wildcard is granted as the concrete reads it covers
        assert any("needs 'Microsoft.ApiManagement/service/" in u for u in instance["unreadable"])


@pytest.mark.usefixtures("as_least_privilege")
def test_the_scan_with_the_whole_role_reads_everything(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, backend: tuple[int, trustme.CA]
) -> None:
    ids = seed(twin, ["KEY-004"], backend[0], READS + WRITES)
    set_vault_url(twin, monkeypatch)
    code, report, text = scan_json("--fail-on", "critical")
    assert code == 0, text
    assert report is not None, text
    [instance] = [i for i in report["instances"] if i["id"].lower() == ids["KEY-004"].lower()]
    assert not instance["unreadable"]
    assert "KEY-004" in {f["rule"] for f in instance["findings"]}


@pytest.mark.parametrize("missing", [None, *sorted(USED_BY_JOBS)])
@pytest.mark.usefixtures("as_least_privilege")
def test_the_backup_jobs_run_with_only_the_role_and_need_each_of_their_actions(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str | None
) -> None:
    from tests.integration.test_backup_jobs import ACCOUNT, policy_text, seed_estate
    from tests.integration.test_backup_jobs import RG as BACKUP_RG

    ids = seed_estate(twin)
    role = f"APIM Remediator jobs under test {uuid.uuid4().hex[:6]}"
    twin.seed(
        {
            "principals": [PRINCIPAL],
            "custom_roles": [{"name": role, "actions": [a for a in READS + WRITES if a != missing]}],
            "role_assignments": [
                {"principal": PRINCIPAL["name"], "role": role, "scope": f"/subscriptions/{twin.subscription_id}"}
            ],
        }
    )
    path = tmp_path / "backup-policy.yaml"
    path.write_text(policy_text(ids))
    monkeypatch.setenv("APIMR_POLICY_FILE", str(path))
    monkeypatch.setenv("APIMR_RESOURCE_GROUPS", BACKUP_RG)
    monkeypatch.setenv("APIMR_BACKUP_STORAGE_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("APIMR_BACKUP_BLOB_ENDPOINT", twin.server.state.extra["storage"][ACCOUNT]["blob_url"])
    monkeypatch.setenv("APIMR_BACKUP_CONTAINER", f"lp-{uuid.uuid4().hex[:10]}")
    code, text = run("backup", "--instance", ids["bk-src"], "--force", "--max-wait", "30")
    if missing == "Microsoft.ApiManagement/service/backup/action":
        assert code == 1, text
        assert f"'{missing}'" in text, text
        return
    assert code == 0, text
    code, text = run("restore-test", "--source", ids["bk-src"], "--force", "--max-wait", "30")
    if missing == "Microsoft.ApiManagement/service/restore/action":
        assert code == 1, text
        assert f"'{missing}'" in text, text
        return
    assert code == 0, text
    assert text.startswith("passed"), text


GATEWAY_ACTIONS = sorted(a for a, job in USED_BY_JOBS.items() if job == "rotate --gateways")


@pytest.mark.parametrize("missing", [None, *GATEWAY_ACTIONS])
@pytest.mark.usefixtures("as_least_privilege")
def test_gateway_token_renewal_runs_with_only_the_role_and_needs_each_of_its_actions(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, missing: str | None
) -> None:
    """`rotate --gateways --apply` onboards (generateToken), then `--force` renews (listKeys,
    regenerateKey, generateToken): with the whole role both pass, without one action the run
    that needs it fails with the 403 naming it."""
    suffix = uuid.uuid4().hex[:6]
    spec = compliant(f"lp-gw-{suffix}", twin.subscription_id)
    spec["gateways"] = [{"id": "edge", "locationData": {"name": "edge site"}}]
    fragment, ids = fragment_for({"gw": spec}, twin.subscription_id)
    vault = f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"
    role = f"APIM Remediator gateways under test {suffix}"
    fragment.update(
        principals=[PRINCIPAL],
        custom_roles=[{"name": role, "actions": [a for a in READS + WRITES if a != missing]}],
        role_assignments=[
            *fragment["role_assignments"],
            {"principal": PRINCIPAL["name"], "role": role, "scope": f"/subscriptions/{twin.subscription_id}"},
            {"principal": PRINCIPAL["name"], "role": "Key Vault Secrets Officer", "scope": vault},
        ],
    )
    twin.seed(fragment)
    set_vault_url(twin, monkeypatch)
    code, text = run("rotate", "--instance", ids["gw"], "--gateways", "--apply")
    if missing == "Microsoft.ApiManagement/service/gateways/generateToken/action":
        assert code == 1, text
        assert f"'{missing}'" in text, text
        return
    assert code == 0, text
    assert "DONE      onboard  edge" in text, text
    code, text = run("rotate", "--instance", ids["gw"], "--gateways", "--force", "--apply")
    if missing is not None:
        assert code == 1, text
        assert "403 AuthorizationFailed" in text, text
        assert f"'{missing}'" in text, text
        return
    assert code == 0, text
    assert "DONE      renew    edge" in text, text
