"""`make demo`'s program runs end to end through the Functions app on devhost: a sweep tick
fixes through the queue, an operator's change is undone through Event Grid, the HTTP API
plans, applies and refuses by role, and a stale key is rotated while a client authenticates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_the_app_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devhost.demo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("1. a sweep tick", "2. an operator turns TLS 1.0 back on", "3. the HTTP API", "=== done ==="):
        assert step in out
    assert re.search(r"sweep -> 2 work message\(s\)", out)
    assert "apim-contoso-prod: BAK-001, BAK-002 open until the backup and restore-test jobs run" in out
    assert re.search(
        r"apim-contoso-prod: backed up to apimbackups/apim-backups/apim-contoso-prod/\d{8}T\d{6}Z\.apimbackup", out
    )
    assert "apim-contoso-prod: after the next sweep, BAK-002 open" in out
    prod = next(line for line in out.splitlines() if "apim-contoso-prod: fixed and verified" in line)
    for fixed in ("TLS-001", "MGMT-001", "ID-001", "ID-002", "ID-003", "API-001"):
        assert fixed in prod, fixed
    assert "NET-001" not in prod  # refused: no private path
    # SEC-001 waits in the run ID-001 made the identity in; once the operator grants that identity
    # the vault, the next run (the event's) moves the secret and APIM reads it (Key Vault RBAC).
    assert "SEC-001" not in prod
    assert "payments-api-key still held by APIM: SEC-001 waits" in out
    assert "operator: grants 'Key Vault Secrets User' on kv-apim-keys-prod to principal" in out
    assert "payments-api-key moved into kv-apim-keys-prod by that run; APIM read it with its identity: Success" in out
    assert re.search(r"TLS 1\.0 off again, verified, \d+\.\d s after the change landed", out)
    assert "WOULD MGMT-003" in out
    assert "operation succeeded: MGMT-003 fixed" in out
    assert "(Remediator.Read only) -> 403" in out
    # 5: the stale key rotated through Key Vault while the client kept authenticating.
    assert "5. a stale key rotated through Key Vault" in out
    assert "WOULD rotate orders-mobile" in out
    assert "operation succeeded: orders-mobile done: rotated: clients now read the secondary key" in out
    assert re.search(r"client: [1-9]\d* request\(s\) authenticated with the vault's current key, 0 refused", out)
    # 6. incidents: what was left to people, in Sentinel and on the signed webhook; SEC-001's
    # refusal (the identity could not read the vault yet) resolved by the run that fixed it.
    assert "6. a later sweep tick, and the incidents the runs posted" in out
    sec = next(line for line in out.splitlines() if "SEC-001 Secret named values" in line)
    assert sec.split()[0] == "RESOLVED"
    assert "[sentinel delivered, webhook delivered]" in sec
    assert re.search(r"resolved: fixed by apim-remediator in run [0-9a-f-]{36} \(SEC-001: Move secret", out)
    assert re.search(r"ACTIVE\s+medium x[2-9] 2 NET findings on apim-contoso-prod", out)  # counted, not duplicated
    assert re.search(r"Sentinel \(law-platform\): (\d+) incident\(s\): \d+ Active, 2 Closed", out)
    assert re.search(r"webhook: \d+ signed deliveries verified \(.*\); refused 0, duplicates 0", out)
    assert "PENDING" not in out
    secrets = ("twin-demo-secret-product", "twin-demo-secret-operator", "twin-demo-secret-reader")
    for secret in (
        *secrets,
        "demo-incident-webhook-hmac-key",
        "demo-plaintext-secret-in-apim",
        "demo-orders-mobile-key-0c1e5a7f",
    ):
        assert secret not in out + result.stderr
