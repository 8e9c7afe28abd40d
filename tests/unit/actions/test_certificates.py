"""CERT-003's remediation planned from `tests.factories` snapshots: refresh a Key Vault-linked
certificate only on evidence that the vault holds a version APIM has not read; refuse otherwise."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from shared.actions import APIM_API_VERSION, REMEDIATIONS, ArmWrite, Expectation, PlanContext, Refusal, RemediationPlan
from shared.evidence import PlanEvidence, VaultVersion
from shared.model import ApimCertificate, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import NOW, SERVICE_ID, compliant

CERT_ID = f"{SERVICE_ID}/certificates/backend-mtls"
SECRET = "https://kv-apim.vault.azure.net/secrets/backend-mtls"
LAST_READ = NOW - timedelta(days=2)


def snapshot(**changes: object) -> Snapshot:
    cert = ApimCertificate(
        id=CERT_ID,
        name="backend-mtls",
        subject="CN=backend-mtls",
        thumbprint="AB" * 20,
        expiration_date=NOW + timedelta(days=10),
        key_vault_secret_id=SECRET,
        key_vault_last_status_code="Success",
        key_vault_last_status_time=LAST_READ,
    )
    return replace(compliant(), certificates=(replace(cert, **changes),))  # type: ignore[arg-type]


def plan(snap: Snapshot, *versions: VaultVersion) -> RemediationPlan | Refusal:
    [finding] = evaluate_rule("CERT-003", snap)
    context = PlanContext(
        params=REGISTRY["CERT-003"].defaults(), key_vault_url=None, evidence=PlanEvidence(vault_versions=versions)
    )
    return REMEDIATIONS["CERT-003"].plan(finding, snap, context)


def newer(created: datetime = NOW - timedelta(days=1)) -> VaultVersion:
    return VaultVersion(CERT_ID, SECRET, newest_created=created)


def test_a_renewed_version_in_the_vault_is_refreshed() -> None:
    result = plan(snapshot(), newer())
    assert isinstance(result, RemediationPlan)
    assert result.steps == (
        ArmWrite(
            method="POST",
            resource_id=f"{CERT_ID}/refreshSecret",
            api_version=APIM_API_VERSION,
            body=None,
            if_match=None,
            description="APIM reads certificate 'backend-mtls' from Key Vault again",
        ),
    )
    assert result.expectations == (
        Expectation(CERT_ID, APIM_API_VERSION, "properties.keyVault.lastStatus.code", "Success"),
    )
    assert result.would().startswith("would refresh certificate 'backend-mtls' from Key Vault")


@pytest.mark.parametrize(
    ("versions", "reason"),
    [
        ((), "no Key Vault evidence was gathered"),
        ((VaultVersion(CERT_ID, SECRET, missing="listing failed (403 Forbidden)"),), "listing failed (403 Forbidden)"),
        ((newer(LAST_READ),), "holds no version of the secret newer than the one APIM read"),
        ((newer(LAST_READ - timedelta(days=30)),), "renew the certificate in Key Vault first"),
    ],
)
def test_without_a_newer_version_it_refuses(versions: tuple[VaultVersion, ...], reason: str) -> None:
    result = plan(snapshot(), *versions)
    assert isinstance(result, Refusal)
    assert reason in result.reason


def test_an_unknown_last_read_is_no_basis_for_a_refresh() -> None:
    result = plan(snapshot(key_vault_last_status_time=None), newer())
    assert isinstance(result, Refusal)
    assert "an unknown time" in result.reason


def test_only_key_vault_linked_expiry_findings_are_remediable() -> None:
    uploaded = snapshot(key_vault_secret_id=None, key_vault_last_status_code=None, key_vault_last_status_time=None)
    assert [f.remediable for f in evaluate_rule("CERT-003", uploaded)] == [False]
    failed = snapshot(key_vault_last_status_code="Forbidden", expiration_date=NOW + timedelta(days=300))
    assert [f.remediable for f in evaluate_rule("CERT-003", failed)] == [False]
    assert [f.remediable for f in evaluate_rule("CERT-003", snapshot())] == [True]
