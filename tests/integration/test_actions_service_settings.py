"""Service-level remediations against the twin through the real SDK and the product's ARM
pipeline: seeded drift -> plan from a real snapshot -> apply with If-Match -> verify by
re-reading -> the twin is fixed -> a re-scan is clean and changes nothing else -> planning
again writes nothing. Also: the TLS plans keep every unrelated customProperties switch (the
twin resets omitted ones, as Azure does), NET-001 refuses without a private path, and a
concurrent external write between plan and apply ends in 412, never a lost update."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.mgmt.apimanagement import models as apim_models

from shared.actions import REMEDIATIONS, PlanContext, Refusal, RemediationPlan
from shared.actions.executor import PreconditionFailed, apply_plan, verify_plan
from shared.actions.service_settings import combine_service_plans
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.inventory import InstanceRef, instance_ref
from shared.model import Snapshot
from shared.rules import REGISTRY, evaluate_rule
from shared.settings import load_settings
from shared.snapshot import read_snapshot
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, drift

pytestmark = pytest.mark.integration

RG = "rg-actions"
NAME = "apim-act"
VAULT = "kv-actions"
GW = "Microsoft.WindowsAzure.ApiManagement.Gateway."
TLS10 = GW + "Security.Protocols.Tls10"
BACKEND_TLS11 = GW + "Security.Backend.Protocols.Tls11"
TRIPLE_DES = GW + "Security.Ciphers.TripleDes168"
GCM_SUITE = GW + "Security.Ciphers.TLS_RSA_WITH_AES_128_GCM_SHA256"
HTTP2 = GW + "Protocols.Server.Http2"
HASH_KEY = b"h" * 32
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
API = "2024-05-01"
WRITES = ("PUT", "PATCH", "POST", "DELETE")
SERVICE_RULES = ("NET-001", "TLS-001", "TLS-002", "TLS-003", "MGMT-001", "MGMT-002", "MGMT-003",
                 "ID-001", "ID-002", "ID-003")  # fmt: skip


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # azure-identity reads AZURE_* itself; the product's settings come from load_settings.
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


@pytest.fixture
async def factory(twin: TwinHandle) -> AsyncIterator[ClientFactory]:
    status, body = twin.control("PUT", "/_twin/lro", {"retry_after": "0.01"})
    assert status == 200, body
    built = ClientFactory(load_settings(twin.env))
    try:
        yield built
    finally:
        await built.aclose()
        built.close()


# -- the estate ----------------------------------------------------------------------------------


def instance(twin: TwinHandle, rule_id: str | None = None, **custom: str) -> dict[str, Any]:
    """The e2e scan's compliant instance (optionally with one rule's drift), in this test's group."""
    spec = compliant(NAME, twin.subscription_id)
    if rule_id is not None:
        drift(rule_id, spec)
    spec["properties"]["customProperties"].update(custom)
    # APIM reads Key Vault references for real: point it at this test's vault, which holds the secret.
    spec["named_values"][0]["keyVault"]["secretIdentifier"] = f"https://{VAULT}.vault.azure.net/secrets/backend-key"
    for private in ("_id", "_ledger", "_diagnostic_setting"):
        spec.pop(private)
    return spec  # `_vault_reader` stays: `seed` grants the identity this test's vault


def seed(twin: TwinHandle, spec: dict[str, Any]) -> str:
    group_id = f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}"
    service_id = f"{group_id}/providers/Microsoft.ApiManagement/service/{NAME}"
    workspace = f"{group_id}/providers/Microsoft.OperationalInsights/workspaces/law"
    spec = copy.deepcopy(spec)
    # As in the e2e scan's estate: the identity reads the vault its reference names.
    grants = [
        {"principal": {"managed_identity_of": service_id}, "role": "Key Vault Secrets User",
         "scope": f"{group_id}/providers/Microsoft.KeyVault/vaults/{VAULT}"}
    ] if spec.pop("_vault_reader") else []  # fmt: skip
    group = {
        "name": RG,
        "location": "westeurope",
        "workspaces": [{"name": "law"}],
        "key_vaults": [{"name": VAULT, "secrets": [{"name": "backend-key", "value": "not-a-real-secret"}]}],
        "apim": [copy.deepcopy(spec)],
        "diagnostic_settings": [
            {"resource": service_id, "name": "to-law",
             "properties": {"workspaceId": workspace, "logAnalyticsDestinationType": "Dedicated",
                            "logs": [{"category": "GatewayLogs", "enabled": True}]}},
        ],
    }  # fmt: skip
    twin.seed({"subscriptions": [{"id": twin.subscription_id, "resource_groups": [group]}], "role_assignments": grants})
    return service_id


