"""The production EvidenceSource: KEY-001's gateway-log evidence through ARM (the workspace's
customerId) and the real LogsQueryClient against the twin; API-003's TLS handshakes against
local HTTPS servers on 127.0.0.1 (a certificate from a CA the product trusts through
APIMR_CA_BUNDLE, and self-signed, untrusted, expired, wrong-name and unreachable ones).
Nothing gathered carries a backend URL's credentials or query."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from shared.azure import ClientFactory
from shared.evidence import PlanEvidence
from shared.evidence_source import AzureEvidenceSource
from shared.inventory import instance_ref
from shared.model import Backend, Snapshot
from shared.rules import evaluate_rule
from shared.settings import load_settings
from shared.snapshot import read_snapshot
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, drift, fragment_for

pytestmark = pytest.mark.integration

CANARIES = ("P4ssw0rd", "svc-user", "s1g-CANARY", "c0de-CANARY", "sig=", "code=")


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


@pytest.fixture(scope="module")
def backend_ca() -> trustme.CA:
    return trustme.CA(organization_name="backends' private CA")


@pytest.fixture
def bundle(twin: TwinHandle, backend_ca: trustme.CA, tmp_path: Path) -> Path:
    """APIMR_CA_BUNDLE: the twin's CA (for Azure) plus the backends' private CA."""
    path = tmp_path / "ca-bundle.pem"
    path.write_bytes(Path(twin.env["APIMR_CA_BUNDLE"]).read_bytes() + b"\n" + backend_ca.cert_pem.bytes())
    return path


@asynccontextmanager
async def evidence_source(twin: TwinHandle, bundle: Path, **kwargs: Any) -> AsyncIterator[AzureEvidenceSource]:
    factory = ClientFactory(load_settings({**twin.env, "APIMR_CA_BUNDLE": str(bundle)}))
    try:
        yield AzureEvidenceSource(factory, **kwargs)
    finally:
        await factory.aclose()
        factory.close()


# -- KEY-001: gateway logs --------------------------------------------------------------------


def seed_key_001(twin: TwinHandle, rows: list[dict[str, Any]] | None, *, setting: bool = True) -> str:
    """An instance whose subscription 'all-apis' is scoped to every API; `rows` of gateway logs
    (their `_ResourceId` filled in) go to the workspace its diagnostic setting names."""
    name = "evidence-key"
    spec = compliant(name, twin.subscription_id)
    drift("KEY-001", spec)
    spec["_diagnostic_setting"] = setting
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    service_id = ids[name]
    if rows is not None:
        [group] = fragment["subscriptions"][0]["resource_groups"]
        group["workspaces"][0]["tables"] = {
            "ApiManagementGatewayLogs": {"rows": [{"_ResourceId": service_id.upper(), **r} for r in rows]}
        }
    twin.seed(fragment)
    return service_id


async def snapshot_of(twin: TwinHandle, bundle: Path, service_id: str) -> Snapshot:
    factory = ClientFactory(load_settings({**twin.env, "APIMR_CA_BUNDLE": str(bundle)}))
    try:
        ref = instance_ref(service_id, "westeurope", {})
        assert ref is not None
        return await read_snapshot(factory, ref, key_vault_url=None, hash_key=b"h" * 32, now=datetime.now(UTC))
    finally:
        await factory.aclose()
        factory.close()


async def key_evidence(twin: TwinHandle, bundle: Path, service_id: str, days: int = 30) -> PlanEvidence:
    snapshot = await snapshot_of(twin, bundle, service_id)
    findings = evaluate_rule("KEY-001", snapshot)
    assert [f.resource_id.rsplit("/", 1)[-1] for f in findings] == ["all-apis"]
    async with evidence_source(twin, bundle) as source:
        return await source.gather(snapshot, findings, {"KEY-001": {"unused_days": days}})


def the_usage(evidence: PlanEvidence) -> Any:
    [usage] = evidence.key_usage
    assert usage.sid == "all-apis"
    return usage


async def test_key_usage_counts_the_subscriptions_requests_in_the_window(twin: TwinHandle, bundle: Path) -> None:
    service_id = seed_key_001(
        twin,
        [
            {"ago": "29.8d", "ApimSubscriptionId": "orders-mobile", "repeat": 5},
            {"ago": "6h", "ApimSubscriptionId": "all-apis", "repeat": 3},
            {"ago": "2d", "ApimSubscriptionId": "ALL-APIS"},
            {"ago": "40d", "ApimSubscriptionId": "all-apis", "repeat": 7},  # outside the window
        ],
    )
    usage = the_usage(await key_evidence(twin, bundle, service_id))
    assert (usage.uses, usage.service_rows, usage.missing, usage.workspaces) == (4, 9, None, ("law",))
    assert usage.last_used is not None
    assert usage.queried_at is not None
    assert timedelta(hours=5) < usage.queried_at - usage.last_used < timedelta(hours=7)
    assert usage.logs_since is not None
    assert usage.queried_at - usage.logs_since > timedelta(days=29)
    # Exactly the two calls the evidence needs reached Azure: the workspace GET and one query.
    _, log = twin.control("GET", "/_twin/log")
    paths = [e["path"] for e in log["entries"] if "operationalinsights" in e["path"].lower() or "/v1/" in e["path"]]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["law", "query"]


async def test_key_usage_unused_key_with_logs_arriving(twin: TwinHandle, bundle: Path) -> None:
    service_id = seed_key_001(
        twin,
        [
            {"ago": "29.9d", "ApimSubscriptionId": "orders-mobile"},
            {"ago": "1h", "ApimSubscriptionId": "orders-mobile", "repeat": 4},
            # Another service's master key in the same workspace is not this one's.
            {"ago": "1h", "ApimSubscriptionId": "all-apis", "_ResourceId": "/subscriptions/x/other"},
        ],
    )
    usage = the_usage(await key_evidence(twin, bundle, service_id))
    assert (usage.uses, usage.service_rows, usage.last_used, usage.missing) == (0, 5, None, None)


async def test_key_usage_without_a_diagnostic_setting_says_what_is_missing(twin: TwinHandle, bundle: Path) -> None:
    service_id = seed_key_001(twin, None, setting=False)
    usage = the_usage(await key_evidence(twin, bundle, service_id))
    assert usage.missing is not None
    assert "no diagnostic setting sends the service's GatewayLogs to a Log Analytics workspace" in usage.missing


async def test_key_usage_a_failed_query_is_missing_evidence(twin: TwinHandle, bundle: Path) -> None:
    service_id = seed_key_001(twin, [{"ago": "1h", "ApimSubscriptionId": "orders-mobile"}])
    status, body = twin.control(
        "POST", "/_twin/faults", {"service": "logs", "path": "/query$", "status": 400, "times": 10}
    )
    assert status in (200, 201), body
    usage = the_usage(await key_evidence(twin, bundle, service_id))
    assert usage.missing is not None
    assert usage.missing.startswith("querying workspace law failed (HttpResponseError")


async def test_key_usage_a_missing_workspace_is_missing_evidence(twin: TwinHandle, bundle: Path) -> None:
    service_id = seed_key_001(twin, [])
    snapshot = await snapshot_of(twin, bundle, service_id)
    [setting] = snapshot.diagnostic_settings
    gone = setting.workspace_id.replace("/law", "/law-deleted") if setting.workspace_id else None
    snapshot = replace(snapshot, diagnostic_settings=(replace(setting, workspace_id=gone),))
    async with evidence_source(twin, bundle) as source:
        evidence = await source.gather(snapshot, evaluate_rule("KEY-001", snapshot), {})
    usage = the_usage(evidence)
    assert usage.missing == "reading workspace law-deleted failed (404 ResourceNotFound)"


# -- API-003: TLS handshakes ------------------------------------------------------------------


def server_context(cert_pem: bytes, key_pem: bytes, tmp: Path, label: str) -> ssl.SSLContext:
    cert, key = tmp / f"{label}.pem", tmp / f"{label}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def leaf_context(ca: trustme.CA, tmp: Path, label: str, *names: str, **kwargs: Any) -> ssl.SSLContext:
    leaf = ca.issue_cert(*names, **kwargs)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return server_context(chain, leaf.private_key_pem.bytes(), tmp, label)


@asynccontextmanager
async def https_server(context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS server on the loopback interface only; returns its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def backend(port: int) -> Backend:
    url = f"https://svc-user:P4ssw0rd@127.0.0.1:{port}/api?code=c0de-CANARY&sig=s1g-CANARY"
    return Backend(
        id=f"/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a/backends/b{port}",
        name="b",
        url=url,
        protocol="http",
        validate_certificate_chain=False,
        validate_certificate_name=False,
        has_credentials=True,
    )


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        found: int = probe.getsockname()[1]
    return found  # nothing listens on it any more


def contexts(backend_ca: trustme.CA, tmp: Path) -> dict[str, ssl.SSLContext]:
    stranger = trustme.CA(organization_name="nobody trusts this CA")
    now = datetime.now(UTC)
    return {
        "valid": leaf_context(backend_ca, tmp, "valid", "127.0.0.1", "localhost"),
        "untrusted": leaf_context(stranger, tmp, "untrusted", "127.0.0.1"),
        "self-signed": server_context(stranger.cert_pem.bytes(), stranger.private_key_pem.bytes(), tmp, "self"),
        "expired": leaf_context(
            backend_ca,
            tmp,
            "expired",
            "127.0.0.1",
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        ),
        "wrong-name": leaf_context(backend_ca, tmp, "wrong-name", "orders.other.example"),
    }


EXPECTED_PROBLEMS = {
    "valid": None,
    "untrusted": "issuer not trusted (unable to get the local issuer certificate)",
    "self-signed": "self-signed certificate",
    "expired": "certificate expired",
    "wrong-name": "name mismatch (the certificate is not valid for the backend's host)",
}


@pytest.mark.parametrize("case", list(EXPECTED_PROBLEMS))
async def test_tls_probe(twin: TwinHandle, bundle: Path, backend_ca: trustme.CA, tmp_path: Path, case: str) -> None:
    async with https_server(contexts(backend_ca, tmp_path)[case]) as port, evidence_source(twin, bundle) as source:
        probe = await source.probe(backend(port))
    assert (probe.ok, probe.problem) == (case == "valid", EXPECTED_PROBLEMS[case])
    assert probe.target == f"https://127.0.0.1:{port}"
    for canary in CANARIES:
        assert canary not in repr(probe)


async def test_tls_probe_unreachable_is_bounded(twin: TwinHandle, bundle: Path, free_port: int) -> None:
    async with evidence_source(twin, bundle, probe_timeout=2.0) as source:
        probe = await asyncio.wait_for(source.probe(backend(free_port)), timeout=5)
    assert not probe.ok
    assert probe.problem is not None
    assert probe.problem.startswith("unreachable")


async def test_tls_probe_a_silent_server_times_out(twin: TwinHandle, bundle: Path) -> None:
    # Accepts the connection and never answers the ClientHello.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with evidence_source(twin, bundle, probe_timeout=0.5) as source:
            probe = await asyncio.wait_for(source.probe(backend(port)), timeout=3)
    finally:
        server.close()
    assert probe.problem == "unreachable (no handshake in 0.5 s)"


async def test_gather_probes_only_the_api_003_backends(twin: TwinHandle, bundle: Path, backend_ca: trustme.CA,
                                                       tmp_path: Path) -> None:  # fmt: skip
    service_id = seed_key_001(twin, None, setting=False)
    snapshot = await snapshot_of(twin, bundle, service_id)
    async with https_server(contexts(backend_ca, tmp_path)["valid"]) as port:
        snapshot = replace(snapshot, backends=(backend(port),))
        [finding] = evaluate_rule("API-003", snapshot)
        async with evidence_source(twin, bundle) as source:
            evidence = await source.gather(snapshot, [finding], {})
    assert evidence.key_usage == ()
    [probe] = evidence.tls_probes
    assert probe.ok
    assert evidence.probe_of(backend(port).id.upper()) == probe
