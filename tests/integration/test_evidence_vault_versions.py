"""CERT-003's evidence from the production EvidenceSource against the twin's Key Vault: the
creation time of the newest enabled version of a certificate's secret, listed as metadata with
the real SecretClient (RBAC-checked: secrets/readMetadata/action), and why it is unknown when
it cannot be had. The certificate's value is never read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from shared.azure import ClientFactory
from shared.evidence import VaultVersion
from shared.evidence_source import AzureEvidenceSource
from shared.model import ApimCertificate
from shared.settings import load_settings
from tests.conftest import TwinHandle
from twin.apim.certificates import make_certificate

pytestmark = pytest.mark.integration

RG = "rg-evidence-kv"
VAULT = "kv-evidence-certs"
STRANGER = {
    "name": "no-vault-role",
    "client_id": "0b5e0c1a-0000-4000-8000-0000000000c3",
    "client_secret": "twin-test-secret-no-vault-role",
    "object_id": "5f1d2e3c-0000-4000-8000-0000000000c3",
}
CERT_ID = "/subscriptions/x/resourceGroups/rg/providers/Microsoft.ApiManagement/service/s/certificates/c"


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


def seed(twin: TwinHandle) -> str:
    far = datetime.now(UTC) + timedelta(days=400)
    secrets: list[dict[str, Any]] = [{"name": "mtls", "value": make_certificate("old", far), "created_days_ago": 40}]
    group = {"name": RG, "location": "westeurope", "key_vaults": [{"name": VAULT, "secrets": secrets}]}
    twin.seed({"subscriptions": [{"id": twin.subscription_id, "resource_groups": [group]}]})
    return f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"


async def version_of(twin: TwinHandle, secret_id: str) -> VaultVersion:
    factory = ClientFactory(load_settings(dict(twin.env)))
    cert = ApimCertificate(CERT_ID, "c", "CN=c", "AB" * 20, None, key_vault_secret_id=secret_id)
    try:
        return await AzureEvidenceSource(factory).vault_version(cert)
    finally:
        await factory.aclose()
        factory.close()


async def test_the_newest_enabled_version_is_what_counts(twin: TwinHandle) -> None:
    vault_id = seed(twin)
    twin.grant("Key Vault Secrets User", vault_id)
    url = twin.urls[f"vault:{VAULT}"]
    first = await version_of(twin, f"{url}/secrets/mtls")
    assert first.missing is None
    assert first.newest_created is not None
    assert timedelta(days=39.9) < datetime.now(UTC) - first.newest_created < timedelta(days=40.1)
    # A renewal, then a newer version that is disabled: the renewal is the newest that counts.
    twin.grant("Key Vault Secrets Officer", vault_id)
    vault = SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs)
    renewal = vault.set_secret("mtls", make_certificate("new", datetime.now(UTC) + timedelta(days=400)))
    vault.set_secret("mtls", make_certificate("off", datetime.now(UTC) + timedelta(days=400)), enabled=False)
    found = await version_of(twin, f"{url}/secrets/mtls")
    assert found.newest_created == renewal.properties.created_on


async def test_without_read_metadata_the_evidence_says_what_to_grant(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(twin)
    # A principal with no role on the vault (the suite's own identity may read every vault).
    twin.seed({"principals": [STRANGER]})
    monkeypatch.setenv("AZURE_CLIENT_ID", STRANGER["client_id"])
    monkeypatch.setenv("AZURE_CLIENT_SECRET", STRANGER["client_secret"])
    found = await version_of(twin, f"{twin.urls[f'vault:{VAULT}']}/secrets/mtls")
    assert found.newest_created is None
    assert found.missing is not None
    assert "403" in found.missing
    assert "Microsoft.KeyVault/vaults/secrets/readMetadata/action" in found.missing


async def test_a_missing_secret_and_a_pinned_version_prove_nothing(twin: TwinHandle) -> None:
    vault_id = seed(twin)
    twin.grant("Key Vault Secrets User", vault_id)
    url = twin.urls[f"vault:{VAULT}"]
    absent = await version_of(twin, f"{url}/secrets/absent")
    assert absent.newest_created is None
    assert absent.missing is not None  # the twin lists no versions; a 404 would say so too
    pinned = await version_of(twin, f"{url}/secrets/mtls/{'0' * 32}")
    assert pinned.missing is not None
    assert "names version" in pinned.missing
    assert (await version_of(twin, "not a url")).missing == "keyVault.secretIdentifier is not a Key Vault secret URL"
