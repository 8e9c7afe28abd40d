"""The findings store against Azurite, and one reconcile of a drifted instance against the
twin: new / changed / resolved as scans come and go, the summary the HTTP API lists,
failures kept for the operator, and coalescing by the time a request was made."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from handlers.reconcile import LogSink, ReconcileDeps, ReconcileRequest, reconcile
from shared.azure import ClientFactory
from shared.findings_store import FindingsStore, FindingStatus
from shared.journal import Trigger, TriggerKind
from shared.model import Evidence, Finding, Severity
from shared.settings import load_settings
from tests.conftest import TwinHandle
from tests.integration.test_remediate_engine_safety import deps_for, seed_drifts

pytestmark = pytest.mark.integration

SERVICE = "/subscriptions/{sub}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/{name}"
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="function")
async def factory(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ClientFactory]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built = ClientFactory(load_settings(twin.env))
    yield built
    await built.aclose()
    built.close()


def finding(instance: str, rule_id: str, resource: str = "", severity: Severity = Severity.HIGH) -> Finding:
    return Finding(
        rule_id=rule_id,
        resource_id=resource or instance,
        instance_id=instance,
        severity=severity,
        title=f"{rule_id} title",
        message=f"{rule_id} on {resource or 'the service'}",
        evidence=Evidence(path="properties.x", actual="a", expected="b"),
        remediable=False,
    )


async def test_sync_reports_new_changed_resolved_and_reopened(twin: TwinHandle, factory: ClientFactory) -> None:
    store = FindingsStore(factory.table_service_async(), f"findings{uuid.uuid4().hex[:10]}")
    instance = SERVICE.format(sub=twin.subscription_id, name="apim-store")
    tls, net = finding(instance, "TLS-001"), finding(instance, "NET-001", severity=Severity.MEDIUM)

    first = await store.sync(instance, [tls, net], seen_at=T0, correlation_id="c1")
    assert {f.rule_id for f in first.new} == {"TLS-001", "NET-001"}
    assert not first.changed
    assert not first.resolved

    later = T0 + timedelta(hours=1)
    second = await store.sync(instance, [tls, replace(net, severity=Severity.HIGH)], seen_at=later)
    assert second.new == ()
    assert [f.rule_id for f in second.changed] == ["NET-001"]
    [stored_tls] = [f for f in await store.findings(instance) if f.rule_id == "TLS-001"]
    assert (stored_tls.first_seen, stored_tls.last_seen) == (T0, later)

    third = await store.sync(instance, [net], seen_at=later + timedelta(hours=1))
    assert [f.rule_id for f in third.resolved] == ["TLS-001"]
    assert [f.rule_id for f in await store.findings(instance)] == ["NET-001"]
    everything = await store.findings(instance, include_resolved=True)
    assert {(f.rule_id, f.status) for f in everything} == {
        ("NET-001", FindingStatus.OPEN),
        ("TLS-001", FindingStatus.RESOLVED),
    }

    fourth = await store.sync(instance, [net, tls], seen_at=later + timedelta(hours=2))
    assert [f.rule_id for f in fourth.new] == ["TLS-001"]  # it came back: new again
    summary = await store.summary(instance)
    assert summary is not None
    assert (summary.open_by_severity["high"], summary.open_by_severity["medium"]) == (1, 1)
    assert summary.last_reconciled == later + timedelta(hours=2)
    assert [s.instance_id for s in await store.instances()] == [instance]

    await store.record_failure(instance, "reading the service: 403 AuthorizationFailed", at=later, correlation_id="c9")
    failed = await store.summary(instance)
    assert failed is not None
    assert failed.last_error == "reading the service: 403 AuthorizationFailed"
    assert failed.last_reconciled == later + timedelta(hours=2)  # the failure did not erase the last success


async def test_reconcile_fixes_stores_and_coalesces(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    service_id = seed_drifts(twin, "reconciled", "TLS-001", "MGMT-003")
    from tests.integration.test_remediate import product_env

    factory = ClientFactory(load_settings(product_env(twin, tmp_path, "version: 1\n")))
    try:
        store = FindingsStore(factory.table_service_async(), f"findings{uuid.uuid4().hex[:10]}")
        deps = ReconcileDeps(
            remediation=deps_for(factory, "version: 1\nrules:\n  TLS-001: {mode: remediate}\n", "journalreconcile"),
            findings=store,
            sink=LogSink(),
        )
        trigger = Trigger(TriggerKind.TIMER, "sweep test")
        first = await reconcile(ReconcileRequest(service_id, trigger, "sweep"), deps)
        assert first.skipped is None
        assert first.changes is not None
        assert [f.rule_id for f in first.changes.new] == ["MGMT-003"]  # TLS-001 was fixed before it was stored
        assert first.remediation is not None
        assert first.remediation.writes == 1

        made_before = datetime.now(UTC) - timedelta(seconds=30)
        coalesced = await reconcile(ReconcileRequest(service_id, trigger, "sweep", not_before=made_before), deps)
        assert coalesced.skipped is not None
        assert "nothing to do twice" in coalesced.skipped

        again = await reconcile(ReconcileRequest(service_id, trigger, "event"), deps)
        assert again.changes is not None
        assert again.changes.empty
        assert again.remediation is not None
        assert again.remediation.writes == 0
    finally:
        await factory.aclose()
        factory.close()
