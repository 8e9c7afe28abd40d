"""Issue 17 part 3: an instance with two workspaces. Each API / key / secret / policy rule
fires in the workspace whose resource drifts, naming it, and nowhere else; the service
level of the same instance (compliant) gives nothing."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import API_POLICY, compliant, fragment_for, run_scan

pytestmark = pytest.mark.integration

NAME = "apim-ws"
# A workspace policy that keeps the global policy (<base />) in every section.
KEEPS_BASE = API_POLICY
# A workspace policy whose inbound drops the global one (and with it the global rate limit).
DROPS_BASE = "<policies><inbound /><backend><base /></backend><outbound><base /></outbound></policies>"
WORKSPACES: list[dict[str, Any]] = [
    {
        "id": "team-a",
        "displayName": "Team A",
        "apis": [
            {"id": "a-legacy", "protocols": ["http", "https"]},  # API-001
            {"id": "a-open", "subscriptionRequired": False},  # API-002
            {"id": "a-fine"},
        ],
        "backends": [
            {"id": "a-be", "url": "https://a.internal.example", "protocol": "http",  # API-003
             "tls": {"validateCertificateChain": False},
             "credentials": {"header": {"x-api-key": ["{{a-key}}"]}}},
        ],
        "named_values": [
            {"id": "a-password", "secret": True, "value": "CANARY7f3a-ws-named-value"},  # SEC-001
            {"id": "a-region", "value": "westeurope"},
        ],
        "subscriptions": [
            {"sid": "a-all", "scope": "/apis"},  # KEY-001 and KEY-005 (no expiry)
            {"sid": "a-one", "scope": "/apis/a-fine", "expirationDate": "2027-06-30T00:00:00Z"},
        ],
        "policies": {"workspace": KEEPS_BASE, "apis": {"a-fine": API_POLICY}},
    },
    {
        "id": "team-b",
        "displayName": "Team B",
        "apis": [{"id": "b-api", "serviceUrl": "https://b.internal.example"}],  # API-005
        "products": [{"id": "b-prod", "apis": ["b-api"]}],
        "backends": [
            {"id": "b-be", "url": "https://b.internal.example", "protocol": "http"},  # API-004
        ],
        "named_values": [
            {"id": "b-kv", "keyVault": {"secretIdentifier": "https://kv-team-b.vault.azure.net/secrets/b-kv",
                                        "lastStatus": {"code": "Forbidden", "message": "access denied"}}},  # SEC-002
        ],
        "subscriptions": [
            {"sid": "b-sub", "scope": "/products/b-prod", "expirationDate": "2027-06-30T00:00:00Z"},
        ],
        "policies": {"workspace": DROPS_BASE, "products": {"b-prod": API_POLICY}},  # API-006
    },
]  # fmt: skip


def ws_id(service_id: str, workspace: str, path: str) -> str:
    return f"{service_id}/workspaces/{workspace}/{path}"


def expected(service_id: str) -> set[tuple[str, str]]:
    """(rule, resource) of every finding: each drift where it is, nothing anywhere else."""
    return {
        ("API-001", ws_id(service_id, "team-a", "apis/a-legacy")),
        ("API-002", ws_id(service_id, "team-a", "apis/a-open")),
        ("API-003", ws_id(service_id, "team-a", "backends/a-be")),
        ("SEC-001", ws_id(service_id, "team-a", "namedValues/a-password")),
        ("KEY-001", ws_id(service_id, "team-a", "subscriptions/a-all")),
        ("KEY-005", ws_id(service_id, "team-a", "subscriptions/a-all")),
        ("API-005", ws_id(service_id, "team-b", "apis/b-api")),
        ("API-004", ws_id(service_id, "team-b", "backends/b-be")),
        ("SEC-002", ws_id(service_id, "team-b", "namedValues/b-kv")),
        ("API-006", ws_id(service_id, "team-b", "policies/policy")),
    }


def workspace_estate(sub_id: str) -> tuple[dict[str, Any], str]:
    spec = compliant(NAME, sub_id)
    spec["workspaces"] = copy.deepcopy(WORKSPACES)
    fragment, ids = fragment_for({NAME: spec}, sub_id)
    return fragment, ids[NAME]


def test_each_rule_fires_in_its_workspace_naming_it_and_nowhere_else(twin: TwinHandle, tmp_path: Path) -> None:
    fragment, service_id = workspace_estate(twin.subscription_id)
    twin.seed(fragment)
    twin.control("DELETE", "/_twin/log")
    result = run_scan(twin, tmp_path, None, "--format", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    [instance] = [i for i in body["instances"] if i["id"].lower() == service_id.lower()]
    assert instance["error"] is None, instance
    assert instance["unreadable"] == [], instance
    found = {(f["rule"], f["resource"]) for f in instance["findings"]}
    assert found == expected(service_id)
    assert len(instance["findings"]) == len(found)  # each exactly once
    for finding in instance["findings"]:
        workspace = finding["resource"].split("/workspaces/", 1)[1].split("/", 1)[0]
        assert finding["message"].startswith(f"In workspace '{workspace}': "), finding
        assert finding["remediable"] is False, finding
    # Each workspace part read once, the workspaces listed once.
    _, log = twin.control("GET", "/_twin/log?service=arm")
    reads = Counter((e["method"], e["path"].lower(), e["query"]) for e in log["entries"] if e["method"] == "GET")
    assert [r for r, n in reads.items() if n > 1] == []
    paths = Counter(e["path"].removeprefix(service_id) for e in log["entries"] if e["path"].startswith(service_id))
    assert paths["/workspaces"] == 1
    for workspace in ("team-a", "team-b"):
        for part in ("apis", "products", "subscriptions", "namedValues", "backends", "policies/policy"):
            assert paths[f"/workspaces/{workspace}/{part}"] == 1, (workspace, part)
    assert paths["/workspaces/team-b/products/b-prod/apiLinks"] == 1
    assert paths["/workspaces/team-b/products/b-prod/policies/policy"] == 1
    assert "CANARY7f3a" not in result.stdout + result.stderr
