"""Workspace findings are detect-only: the engine, in remediate mode for their rules, fixes the
service-level drift and never writes a workspace resource with a service-level action."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from handlers.remediate import Status
from shared.azure import ClientFactory
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import compliant, fragment_for
from tests.integration.test_remediate import apim_writes
from tests.integration.test_remediate_engine_safety import deps_for, make_factory, run  # noqa: F401

pytestmark = pytest.mark.integration

POLICY = """version: 1
rules:
  API-001: {mode: remediate}
  SEC-001: {mode: remediate}
  API-003: {mode: remediate}
"""


async def test_workspace_findings_are_skipped_and_never_written(
    twin: TwinHandle,
    make_factory: Callable[[], ClientFactory],  # noqa: F811 (the engine tests' fixture)
) -> None:
    spec = compliant("apim-wsfix", twin.subscription_id)
    spec["apis"][0]["protocols"] = ["http", "https"]  # the service-level API-001 drift: fixed
    spec["workspaces"] = [
        {
            "id": "team-a",
            "apis": [{"id": "legacy", "protocols": ["http", "https"]}],
            "named_values": [{"id": "pw", "secret": True, "value": "CANARY7f3a-ws-fix"}],
            "backends": [
                {"id": "be", "url": "https://be.internal.example", "protocol": "http",
                 "tls": {"validateCertificateChain": False}, "credentials": {"header": {"k": ["v"]}}},
            ],
        }
    ]  # fmt: skip
    fragment, ids = fragment_for({"apim-wsfix": spec}, twin.subscription_id)
    twin.seed(fragment)
    service_id = ids["apim-wsfix"]
    workspace = f"{service_id}/workspaces/team-a"
    factory = make_factory()
    twin.control("DELETE", "/_twin/log")
    report = await run(deps_for(factory, POLICY, "journalwsfix"), service_id)

    results = {(r.rule_id, r.resource_id): r for r in report.results}
    assert results[("API-001", f"{service_id}/apis/orders")].status is Status.FIXED
    for rule_id, path in (("API-001", "apis/legacy"), ("SEC-001", "namedValues/pw"), ("API-003", "backends/be")):
        result = results[(rule_id, f"{workspace}/{path}")]
        assert result.status is Status.SKIPPED, result
        assert result.detail == "no automatic remediation for this finding"
    writes = apim_writes(twin)
    assert writes == [f"PATCH {service_id}/apis/orders"], writes
    assert not [w for w in writes if "/workspaces/" in w]
    # The workspace's drift is still there, untouched; the service-level one is gone.
    remaining = {(f.rule_id, f.resource_id) for f in report.remaining}
    assert ("API-001", f"{workspace}/apis/legacy") in remaining
    assert ("API-001", f"{service_id}/apis/orders") not in remaining
