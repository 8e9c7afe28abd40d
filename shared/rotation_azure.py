"""The production `KeyApi` (APIM subscription keys over ARM) and `LedgerVault` (the key-ledger
Key Vault) of `shared.rotation`. Keys pass through as `Key` and are never logged; errors name
the subscription or the secret, never a value.

Azure actions: Microsoft.ApiManagement/service/subscriptions/listSecrets/action,
service/subscriptions/regeneratePrimaryKey/action, service/subscriptions/regenerateSecondaryKey/action;
Key Vault secrets list, get and set on the ledger vault ("Key Vault Secrets Officer").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretProperties

from shared.actions import APIM_API_VERSION
from shared.actions.executor import ArmApi, ArmResponse
from shared.azure import ClientFactory
from shared.errors import NotFoundError, PermanentError, TransientError, error_code_and_message
from shared.inventory import describe_failure
from shared.rotation import CONTENT_TYPE, Key, LedgerRef, SubscriptionKeys, VaultCopy
from shared.snapshot import ledger_entry

TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def arm_refusal(response: ArmResponse, what: str) -> Exception:
    """The error for an ARM answer that is not a success: NotFound, Transient (408, 409, 429,
    5xx) or Permanent, naming what was asked. ARM's message names the action and scope of a
    403; it never carries a key or a token."""
    code, message = error_code_and_message(response.body)
    text = f"{what}: {response.status} {code} {message[:500]}".strip()
    if response.status == 404:
        return NotFoundError(text)
    return (TransientError if response.status in TRANSIENT_STATUSES else PermanentError)(text)


def vault_failure(error: AzureError, what: str, vault_url: str) -> Exception:
    """A Key Vault SDK failure as Transient (no answer, 408, 409, 429, 5xx) or Permanent,
    naming what was asked and the vault; the SDK's message is not repeated (describe_failure)."""
    status = getattr(error, "status_code", None)
    kind = TransientError if status is None or status in TRANSIENT_STATUSES else PermanentError
    return kind(f"{what} in {vault_url}: {describe_failure(error)}")


class AzureKeyApi:
    """APIM subscription keys through the raw ARM pipeline (its retry policy honours 429 Retry-After)."""

    def __init__(self, arm: ArmApi) -> None:
        self.arm = arm

    async def list_keys(self, subscription_id: str) -> SubscriptionKeys:
        response = await self.arm.send("POST", f"{subscription_id}/listSecrets", APIM_API_VERSION)
        if response.status != 200 or not isinstance(response.body, dict):
            raise arm_refusal(response, f"reading the keys of {subscription_id} (listSecrets)")
        primary, secondary = response.body.get("primaryKey"), response.body.get("secondaryKey")
        if not isinstance(primary, str) or not isinstance(secondary, str) or not primary or not secondary:
            raise PermanentError(f"listSecrets of {subscription_id} did not return both keys")
        return SubscriptionKeys(Key(primary), Key(secondary))

    async def regenerate(self, subscription_id: str, slot: str) -> None:
        action = "regeneratePrimaryKey" if slot == "primary" else "regenerateSecondaryKey"
        response = await self.arm.send("POST", f"{subscription_id}/{action}", APIM_API_VERSION)
        if response.status not in (200, 204):
            raise arm_refusal(response, f"{action} of {subscription_id}")


class AzureLedgerVault:
    """The key-ledger vault through the factory's async SecretClient."""

    def __init__(self, factory: ClientFactory, vault_url: str) -> None:
        self.vault_url = vault_url.rstrip("/")
        self.client = factory.secrets_async(vault_url)

    def _failed(self, error: AzureError, what: str) -> Exception:
        return vault_failure(error, what, self.vault_url)

    async def ledger(self, service_id: str) -> list[LedgerRef]:
        found = []
        try:
            async for props in self.client.list_properties_of_secrets():
                entry = ledger_entry(props.tags, service_id)
                if entry is not None and props.name:
                    found.append(LedgerRef(name=props.name, subscription_id=entry[0], slot=entry[1]))
        except AzureError as error:
            raise self._failed(error, "listing the key ledger") from None
        return found

    async def current(self, name: str) -> VaultCopy | None:
        try:
            secret = await self.client.get_secret(name)
        except ResourceNotFoundError:
            return None
        except AzureError as error:
            if getattr(error, "status_code", None) == 403:
                # A disabled current version answers 403: the entry is there, its value is not.
                try:
                    props = await self._properties(name)
                except AzureError:
                    raise self._failed(error, f"reading secret '{name}'") from None
                return VaultCopy(name=name, version=props.version or "", tags=dict(props.tags or {}), value=None)
            raise self._failed(error, f"reading secret '{name}'") from None
        props = secret.properties
        value = Key(secret.value) if secret.value is not None else None
        del secret
        return VaultCopy(
            name=name, version=props.version or "", tags=dict(props.tags or {}), value=value, created=props.created_on
        )

    async def _properties(self, name: str) -> SecretProperties:
        newest: SecretProperties | None = None
        async for props in self.client.list_properties_of_secret_versions(name):
            if newest is None or (props.created_on and newest.created_on and props.created_on > newest.created_on):
                newest = props
        if newest is None:
            raise ResourceNotFoundError(f"secret {name} has no versions")
        return newest

    async def store(self, name: str, value: Key, *, tags: Mapping[str, str], expires: datetime) -> str:
        try:
            secret = await self.client.set_secret(
                name, value.reveal(), tags=dict(tags), content_type=CONTENT_TYPE, expires_on=expires
            )
        except AzureError as error:
            raise self._failed(error, f"storing secret '{name}'") from None
        return str(secret.properties.version or "")