def ref_of(service_id: str) -> InstanceRef:
    ref = instance_ref(service_id, "westeurope", {})
    assert ref is not None
    return ref


async def scan(factory: ClientFactory, service_id: str) -> Snapshot:
    return await read_snapshot(factory, ref_of(service_id), key_vault_url=None, hash_key=HASH_KEY, now=NOW)


def every_finding(snapshot: Snapshot) -> set[tuple[str, str, str]]:
    return {
        (f.rule_id, f.resource_id.lower(), f.evidence.path.lower())
        for rule_id in REGISTRY
        for f in evaluate_rule(rule_id, snapshot)
    }


def plan_for(rule_id: str, snapshot: Snapshot) -> RemediationPlan | Refusal | None:
    """What the engine would plan for the rule's findings on this snapshot (None: no finding)."""
    findings = evaluate_rule(rule_id, snapshot)
    if not findings:
        return None
    remediation = REMEDIATIONS[rule_id]
    # NET-001's fixtures reach the gateway over a private endpoint: the policy acknowledges that
    # the portal and management endpoint go dark (issue 8's gateway-only acknowledgement).
    extra = {"acknowledge_gateway_only": True} if rule_id == "NET-001" else {}
    context = PlanContext(params={**REGISTRY[rule_id].defaults(), **extra}, key_vault_url=None)
    if remediation.combine:
        assert remediation.combiner is not None
        return remediation.combiner(findings, snapshot, context)
    [finding] = findings
    return remediation.plan(finding, snapshot, context)


def a_plan(rule_id: str, snapshot: Snapshot) -> RemediationPlan:
    plan = plan_for(rule_id, snapshot)
    assert isinstance(plan, RemediationPlan), plan
    return plan


async def remediate(factory: ClientFactory, plan: RemediationPlan) -> None:
    arm = AzureArm(factory, poll_default=0.01)
    await apply_plan(plan, arm, AzureSecrets(factory))
    await verify_plan(plan, arm, pause=0.05)


def arm_writes(twin: TwinHandle) -> list[tuple[str, str]]:
    status, body = twin.control("GET", "/_twin/log?service=arm")
    assert status == 200, body
    return [
        (e["method"], e["path"])
        for e in body["entries"]
        if e["method"] in WRITES
        and ("/providers/microsoft.apimanagement" in e["path"].lower() or "microsoft.insights" in e["path"].lower())
    ]


