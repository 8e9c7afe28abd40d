"""Key Vault references in APIM named values resolve for real (issue 10, item 2).

Sources:
- ApiManagement spec (stable/2024-05-01): apimnamedvalues.json NamedValue_CreateOrUpdate,
  NamedValue_Update, NamedValue_RefreshSecret, NamedValue_ListByService
  (isKeyVaultRefreshFailed); definitions.json KeyVaultContractCreateProperties
  (secretIdentifier, identityClientId: null for the system-assigned identity) and
  KeyVaultLastAccessStatusContractProperties {code, message, timeStampUtc}.
- Learn, "Use named values in Azure API Management policies" (Key vault secrets): APIM reads
  the secret with the instance's system- or user-assigned managed identity, which needs
  get access to secrets; refreshSecret re-reads it.
- An unknown identityClientId is a synchronous 400 ValidationError on the write, as
  Azure/apiops#257 shows APIM answering ("Can not find Managed Identity with provided
  IdentityClientId").
The failure codes in lastStatus other than Key Vault's own (SecretNotFound, Forbidden) are the
twin's: neither the spec nor Learn lists them. The product only relies on "Success".
"""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.secrets import SecretClient
from azure.mgmt.apimanagement import ApiManagementClient
from azure.mgmt.apimanagement.models import (
    ApiManagementServiceIdentity,
    ApiManagementServiceUpdateParameters,
    NamedValueCreateContract,
)

from tests.integration.test_twin_apim import RG, SUB, client

pytestmark = pytest.mark.integration

VAULT = "kv-nv-refs"


@pytest.fixture(autouse=True)
def _apim_contributor(twin: Any, _fresh_twin: None) -> None:
    """These tests are about how APIM reads Key Vault references, not about who may call
    APIM: the caller is an API Management Service Contributor (test_twin_rbac.py covers RBAC)."""
    twin.grant("API Management Service Contributor", f"/subscriptions/{SUB}")


USER_IDENTITY = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai"
)
USER_CLIENT_ID = "5b0c9b7e-1f3c-4f5e-9d43-0d1d1c0a0b01"


