"""`make demo`'s program runs end to end: scan, dry run, apply, rescan on the twin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_scans_fixes_and_rescans() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devhost.demo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("1. scan", "2. dry run", "3. apply", "4. rescan", "=== done ==="):
        assert step in out
    assert "dry run (nothing changed; --apply to act)" in out
    assert "REFUSED   NET-001" in out
    # The identity ID-001 adds in this run cannot read the vault yet: SEC-001 names the role.
    assert "REFUSED   SEC-001" in out
    assert "grant 'Key Vault Secrets User' on the vault to principal" in out
    assert "7 fixed, 0 failed" in out
    # The fixed findings are gone from the rescan; the refused and detect-only ones remain.
    rescan = out.split("4. rescan")[1]
    for fixed in ("TLS-001", "MGMT-001", "ID-001", "ID-002", "ID-003", "API-001"):
        assert f" {fixed} " not in rescan, fixed
    assert " NET-001 " in rescan
    assert " SEC-001 " in rescan
    assert "twin-demo-secret-product" not in out + result.stderr