def raw(twin: TwinHandle, path: str) -> dict[str, Any]:
    response = twin.arm("GET", f"{path}?api-version={API}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the acceptance, rule by rule ----------------------------------------------------------------


def fixed_in_twin(twin: TwinHandle, factory: ClientFactory, rule_id: str, before: dict[str, Any]) -> None:
    """Read the fixed state back through the SDK (and the raw map where the SDK is not exact)."""
    apim = factory.apim(twin.subscription_id)
    service = apim.api_management_service.get(RG, NAME)
    custom = service.custom_properties or {}
    if rule_id == "NET-001":
        assert service.public_network_access == "Disabled"
    elif rule_id in ("TLS-001", "TLS-002", "TLS-003"):
        flipped = {"TLS-001": TLS10, "TLS-002": BACKEND_TLS11, "TLS-003": TRIPLE_DES}[rule_id]
        assert custom == {**before, flipped: "False"}  # only the drifted switch changed
    elif rule_id == "MGMT-001":
        assert apim.tenant_access.get(RG, NAME, "access").enabled is False
    elif rule_id == "MGMT-002":
        assert apim.tenant_access.get(RG, NAME, "gitAccess").enabled is False
    elif rule_id == "MGMT-003":
        assert service.api_version_constraint is not None
        assert service.api_version_constraint.min_api_version == "2019-12-01"
    elif rule_id == "ID-001":
        assert service.identity is not None
        assert service.identity.type == "SystemAssigned"
        assert service.identity.principal_id
    elif rule_id == "ID-002":
        assert apim.sign_up_settings.get(RG, NAME).enabled is False
    elif rule_id == "ID-003":
        assert apim.portal_config.get(RG, NAME, "default").enable_basic_auth is False
    else:
        raise AssertionError(rule_id)
    if rule_id not in ("TLS-001", "TLS-002", "TLS-003"):
        assert custom == before  # no other write touched the protocol switches


@pytest.mark.parametrize("rule_id", SERVICE_RULES)
async def test_drift_is_fixed_verified_and_stays_fixed(twin: TwinHandle, factory: ClientFactory, rule_id: str) -> None:
    service_id = seed(twin, instance(twin, rule_id))
    drifted = await scan(factory, service_id)
    assert drifted.unreadable == ()
    assert drifted.not_configured == ("key_hashes: not configured (APIMR_KEY_VAULT_URL is not set)",
                                      "key_ledger: not configured (APIMR_KEY_VAULT_URL is not set)")  # fmt: skip
    found_before = every_finding(drifted)
    assert {f[0] for f in found_before} == {rule_id}  # the drift, and nothing else
    plan = a_plan(rule_id, drifted)
    before_custom = dict(raw(twin, service_id)["properties"]["customProperties"])

    await remediate(factory, plan)
    fixed_in_twin(twin, factory, rule_id, before_custom)

    # Re-scan: clean, and nothing else appeared or went away. Planning again writes nothing.
    twin.control("DELETE", "/_twin/log")
    rescanned = await scan(factory, service_id)
    assert evaluate_rule(rule_id, rescanned) == []
    assert every_finding(rescanned) == set()
    assert plan_for(rule_id, rescanned) is None
    assert arm_writes(twin) == []


# -- TLS: the whole customProperties map ---------------------------------------------------------


async def test_tls_remediation_keeps_unrelated_switches(twin: TwinHandle, factory: ClientFactory) -> None:
    # Http2 on, a weak suite left on (TLS-003's business), a backend protocol on (TLS-002's):
    # TLS-001 must change only the client TLS 1.0 switch.
    spec = instance(twin, None, **{TLS10: "True", HTTP2: "True", GCM_SUITE: "True", BACKEND_TLS11: "True"})
    service_id = seed(twin, spec)
    before = dict(raw(twin, service_id)["properties"]["customProperties"])
    assert (before[TLS10], before[HTTP2], before[GCM_SUITE], before[BACKEND_TLS11]) == ("True",) * 4

    drifted = await scan(factory, service_id)
    plan = a_plan("TLS-001", drifted)
    await remediate(factory, plan)

    after = raw(twin, service_id)["properties"]["customProperties"]
    assert after == {**before, TLS10: "False"}
    assert (after[HTTP2], after[GCM_SUITE], after[BACKEND_TLS11]) == ("True", "True", "True")
    rescanned = await scan(factory, service_id)
    assert evaluate_rule("TLS-001", rescanned) == []
    assert {f.evidence.path for f in evaluate_rule("TLS-002", rescanned)} == {BACKEND_TLS11}
    assert {f.evidence.path for f in evaluate_rule("TLS-003", rescanned)} == {GCM_SUITE}


async def test_the_twin_resets_switches_a_partial_map_leaves_out(twin: TwinHandle) -> None:
    # The model the previous test relies on: a PATCH with only Tls10 resets Http2 and drops the suite.
    service_id = seed(twin, instance(twin, None, **{TLS10: "True", HTTP2: "True", GCM_SUITE: "True"}))
    etag = raw(twin, service_id)["etag"]
    response = twin.arm(
        "PATCH",
        f"{service_id}?api-version={API}",
        json={"properties": {"customProperties": {TLS10: "false"}}},
        headers={"If-Match": etag},
    )
    assert response.status_code == 202, response.text
    status_url = response.headers["Azure-AsyncOperation"].removeprefix(twin.urls["arm"])
    for _ in range(50):
        if twin.arm("GET", status_url).json()["status"] == "Succeeded":
            break
    custom = raw(twin, service_id)["properties"]["customProperties"]
    assert custom[TLS10] == "false"  # as sent
    assert custom[HTTP2] == "False"  # reset to its default
    assert GCM_SUITE not in custom  # back to the (enabled) default
    assert custom[GW + "Security.Backend.Protocols.Tls10"] == "False"  # dated default of a new service


async def test_tls_plans_of_one_snapshot_must_be_one_write(twin: TwinHandle, factory: ClientFactory) -> None:
    """Azure does not evaluate If-Match on the service PATCH (ApiManagementService_Update
    declares none), so two plans of one snapshot sent one after another lose an update: the
    second sends the whole customProperties map as read and resets the first one's switch.
    That is why the engine folds every service-level plan of a run into one PATCH."""
    spec = instance(twin, None, **{TLS10: "True", BACKEND_TLS11: "True", TRIPLE_DES: "True", HTTP2: "True"})
    service_id = seed(twin, spec)
    before = dict(raw(twin, service_id)["properties"]["customProperties"])
    snapshot = await scan(factory, service_id)
    client, backend = a_plan("TLS-001", snapshot), a_plan("TLS-002", snapshot)

    await remediate(factory, client)
    await apply_plan(backend, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    lost = raw(twin, service_id)["properties"]["customProperties"]
    assert lost[TLS10] == "True"  # TLS-001's fix was silently undone by the second, stale map
    assert lost[BACKEND_TLS11] == "False"

    fresh = await scan(factory, service_id)
    combined = combine_service_plans([a_plan(r, fresh) for r in ("TLS-001", "TLS-003")], fresh)
    twin.control("DELETE", "/_twin/log")
    await remediate(factory, combined)
    assert [m for m, _ in arm_writes(twin)] == ["PATCH"]  # one service write for both fixes
    after = raw(twin, service_id)["properties"]["customProperties"]
    assert after == {**before, TLS10: "False", BACKEND_TLS11: "False", TRIPLE_DES: "False"}
    assert after[HTTP2] == "True"


# -- NET-001 refusal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [None, "Pending"])
async def test_net001_without_private_connectivity_is_refused(
    twin: TwinHandle, factory: ClientFactory, status: str | None
) -> None:
    spec = instance(twin, "NET-001")
    if status is None:
        spec["properties"].pop("privateEndpointConnections")
    else:
        spec["properties"]["privateEndpointConnections"][0]["properties"]["privateLinkServiceConnectionState"] = {
            "status": status
        }
    service_id = seed(twin, spec)
    snapshot = await scan(factory, service_id)
    refusal = plan_for("NET-001", snapshot)
    assert isinstance(refusal, Refusal)
    assert refusal.resource_id == service_id
    assert "would cut every client off" in refusal.reason
    assert "no approved private endpoint" in refusal.reason
    assert raw(twin, service_id)["properties"]["publicNetworkAccess"] == "Enabled"


# -- concurrent external writes: 412, never a lost update ---------------------------------------------


async def test_external_service_write_between_plan_and_apply(twin: TwinHandle, factory: ClientFactory) -> None:
    """A stale service plan: with If-Match evaluated (a twin option; Azure does not on this
    PATCH) it gets 412 and writes nothing; as Azure behaves, it overwrites a human's change
    made after the plan's read. Hence the engine plans service updates from a read taken
    right before the write (tests/integration/test_remediate.py) and never from a snapshot."""
    service_id = seed(twin, instance(twin, "TLS-001"))
    plan = a_plan("TLS-001", await scan(factory, service_id))
    # A human turns HTTP/2 on (sending the whole map, as they must) after the plan was made.
    apim = factory.apim(twin.subscription_id)
    current = dict(apim.api_management_service.get(RG, NAME).custom_properties or {})
    apim.api_management_service.begin_update(
        RG, NAME, apim_models.ApiManagementServiceUpdateParameters(custom_properties={**current, HTTP2: "True"})
    ).result()

    twin.control("PUT", "/_twin/lro", {"enforce_service_if_match": True})
    with pytest.raises(PreconditionFailed):
        await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    custom = raw(twin, service_id)["properties"]["customProperties"]
    assert (custom[HTTP2], custom[TLS10]) == ("True", "True")  # nothing written

    twin.control("PUT", "/_twin/lro", {"enforce_service_if_match": False})
    await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    custom = raw(twin, service_id)["properties"]["customProperties"]
    assert (custom[TLS10], custom[HTTP2]) == ("False", "False")  # the human's change is lost


async def test_external_tenant_access_write_between_plan_and_apply(twin: TwinHandle, factory: ClientFactory) -> None:
    service_id = seed(twin, instance(twin, "MGMT-001"))
    plan = a_plan("MGMT-001", await scan(factory, service_id))
    apim = factory.apim(twin.subscription_id)
    apim.tenant_access.update(RG, NAME, "access", "*", apim_models.AccessInformationUpdateParameters(enabled=True))

    with pytest.raises(PreconditionFailed):
        await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    assert apim.tenant_access.get(RG, NAME, "access").enabled is True

    await remediate(factory, a_plan("MGMT-001", await scan(factory, service_id)))
    assert apim.tenant_access.get(RG, NAME, "access").enabled is False


async def test_external_portal_config_write_between_plan_and_apply(twin: TwinHandle, factory: ClientFactory) -> None:
    service_id = seed(twin, instance(twin, "ID-003"))
    plan = a_plan("ID-003", await scan(factory, service_id))
    apim = factory.apim(twin.subscription_id)
    origins = ["https://portal.contoso.example"]
    apim.portal_config.update(
        RG, NAME, "default", "*",
        apim_models.PortalConfigContract(
            enable_basic_auth=True, cors=apim_models.PortalConfigCorsProperties(allowed_origins=origins)
        ),
    )  # fmt: skip

    with pytest.raises(PreconditionFailed):
        await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    config = apim.portal_config.get(RG, NAME, "default")
    assert config.cors is not None
    assert config.cors.allowed_origins == origins
    assert config.enable_basic_auth is True

    await remediate(factory, a_plan("ID-003", await scan(factory, service_id)))
    config = apim.portal_config.get(RG, NAME, "default")
    assert config.enable_basic_auth is False
    assert config.cors is not None
    assert config.cors.allowed_origins == origins


async def test_signup_patch_keeps_a_concurrent_terms_change(twin: TwinHandle, factory: ClientFactory) -> None:
    # ID-002 takes the ETag of a read just before the write (the snapshot holds none for portal
    # settings), guarded by sign-up still being enabled: a concurrent terms change passes the
    # guard, and the PATCH touches nothing but `enabled`, so it survives.
    service_id = seed(twin, instance(twin, "ID-002"))
    plan = a_plan("ID-002", await scan(factory, service_id))
    apim = factory.apim(twin.subscription_id)
    terms = apim_models.TermsOfServiceProperties(text="Be kind to the API.", enabled=True, consent_required=True)
    apim.sign_up_settings.update(RG, NAME, "*", apim_models.PortalSignupSettings(enabled=True, terms_of_service=terms))

    await remediate(factory, plan)
    signup = apim.sign_up_settings.get(RG, NAME)
    assert signup.enabled is False
    assert signup.terms_of_service is not None
    assert (signup.terms_of_service.text, signup.terms_of_service.consent_required) == ("Be kind to the API.", True)


async def test_signup_concurrent_disable_stops_the_write(twin: TwinHandle, factory: ClientFactory) -> None:
    # A person turns sign-up off themselves (with terms) after the plan was made: the plan's
    # premise (sign-up enabled) no longer holds, so nothing is written and their settings stand.
    service_id = seed(twin, instance(twin, "ID-002"))
    plan = a_plan("ID-002", await scan(factory, service_id))
    apim = factory.apim(twin.subscription_id)
    terms = apim_models.TermsOfServiceProperties(text="Closed for now.", enabled=True, consent_required=False)
    apim.sign_up_settings.update(RG, NAME, "*", apim_models.PortalSignupSettings(enabled=False, terms_of_service=terms))
    twin.control("DELETE", "/_twin/log")

    with pytest.raises(PreconditionFailed, match=r"properties\.enabled"):
        await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    assert arm_writes(twin) == []
    signup = apim.sign_up_settings.get(RG, NAME)
    assert signup.enabled is False
    assert signup.terms_of_service is not None
    assert signup.terms_of_service.text == "Closed for now."
    assert plan_for("ID-002", await scan(factory, service_id)) is None  # re-planning finds nothing to do
