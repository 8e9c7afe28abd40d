"""The product's composition root, configured exactly as a deployment would be (a Custom
cloud's settings from the twin's env file), reaches every service with its own identity."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from shared.azure import ClientFactory
from shared.settings import load_settings
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration


@pytest.fixture
def factory(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientFactory]:
    # The product reads APIMR_* through shared.settings; azure-identity reads AZURE_* itself.
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built = ClientFactory(load_settings(twin.env))
    yield built
    built.close()


def test_factory_settings_come_from_the_env_file(twin: TwinHandle, factory: ClientFactory) -> None:
    assert factory.settings.cloud.is_custom
    assert factory.settings.cloud.resource_manager == twin.urls["arm"]
    assert factory.settings.subscription_ids == tuple(s.lower() for s in twin.subscription_ids)


def test_storage_clients_reach_azurite_with_the_product_identity(factory: ClientFactory) -> None:
    name = f"q{uuid.uuid4().hex[:12]}"
    queue = factory.queue(name)
    queue.create_queue()
    queue.send_message(b'{"instance": "apim-prod"}')
    [message] = list(queue.receive_messages())
    assert message.content == b'{"instance": "apim-prod"}'
    # What the Functions host reads (messageEncoding base64) is what the product wrote.
    queue.send_message(b"for the host")
    [peeked] = factory.queue_service().get_queue_client(name).peek_messages()
    assert base64.b64decode(peeked.content) == b"for the host"

    container = factory.blob_service().get_container_client(f"c{uuid.uuid4().hex[:12]}")
    container.create_container()
    container.upload_blob("lease-target", b"")
    lease = container.get_blob_client("lease-target").acquire_lease(lease_duration=15)
    lease.release()

    table = factory.table_service().create_table_if_not_exists(f"t{uuid.uuid4().hex[:12]}")
    table.upsert_entity({"PartitionKey": "journal", "RowKey": "1", "phase": "intent"})
    assert table.get_entity("journal", "1")["phase"] == "intent"


async def test_async_storage_clients_reach_azurite(factory: ClientFactory) -> None:
    container = factory.blob_service_async().get_container_client(f"c{uuid.uuid4().hex[:12]}")
    await container.create_container()
    await container.upload_blob("x", b"async")
    assert await (await container.download_blob("x")).readall() == b"async"
    queue = factory.queue_async(f"q{uuid.uuid4().hex[:12]}")
    await queue.create_queue()
    await queue.send_message(b"hello")
    messages = [m.content async for m in queue.receive_messages()]
    assert messages == [b"hello"]
    await factory.aclose()


def rg_fragment(twin: TwinHandle, **sections: Any) -> dict[str, Any]:
    group = {"name": "rg-apim-prod", "location": "westeurope", **sections}
    return {"subscriptions": [{"id": twin.subscription_id, "resource_groups": [group]}]}


def test_key_vault_client_passes_the_challenge_with_the_product_identity(
    twin: TwinHandle, factory: ClientFactory
) -> None:
    twin.seed(rg_fragment(twin, key_vaults=[{"name": "kv-factory", "secrets": [{"name": "apim-key", "value": "v1"}]}]))
    secrets = factory.secrets(twin.urls["vault:kv-factory"])
    assert secrets.get_secret("apim-key").value == "v1"
    secrets.set_secret("apim-key", "v2")
    assert [s.name for s in secrets.list_properties_of_secrets()] == ["apim-key"]
    assert len(list(secrets.list_properties_of_secret_versions("apim-key"))) == 2


async def test_async_key_vault_and_logs_clients(twin: TwinHandle, factory: ClientFactory) -> None:
    workspace = "3c9d1e2f-0000-4000-8000-00000000f0aa"
    twin.seed(
        rg_fragment(
            twin,
            key_vaults=[{"name": "kv-factory-async", "secrets": [{"name": "s", "value": "x"}]}],
            workspaces=[
                {
                    "name": "law",
                    "customer_id": workspace,
                    "tables": {"ApiManagementGatewayLogs": {"rows": [{"ago": "5m", "ResponseCode": 200, "repeat": 4}]}},
                }
            ],
        )
    )
    secret = await factory.secrets_async(twin.urls["vault:kv-factory-async"]).get_secret("s")
    assert secret.value == "x"
    result = await factory.logs_async().query_workspace(
        workspace, "ApiManagementGatewayLogs | count", timespan=timedelta(hours=1)
    )
    assert result.tables[0].rows[0][0] == 4
    sync_result = factory.logs().query_workspace(workspace, "ApiManagementGatewayLogs | count", timespan=None)
    assert sync_result.tables[0].rows[0][0] == 4
    await factory.aclose()
