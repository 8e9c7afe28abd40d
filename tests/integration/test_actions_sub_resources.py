"""Sub-resource remediations against the twin through the real SDK: seeded drift -> plan from
a real snapshot -> apply -> verify -> the twin state is fixed -> a fresh snapshot is clean and
re-planning finds nothing -> no write reached the twin after the fix was verified. Also: a
person's change between plan and apply is never clobbered — to what the plan relied on, the
write stops (PreconditionFailed); to anything else, the PATCH (only our property, If-Match
the ETag of a read just before) keeps it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.mgmt.apimanagement import models as apim_models

from shared.actions import REMEDIATIONS, ArmWrite, PlanContext, Refusal, RemediationPlan
from shared.actions.executor import ArmApi, ArmResponse, PreconditionFailed, apply_plan, verify_plan
from shared.actions.sub_resources import SUSPEND_COMMENT, vault_secret_name
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.evidence import KeyUsage, PlanEvidence, TlsProbe, safe_target
from shared.inventory import instance_ref
from shared.model import Finding, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from shared.settings import load_settings
from shared.snapshot import read_snapshot
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, RG, VAULT, compliant, drift, fragment_for

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HASH_KEY = b"h" * 32
WRITES = ("PUT", "PATCH", "POST", "DELETE")
PROVIDERS = ("/providers/microsoft.apimanagement", "/providers/microsoft.insights")


@pytest.fixture(autouse=True)
def _identity_and_fast_lros(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    status, body = twin.control("PUT", "/_twin/lro", {"retry_after": "0.01", "polls": 1})
    assert status == 200, body


@asynccontextmanager
async def product_factory(twin: TwinHandle) -> AsyncIterator[ClientFactory]:
    built = ClientFactory(load_settings({**twin.env, "APIMR_KEY_VAULT_URL": twin.urls[f"vault:{VAULT}"]}))
    try:
        yield built
    finally:
        await built.aclose()
        built.close()


def seed(twin: TwinHandle, rule_id: str, *, tweak: Any = None) -> str:
    """One APIM instance that is compliant but for this rule's drift; returns its id."""
    name = "fix-" + rule_id.lower()
    spec = compliant(name, twin.subscription_id)
    drift(rule_id, spec)
    if tweak is not None:
        tweak(spec)
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


async def snapshot_of(factory: ClientFactory, service_id: str) -> Snapshot:
    ref = instance_ref(service_id, "westeurope", {})
    assert ref is not None
    # No ledger vault: the snapshot then makes no listSecrets POST, so the only POST/PUT/PATCH/
    # DELETE requests in the twin's log are writes of the remediation.
    return await read_snapshot(factory, ref, key_vault_url=None, hash_key=HASH_KEY, now=NOW)


def as_if_safe(snapshot: Snapshot) -> PlanEvidence:
    """Evidence that lets KEY-001 and API-003 go ahead: these tests are about the writes (the
    evidence itself is tested in test_evidence_source.py and test_remediate_lockouts.py)."""
    return PlanEvidence(
        key_usage=tuple(
            KeyUsage(s.id, s.sid, 30, ("law",), service_rows=100, logs_since=NOW - timedelta(days=30), queried_at=NOW)
            for s in snapshot.subscriptions
        ),
        tls_probes=tuple(TlsProbe(b.id, safe_target(b.url), ok=True) for b in snapshot.backends),
    )


def context(twin: TwinHandle, rule_id: str, params: Mapping[str, Any], snapshot: Snapshot | None = None) -> PlanContext:
    return PlanContext(
        params={**REGISTRY[rule_id].defaults(), **params},
        key_vault_url=twin.urls[f"vault:{VAULT}"],
        evidence=as_if_safe(snapshot) if snapshot is not None else PlanEvidence(),
    )


def plan_for(
    twin: TwinHandle, rule_id: str, findings: list[Finding], snapshot: Snapshot, params: Mapping[str, Any]
) -> RemediationPlan | Refusal:
    remediation = REMEDIATIONS[rule_id]
    if remediation.combiner is not None:
        return remediation.combiner(findings, snapshot, context(twin, rule_id, params, snapshot))
    (finding,) = findings
    return remediation.plan(finding, snapshot, context(twin, rule_id, params, snapshot))


