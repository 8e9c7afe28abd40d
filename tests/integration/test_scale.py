"""One SSL context and one connection pool per process, and pacing against ARM's buckets,
measured where it shows: the twin numbers every TCP connection it accepts and logs every
429 it answers. Nothing here times anything."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handlers.cli import main
from handlers.scan import MAX_PARALLEL_INSTANCES, ScanRequest, scan
from shared.azure import ClientFactory
from shared.connections import POOL_CONNECTIONS
from shared.policy import Policy
from shared.settings import load_settings
from shared.snapshot import MAX_CONCURRENT_READS
from shared.source import AzureInstanceSource
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

RG = "rg-pool"


def _estate(subscription_id: str, count: int) -> dict[str, Any]:
    apim = [
        {
            "name": f"pool-{n:02d}",
            "sku": {"name": "Developer", "capacity": 1},
            "apis": [{"id": f"api-{a}", "path": f"p{a}", "protocols": ["https"]} for a in range(3)],
            "subscriptions": [{"generate": {"count": 3, "scope": "/apis/api-0"}}],
        }
        for n in range(count)
    ]
    return {"subscriptions": [{"id": subscription_id, "resource_groups": [{"name": RG, "apim": apim}]}]}


@pytest.fixture
def env(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    values = dict(twin.env)
    assert values.get("APIMR_CA_BUNDLE"), (
        "the twin's settings name its CA bundle (what made every request a new TLS session)"
    )
    values["APIMR_RESOURCE_GROUPS"] = RG
    return values


@pytest.fixture
def factory(env: dict[str, str]) -> Iterator[ClientFactory]:
    built = ClientFactory(load_settings(env))
    yield built
    built.close()


def _arm_log(twin: TwinHandle) -> list[dict[str, Any]]:
    status, body = twin.control("GET", "/_twin/log?service=arm")
    assert status == 200
    return [
        e for e in body["entries"] if "/providers/Microsoft.ApiManagement/" in e["path"] or "/resources" in e["path"]
    ]


async def _scan(factory: ClientFactory, *, after: Any = None) -> None:
    source = AzureInstanceSource(factory, factory.settings)
    try:
        report = await scan(ScanRequest(), source, Policy(), policy_file="-")
        if after is not None:
            after()
    finally:
        await factory.aclose()
    assert report.instances, "the scan found the seeded instances"
    assert all(r.error is None and not r.unreadable for r in report.instances), [
        (r.error, r.unreadable) for r in report.instances
    ]


async def test_a_scan_reuses_connections_under_a_ca_bundle(twin: TwinHandle, factory: ClientFactory) -> None:
    twin.seed(_estate(twin.subscription_id, 6))
    twin.control("DELETE", "/_twin/log")
    held: list[int] = []
    await _scan(factory, after=lambda: held.append(factory.pool.open_sockets()))
    assert 0 < held[0] <= MAX_PARALLEL_INSTANCES * MAX_CONCURRENT_READS, "kept alive for reuse, bounded"
    entries = _arm_log(twin)
    connections = {e["connection"] for e in entries}
    assert len(entries) > 6 * 15, "each instance takes a snapshot's worth of reads"
    # Before the pool: one connection (one TLS handshake) per request.
    assert len(connections) <= min(POOL_CONNECTIONS, MAX_PARALLEL_INSTANCES * MAX_CONCURRENT_READS)
    assert len(entries) >= 3 * len(connections)
    assert factory.pool.open_sockets() == 0, "aclose closed the shared session"


def test_sync_clients_share_one_connection(twin: TwinHandle, factory: ClientFactory) -> None:
    twin.seed(_estate(twin.subscription_id, 3))
    twin.control("DELETE", "/_twin/log")
    apim = factory.apim(twin.subscription_id)
    monitor = factory.monitor(twin.subscription_id)
    services = list(apim.api_management_service.list_by_resource_group(RG))
    assert services
    for service in services[:3]:
        assert service.id is not None
        apim.api_management_service.get(service.id.split("/")[4], service.name)
        list(monitor.diagnostic_settings.list(service.id))
    _, body = twin.control("GET", "/_twin/log?service=arm")
    entries = body["entries"]
    assert len(entries) >= 4
    assert len({e["connection"] for e in entries}) == 1, "requests one after another go over one kept-alive connection"


async def test_the_ssl_context_is_built_once(factory: ClientFactory) -> None:
    assert factory.pool.ssl_context() is factory.pool.ssl_context()
    assert factory.https_context() is factory.pool.ssl_context()
    first = factory.pool.session()
    assert factory.pool.session() is first
    connector: Any = first.connector
    assert connector._ssl is factory.pool.ssl_context(), "the connector verifies with the one context"
    await factory.aclose()


async def test_a_paced_scan_spends_no_attempt_on_429s(twin: TwinHandle, factory: ClientFactory) -> None:
    """Throttling on, the bucket scaled to 50 reads refilling 5/s: four instances need about
    twice the bucket. Unpaced, 32 requests in flight drain it at once and every one backs
    off alone (429s in the log); paced, they wait for the refill."""
    twin.seed(_estate(twin.subscription_id, 4))
    status, _ = twin.control("PUT", "/_twin/throttle", {"enabled": True, "scale": 0.2})
    assert status == 200
    twin.control("DELETE", "/_twin/log")
    await _scan(factory)
    _, counters = twin.control("GET", "/_twin/counters")
    assert counters["reads"] > 50 + 10, "the scan needed more reads than the bucket holds"
    assert counters["throttled"] == 0, counters["by_status"]
    assert factory.pacer.stats["waited"] > 0, "requests waited for the refill"


def test_the_cli_streams_json_lines_and_sarif_while_it_scans(
    twin: TwinHandle, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`scan --format jsonl` (and `--format sarif --stream`) write each instance as it is
    read: valid JSON lines / SARIF with every seeded instance, and the same exit code as the
    whole-document report."""
    twin.seed(_estate(twin.subscription_id, 3))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("APIMR_KEY_VAULT_URL", raising=False)
    out, err = io.StringIO(), io.StringIO()
    code = main(["scan", "--format", "jsonl", "--quiet", "--fail-on", "critical"], out=out, err=err)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["scan", "instance", "instance", "instance", "summary"]
    assert sorted(line["id"].rsplit("/", 1)[-1] for line in lines[1:-1]) == ["pool-00", "pool-01", "pool-02"]
    whole = io.StringIO()
    assert main(["scan", "--format", "json", "--quiet", "--fail-on", "critical"], out=whole, err=err) == code
    assert lines[-1]["findings"] == sum(len(i["findings"]) for i in json.loads(whole.getvalue())["instances"])
    target = tmp_path / "scan.sarif"
    sarif_code = main(
        ["scan", "--format", "sarif", "--stream", "--output", str(target), "--quiet", "--fail-on", "critical"],
        out=io.StringIO(),
        err=err,
    )
    assert sarif_code == code
    [run] = json.loads(target.read_text())["runs"]
    assert len(run["results"]) == lines[-1]["findings"]
    assert not err.getvalue()
    assert main(["scan", "--format", "table", "--stream"], out=io.StringIO(), err=err) == 2


