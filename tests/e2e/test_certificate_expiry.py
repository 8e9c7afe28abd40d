"""CERT-001..003 end to end: `apim-remediator scan` over the twin, with real certificates
(custom domains uploaded and synced from Key Vault, CA certificates, backend client
certificates) on each side of every boundary of the expiry window. The twin reads each
certificate as Azure does; the product sees only subject, thumbprint and expiry.

Boundaries are an hour either side (seeding and scanning are seconds apart); the exact
instants are covered by tests/unit/rules/test_certs.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, VAULT, compliant, findings_by_instance, fragment_for, run_scan
from twin.apim.certificates import make_certificate

pytestmark = pytest.mark.integration

HOUR = 1 / 24
INSIDE, OUTSIDE = 30 - HOUR, 30 + HOUR  # the default window is 30 days


def instance(name: str, sub_id: str) -> dict[str, Any]:
    spec = compliant(name, sub_id)
    spec["properties"]["hostnameConfigurations"] = [
        {"type": "Proxy", "hostName": f"{name}.azure-api.net", "certificateSource": "BuiltIn"},
        {"type": "Proxy", "hostName": "expired.contoso.example", "expires_in_days": -1},
        {"type": "Proxy", "hostName": "soon.contoso.example", "expires_in_days": HOUR},
        {"type": "Proxy", "hostName": "inside.contoso.example", "expires_in_days": INSIDE},
        {"type": "Proxy", "hostName": "outside.contoso.example", "expires_in_days": OUTSIDE},
        {"type": "DeveloperPortal", "hostName": "portal.contoso.example", "expires_in_days": 400},
        # Synced from Key Vault once; the last sync failed since (the estate states it).
        {
            "type": "Management",
            "hostName": "mgmt.contoso.example",
            "keyVaultId": f"https://{VAULT}.vault.azure.net/secrets/mgmt-cert",
            "certificateStatus": "Failed",
        },
        {"type": "Scm", "hostName": "scm.contoso.example", "keyVaultId": f"https://{VAULT}.vault.azure.net/secrets/scm-cert"},
    ]  # fmt: skip
    spec["properties"]["certificates"] = [
        {"storeName": "Root", "subject": "Old Root", "expires_in_days": -1},
        {"storeName": "CertificateAuthority", "subject": "Inside CA", "expires_in_days": INSIDE},
        {"storeName": "CertificateAuthority", "subject": "Outside CA", "expires_in_days": OUTSIDE},
    ]
    spec["certificates"] = [
        {"id": "expired", "subject": "expired.backend", "expires_in_days": -1},
        {"id": "soon", "subject": "soon.backend", "expires_in_days": HOUR},
        {"id": "inside", "subject": "inside.backend", "expires_in_days": INSIDE},
        {"id": "outside", "subject": "outside.backend", "expires_in_days": OUTSIDE},
        {"id": "vaulted", "keyVault": {"secretIdentifier": f"https://{VAULT}.vault.azure.net/secrets/mtls-cert"}},
        {
            "id": "refresh-failed",
            "keyVault": {
                "secretIdentifier": f"https://{VAULT}.vault.azure.net/secrets/mtls-cert",
                "lastStatus": {"code": "Forbidden", "message": "access revoked"},
            },
        },
    ]
    return spec


def estate(sub_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    fragment, ids = fragment_for(
        {"certs": instance("certs", sub_id), "clean": compliant("certs-clean", sub_id)}, sub_id
    )
    far = datetime.now(UTC) + timedelta(days=400)
    [group] = fragment["subscriptions"][0]["resource_groups"]
    group["key_vaults"][0]["secrets"] += [
        {"name": name, "value": make_certificate(name, far)} for name in ("mgmt-cert", "scm-cert", "mtls-cert")
    ]
    return fragment, ids


EXPECTED = {
    ("CERT-001", "", "properties.hostnameConfigurations[Proxy:expired.contoso.example].certificate.expiry", "high"),
    ("CERT-001", "", "properties.hostnameConfigurations[Proxy:soon.contoso.example].certificate.expiry", "medium"),
    ("CERT-001", "", "properties.hostnameConfigurations[Proxy:inside.contoso.example].certificate.expiry", "medium"),
    ("CERT-001", "", "properties.hostnameConfigurations[Management:mgmt.contoso.example].certificateStatus", "high"),
    ("CERT-002", "", "properties.certificates[{old}].certificate.expiry", "high"),
    ("CERT-002", "", "properties.certificates[{inside}].certificate.expiry", "medium"),
    ("CERT-003", "certificates/expired", "properties.expirationDate", "high"),
    ("CERT-003", "certificates/soon", "properties.expirationDate", "medium"),
    ("CERT-003", "certificates/inside", "properties.expirationDate", "medium"),
    ("CERT-003", "certificates/refresh-failed", "properties.keyVault.lastStatus.code", "high"),
}


def cert_findings(found: list[dict[str, Any]], instance_id: str) -> set[tuple[str, str, str, str]]:
    return {
        (f["rule"], f["resource"][len(instance_id) + 1 :], f["evidence"]["path"], f["severity"])
        for f in found
        if f["rule"].startswith("CERT-")
    }


def test_each_certificate_rule_fires_exactly_at_its_boundaries(twin: TwinHandle, tmp_path: Path) -> None:
    fragment, ids = estate(twin.subscription_id)
    twin.seed(fragment)
    result = run_scan(twin, tmp_path, None, "--format", "json", "--instance", ids["certs"], "--instance", ids["clean"])
    assert result.returncode == 0, result.stderr
    found = findings_by_instance(result.stdout)
    assert cert_findings(found["certs-clean"], ids["clean"]) == set()
    # CA certificates are named by thumbprint (the twin made them): take those from the paths.
    got = cert_findings(found["certs"], ids["certs"])
    thumbprints = {p.split("[", 1)[1].split("]", 1)[0] for r, _, p, _ in got if r == "CERT-002"}
    assert len(thumbprints) == 2
    by_severity = {s: p for r, _, p, s in got if r == "CERT-002"}
    expected = {
        (r, res, p.format(old=_thumb(by_severity["high"]), inside=_thumb(by_severity["medium"])), s)
        for r, res, p, s in EXPECTED
    }
    assert got == expected
    messages = {f["message"] for f in found["certs"] if f["rule"] == "CERT-002"}
    assert any("CN=Old Root" in m and "expired" in m for m in messages)
    assert any("CN=Inside CA" in m and "expires on" in m for m in messages)
    assert len([f for f in found["certs"] if f["rule"].startswith("CERT-")]) == len(EXPECTED)
    assert CANARY not in result.stdout + result.stderr

    # A narrower window: the certificates a day or more away drop out.
    policy = "version: 1\nrules:\n" + "".join(
        f"  {rule}: {{params: {{expiry_days: 1}}}}\n" for rule in ("CERT-001", "CERT-002", "CERT-003")
    )
    narrow = run_scan(twin, tmp_path, policy, "--format", "json", "--instance", ids["certs"])
    assert narrow.returncode == 0, narrow.stderr
    left = cert_findings(findings_by_instance(narrow.stdout)["certs"], ids["certs"])
    assert {(r, res, s) for r, res, _, s in left} == {
        ("CERT-001", "", "high"),
        ("CERT-001", "", "medium"),
        ("CERT-002", "", "high"),
        ("CERT-003", "certificates/expired", "high"),
        ("CERT-003", "certificates/soon", "medium"),
        ("CERT-003", "certificates/refresh-failed", "high"),
    }
    assert len(left) == 7  # CERT-001: expired, soon, and the failed sync


def _thumb(path: str) -> str:
    return path.split("[", 1)[1].split("]", 1)[0]