def arm_writes(twin: TwinHandle) -> list[str]:
    _, log = twin.control("GET", "/_twin/log?service=arm")
    return [
        f"{e['method']} {e['path']}"
        for e in log["entries"]
        if e["method"] in WRITES and any(p in e["path"].lower() for p in PROVIDERS)
    ]


async def remediate(
    twin: TwinHandle, service_id: str, rule_id: str, params: Mapping[str, Any] | None = None, *, findings: int = 1
) -> RemediationPlan:
    """Plan from a real snapshot, apply, verify, then prove the instance is clean and stays so."""
    params = dict(params or {})
    async with product_factory(twin) as factory:
        snapshot = await snapshot_of(factory, service_id)
        found = evaluate_rule(rule_id, snapshot, params)
        assert len(found) == findings, found
        plan = plan_for(twin, rule_id, found, snapshot, params)
        assert isinstance(plan, RemediationPlan), plan
        twin.control("DELETE", "/_twin/log")
        arm = AzureArm(factory, poll_default=0.01)
        await apply_plan(plan, arm, AzureSecrets(factory))
        await verify_plan(plan, arm, pause=0.01)
        # Exactly the planned requests reached ARM (a copy to Key Vault reads the value with listValue).
        expected = [
            f"{s.method} {s.resource_id}" if isinstance(s, ArmWrite) else f"POST {s.named_value_id}/listValue"
            for s in plan.steps
        ]
        assert [w.lower() for w in arm_writes(twin)] == [e.lower() for e in expected]

        twin.control("DELETE", "/_twin/log")
        fresh = await snapshot_of(factory, service_id)
        assert evaluate_rule(rule_id, fresh, params) == []
        assert arm_writes(twin) == []  # re-scanning after the fix writes nothing
    return plan


def sdk_names(service_id: str) -> tuple[str, str, str]:
    parts = service_id.split("/")
    return parts[2], parts[4], parts[-1]


async def planned(twin: TwinHandle, factory: ClientFactory, service_id: str, rule_id: str) -> RemediationPlan:
    snapshot = await snapshot_of(factory, service_id)
    found = evaluate_rule(rule_id, snapshot)
    plan = plan_for(twin, rule_id, found, snapshot, {})
    assert isinstance(plan, RemediationPlan), plan
    return plan


class Recording:
    """The product's ArmApi, recording each request: (method, path, If-Match sent, body, ETag returned)."""

    def __init__(self, inner: ArmApi) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str, str | None, Any, str | None]] = []

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
    ) -> ArmResponse:
        response = await self.inner.send(method, path, api_version, body=body, if_match=if_match)
        self.sent.append((method, path, if_match, body, response.etag))
        return response

    def writes(self) -> list[tuple[str, str, str | None, Any, str | None]]:
        return [s for s in self.sent if s[0] != "GET"]

    def assert_patched_with_a_fresh_etag(self, resource_id: str, body: Any) -> None:
        """One PATCH, of exactly `body`, whose If-Match is the ETag the GET just before returned."""
        (write,) = self.writes()
        at = self.sent.index(write)
        method, path, if_match, sent_body, _ = write
        read = self.sent[at - 1]
        assert (method, path.lower(), sent_body) == ("PATCH", resource_id.lower(), body)
        assert (read[0], read[1].lower()) == ("GET", resource_id.lower())
        assert if_match is not None
        assert if_match != "*"
        assert if_match == read[4]


# -- the remediations --------------------------------------------------------------------------------


