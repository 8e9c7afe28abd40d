"""Planners of the service-level remediations on factory snapshots: the exact request (method,
resource, body, If-Match), the readable diff, what a re-read must show, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from shared.actions import (
    APIM_API_VERSION,
    REMEDIATIONS,
    ArmWrite,
    Change,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
)
from shared.model import AccessSetting, Finding, Portal, PrivateEndpointConnection, Snapshot, frozen_map
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import GW, SECURE_CUSTOM_PROPERTIES, SERVICE_ID, compliant

TLS10 = GW + "Security.Protocols.Tls10"
TLS11 = GW + "Security.Protocols.Tls11"
BACKEND_SSL30 = GW + "Security.Backend.Protocols.Ssl30"
TRIPLE_DES = GW + "Security.Ciphers.TripleDes168"
CBC_SUITE = GW + "Security.Ciphers.TLS_RSA_WITH_AES_128_CBC_SHA"
HTTP2 = GW + "Protocols.Server.Http2"
ETAG = '"etag-service"'


def context(**params: Any) -> PlanContext:
    return PlanContext(params=params, key_vault_url=None)


def with_service(snapshot: Snapshot | None = None, **changes: Any) -> Snapshot:
    base = snapshot or compliant()
    return replace(base, service=replace(base.service, **changes))


def findings_of(rule_id: str, snapshot: Snapshot) -> list[Finding]:
    found = evaluate_rule(rule_id, snapshot)
    assert found, f"{rule_id}: the drifted snapshot has no finding"
    return found


def plan_one(rule_id: str, snapshot: Snapshot, **params: Any) -> RemediationPlan | Refusal:
    [finding] = findings_of(rule_id, snapshot)
    return REMEDIATIONS[rule_id].plan(finding, snapshot, context(**params))


def plan_all(rule_id: str, snapshot: Snapshot) -> RemediationPlan | Refusal:
    remediation = REMEDIATIONS[rule_id]
    assert remediation.combine
    assert remediation.combiner is not None
    return remediation.combiner(findings_of(rule_id, snapshot), snapshot, context())


def only_write(plan: RemediationPlan) -> ArmWrite:
    [step] = plan.steps
    assert isinstance(step, ArmWrite)
    return step


def test_every_remediable_service_rule_is_registered() -> None:
    for rule_id in ("NET-001", "TLS-001", "TLS-002", "TLS-003", "MGMT-001", "MGMT-002", "MGMT-003",
                    "ID-001", "ID-002", "ID-003"):  # fmt: skip
        assert REGISTRY[rule_id].remediable
        assert rule_id in REMEDIATIONS
    assert all(REMEDIATIONS[r].combine for r in ("TLS-001", "TLS-002", "TLS-003"))


# -- NET-001 ----------------------------------------------------------------------------------


def test_net001_disables_public_access_with_the_service_etag() -> None:
    snapshot = with_service(public_network_access="Enabled")
    plan = plan_one("NET-001", snapshot, acknowledge_gateway_only=True)
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=SERVICE_ID,
        api_version=APIM_API_VERSION,
        body={"properties": {"publicNetworkAccess": "Disabled"}},
        if_match=ETAG,
        description="PATCH service publicNetworkAccess",
    )
    assert plan.changes == (Change("properties.publicNetworkAccess", "Enabled", "Disabled"),)
    assert plan.expectations == (
        Expectation(SERVICE_ID, APIM_API_VERSION, "properties.publicNetworkAccess", "Disabled"),
    )
    assert (plan.rule_id, plan.instance_id, plan.resource_id) == ("NET-001", SERVICE_ID, SERVICE_ID)
    assert "pe1" in plan.summary
    assert plan.would().startswith("would disable public network access")


def test_net001_absent_property_reads_as_enabled_in_the_diff() -> None:
    plan = plan_one("NET-001", with_service(public_network_access=None), acknowledge_gateway_only=True)
    assert isinstance(plan, RemediationPlan)
    assert plan.changes == (Change("properties.publicNetworkAccess", "(not set: Enabled)", "Disabled"),)


@pytest.mark.parametrize("status", ["Pending", "Rejected", "Disconnected", None])
def test_net001_is_refused_without_private_connectivity(status: str | None) -> None:
    endpoints = (PrivateEndpointConnection(id=f"{SERVICE_ID}/privateEndpointConnections/pe1", name="pe1",
                                           status=status),)  # fmt: skip
    for private in (endpoints, ()):
        snapshot = with_service(public_network_access="Enabled", private_endpoints=private)
        refusal = plan_one("NET-001", snapshot)
        assert isinstance(refusal, Refusal)
        assert (refusal.rule_id, refusal.instance_id, refusal.resource_id) == ("NET-001", SERVICE_ID, SERVICE_ID)
        assert "cut every client off" in refusal.reason
        assert "no approved private endpoint and no internal VNet" in refusal.reason
        assert "Add a private endpoint first" in refusal.reason  # what would unblock it


def test_net001_external_vnet_is_no_private_path() -> None:
    snapshot = with_service(public_network_access="Enabled", private_endpoints=(), virtual_network_type="External")
    assert isinstance(plan_one("NET-001", snapshot), Refusal)


def test_net001_internal_vnet_counts_as_a_private_path() -> None:
    # The rule skips Internal VNet instances; the planner's precondition still accepts them.
    snapshot = with_service(public_network_access="Enabled", private_endpoints=(), virtual_network_type="Internal")
    finding = evaluate_rule("NET-001", with_service(public_network_access="Enabled"))[0]
    plan = REMEDIATIONS["NET-001"].plan(finding, snapshot, context())
    assert isinstance(plan, RemediationPlan)
    assert "internal virtual network" in plan.summary


def test_service_writes_without_an_etag_are_refused() -> None:
    drifted = {
        "NET-001": with_service(public_network_access="Enabled", etag=None),
        "MGMT-003": with_service(min_api_version=None, etag=None),
        "ID-001": with_service(identity_type=None, etag=None),
    }
    for rule_id, snapshot in drifted.items():
        refusal = plan_one(rule_id, snapshot, acknowledge_gateway_only=True)
        assert isinstance(refusal, Refusal), rule_id
        assert "no ETag" in refusal.reason
    tls = with_service(custom_properties=frozen_map({**SECURE_CUSTOM_PROPERTIES, TLS10: "True"}), etag=None)
    refusal = plan_all("TLS-001", tls)
    assert isinstance(refusal, Refusal)
    assert "no ETag" in refusal.reason


# -- TLS ----------------------------------------------------------------------------------------


def tls_snapshot(**switches: str) -> Snapshot:
    return with_service(custom_properties=frozen_map({**SECURE_CUSTOM_PROPERTIES, **switches}))


def test_tls001_patches_the_whole_map_with_only_its_switches_flipped() -> None:
    snapshot = tls_snapshot(**{TLS10: "True", TLS11: "true", BACKEND_SSL30: "True", TRIPLE_DES: "True"})
    plan = plan_all("TLS-001", snapshot)
    assert isinstance(plan, RemediationPlan)
    expected_map = {**SECURE_CUSTOM_PROPERTIES, TLS10: "False", TLS11: "False",
                    BACKEND_SSL30: "True", TRIPLE_DES: "True"}  # fmt: skip
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=SERVICE_ID,
        api_version=APIM_API_VERSION,
        body={"properties": {"customProperties": expected_map}},
        if_match=ETAG,
        description="PATCH service customProperties (whole map)",
    )
    # Every key of the map the service had is sent: omitted keys would be reset by Azure.
    sent = only_write(plan).body["properties"]["customProperties"]  # type: ignore[index]
    assert set(sent) == set(snapshot.service.custom_properties)
    for key, value in snapshot.service.custom_properties.items():
        if key not in (TLS10, TLS11):
            assert sent[key] == value, key
    assert sent[HTTP2] == "True"
    assert plan.changes == (
        Change(f"properties.customProperties.{TLS10}", "True", "False"),
        Change(f"properties.customProperties.{TLS11}", "true", "False"),
    )
    # The re-read must show the switches this fix owns as False (keys and values compared
    # case-insensitively); the other keys are checked after the write as a concurrent change.
    assert plan.expectations == (
        Expectation(
            SERVICE_ID, APIM_API_VERSION, "properties.customProperties", {TLS10: "False", TLS11: "False"}, subset=True
        ),
    )
    assert "TLS 1.0, TLS 1.1 for clients" in plan.summary


def test_tls_plan_does_not_share_the_snapshot_mapping() -> None:
    snapshot = tls_snapshot(**{TLS10: "True"})
    plan = plan_all("TLS-001", snapshot)
    assert isinstance(plan, RemediationPlan)
    assert snapshot.service.custom_properties[TLS10] == "True"  # the snapshot is untouched


def test_tls002_flips_backend_switches_only() -> None:
    snapshot = tls_snapshot(**{TLS10: "True", BACKEND_SSL30: "True"})
    plan = plan_all("TLS-002", snapshot)
    assert isinstance(plan, RemediationPlan)
    sent = only_write(plan).body["properties"]["customProperties"]  # type: ignore[index]
    assert sent == {**SECURE_CUSTOM_PROPERTIES, TLS10: "True", BACKEND_SSL30: "False"}
    assert plan.changes == (Change(f"properties.customProperties.{BACKEND_SSL30}", "True", "False"),)
    assert "SSL 3.0 towards backends" in plan.summary


def test_tls003_adds_absent_default_on_suites_as_false() -> None:
    # An absent settable suite is enabled by default: the plan adds it, explicitly False.
    custom = {k: v for k, v in SECURE_CUSTOM_PROPERTIES.items() if k != CBC_SUITE}
    snapshot = with_service(custom_properties=frozen_map({**custom, TRIPLE_DES: "True"}))
    plan = plan_all("TLS-003", snapshot)
    assert isinstance(plan, RemediationPlan)
    sent = only_write(plan).body["properties"]["customProperties"]  # type: ignore[index]
    assert sent == {**custom, TRIPLE_DES: "False", CBC_SUITE: "False"}
    assert [c.path.rsplit(".", 1)[-1] for c in plan.changes] == ["TripleDes168", "TLS_RSA_WITH_AES_128_CBC_SHA"]
    [added] = [c for c in plan.changes if c.path.endswith("TLS_RSA_WITH_AES_128_CBC_SHA")]
    assert added.before.startswith("(not set: Azure default True")
    assert plan.expectations[0].value == {TRIPLE_DES: "False", CBC_SUITE: "False"}
    assert plan.expectations[0].subset


def test_tls_keeps_azure_spelling_of_a_key() -> None:
    lower = TLS10.lower()
    custom = {k: v for k, v in SECURE_CUSTOM_PROPERTIES.items() if k != TLS10}
    snapshot = with_service(custom_properties=frozen_map({**custom, lower: "True"}))
    plan = plan_all("TLS-001", snapshot)
    assert isinstance(plan, RemediationPlan)
    sent = only_write(plan).body["properties"]["customProperties"]  # type: ignore[index]
    assert sent[lower] == "False"
    assert TLS10 not in sent


def test_tls_legacy_service_absent_protocols_are_set_false() -> None:
    custom = {k: v for k, v in SECURE_CUSTOM_PROPERTIES.items() if k not in (TLS10, TLS11)}
    snapshot = with_service(custom_properties=frozen_map(custom), created_at="2017-06-01T10:00:00Z")
    plan = plan_all("TLS-001", snapshot)
    assert isinstance(plan, RemediationPlan)
    sent = only_write(plan).body["properties"]["customProperties"]  # type: ignore[index]
    assert sent == {**custom, TLS10: "False", TLS11: "False"}


def test_tls_refuses_a_finding_from_another_family() -> None:
    snapshot = tls_snapshot(**{BACKEND_SSL30: "True"})
    backend = findings_of("TLS-002", snapshot)
    refusal = REMEDIATIONS["TLS-001"].combiner(backend, snapshot, context())  # type: ignore[misc]
    assert isinstance(refusal, Refusal)
    assert "not a switch under" in refusal.reason


def test_tls_single_finding_plan_goes_through_the_same_planner() -> None:
    snapshot = tls_snapshot(**{TLS10: "True", TLS11: "True"})
    first = findings_of("TLS-001", snapshot)[0]
    plan = REMEDIATIONS["TLS-001"].plan(first, snapshot, context())
    assert isinstance(plan, RemediationPlan)
    assert len(plan.changes) == 1


def test_tls_empty_findings_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one finding"):
        REMEDIATIONS["TLS-003"].combiner([], compliant(), context())  # type: ignore[misc]


# -- MGMT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule_id", "field", "segment"), [("MGMT-001", "tenant_access", "access"), ("MGMT-002", "git_access", "gitAccess")]
)
def test_mgmt_access_disabled_with_the_settings_etag(rule_id: str, field: str, segment: str) -> None:
    setting_id = f"{SERVICE_ID}/tenant/{segment}"
    setting = AccessSetting(id=setting_id, enabled=True, etag='"a7"')
    base = compliant()
    snapshot = replace(base, tenant_access=setting) if field == "tenant_access" else replace(base, git_access=setting)
    plan = plan_one(rule_id, snapshot)
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=setting_id,
        api_version=APIM_API_VERSION,
        body={"properties": {"enabled": False}},
        if_match='"a7"',
        description=f"PATCH tenant/{segment} enabled=false",
    )
    assert plan.resource_id == setting_id
    assert plan.changes == (Change("properties.enabled", "True", "False"),)
    assert plan.expectations == (Expectation(setting_id, APIM_API_VERSION, "properties.enabled", False),)


def test_mgmt_access_without_etag_is_refused() -> None:
    snapshot = replace(compliant(), tenant_access=AccessSetting(id=f"{SERVICE_ID}/tenant/access", enabled=True))
    refusal = plan_one("MGMT-001", snapshot)
    assert isinstance(refusal, Refusal)
    assert "If-Match" in refusal.reason


def test_mgmt_access_setting_missing_from_snapshot_is_refused() -> None:
    finding = findings_of(
        "MGMT-002", replace(compliant(), git_access=AccessSetting(id=f"{SERVICE_ID}/tenant/gitAccess", enabled=True))
    )[0]
    refusal = REMEDIATIONS["MGMT-002"].plan(finding, replace(compliant(), git_access=None), context())
    assert isinstance(refusal, Refusal)
    assert "not read" in refusal.reason


@pytest.mark.parametrize(("current", "before"), [(None, "(not set)"), ("2018-01-01", "2018-01-01")])
def test_mgmt003_sets_the_policy_floor(current: str | None, before: str) -> None:
    snapshot = with_service(min_api_version=current)
    plan = plan_one("MGMT-003", snapshot, min_api_version="2019-12-01", skip_skus=("Consumption",))
    assert isinstance(plan, RemediationPlan)
    path = "properties.apiVersionConstraint.minApiVersion"
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=SERVICE_ID,
        api_version=APIM_API_VERSION,
        body={"properties": {"apiVersionConstraint": {"minApiVersion": "2019-12-01"}}},
        if_match=ETAG,
        description="PATCH service apiVersionConstraint.minApiVersion",
    )
    assert plan.changes == (Change(path, before, "2019-12-01"),)
    assert plan.expectations == (Expectation(SERVICE_ID, APIM_API_VERSION, path, "2019-12-01"),)


def test_mgmt003_uses_the_parameter_not_a_newer_version() -> None:
    snapshot = with_service(min_api_version=None)
    [finding] = evaluate_rule("MGMT-003", snapshot, {"min_api_version": "2021-08-01"})
    plan = REMEDIATIONS["MGMT-003"].plan(finding, snapshot, context(min_api_version="2021-08-01"))
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan).body == {"properties": {"apiVersionConstraint": {"minApiVersion": "2021-08-01"}}}
    # No parameter given: the rule's default floor.
    default = REMEDIATIONS["MGMT-003"].plan(finding, snapshot, context())
    assert isinstance(default, RemediationPlan)
    assert default.expectations[0].value == "2019-12-01"


def test_mgmt003_refuses_a_floor_that_is_not_an_api_version() -> None:
    snapshot = with_service(min_api_version=None)
    [finding] = evaluate_rule("MGMT-003", snapshot)
    refusal = REMEDIATIONS["MGMT-003"].plan(finding, snapshot, context(min_api_version="latest"))
    assert isinstance(refusal, Refusal)
    assert "'latest'" in refusal.reason


# -- ID -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("current", "before"), [(None, "(not set)"), ("None", "None")])
def test_id001_enables_the_system_assigned_identity(current: str | None, before: str) -> None:
    plan = plan_one("ID-001", with_service(identity_type=current))
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=SERVICE_ID,
        api_version=APIM_API_VERSION,
        body={"identity": {"type": "SystemAssigned"}},
        if_match=ETAG,
        description="PATCH service identity SystemAssigned",
    )
    assert plan.changes == (Change("identity.type", before, "SystemAssigned"),)
    assert plan.expectations == (Expectation(SERVICE_ID, APIM_API_VERSION, "identity.type", "SystemAssigned"),)


@pytest.mark.parametrize("identity", ["UserAssigned", "SystemAssigned, UserAssigned"])
def test_id001_refuses_to_touch_user_assigned_identities(identity: str) -> None:
    # The snapshot does not carry the userAssignedIdentities map a combined PATCH would need.
    [finding] = evaluate_rule("ID-001", with_service(identity_type=None))
    refusal = REMEDIATIONS["ID-001"].plan(finding, with_service(identity_type=identity), context())
    assert isinstance(refusal, Refusal)
    assert "userAssignedIdentities" in refusal.reason


def test_id001_stale_finding_is_refused() -> None:
    [finding] = evaluate_rule("ID-001", with_service(identity_type=None))
    refusal = REMEDIATIONS["ID-001"].plan(finding, compliant(), context())
    assert isinstance(refusal, Refusal)
    assert "stale" in refusal.reason


def test_id002_disables_signup_with_the_etag_of_a_guarded_read() -> None:
    snapshot = replace(compliant(), portal=Portal(signup_enabled=True, signin_enabled=True, basic_auth_enabled=False))
    plan = plan_one("ID-002", snapshot)
    assert isinstance(plan, RemediationPlan)
    signup = f"{SERVICE_ID}/portalsettings/signup"
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=signup,
        api_version=APIM_API_VERSION,
        body={"properties": {"enabled": False}},
        if_match=None,  # the snapshot holds no ETag for portal settings: read just before the write
        description="PATCH portalsettings/signup enabled=false",
        etag_from_read=True,
        guard=(Expectation(signup, APIM_API_VERSION, "properties.enabled", True),),
    )
    assert plan.resource_id == signup
    assert plan.changes == (Change("properties.enabled", "True", "False"),)
    assert plan.expectations == (Expectation(signup, APIM_API_VERSION, "properties.enabled", False),)


def test_id003_disables_basic_auth_with_the_portal_config_etag() -> None:
    config = f"{SERVICE_ID}/portalconfigs/default"
    snapshot = replace(
        compliant(),
        portal=Portal(
            signup_enabled=False, basic_auth_enabled=True, portal_config_id=config, portal_config_etag='"p3"'
        ),
    )
    plan = plan_one("ID-003", snapshot)
    assert isinstance(plan, RemediationPlan)
    assert only_write(plan) == ArmWrite(
        method="PATCH",
        resource_id=config,
        api_version=APIM_API_VERSION,
        body={"properties": {"enableBasicAuth": False}},
        if_match='"p3"',
        description="PATCH portalconfigs/default enableBasicAuth=false",
    )
    assert plan.changes == (Change("properties.enableBasicAuth", "True", "False"),)
    assert plan.expectations == (Expectation(config, APIM_API_VERSION, "properties.enableBasicAuth", False),)


def test_id003_without_portal_config_etag_is_refused() -> None:
    snapshot = replace(compliant(), portal=Portal(basic_auth_enabled=True))
    refusal = plan_one("ID-003", snapshot)
    assert isinstance(refusal, Refusal)
    assert refusal.resource_id == f"{SERVICE_ID}/portalconfigs/default"
    assert "If-Match" in refusal.reason


def test_tls_plan_is_plain_json_data() -> None:
    # Plans are journaled: JSON-able values only, never the snapshot's mapping proxy.
    snapshot = tls_snapshot(**{TLS10: "True"})
    plan = plan_all("TLS-001", snapshot)
    assert isinstance(plan, RemediationPlan)
    json.dumps([only_write(plan).body, plan.expectations[0].value])


# -- issue 8: gateway-only acknowledgement, api-version ceiling, one service update ---------------


def test_net001_over_a_private_endpoint_needs_the_gateway_only_acknowledgement() -> None:
    snapshot = with_service(public_network_access="Enabled")
    refusal = plan_one("NET-001", snapshot)
    assert isinstance(refusal, Refusal)
    assert "carries only the gateway" in refusal.reason
    assert "developer portal and the management API endpoint" in refusal.reason
    assert "acknowledge_gateway_only: true" in refusal.reason
    plan = plan_one("NET-001", snapshot, acknowledge_gateway_only=True)
    assert isinstance(plan, RemediationPlan)
    assert "acknowledged" in plan.summary
    assert "only the gateway" in plan.summary


def test_net001_internal_vnet_needs_no_acknowledgement() -> None:
    snapshot = with_service(public_network_access="Enabled", private_endpoints=(), virtual_network_type="Internal")
    finding = evaluate_rule("NET-001", with_service(public_network_access="Enabled"))[0]
    assert isinstance(REMEDIATIONS["NET-001"].plan(finding, snapshot, context()), RemediationPlan)


def test_mgmt003_never_sets_a_floor_newer_than_the_product_calls() -> None:
    snapshot = with_service(min_api_version=None)
    refusal = plan_one("MGMT-003", snapshot, min_api_version="2025-03-01-preview")
    assert isinstance(refusal, Refusal)
    assert "2024-05-01" in refusal.reason
    assert "product" in refusal.reason
    assert isinstance(plan_one("MGMT-003", snapshot, min_api_version="2024-05-01"), RemediationPlan)


def test_product_api_versions_include_the_sdk_default() -> None:
    from azure.mgmt.apimanagement import ApiManagementClient

    from shared.actions import PRODUCT_APIM_API_VERSIONS

    client = ApiManagementClient(credential=object(), subscription_id="00000000-0000-0000-0000-000000000000")  # type: ignore[arg-type]
    assert client._config.api_version in PRODUCT_APIM_API_VERSIONS
    assert APIM_API_VERSION in PRODUCT_APIM_API_VERSIONS


def test_service_level_fixes_become_one_patch() -> None:
    from shared.actions.service_settings import combine_service_plans

    snapshot = with_service(
        tls_snapshot(**{TLS10: "True", BACKEND_SSL30: "True", TRIPLE_DES: "True"}),
        public_network_access="Enabled",
        identity_type=None,
        min_api_version=None,
    )
    plans = [plan_all(r, snapshot) for r in ("TLS-001", "TLS-002", "TLS-003")]
    plans += [plan_one(r, snapshot, acknowledge_gateway_only=True) for r in ("NET-001", "MGMT-003", "ID-001")]
    assert all(isinstance(p, RemediationPlan) for p in plans)
    assert all(REMEDIATIONS[p.rule_id].service_level for p in plans)
    combined = combine_service_plans(plans, snapshot)  # type: ignore[arg-type]
    write = only_write(combined)
    assert (write.method, write.resource_id, write.if_match) == ("PATCH", SERVICE_ID, ETAG)
    sent = write.body["properties"]["customProperties"]  # type: ignore[index]
    # Each TLS plan sent the whole map with only its own switches flipped: the merge keeps all three flips.
    assert sent == {**SECURE_CUSTOM_PROPERTIES, TLS10: "False", BACKEND_SSL30: "False", TRIPLE_DES: "False"}
    assert write.body["properties"]["publicNetworkAccess"] == "Disabled"  # type: ignore[index]
    assert write.body["properties"]["apiVersionConstraint"] == {"minApiVersion": "2019-12-01"}  # type: ignore[index]
    assert write.body["identity"] == {"type": "SystemAssigned"}  # type: ignore[index]
    assert combined.rule_id == "TLS-001+TLS-002+TLS-003+NET-001+MGMT-003+ID-001"
    assert len(combined.expectations) == sum(len(p.expectations) for p in plans)  # type: ignore[union-attr]
    assert len(combined.changes) == sum(len(p.changes) for p in plans)  # type: ignore[union-attr]


def test_two_different_changes_of_one_service_value_cannot_be_combined() -> None:
    from shared.actions.service_settings import combine_service_plans

    snapshot = with_service(min_api_version=None)
    low = plan_one("MGMT-003", snapshot, min_api_version="2019-12-01")
    high = plan_one("MGMT-003", snapshot, min_api_version="2021-08-01")
    assert isinstance(low, RemediationPlan)
    assert isinstance(high, RemediationPlan)
    with pytest.raises(ValueError, match=r"apiVersionConstraint\.minApiVersion"):
        combine_service_plans([low, high], snapshot)
