"""CERT rules: custom domain, CA and backend client certificates at every boundary of the expiry window."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from shared.model import ApimCertificate, CaCertificate, HostnameCertificate, Severity, Snapshot
from shared.rules import evaluate_rule
from tests.factories import NOW, SERVICE_ID, compliant, service

KV = "https://kv-apim.vault.azure.net/secrets"
# (expiry relative to the scan, the severity reported or None) with the default 30 days.
BOUNDARIES = [
    (timedelta(days=-400), Severity.HIGH),  # long expired
    (timedelta(seconds=-1), Severity.HIGH),  # just expired
    (timedelta(0), Severity.HIGH),  # expires the instant of the scan: not valid any more
    (timedelta(seconds=1), Severity.MEDIUM),
    (timedelta(days=30) - timedelta(seconds=1), Severity.MEDIUM),  # last instant inside the window
    (timedelta(days=30), None),  # the window's end: not within 30 days
    (timedelta(days=31), None),
]


def hostname(host: str, expiry: datetime | None, **changes: object) -> HostnameCertificate:
    base = HostnameCertificate(
        type="Proxy",
        host_name=host,
        certificate_source="Custom",
        certificate_status="Completed",
        expiry=expiry,
        thumbprint="AB" * 20,
        subject=f"CN={host}",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def with_service(**changes: object) -> Snapshot:
    return replace(compliant(), service=service(**changes))


def client_cert(name: str, expiry: datetime | None, **changes: object) -> ApimCertificate:
    base = ApimCertificate(
        id=f"{SERVICE_ID}/certificates/{name}",
        name=name,
        subject=f"CN={name}",
        thumbprint="CD" * 20,
        expiration_date=expiry,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("offset", "severity"), BOUNDARIES)
def test_custom_domain_expiry_window(offset: timedelta, severity: Severity | None) -> None:
    snapshot = with_service(hostname_configurations=(hostname("api.contoso.example", NOW + offset),))
    found = evaluate_rule("CERT-001", snapshot)
    assert [f.severity for f in found] == ([severity] if severity else [])
    for f in found:
        assert f.resource_id == SERVICE_ID
        assert f.evidence.path == "properties.hostnameConfigurations[Proxy:api.contoso.example].certificate.expiry"
        assert f.entry == "api.contoso.example"


@pytest.mark.parametrize(("offset", "severity"), BOUNDARIES)
def test_ca_certificate_expiry_window(offset: timedelta, severity: Severity | None) -> None:
    ca = CaCertificate(store_name="Root", expiry=NOW + offset, thumbprint="EF" * 20, subject="CN=Contoso Root")
    found = evaluate_rule("CERT-002", with_service(ca_certificates=(ca,)))
    assert [f.severity for f in found] == ([severity] if severity else [])


@pytest.mark.parametrize(("offset", "severity"), BOUNDARIES)
def test_client_certificate_expiry_window(offset: timedelta, severity: Severity | None) -> None:
    snapshot = replace(compliant(), certificates=(client_cert("backend-mtls", NOW + offset),))
    found = evaluate_rule("CERT-003", snapshot)
    assert [f.severity for f in found] == ([severity] if severity else [])
    assert all(f.resource_id == f"{SERVICE_ID}/certificates/backend-mtls" for f in found)


def test_the_window_is_a_parameter() -> None:
    snapshot = replace(compliant(), certificates=(client_cert("c", NOW + timedelta(days=45)),))
    assert evaluate_rule("CERT-003", snapshot) == []
    [found] = evaluate_rule("CERT-003", snapshot, {"expiry_days": 60})
    assert found.message == "The client certificate 'c' (CN=c) expires on 2027-01-07, in 45 day(s)."


def test_builtin_hostnames_and_unknown_expiry_are_not_judged() -> None:
    snapshot = with_service(
        hostname_configurations=(
            hostname("apim-good.azure-api.net", NOW - timedelta(days=1), certificate_source="BuiltIn"),
            hostname("portal.contoso.example", None, type="DeveloperPortal"),
        )
    )
    assert evaluate_rule("CERT-001", snapshot) == []


def test_key_vault_linked_hostname_whose_sync_failed() -> None:
    failed = hostname(
        "api.contoso.example",
        NOW + timedelta(days=200),
        certificate_source="KeyVault",
        certificate_status="Failed",
        key_vault_id=f"{KV}/gateway-cert",
    )
    uploaded_failed = hostname("mgmt.contoso.example", NOW + timedelta(days=200), certificate_status="Failed")
    [finding] = evaluate_rule("CERT-001", with_service(hostname_configurations=(failed, uploaded_failed)))
    assert finding.evidence.path == "properties.hostnameConfigurations[Proxy:api.contoso.example].certificateStatus"
    assert finding.evidence.actual == "Failed"
    assert finding.severity is Severity.HIGH
    assert "could not be synced from Key Vault" in finding.message


def test_key_vault_linked_client_certificate_whose_refresh_failed() -> None:
    certs = (
        client_cert(
            "ok", NOW + timedelta(days=200), key_vault_secret_id=f"{KV}/ok", key_vault_last_status_code="Success"
        ),
        client_cert(
            "denied", NOW + timedelta(days=200), key_vault_secret_id=f"{KV}/d", key_vault_last_status_code="Forbidden"
        ),
        client_cert("uploaded", NOW + timedelta(days=200)),
    )
    [finding] = evaluate_rule("CERT-003", replace(compliant(), certificates=certs))
    assert finding.resource_id == f"{SERVICE_ID}/certificates/denied"
    assert finding.evidence.path == "properties.keyVault.lastStatus.code"
    assert finding.evidence.actual == "Forbidden"


def test_ca_certificates_are_not_checked_on_consumption() -> None:
    ca = CaCertificate(store_name="CertificateAuthority", expiry=NOW - timedelta(days=1))
    assert evaluate_rule("CERT-002", with_service(sku_name="Consumption", ca_certificates=(ca,))) == []
    assert len(evaluate_rule("CERT-002", with_service(ca_certificates=(ca,)))) == 1


def test_unreadable_certificates_say_nothing() -> None:
    snapshot = replace(
        compliant(),
        certificates=(client_cert("c", NOW - timedelta(days=1)),),
        unreadable=("certificates: 403 AuthorizationFailed",),
    )
    assert evaluate_rule("CERT-003", snapshot) == []