async def test_key_001_suspends_the_all_apis_subscription(twin: TwinHandle) -> None:
    service_id = seed(twin, "KEY-001")
    await remediate(twin, service_id, "KEY-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        contract = factory.apim(sub).subscription.get(rg, name, "all-apis")
        kept = factory.apim(sub).subscription.get(rg, name, "orders-mobile")
    assert contract.state == "suspended"
    assert contract.state_comment == SUSPEND_COMMENT
    assert (contract.scope or "").lower().endswith("/apis")  # the scope itself is untouched
    assert kept.state == "active"


async def test_key_001_built_in_subscription(twin: TwinHandle) -> None:
    def active_master(spec: dict[str, Any]) -> None:
        spec["subscriptions"] = [s for s in spec["subscriptions"] if s["sid"] != "all-apis"]
        spec["subscriptions"][0].update(state="active", scope="/")

    service_id = seed(twin, "KEY-001", tweak=active_master)
    plan = await remediate(twin, service_id, "KEY-001")
    assert "test console" in plan.summary
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        assert factory.apim(sub).subscription.get(rg, name, "master").state == "suspended"


async def test_sec_001_moves_the_secret_into_key_vault(twin: TwinHandle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_value = f"{CANARY}-named-value-secret"
    service_id = seed(twin, "SEC-001")
    sub, rg, name = sdk_names(service_id)
    plan = await remediate(twin, service_id, "SEC-001")

    vault_url = twin.urls[f"vault:{VAULT}"]
    secret_name = vault_secret_name(name, "db-password")
    async with product_factory(twin) as factory:
        stored = factory.secrets(vault_url).get_secret(secret_name)
        named = factory.apim(sub).named_value.get(rg, name, "db-password")
    assert stored.value == secret_value
    assert (stored.properties.tags or {}).get("apim-named-value-id") == f"{service_id}/namedValues/db-password"
    assert named.key_vault is not None
    assert named.key_vault.secret_identifier == f"{vault_url.rstrip('/')}/secrets/{secret_name}"
    assert named.secret is True
    assert named.value is None
    # The value never entered the plan or the log.
    assert secret_value not in repr(plan)
    assert secret_value not in caplog.text


async def test_sec_001_list_value_still_returns_the_value(twin: TwinHandle) -> None:
    service_id = seed(twin, "SEC-001")
    sub, rg, name = sdk_names(service_id)
    await remediate(twin, service_id, "SEC-001")
    async with product_factory(twin) as factory:
        listed = factory.apim(sub).named_value.list_value(rg, name, "db-password")
    assert listed.value == f"{CANARY}-named-value-secret"


async def test_sec_001_refused_without_managed_identity(twin: TwinHandle) -> None:
    # No identity, so none to grant the vault to either.
    service_id = seed(twin, "SEC-001", tweak=lambda spec: (spec.pop("identity"), spec.update(_vault_reader=False)))
    async with product_factory(twin) as factory:
        snapshot = await snapshot_of(factory, service_id)
    (finding,) = evaluate_rule("SEC-001", snapshot)
    result = plan_for(twin, "SEC-001", [finding], snapshot, {})
    assert isinstance(result, Refusal)
    assert "needs ID-001 first" in result.reason


async def test_api_001_https_only(twin: TwinHandle) -> None:
    service_id = seed(twin, "API-001")
    await remediate(twin, service_id, "API-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        api = factory.apim(sub).api.get(rg, name, "orders")
    assert api.protocols == ["https"]
    assert api.service_url == "https://orders.internal.example"  # nothing else changed


async def test_api_003_backend_validates_certificates(twin: TwinHandle) -> None:
    service_id = seed(twin, "API-003")
    await remediate(twin, service_id, "API-003")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        backend = factory.apim(sub).backend.get(rg, name, "orders")
    assert backend.tls is not None
    assert (backend.tls.validate_certificate_chain, backend.tls.validate_certificate_name) == (True, True)
    assert backend.credentials is not None  # the credentials are kept
    assert backend.credentials.header == {"x-api-key": ["{{backend-key}}"]}


async def test_log_001_diagnostic_setting_to_the_workspace(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-001")
    workspace = (
        f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/"
        "Microsoft.OperationalInsights/workspaces/law"
    )
    await remediate(twin, service_id, "LOG-001", {"workspace_id": workspace})
    sub = service_id.split("/")[2]
    async with product_factory(twin) as factory:
        setting = factory.monitor(sub).diagnostic_settings.get(service_id, "apim-remediator")
    assert (setting.workspace_id or "").lower() == workspace.lower()
    assert setting.log_analytics_destination_type == "Dedicated"
    assert [(log.category, log.enabled) for log in setting.logs] == [("GatewayLogs", True)]
    assert [(m.category, m.enabled) for m in setting.metrics] == [("AllMetrics", True)]


async def test_log_001_refused_without_a_workspace(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-001")
    async with product_factory(twin) as factory:
        snapshot = await snapshot_of(factory, service_id)
    found = evaluate_rule("LOG-001", snapshot)
    result = plan_for(twin, "LOG-001", found, snapshot, {})
    assert isinstance(result, Refusal)
    assert "rules.LOG-001.params.workspace_id" in result.reason


async def test_log_002_creates_the_diagnostic(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-002", tweak=lambda spec: spec.update(loggers=[]))
    await remediate(twin, service_id, "LOG-002")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        logger = factory.apim(sub).logger.get(rg, name, "azuremonitor")
        diagnostic = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor")
    assert logger.logger_type == "azureMonitor"
    assert (diagnostic.logger_id or "").lower() == f"{service_id}/loggers/azuremonitor".lower()
    assert diagnostic.sampling is not None
    assert diagnostic.sampling.percentage == 100
    assert diagnostic.verbosity == "information"
    assert diagnostic.log_client_ip is True


async def test_log_002_a_logger_created_meanwhile_is_not_replaced(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-002", tweak=lambda spec: spec.update(loggers=[], diagnostics=[]))
    logger_id = f"{service_id}/loggers/azuremonitor"
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "LOG-002")
        first = next(s for s in plan.steps if isinstance(s, ArmWrite))
        assert (first.method, first.resource_id, first.create_only) == ("PUT", logger_id, True)
        # A person creates the logger between the plan and the apply.
        made = twin.arm(
            "PUT",
            f"{logger_id}?api-version=2024-05-01",
            json={"properties": {"loggerType": "azureMonitor", "isBuffered": False, "description": "the team's"}},
        )
        assert made.status_code in (200, 201), made.text
        twin.control("DELETE", "/_twin/log")
        with pytest.raises(PreconditionFailed, match="somebody created it since the plan was made"):
            await apply_plan(plan, AzureArm(factory, poll_default=0.01), AzureSecrets(factory))
    assert arm_writes(twin) == []
    logger = twin.arm("GET", f"{logger_id}?api-version=2024-05-01").json()["properties"]
    assert (logger["description"], logger["isBuffered"]) == ("the team's", False)


async def test_log_002_repoints_an_existing_diagnostic(twin: TwinHandle) -> None:
    def to_event_hub(spec: dict[str, Any]) -> None:
        hub = f"Endpoint=sb://hub/;SharedAccessKey={CANARY}"
        spec["loggers"].append({"id": "hub", "loggerType": "azureEventHub", "credentials": {"connectionString": hub}})
        spec["diagnostics"] = [{"id": "azuremonitor", "loggerId": "/loggers/hub",
                                "frontend": {"request": {"headers": ["User-Agent"]}}}]  # fmt: skip

    service_id = seed(twin, "LOG-002", tweak=to_event_hub)
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        before = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor")
    assert (before.logger_id or "").lower().endswith("/loggers/hub")
    plan = await remediate(twin, service_id, "LOG-002")
    assert [(s.method, s.resource_id.rsplit("/", 1)[-1]) for s in plan.steps if isinstance(s, ArmWrite)] == [
        ("PATCH", "azuremonitor")
    ]
    async with product_factory(twin) as factory:
        diagnostic = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor")
    assert (diagnostic.logger_id or "").lower() == f"{service_id}/loggers/azuremonitor".lower()
    assert diagnostic.frontend is not None
    assert diagnostic.frontend.request is not None
    assert diagnostic.frontend.request.headers == ["User-Agent"]  # a loggerId PATCH keeps the rest


async def test_log_003_removes_secret_headers_in_one_write(twin: TwinHandle) -> None:
    def more_secrets(spec: dict[str, Any]) -> None:
        spec["diagnostics"][0]["frontend"] = {
            "request": {"headers": ["User-Agent", "ocp-apim-subscription-key", "Authorization", "X-Request-Id"]},
            "response": {"headers": ["Content-Type"]},
        }

    service_id = seed(twin, "LOG-003", tweak=more_secrets)
    plan = await remediate(twin, service_id, "LOG-003", findings=2)
    assert len(plan.steps) == 1
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        diagnostic = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor")
    assert diagnostic.frontend is not None
    assert diagnostic.frontend.request is not None
    assert diagnostic.frontend.response is not None
    assert diagnostic.frontend.request.headers == ["User-Agent", "X-Request-Id"]
    assert diagnostic.frontend.response.headers == ["Content-Type"]


MASKING = {"queryParams": [{"value": "sig", "mode": "Hide"}], "headers": [{"value": "X-User-Email", "mode": "Mask"}]}


def masked_frontend(spec: dict[str, Any]) -> None:
    spec["diagnostics"][0]["frontend"] = {
        "request": {
            "headers": ["User-Agent", "Authorization"],
            "body": {"bytes": 512},
            "dataMasking": MASKING,
        },
        "response": {"body": {"bytes": 256}},
    }
    spec["diagnostics"][0]["backend"] = {"request": {"headers": ["X-Trace"], "body": {"bytes": 64}}}


def masking_of(settings: apim_models.HttpMessageDiagnostic | None) -> Any:
    assert settings is not None
    assert settings.data_masking is not None
    return settings.data_masking.serialize()


async def test_log_003_keeps_data_masking_and_body_settings(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-003", tweak=masked_frontend)
    plan = await remediate(twin, service_id, "LOG-003")
    (write,) = plan.steps
    assert isinstance(write, ArmWrite)
    assert write.body is not None
    assert write.body["properties"]["frontend"]["request"]["dataMasking"] == MASKING
    assert "backend" not in write.body["properties"]  # nothing to remove there: not sent
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        diagnostic = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor")
    assert diagnostic.frontend is not None
    request, response = diagnostic.frontend.request, diagnostic.frontend.response
    assert request is not None
    assert response is not None
    assert request.headers == ["User-Agent"]
    assert masking_of(request) == MASKING  # dataMasking survived the remediation
    assert request.body is not None
    assert request.body.bytes == 512
    assert response.body is not None
    assert response.body.bytes == 256
    assert diagnostic.backend is not None
    assert diagnostic.backend.request is not None
    assert diagnostic.backend.request.headers == ["X-Trace"]
    assert diagnostic.backend.request.body is not None
    assert diagnostic.backend.request.body.bytes == 64


async def test_log_003_a_concurrent_masking_change_is_never_clobbered(twin: TwinHandle) -> None:
    service_id = seed(twin, "LOG-003", tweak=masked_frontend)
    sub, rg, name = sdk_names(service_id)
    theirs = {"queryParams": [{"value": "sig", "mode": "Mask"}, {"value": "token", "mode": "Hide"}]}
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "LOG-003")
        # A person tightens the masking after the plan was made (sending the side whole, as APIM needs).
        current = raw_diagnostic(twin, service_id)["properties"]["frontend"]
        current["request"]["dataMasking"] = theirs
        response = twin.arm(
            "PATCH",
            f"{service_id}/diagnostics/azuremonitor?api-version=2024-05-01",
            json={"properties": {"frontend": current}},
            headers={"If-Match": "*"},
        )
        assert response.status_code == 200, response.text
        arm = Recording(AzureArm(factory, poll_default=0.01))
        with pytest.raises(PreconditionFailed, match="dataMasking"):
            await apply_plan(plan, arm, AzureSecrets(factory))
        assert arm.writes() == []
        request = factory.apim(sub).diagnostic.get(rg, name, "azuremonitor").frontend.request
    assert masking_of(request) == theirs  # the person's change stands
    assert request is not None
    assert request.headers == ["User-Agent", "Authorization"]  # and the stale plan wrote nothing


def raw_diagnostic(twin: TwinHandle, service_id: str) -> dict[str, Any]:
    response = twin.arm("GET", f"{service_id}/diagnostics/azuremonitor?api-version=2024-05-01")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- a person's change between plan and apply ----------------------------------------------------------


async def test_api_001_a_concurrent_protocol_change_stops_the_write(twin: TwinHandle) -> None:
    service_id = seed(twin, "API-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "API-001")  # http, https -> https
        apim = factory.apim(sub)
        apim.api.update(rg, name, "orders", "*", apim_models.ApiUpdateContract(protocols=["http"]))

        arm = Recording(AzureArm(factory, poll_default=0.01))
        with pytest.raises(PreconditionFailed, match="protocols"):
            await apply_plan(plan, arm, AzureSecrets(factory))
        assert arm.writes() == []
        assert apim.api.get(rg, name, "orders").protocols == ["http"]  # the person's change stands

        # Re-planned from a fresh snapshot, the fix starts from what the person left.
        again = await planned(twin, factory, service_id, "API-001")
        assert [c.before for c in again.changes] == ["http"]


async def test_api_001_a_concurrent_unrelated_change_survives(twin: TwinHandle) -> None:
    service_id = seed(twin, "API-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "API-001")
        apim = factory.apim(sub)
        apim.api.update(rg, name, "orders", "*", apim_models.ApiUpdateContract(description="Edited by a person"))

        arm = Recording(AzureArm(factory, poll_default=0.01))
        await apply_plan(plan, arm, AzureSecrets(factory))
        await verify_plan(plan, arm, pause=0.01)
        arm.assert_patched_with_a_fresh_etag(f"{service_id}/apis/orders", {"properties": {"protocols": ["https"]}})
        api = apim.api.get(rg, name, "orders")
    assert api.protocols == ["https"]
    assert api.description == "Edited by a person"


async def test_key_001_a_concurrent_scope_change_stops_the_suspension(twin: TwinHandle) -> None:
    service_id = seed(twin, "KEY-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "KEY-001")
        apim = factory.apim(sub)
        # A person narrows the key to one product: it no longer opens every API.
        product_scope = apim.subscription.get(rg, name, "orders-mobile").scope
        apim.subscription.update(
            rg, name, "all-apis", "*", apim_models.SubscriptionUpdateParameters(scope=product_scope)
        )

        arm = Recording(AzureArm(factory, poll_default=0.01))
        with pytest.raises(PreconditionFailed, match="scope"):
            await apply_plan(plan, arm, AzureSecrets(factory))
        assert arm.writes() == []
        contract = apim.subscription.get(rg, name, "all-apis")
        assert contract.scope == product_scope  # the person's change stands
        assert contract.state == "active"  # and a key that no longer opens every API is not suspended
        assert evaluate_rule("KEY-001", await snapshot_of(factory, service_id)) == []


async def test_key_001_a_concurrent_unrelated_change_survives(twin: TwinHandle) -> None:
    service_id = seed(twin, "KEY-001")
    sub, rg, name = sdk_names(service_id)
    async with product_factory(twin) as factory:
        plan = await planned(twin, factory, service_id, "KEY-001")
        apim = factory.apim(sub)
        apim.subscription.update(
            rg, name, "all-apis", "*", apim_models.SubscriptionUpdateParameters(display_name="Renamed by a person")
        )

        arm = Recording(AzureArm(factory, poll_default=0.01))
        await apply_plan(plan, arm, AzureSecrets(factory))
        await verify_plan(plan, arm, pause=0.01)
        arm.assert_patched_with_a_fresh_etag(
            sub_id_of(service_id, "all-apis"),
            {"properties": {"state": "suspended", "stateComment": SUSPEND_COMMENT}},
        )
        contract = apim.subscription.get(rg, name, "all-apis")
    assert contract.state == "suspended"
    assert contract.display_name == "Renamed by a person"


def sub_id_of(service_id: str, sid: str) -> str:
    return f"{service_id}/subscriptions/{sid}"
