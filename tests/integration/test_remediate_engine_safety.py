"""Issue 8 against the twin and Azurite: one service update per run (and what happens while
Azure takes an hour to apply it), the write budget charged per executed step, outcomes per
step in the journal."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from handlers.remediate import RemediateRequest, RemediationDeps, RemediationReport, Status, remediate
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.evidence_source import AzureEvidenceSource
from shared.journal import Journal, Phase, Trigger, TriggerKind
from shared.locks import InstanceLocks
from shared.policy import parse_policy
from shared.settings import load_settings
from shared.source import AzureInstanceSource
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, drift, fragment_for
from tests.integration.test_remediate import apim_writes, cli, product_env

pytestmark = pytest.mark.integration

SERVICE_RULES = ("NET-001", "TLS-001", "TLS-003", "MGMT-003", "ID-001")
ALL_SERVICE = """version: 1
rules:
  NET-001: {mode: remediate, params: {acknowledge_gateway_only: true}}
  TLS-001: {mode: remediate}
  TLS-003: {mode: remediate}
  MGMT-003: {mode: remediate}
  ID-001: {mode: remediate}
"""
TLS_ONLY = "version: 1\nrules:\n  TLS-001: {mode: remediate}\n"


def seed_drifts(twin: TwinHandle, name: str, *rule_ids: str, named_secrets: int = 0) -> str:
    spec = compliant(name, twin.subscription_id)
    for rule_id in rule_ids:
        drift(rule_id, spec)
    for i in range(named_secrets):
        spec["named_values"].append(
            {"id": f"secret-{i}", "displayName": f"secret-{i}", "secret": True, "value": f"canary-nv-{i}"}
        )
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


@pytest.fixture
async def make_factory(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Callable[[], ClientFactory]]:
    """Clients for the product, built once the test has seeded its estate (the product's
    Key Vault URL is known only then)."""
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built: list[ClientFactory] = []

    def make() -> ClientFactory:
        built.append(ClientFactory(load_settings(product_env(twin, tmp_path, TLS_ONLY))))
        return built[-1]

    yield make
    for factory in built:
        await factory.aclose()
        factory.close()


def deps_for(factory: ClientFactory, policy: str, table: str, **extra: Any) -> RemediationDeps:
    return RemediationDeps(
        source=AzureInstanceSource(factory, factory.settings),
        arm=AzureArm(factory, poll_default=0.01),
        secrets=AzureSecrets(factory),
        journal=Journal(factory.table_service_async(), table),
        locks=InstanceLocks(factory.blob_service_async(), duration=15),
        policy=parse_policy(policy, source="policy.yaml"),
        key_vault_url=factory.settings.key_vault_url,
        evidence=AzureEvidenceSource(factory),
        **extra,
    )


async def run(deps: RemediationDeps, service_id: str) -> RemediationReport:
    request = RemediateRequest(instance_id=service_id, trigger=Trigger(TriggerKind.CLI, "test"), apply=True)
    return await remediate(request, deps)


def service_patches(twin: TwinHandle, service_id: str) -> list[str]:
    return [w for w in apim_writes(twin) if w.lower() == f"patch {service_id}".lower()]


def by_rule(report: RemediationReport) -> dict[str, Status]:
    return {r.rule_id: r.status for r in report.results}


# -- one service update per run ---------------------------------------------------------------------


async def test_service_level_fixes_go_out_as_one_patch(
    twin: TwinHandle, make_factory: Callable[[], ClientFactory]
) -> None:
    service_id = seed_drifts(twin, "svc-one", *SERVICE_RULES)
    factory = make_factory()
    twin.control("DELETE", "/_twin/log")
    deps = deps_for(factory, ALL_SERVICE, "journalonepatch")
    report = await run(deps, service_id)
    assert by_rule(report) == dict.fromkeys(SERVICE_RULES, Status.FIXED), report.results
    assert len(service_patches(twin, service_id)) == 1  # five fixes, one infrastructure change
    assert all("in one service update with" in r.detail for r in report.results)
    assert report.writes == 1
    body = twin.arm("GET", f"{service_id}?api-version=2024-05-01").json()
    assert body["properties"]["publicNetworkAccess"] == "Disabled"
    assert body["identity"]["type"] == "SystemAssigned"
    assert body["properties"]["apiVersionConstraint"]["minApiVersion"] == "2019-12-01"
    [entry] = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert entry.phase is Phase.VERIFIED
    assert set(entry.rule_id.split("+")) == set(SERVICE_RULES)
    assert json.loads(entry.after or "{}")["service_update"] is True

    twin.control("DELETE", "/_twin/log")
    again = await run(deps, service_id)
    assert apim_writes(twin) == []  # converged: a second run changes nothing
    assert again.writes == 0


async def test_a_long_service_update_is_journaled_and_resumed_by_a_later_run(
    twin: TwinHandle, make_factory: Callable[[], ClientFactory]
) -> None:
    """Azure can take an hour: the run waits `service_wait`, journals the operation URL
    (phase running) and ends; a run while it still runs writes nothing to the service and
    settles nothing as abandoned; once it has finished, the next run verifies it."""
    service_id = seed_drifts(twin, "svc-slow", "TLS-001")
    factory = make_factory()
    twin.control("PUT", "/_twin/lro", {"service_update_seconds": 3600, "polls": 0})
    deps = deps_for(factory, TLS_ONLY, "journalslow", service_wait=0.3)

    first = await run(deps, service_id)
    assert by_rule(first)["TLS-001"] is Status.PENDING
    assert "next run verifies it" in first.results[0].detail
    [entry] = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert entry.phase is Phase.RUNNING
    assert entry.operation_url
    assert "/operationresults/" in entry.operation_url
    assert twin.arm("GET", f"{service_id}?api-version=2024-05-01").json()["properties"]["provisioningState"] == (
        "Updating"
    )

    twin.control("DELETE", "/_twin/log")
    second = await run(deps, service_id)
    assert service_patches(twin, service_id) == []  # never a second infrastructure change meanwhile
    assert by_rule(second)["TLS-001"] is Status.SKIPPED
    assert "still running" in second.results[0].detail
    assert any("still running in Azure" in note for note in second.recovered)
    [entry] = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert entry.phase is Phase.RUNNING  # not settled as abandoned while Azure still applies it

    twin.control("POST", "/_twin/clock/advance", {"seconds": 3601})
    twin.control("DELETE", "/_twin/log")
    third = await run(deps, service_id)
    assert service_patches(twin, service_id) == []
    assert any("has landed; verified" in note for note in third.recovered)
    [entry] = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert entry.phase is Phase.VERIFIED
    assert not [f for f in third.remaining if f.rule_id == "TLS-001"]


async def test_no_service_write_while_somebody_elses_update_runs(
    twin: TwinHandle, make_factory: Callable[[], ClientFactory]
) -> None:
    service_id = seed_drifts(twin, "svc-busy", "TLS-001")
    factory = make_factory()
    twin.control("PUT", "/_twin/lro", {"service_update_seconds": 3600, "polls": 0})
    started = twin.arm("PATCH", f"{service_id}?api-version=2024-05-01", json={"tags": {"change": "CHG-9"}})
    assert started.status_code == 202, started.text
    twin.control("DELETE", "/_twin/log")
    report = await run(deps_for(factory, TLS_ONLY, "journalbusy"), service_id)
    assert service_patches(twin, service_id) == []
    [result] = report.results
    assert result.status is Status.SKIPPED
    assert "the service is Updating" in result.detail


# -- the write budget ---------------------------------------------------------------------------------


def test_the_budget_counts_what_earlier_fixes_unlock(twin: TwinHandle, tmp_path: Path) -> None:
    """Issue 8's reproduction: cap 2, ID-001 and SEC-001 in remediate mode, 6 secret named
    values. The dry run and the apply agree; no run writes more than 2."""
    service_id = seed_drifts(twin, "budget", "ID-001", named_secrets=6)
    policy = (
        "version: 1\nrules:\n  ID-001: {mode: remediate}\n  SEC-001: {mode: remediate}\n"
        "limits:\n  max_writes_per_run: 2\n"
    )
    env = product_env(twin, tmp_path, policy)
    dry = json.loads(cli(env, "remediate", "--instance", service_id, "--format", "json").stdout)
    statuses = [(r["rule"], r["status"]) for r in dry["results"]]
    assert statuses.count(("SEC-001", "refused")) == 6  # ID-001's identity would be minutes old
    assert ("ID-001", "would") in statuses

    twin.control("DELETE", "/_twin/log")
    first = cli(env, "remediate", "--instance", service_id, "--apply", "--format", "json")
    applied = json.loads(first.stdout)
    assert len(apim_writes(twin)) == 1 == applied["writes"]
    assert [(r["rule"], r["status"]) for r in applied["results"]].count(("SEC-001", "refused")) == 6

    # Next run: the identity exists, so each SEC-001 is two writes (copy, switch): 12 > 2.
    twin.control("DELETE", "/_twin/log")
    second = cli(env, "remediate", "--instance", service_id, "--apply", "--format", "json")
    assert second.returncode == 1
    report = json.loads(second.stdout)
    assert "12 writes planned" in report["stopped"]
    assert apim_writes(twin) == []


async def test_a_replan_after_412_is_charged(twin: TwinHandle, make_factory: Callable[[], ClientFactory]) -> None:
    """Cap 1 and one planned write: a 412 spends the budget, so the re-plan is not sent."""
    service_id = seed_drifts(twin, "replan", "API-001")
    factory = make_factory()
    policy = "version: 1\nrules:\n  API-001: {mode: remediate}\nlimits:\n  max_writes_per_run: 1\n"
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "method": "PATCH", "path": "/apis/", "status": 412, "code": "PreconditionFailed"},
    )
    twin.control("DELETE", "/_twin/log")
    report = await run(deps_for(factory, policy, "journalreplan"), service_id)
    assert len(apim_writes(twin)) == 1  # the refused PATCH; the re-plan was not sent
    assert report.writes == 1
    [result] = report.results
    assert result.status is Status.SKIPPED
    assert "write budget" in result.detail
    assert report.stopped is None or "write budget" in report.stopped


# -- outcomes per step ----------------------------------------------------------------------------------


async def test_a_412_after_an_earlier_step_is_journaled_partial(
    twin: TwinHandle, make_factory: Callable[[], ClientFactory]
) -> None:
    """SEC-001 copies the secret into Key Vault (step 1), then its named value PATCH gets 412
    (step 2): the row says partial with one step done, not abandoned; the re-plan finishes."""
    service_id = seed_drifts(twin, "partial", "SEC-001")
    factory = make_factory()
    policy = "version: 1\nrules:\n  SEC-001: {mode: remediate}\n"
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "method": "PATCH", "path": "/namedValues/db-password$", "status": 412,
         "code": "PreconditionFailed"},
    )  # fmt: skip
    deps = deps_for(factory, policy, "journalpartial")
    report = await run(deps, service_id)
    [result] = report.results
    assert result.status is Status.FIXED
    assert result.detail == "verified by re-reading after re-planning"
    verified, partial = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert (verified.phase, partial.phase) == (Phase.VERIFIED, Phase.PARTIAL)
    assert partial.steps_done == 1
    assert "412" in (partial.error or "")
    assert report.writes == 4  # copy + refused PATCH, then copy + PATCH: every executed step counted


# -- SEC-001's verification can fail (issue 10, item 2) ----------------------------------------------


class DisablingSecrets:
    """The product's AzureSecrets, and right after its copy an operator disables that secret in
    the vault: APIM's write-time read of the new reference then fails."""

    def __init__(self, real: AzureSecrets, twin: TwinHandle) -> None:
        self.real = real
        self.twin = twin

    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        made = await self.real.set_secret(vault_url, name, value, tags=tags)
        operator = SecretClient(
            vault_url, self.twin.credential(), verify_challenge_resource=False, **self.twin.sdk_kwargs
        )
        with operator:
            await asyncio.to_thread(operator.update_secret_properties, name, enabled=False)
        return made

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_sec001_verification_fails_when_apim_cannot_read_the_secret(
    twin: TwinHandle, make_factory: Callable[[], ClientFactory]
) -> None:
    """The plan expects keyVault.lastStatus.code Success; the twin now reads the secret with the
    instance's identity when the reference is written, so a disabled secret fails the fix."""
    service_id = seed_drifts(twin, "kv-unread", "SEC-001")
    factory = make_factory()
    policy = "version: 1\nrules:\n  SEC-001: {mode: remediate}\n"
    deps = deps_for(factory, policy, "journalkvunread")
    deps = dataclasses.replace(deps, secrets=DisablingSecrets(deps.secrets, twin))  # type: ignore[arg-type]
    report = await run(deps, service_id)
    [result] = report.results
    assert result.rule_id == "SEC-001"
    assert result.status is Status.FAILED
    assert "lastStatus.code" in result.detail
    nv = twin.arm("GET", f"{service_id}/namedValues/db-password?api-version=2024-05-01").json()
    assert nv["properties"]["keyVault"]["lastStatus"]["code"] == "Forbidden"
    [entry] = await deps.journal.history(service_id)  # type: ignore[attr-defined]
    assert entry.phase is not Phase.VERIFIED
