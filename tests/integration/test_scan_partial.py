"""`apim-remediator scan --fail-on` in-process against the twin: a partial read fails the
gate unless the operator allows it, and a part the settings leave out is not a failure."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from handlers.cli import main
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
RG = "rg-partial"
# One rule on, its findings exempt: the instance has no active finding, so only the
# completeness of the read decides. (With every rule off nothing is read at all: a scan
# reads only the parts the rules the policy runs read, shared/read_plan.py.)
POLICY = """version: 1
defaults: {mode: off}
rules:
  LOG-001: {mode: detect}
exemptions:
  - rule: LOG-001
    resource: "**"
    reason: the test gates on the completeness of the read only
    expires: 2099-12-31
"""


@pytest.fixture
def scan_env(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    twin.seed(
        {
            "subscriptions": [
                {"id": SUB, "resource_groups": [{"name": RG, "location": "westeurope", "apim": [{"name": "apim-p"}]}]}
            ]
        }
    )
    for key, value in twin.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("APIMR_KEY_VAULT_URL", raising=False)  # no key ledger configured
    monkeypatch.setenv("APIMR_RESOURCE_GROUPS", RG)
    monkeypatch.setenv("APIMR_RETRY_TOTAL", "0")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("APIMR_POLICY_FILE", str(policy))


def scan(*args: str) -> tuple[int, dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["scan", "--format", "json", "--quiet", *args], out=out, err=err)
    assert not err.getvalue(), err.getvalue()
    return code, json.loads(out.getvalue())


def fail_diagnostic_settings(twin: TwinHandle) -> None:
    status, body = twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": "diagnosticSettings", "status": 403, "code": "AuthorizationFailed", "times": 0},
    )
    assert status == 201, body


@pytest.mark.usefixtures("scan_env")
def test_an_unreadable_part_fails_fail_on_unless_partial_results_are_allowed(twin: TwinHandle) -> None:
    fail_diagnostic_settings(twin)
    code, body = scan("--fail-on", "critical")
    [instance] = body["instances"]
    assert instance["findings"] == []
    assert code == 1  # nothing found, but not everything was looked at
    assert instance["unreadable"] == ["diagnostic_settings: 403 AuthorizationFailed"]
    code, _ = scan("--fail-on", "critical", "--allow-partial")
    assert code == 0
    code, _ = scan()  # no gate asked for
    assert code == 0


@pytest.mark.usefixtures("scan_env")
def test_a_key_ledger_not_configured_is_reported_as_such_and_does_not_fail() -> None:
    code, body = scan("--fail-on", "info")
    [instance] = body["instances"]
    assert instance["unreadable"] == []
    assert instance["not_configured"] == [
        "backups: not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)",
        "key_hashes: not configured (APIMR_KEY_VAULT_URL is not set)",
        "key_ledger: not configured (APIMR_KEY_VAULT_URL is not set)",
    ]
    assert code == 0
