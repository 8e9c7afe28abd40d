"""The production `GatewayApi` (APIM self-hosted gateways over ARM) and `TokenVault` (the
ledger vault, for gateway tokens) of `shared.gateway_rotation`. Keys and tokens pass through
as `Key` and are never logged; errors name the gateway or the secret, never a value.

Azure actions: Microsoft.ApiManagement/service/*/read (list the gateways),
Microsoft.ApiManagement/service/gateways/listKeys/action,
Microsoft.ApiManagement/service/gateways/regenerateKey/action,
Microsoft.ApiManagement/service/gateways/generateToken/action;
Key Vault secrets list, get and set on the ledger vault ("Key Vault Secrets Officer").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from azure.core.exceptions import AzureError, ResourceNotFoundError

from shared.actions import APIM_API_VERSION
from shared.actions.executor import ArmApi
from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.gateway_rotation import GATEWAY_SLOT_TAG, GATEWAY_TAG, TOKEN_CONTENT_TYPE, GatewayKeys, TokenCopy
from shared.rotation import Key, LedgerRef
from shared.rotation_azure import arm_refusal, vault_failure


class AzureGatewayApi:
    """Gateways through the raw ARM pipeline (its retry policy honours 429 Retry-After)."""

    def __init__(self, arm: ArmApi) -> None:
        self.arm = arm

    async def gateways(self, service_id: str) -> list[str]:
        found: list[str] = []
        path: str | None = f"{service_id}/gateways"
        skip = 0
        while path is not None:
            response = await self.arm.send("GET", path, APIM_API_VERSION)
            if response.status != 200 or not isinstance(response.body, dict):
                raise arm_refusal(response, f"listing the gateways of {service_id}")
            page = response.body.get("value") or []
            found.extend(str(g["id"]) for g in page if isinstance(g, dict) and g.get("id"))
            skip += len(page)
            # APIM pages with $top/$skip; the next page is asked the same way.
            path = f"{service_id}/gateways?$skip={skip}" if response.body.get("nextLink") and page else None
        return found

    async def list_keys(self, gateway_id: str) -> GatewayKeys:
        response = await self.arm.send("POST", f"{gateway_id}/listKeys", APIM_API_VERSION)
        if response.status != 200 or not isinstance(response.body, dict):
            raise arm_refusal(response, f"reading the keys of gateway {gateway_id} (listKeys)")
        primary, secondary = response.body.get("primary"), response.body.get("secondary")
        if not isinstance(primary, str) or not isinstance(secondary, str) or not primary or not secondary:
            raise PermanentError(f"listKeys of gateway {gateway_id} did not return both keys")
        return GatewayKeys(Key(primary), Key(secondary))

    async def regenerate(self, gateway_id: str, slot: str) -> None:
        response = await self.arm.send("POST", f"{gateway_id}/regenerateKey", APIM_API_VERSION, body={"keyType": slot})
        if response.status not in (200, 204):
            raise arm_refusal(response, f"regenerateKey ({slot}) of gateway {gateway_id}")

    async def generate_token(self, gateway_id: str, slot: str, expiry: datetime) -> Key:
        body = {"keyType": slot, "expiry": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}
        response = await self.arm.send("POST", f"{gateway_id}/generateToken", APIM_API_VERSION, body=body)
        if response.status != 200 or not isinstance(response.body, dict):
            raise arm_refusal(response, f"generateToken ({slot}) of gateway {gateway_id}")
        value = response.body.get("value")
        if not isinstance(value, str) or not value:
            raise PermanentError(f"generateToken of gateway {gateway_id} returned no token")
        return Key(value)


class AzureTokenVault:
    """The ledger vault, for gateway tokens, through the factory's async SecretClient."""

    def __init__(self, factory: ClientFactory, vault_url: str) -> None:
        self.vault_url = vault_url.rstrip("/")
        self.client = factory.secrets_async(vault_url)

    def _failed(self, error: AzureError, what: str) -> Exception:
        return vault_failure(error, what, self.vault_url)

    async def gateway_ledger(self, service_id: str) -> list[LedgerRef]:
        prefix = service_id.rstrip("/").lower() + "/gateways/"
        found = []
        try:
            async for props in self.client.list_properties_of_secrets():
                tags = {k.lower(): str(v) for k, v in (props.tags or {}).items()}
                gateway = tags.get(GATEWAY_TAG, "").strip()
                if props.name and gateway.lower().startswith(prefix):
                    found.append(
                        LedgerRef(name=props.name, subscription_id=gateway, slot=tags.get(GATEWAY_SLOT_TAG, ""))
                    )
        except AzureError as error:
            raise self._failed(error, "listing the gateway token ledger") from None
        return found

    async def current_token(self, name: str) -> TokenCopy | None:
        try:
            secret = await self.client.get_secret(name)
        except ResourceNotFoundError:
            return None
        except AzureError as error:
            if getattr(error, "status_code", None) == 403:
                # A disabled current version answers 403: the entry is there, its value is not.
                try:
                    newest = None
                    async for props in self.client.list_properties_of_secret_versions(name):
                        if newest is None or (
                            props.created_on and newest.created_on and props.created_on > newest.created_on
                        ):
                            newest = props
                except AzureError:
                    raise self._failed(error, f"reading secret '{name}'") from None
                if newest is None:
                    return None
                return TokenCopy(name=name, version=newest.version or "", tags=dict(newest.tags or {}), value=None)
            raise self._failed(error, f"reading secret '{name}'") from None
        props = secret.properties
        value = Key(secret.value) if secret.value is not None else None
        del secret
        return TokenCopy(
            name=name, version=props.version or "", tags=dict(props.tags or {}), value=value, expires=props.expires_on
        )

    async def store_token(self, name: str, value: Key, *, tags: Mapping[str, str], expires: datetime) -> str:
        try:
            secret = await self.client.set_secret(
                name, value.reveal(), tags=dict(tags), content_type=TOKEN_CONTENT_TYPE, expires_on=expires
            )
        except AzureError as error:
            raise self._failed(error, f"storing secret '{name}'") from None
        return str(secret.properties.version or "")