async def test_a_named_instance_is_read_without_listing_the_estate(twin: TwinHandle, factory: ClientFactory) -> None:
    """A scan (or remediation, or API call) of one instance GETs that service: no Resource
    Graph query, no list of services, however large the estate."""
    twin.seed(_estate(twin.subscription_id, 3))
    source = AzureInstanceSource(factory, factory.settings)
    wanted = (
        f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/POOL-01"
    )
    twin.control("DELETE", "/_twin/log")
    try:
        report = await scan(ScanRequest(instance_ids=(wanted,)), source, Policy(), policy_file="-")
        outside = wanted.replace(f"/resourceGroups/{RG}/", "/resourceGroups/rg-elsewhere/")
        assert await source.locate(outside) is None, "outside APIMR_RESOURCE_GROUPS: refused without a call"
        assert await source.locate(wanted.replace("POOL-01", "pool-99")) is None
    finally:
        await factory.aclose()
    [result] = report.instances
    assert result.instance_id.endswith("/service/pool-01"), "the id as ARM spells it"
    _, body = twin.control("GET", "/_twin/log?service=arm")
    routes = [f"{e['method']} {e['path']}" for e in body["entries"]]
    assert not [r for r in routes if "Microsoft.ResourceGraph" in r]
    assert not [r for r in routes if r.endswith("/Microsoft.ApiManagement/service")]
    assert not [r for r in routes if "rg-elsewhere" in r]
    assert sum(1 for r in routes if r.lower().endswith("/service/pool-99")) == 1


def test_a_scan_skips_the_reads_of_switched_off_rules(
    twin: TwinHandle, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the LOG family on: the scan reads the service, diagnostics, loggers, APIs and
    diagnostic settings, nothing else, and finds what a full read finds for those rules."""
    twin.seed(_estate(twin.subscription_id, 2))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("APIMR_KEY_VAULT_URL", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefaults: {mode: off}\nrules:\n  LOG-001: {mode: detect}\n"
        "  LOG-002: {mode: detect}\n  LOG-003: {mode: detect}\n"
    )
    monkeypatch.setenv("APIMR_POLICY_FILE", str(policy))
    twin.control("DELETE", "/_twin/log")
    out, err = io.StringIO(), io.StringIO()
    assert main(["scan", "--format", "json", "--quiet"], out=out, err=err) == 0, err.getvalue()
    narrow = json.loads(out.getvalue())["instances"]
    _, body = twin.control("GET", "/_twin/log?service=arm")
    kinds = {
        e["path"].split("/service/", 1)[1].split("/", 1)[1].split("/")[0]
        for e in body["entries"]
        if "/service/pool-" in e["path"] and e["path"].count("/") > 8
    }
    assert kinds == {"diagnostics", "loggers", "apis", "providers"}, kinds
    for instance in narrow:  # skipped parts are not reported; the key ledger and backups are unset
        assert instance["unreadable"] == []
        unset = ("APIMR_KEY_VAULT_URL", "APIMR_BACKUP_STORAGE_ACCOUNT")
        assert all(any(setting in part for setting in unset) for part in instance["not_configured"])

    policy.write_text("version: 1\n")  # every rule: every part
    full_out = io.StringIO()
    assert main(["scan", "--format", "json", "--quiet"], out=full_out, err=err) == 0, err.getvalue()
    full = json.loads(full_out.getvalue())["instances"]
    log_findings = [[f for f in i["findings"] if f["rule"].startswith("LOG-")] for i in full]
    assert [i["findings"] for i in narrow] == log_findings
    assert any(log_findings), "the LOG rules find something on these instances"
