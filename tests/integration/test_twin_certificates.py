"""The twin's APIM certificates, driven by the real azure-mgmt-apimanagement client: the
certificates collection (uploaded or Key Vault-linked, refreshSecret), custom hostnames and CA
certificates on the service. The twin reads every certificate and answers only what it learnt
(subject, thumbprint, expiry); data and passwords are write-only.

Sources (azure-rest-api-specs, specification/apimanagement/resource-manager/
Microsoft.ApiManagement/stable/2022-08-01): apimcertificates.json (Certificate_ListByService,
Certificate_Get, Certificate_CreateOrUpdate, Certificate_Delete, Certificate_RefreshSecret);
definitions.json (CertificateContractProperties: subject, thumbprint, expirationDate;
CertificateCreateOrUpdateProperties: data, password, keyVault; KeyVaultContractProperties,
KeyVaultLastAccessStatusContractProperties); apimdeployment.json (HostnameConfiguration,
HostnameType, CertificateSource, CertificateStatus, CertificateConfiguration with storeName
CertificateAuthority | Root, CertificateInformation: expiry, thumbprint, subject). Learn: "How
to add a custom CA certificate in Azure API Management" (at most 10), "Configure a custom
domain name" (Key Vault certificates read with the instance's managed identity).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.secrets import SecretClient
from azure.mgmt.apimanagement import ApiManagementClient
from azure.mgmt.apimanagement.models import (
    ApiManagementServiceUpdateParameters,
    CertificateConfiguration,
    CertificateCreateOrUpdateParameters,
    HostnameConfiguration,
    KeyVaultContractCreateProperties,
)

from tests.integration.test_twin_apim import RG, SUB, client
from twin.apim.certificates import make_certificate

pytestmark = pytest.mark.integration

VAULT = "kv-certs"
VAULT_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"
NAME = "apim-certs"
SERVICE_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{NAME}"
EXPIRY = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
PASSWORD = "CANARY-pfx-password"


@pytest.fixture(autouse=True)
def _estate(twin: Any, _fresh_twin: None) -> None:
    twin.grant("API Management Service Contributor", f"/subscriptions/{SUB}")
    twin.grant("Key Vault Secrets Officer", VAULT_ID)
    twin.seed(
        {
            "role_assignments": [
                {"principal": {"managed_identity_of": SERVICE_ID}, "role": "Key Vault Secrets User", "scope": VAULT_ID}
            ],
            "subscriptions": [
                {
                    "id": SUB,
                    "resource_groups": [
                        {
                            "name": RG,
                            "location": "westeurope",
                            "apim": [{"name": NAME, "identity": {"type": "SystemAssigned"}}],
                            "key_vaults": [
                                {
                                    "name": VAULT,
                                    "secrets": [
                                        {"name": "mtls", "value": make_certificate("backend.contoso.example", EXPIRY)}
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    )


@pytest.fixture
def apim(twin: Any) -> ApiManagementClient:
    return client(twin)


def test_an_uploaded_pfx_is_read_and_never_returned(twin: Any, apim: ApiManagementClient) -> None:
    data = make_certificate("client.contoso.example", EXPIRY, password=PASSWORD)
    created = apim.certificate.create_or_update(
        RG, NAME, "client", CertificateCreateOrUpdateParameters(data=data, password=PASSWORD)
    )
    assert created.subject == "CN=client.contoso.example"
    assert created.expiration_date == EXPIRY
    assert created.thumbprint is not None
    assert len(created.thumbprint) == 40
    assert [c.name for c in apim.certificate.list_by_service(RG, NAME)] == ["client"]
    raw = twin.arm("GET", f"{SERVICE_ID}/certificates/client?api-version=2022-08-01")
    assert raw.status_code == 200
    assert PASSWORD not in raw.text
    assert data[:40] not in raw.text
    assert set(raw.json()["properties"]) == {"subject", "thumbprint", "expirationDate"}


@pytest.mark.parametrize(
    ("data", "password", "reason"),
    [
        ("bm90IGEgY2VydA==", None, "not a PFX"),
        ("%%%", None, "not base64"),
        (None, None, "'data' (a base64 PFX) or 'keyVault' is required"),
        ("wrong-password", "nope", "this password opens"),
    ],
)
def test_a_certificate_that_cannot_be_read_is_refused(
    apim: ApiManagementClient, data: str | None, password: str | None, reason: str
) -> None:
    if data == "wrong-password":
        data = make_certificate("x", EXPIRY, password=PASSWORD)
    with pytest.raises(HttpResponseError) as refused:
        apim.certificate.create_or_update(
            RG, NAME, "bad", CertificateCreateOrUpdateParameters(data=data, password=password)
        )
    assert refused.value.status_code == 400
    assert refused.value.error is not None
    assert refused.value.error.code == "ValidationError"
    assert reason in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_a_key_vault_certificate_is_read_with_the_instance_identity_and_refreshed(
    twin: Any, apim: ApiManagementClient
) -> None:
    secret_id = f"https://{VAULT}.vault.azure.net/secrets/mtls"
    linked = apim.certificate.create_or_update(
        RG,
        NAME,
        "mtls",
        CertificateCreateOrUpdateParameters(key_vault=KeyVaultContractCreateProperties(secret_identifier=secret_id)),
    )
    assert linked.subject == "CN=backend.contoso.example"
    assert linked.expiration_date == EXPIRY
    assert linked.key_vault is not None
    assert linked.key_vault.last_status is not None
    assert linked.key_vault.last_status.code == "Success"
    # A renewed certificate in the vault reaches APIM on refreshSecret.
    renewed = EXPIRY + timedelta(days=365)
    vault = SecretClient(twin.urls[f"vault:{VAULT}"], twin.credential(), verify_challenge_resource=False,
                         **twin.sdk_kwargs)  # fmt: skip
    vault.set_secret("mtls", make_certificate("backend.contoso.example", renewed))
    assert apim.certificate.get(RG, NAME, "mtls").expiration_date == EXPIRY
    refreshed = apim.certificate.refresh_secret(RG, NAME, "mtls")
    assert refreshed.expiration_date == renewed
    # Uploaded certificates have nothing to refresh.
    apim.certificate.create_or_update(
        RG, NAME, "up", CertificateCreateOrUpdateParameters(data=make_certificate("up", EXPIRY))
    )
    with pytest.raises(HttpResponseError) as refused:
        apim.certificate.refresh_secret(RG, NAME, "up")
    assert refused.value.status_code == 400


def test_a_key_vault_certificate_the_identity_cannot_read_is_refused(apim: ApiManagementClient) -> None:
    missing = f"https://{VAULT}.vault.azure.net/secrets/absent"
    with pytest.raises(HttpResponseError) as refused:
        apim.certificate.create_or_update(
            RG,
            NAME,
            "absent",
            CertificateCreateOrUpdateParameters(key_vault=KeyVaultContractCreateProperties(secret_identifier=missing)),
        )
    assert refused.value.status_code == 400
    assert "SecretNotFound" in str(refused.value)


def test_custom_hostnames_and_ca_certificates_on_the_service(twin: Any, apim: ApiManagementClient) -> None:
    pfx = make_certificate("api.contoso.example", EXPIRY, password=PASSWORD)
    ca = make_certificate("Contoso Root", EXPIRY + timedelta(days=1000), with_key=False)
    builtin = HostnameConfiguration(type="Proxy", host_name=f"{NAME}.azure-api.net", certificate_source="BuiltIn")
    custom = HostnameConfiguration(
        type="Proxy", host_name="api.contoso.example", encoded_certificate=pfx, certificate_password=PASSWORD
    )
    from_vault = HostnameConfiguration(
        type="DeveloperPortal",
        host_name="portal.contoso.example",
        key_vault_id=f"https://{VAULT}.vault.azure.net/secrets/mtls",
    )
    apim.api_management_service.begin_update(
        RG,
        NAME,
        ApiManagementServiceUpdateParameters(
            hostname_configurations=[builtin, custom, from_vault],
            certificates=[CertificateConfiguration(encoded_certificate=ca, store_name="Root")],
        ),
        polling_interval=0,
    ).result()
    service = apim.api_management_service.get(RG, NAME)
    hosts = {h.host_name: h for h in service.hostname_configurations or []}
    assert hosts["api.contoso.example"].certificate is not None
    assert hosts["api.contoso.example"].certificate.expiry == EXPIRY
    assert hosts["api.contoso.example"].certificate_source == "Custom"
    assert hosts["portal.contoso.example"].certificate_source == "KeyVault"
    assert hosts["portal.contoso.example"].certificate_status == "Completed"
    assert hosts[f"{NAME}.azure-api.net"].certificate_source == "BuiltIn"
    [root] = service.certificates or []
    assert root.store_name == "Root"
    assert root.certificate is not None
    assert root.certificate.subject == "CN=Contoso Root"
    raw = twin.arm("GET", f"{SERVICE_ID}?api-version=2022-08-01").text
    assert PASSWORD not in raw
    assert pfx[:40] not in raw
    assert ca[:40] not in raw
    # What was read goes back unchanged (no certificate data): the certificates stay.
    apim.api_management_service.begin_update(
        RG,
        NAME,
        ApiManagementServiceUpdateParameters(
            hostname_configurations=service.hostname_configurations, certificates=service.certificates
        ),
        polling_interval=0,
    ).result()
    again = apim.api_management_service.get(RG, NAME)
    assert {h.host_name: h.certificate for h in again.hostname_configurations or []} == {
        h: v.certificate for h, v in hosts.items()
    }


@pytest.mark.parametrize(
    ("update", "target"),
    [
        ({"hostnameConfigurations": [{"type": "Proxy", "hostName": "x.contoso.example"}]}, "hostnameConfigurations[0]"),
        ({"hostnameConfigurations": [{"type": "Gateway", "hostName": "x", "encodedCertificate": "AA=="}]}, ".type"),
        (
            {"hostnameConfigurations": [{"type": "Proxy", "hostName": "x", "encodedCertificate": "bm90"}]},
            "encodedCertificate",
        ),
        ({"certificates": [{"storeName": "My", "encodedCertificate": "AA=="}]}, "storeName"),
        ({"certificates": [{"storeName": "Root"}]}, "encodedCertificate"),
    ],
)
def test_bad_hostnames_and_ca_certificates_are_refused(twin: Any, update: dict[str, Any], target: str) -> None:
    response = twin.arm("PATCH", f"{SERVICE_ID}?api-version=2022-08-01", json={"properties": update})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "ValidationError"
    assert target in response.text


def test_at_most_ten_ca_certificates(twin: Any) -> None:
    ca = make_certificate("ca", EXPIRY, with_key=False)
    eleven = [{"storeName": "CertificateAuthority", "encodedCertificate": ca}] * 11
    response = twin.arm("PATCH", f"{SERVICE_ID}?api-version=2022-08-01", json={"properties": {"certificates": eleven}})
    assert response.status_code == 400
    assert "At most 10" in response.text