def seed(twin: Any, name: str, *, identity: dict[str, Any] | None, named_values: list[dict[str, Any]]) -> str:
    """One resource group: APIM first, the vault after it (order must not matter)."""
    service: dict[str, Any] = {"name": name, "named_values": named_values}
    if identity is not None:
        service["identity"] = identity
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": SUB,
                    "resource_groups": [
                        {
                            "name": RG,
                            "location": "westeurope",
                            "apim": [service],
                            "key_vaults": [
                                {
                                    "name": VAULT,
                                    "secrets": [
                                        {"name": "api-key", "value": "from-the-vault"},
                                        {"name": "off", "value": "disabled-value", "enabled": False},
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )
    return f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{name}"


def ref(secret: str, vault: str = VAULT) -> dict[str, Any]:
    return {"secretIdentifier": f"https://{vault}.vault.azure.net/secrets/{secret}"}


SYSTEM = {"type": "SystemAssigned"}


@pytest.fixture
def apim(twin: Any) -> ApiManagementClient:
    return client(twin)


def vault_client(twin: Any) -> SecretClient:
    return SecretClient(
        twin.urls[f"vault:{VAULT}"], twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs
    )


def status(apim: ApiManagementClient, service: str, nv: str) -> tuple[str, str | None]:
    last = apim.named_value.get(RG, service, nv).key_vault.last_status
    return last.code, last.message


def test_the_system_assigned_identity_reads_the_secret(twin: Any, apim: ApiManagementClient) -> None:
    seed(twin, "apim-kv-ok", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}])
    code, message = status(apim, "apim-kv-ok", "k")
    assert (code, message) == ("Success", None)
    assert apim.named_value.get(RG, "apim-kv-ok", "k").key_vault.last_status.time_stamp_utc is not None
    assert apim.named_value.list_value(RG, "apim-kv-ok", "k").value == "from-the-vault"


@pytest.mark.parametrize(
    ("identity", "secret", "vault", "code"),
    [
        (None, "api-key", VAULT, "IdentityNotFound"),
        ({"type": "None"}, "api-key", VAULT, "IdentityNotFound"),
        (SYSTEM, "missing", VAULT, "SecretNotFound"),
        (SYSTEM, "off", VAULT, "Forbidden"),
        (SYSTEM, "api-key", "kv-nowhere", "VaultNotFound"),
    ],
)
def test_a_reference_apim_cannot_read_shows_in_last_status(
    twin: Any, apim: ApiManagementClient, identity: dict[str, Any] | None, secret: str, vault: str, code: str
) -> None:
    seed(twin, "apim-kv-bad", identity=identity, named_values=[{"id": "k", "keyVault": ref(secret, vault)}])
    got, message = status(apim, "apim-kv-bad", "k")
    assert got == code
    assert message
    assert apim.named_value.list_value(RG, "apim-kv-bad", "k").value is None  # nothing was ever read
    failed = [nv.name for nv in apim.named_value.list_by_service(RG, "apim-kv-bad", is_key_vault_refresh_failed=True)]
    assert failed == ["k"]


def test_write_time_read_uses_the_identity_the_reference_names(twin: Any, apim: ApiManagementClient) -> None:
    user = {"type": "UserAssigned", "userAssignedIdentities": {USER_IDENTITY: {"clientId": USER_CLIENT_ID}}}
    seed(twin, "apim-kv-user", identity=user, named_values=[])
    body = NamedValueCreateContract(
        display_name="k", secret=True, key_vault={"secret_identifier": ref("api-key")["secretIdentifier"]}
    )
    # No client id: the system-assigned identity, which this service does not have.
    made = apim.named_value.begin_create_or_update(RG, "apim-kv-user", "k", body, polling_interval=0).result()
    assert made.key_vault.last_status.code == "IdentityNotFound"
    body.key_vault.identity_client_id = USER_CLIENT_ID
    made = apim.named_value.begin_create_or_update(RG, "apim-kv-user", "k", body, polling_interval=0).result()
    assert made.key_vault.last_status.code == "Success"
    body.key_vault.identity_client_id = "00000000-0000-0000-0000-00000000dead"
    with pytest.raises(HttpResponseError) as refused:
        apim.named_value.begin_create_or_update(RG, "apim-kv-user", "k", body, polling_interval=0).result()
    assert refused.value.status_code == 400
    assert "Can not find Managed Identity with provided IdentityClientId" in str(refused.value)


def test_refresh_secret_reads_again(twin: Any, apim: ApiManagementClient) -> None:
    seed(twin, "apim-kv-refresh", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}])
    vault = vault_client(twin)
    assert status(apim, "apim-kv-refresh", "k")[0] == "Success"
    # A new version: APIM keeps serving its copy until it reads again.
    vault.set_secret("api-key", "rotated")
    assert apim.named_value.list_value(RG, "apim-kv-refresh", "k").value == "from-the-vault"
    apim.named_value.begin_refresh_secret(RG, "apim-kv-refresh", "k", polling_interval=0).result()
    assert apim.named_value.list_value(RG, "apim-kv-refresh", "k").value == "rotated"
    # Disabled in the vault: the refresh fails, the last good value stays.
    vault.update_secret_properties("api-key", enabled=False)
    apim.named_value.begin_refresh_secret(RG, "apim-kv-refresh", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-refresh", "k")[0] == "Forbidden"
    assert apim.named_value.list_value(RG, "apim-kv-refresh", "k").value == "rotated"
    # Enabled again: the next refresh succeeds.
    vault.update_secret_properties("api-key", enabled=True)
    apim.named_value.begin_refresh_secret(RG, "apim-kv-refresh", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-refresh", "k")[0] == "Success"


def test_refresh_after_the_identity_is_removed_fails(twin: Any, apim: ApiManagementClient) -> None:
    seed(twin, "apim-kv-noid", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}])
    assert status(apim, "apim-kv-noid", "k")[0] == "Success"
    apim.api_management_service.begin_update(
        RG, "apim-kv-noid", ApiManagementServiceUpdateParameters(identity=ApiManagementServiceIdentity(type="None")),
        polling_interval=0,
    ).result()  # fmt: skip
    apim.named_value.begin_refresh_secret(RG, "apim-kv-noid", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-noid", "k")[0] == "IdentityNotFound"


def test_last_status_is_read_only_and_an_estate_may_state_it(twin: Any, apim: ApiManagementClient) -> None:
    seed(
        twin,
        "apim-kv-stated",
        identity=SYSTEM,
        named_values=[{"id": "k", "keyVault": {**ref("api-key"), "lastStatus": {"code": "Forbidden"}}}],
    )
    assert status(apim, "apim-kv-stated", "k")[0] == "Forbidden"  # the world the estate states
    service_id = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/apim-kv-stated"
    body = {"properties": {"displayName": "k2", "keyVault": {**ref("missing"), "lastStatus": {"code": "Success"}}}}
    put = twin.arm("PUT", f"{service_id}/namedValues/k2?api-version=2024-05-01", json=body)
    assert put.status_code in (200, 201, 202), put.text
    for _ in range(50):  # a named value PUT is an LRO: poll it to the end, as a client would
        if (
            twin.arm("GET", put.headers["Azure-AsyncOperation"].removeprefix(twin.urls["arm"])).json()["status"]
            != "InProgress"
        ):
            break
    apim.named_value.begin_refresh_secret(RG, "apim-kv-stated", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-stated", "k")[0] == "Success"
    assert status(apim, "apim-kv-stated", "k2")[0] == "SecretNotFound"  # a client cannot claim Success
