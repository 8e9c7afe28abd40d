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
- Learn, "Provide access to Key Vault keys, certificates, and secrets with Azure role-based
  access control": under RBAC an identity gets a secret only when a role assignment at the
  secret, vault, resource group or subscription grants the data action
  Microsoft.KeyVault/vaults/secrets/getSecret/action (built-in "Key Vault Secrets User");
  and the named values page: with the RBAC permission model the APIM identity needs Key Vault
  Secrets User. The refusal APIM records is Key Vault's own 403 ForbiddenByRbac text
  ("Caller is not authorized to perform action on resource.", twin/rbac.py).
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


VAULT_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.KeyVault/vaults/{VAULT}"


def readers(name: str, identity: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The role "Key Vault Secrets User" on the vault for each managed identity the service has, as an
    operator grants it after enabling them (Learn: APIM's named values page, Key vault secrets)."""
    if identity is None:
        return []
    service_id = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{name}"
    targets = [service_id] if "SystemAssigned" in identity["type"] else []
    targets += list(identity.get("userAssignedIdentities") or {})
    return [
        {"principal": {"managed_identity_of": t}, "role": "Key Vault Secrets User", "scope": VAULT_ID} for t in targets
    ]


def seed(
    twin: Any,
    name: str,
    *,
    identity: dict[str, Any] | None,
    named_values: list[dict[str, Any]],
    grant: bool = True,
) -> str:
    """One resource group: APIM first, the vault after it (order must not matter). `grant`: the
    service's identities hold Key Vault Secrets User on the vault (the twin enforces RBAC)."""
    service: dict[str, Any] = {"name": name, "named_values": named_values}
    if identity is not None:
        service["identity"] = identity
    twin.seed(
        {
            "role_assignments": readers(name, identity) if grant else [],
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
            ],
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


# -- who may read: Key Vault's RBAC, with the instance's identity ---------------------------------

OPERATOR = ("0b5e0c1a-0000-4000-8000-00000000c002", "twin-test-secret-operator")  # estates/test.yaml: no vault role


def test_an_identity_without_a_role_on_the_vault_is_forbidden_in_key_vaults_words(
    twin: Any, apim: ApiManagementClient
) -> None:
    """Learn (RBAC for Key Vault; APIM named values): without Key Vault Secrets User (getSecret)
    the instance's identity cannot read the secret; lastStatus carries Key Vault's 403 text, the
    same words the vault answers any caller without the role."""
    seed(twin, "apim-kv-norole", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}], grant=False)
    code, message = status(apim, "apim-kv-norole", "k")
    assert code == "Forbidden"
    assert message is not None
    principal = apim.api_management_service.get(RG, "apim-kv-norole").identity.principal_id
    assert message.startswith("Caller is not authorized to perform action on resource.\r\n")
    assert f";oid={principal};" in message
    assert "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'\r\n" in message
    assert f"Resource: '{VAULT_ID.lower()}/secrets/api-key'\r\n" in message
    assert apim.named_value.list_value(RG, "apim-kv-norole", "k").value is None
    failed = [n.name for n in apim.named_value.list_by_service(RG, "apim-kv-norole", is_key_vault_refresh_failed=True)]
    assert failed == ["k"]
    # The vault's own answer to a caller without the role: every line but who called is the same.
    outsider = SecretClient(
        twin.urls[f"vault:{VAULT}"], twin.credential(*OPERATOR), verify_challenge_resource=False, **twin.sdk_kwargs
    )
    with pytest.raises(HttpResponseError) as refused:
        outsider.get_secret("api-key")
    assert refused.value.status_code == 403
    assert refused.value.error is not None
    assert refused.value.error.innererror == {"code": "ForbiddenByRbac"}
    vault_lines = (refused.value.error.message or "").split("\r\n")
    apim_lines = message.split("\r\n")
    assert [line for line in vault_lines if not line.startswith("Caller:")] == [
        line for line in apim_lines if not line.startswith("Caller:")
    ]


@pytest.mark.parametrize(
    "scope",
    [
        f"{VAULT_ID}/secrets/api-key",
        VAULT_ID,
        f"/subscriptions/{SUB}/resourceGroups/{RG}",
        f"/subscriptions/{SUB}",
    ],
    ids=["secret", "vault", "resource-group", "subscription"],
)
def test_granting_key_vault_secrets_user_then_refresh_secret_reads_it(
    twin: Any, apim: ApiManagementClient, scope: str
) -> None:
    """Learn (RBAC for Key Vault): a role assignment applies at the secret, vault, resource group
    or subscription; refreshSecret (NamedValue_RefreshSecret) makes APIM read again."""
    seed(twin, "apim-kv-later", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}], grant=False)
    assert status(apim, "apim-kv-later", "k")[0] == "Forbidden"
    twin.grant("Key Vault Secrets User", scope, principal={"managed_identity_of": "apim-kv-later"})
    apim.named_value.begin_refresh_secret(RG, "apim-kv-later", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-later", "k") == ("Success", None)
    assert apim.named_value.list_value(RG, "apim-kv-later", "k").value == "from-the-vault"


@pytest.mark.parametrize(
    ("role", "scope"),
    [
        ("Key Vault Secrets User", f"{VAULT_ID}/secrets/off"),  # another secret
        ("Contributor", f"/subscriptions/{SUB}/resourceGroups/{RG}"),  # management roles grant no data actions
        ("Key Vault Secrets User", f"/subscriptions/{SUB}/resourceGroups/rg-monitoring"),  # another group
    ],
)
def test_a_role_that_does_not_cover_the_secret_leaves_it_forbidden(
    twin: Any, apim: ApiManagementClient, role: str, scope: str
) -> None:
    seed(twin, "apim-kv-wrong", identity=SYSTEM, named_values=[], grant=False)
    twin.grant(role, scope, principal={"managed_identity_of": "apim-kv-wrong"})
    body = NamedValueCreateContract(
        display_name="k", secret=True, key_vault={"secret_identifier": ref("api-key")["secretIdentifier"]}
    )
    made = apim.named_value.begin_create_or_update(RG, "apim-kv-wrong", "k", body, polling_interval=0).result()
    assert made.key_vault.last_status.code == "Forbidden"


def test_the_user_assigned_identity_the_reference_names_needs_the_role(twin: Any, apim: ApiManagementClient) -> None:
    """The role of the system-assigned identity does not help a reference that names a user-assigned one."""
    both = {
        "type": "SystemAssigned, UserAssigned",
        "userAssignedIdentities": {USER_IDENTITY: {"clientId": USER_CLIENT_ID}},
    }
    seed(twin, "apim-kv-two", identity=both, named_values=[], grant=False)
    twin.grant("Key Vault Secrets User", VAULT_ID, principal={"managed_identity_of": "apim-kv-two"})
    body = NamedValueCreateContract(
        display_name="k",
        secret=True,
        key_vault={"secret_identifier": ref("api-key")["secretIdentifier"], "identity_client_id": USER_CLIENT_ID},
    )
    made = apim.named_value.begin_create_or_update(RG, "apim-kv-two", "k", body, polling_interval=0).result()
    assert made.key_vault.last_status.code == "Forbidden"
    twin.grant("Key Vault Secrets User", VAULT_ID, principal={"managed_identity_of": USER_IDENTITY})
    apim.named_value.begin_refresh_secret(RG, "apim-kv-two", "k", polling_interval=0).result()
    assert status(apim, "apim-kv-two", "k")[0] == "Success"


def test_with_rbac_off_any_identity_reads(twin: Any, apim: ApiManagementClient) -> None:
    """The twin's own switch (no Azure source): `rbac: off` lets any identity read, as it lets
    any caller do anything."""
    twin.seed({"rbac": "off"})
    seed(twin, "apim-kv-open", identity=SYSTEM, named_values=[{"id": "k", "keyVault": ref("api-key")}], grant=False)
    assert status(apim, "apim-kv-open", "k") == ("Success", None)
