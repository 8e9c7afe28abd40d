"""The composition root builds every client for each cloud profile with the right
endpoints, token scopes, retry budget and user agent.

Building a client makes no network call; these tests read the built pipelines. The same
factory is driven against the twin over HTTPS in tests/integration.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared import __version__
from shared.azure import DIAGNOSTIC_SETTINGS_API_VERSION, ClientFactory
from shared.errors import PermanentError
from shared.settings import Settings, load_settings

SUB = "11111111-2222-3333-4444-555555555555"

CLOUDS: dict[str, dict[str, str]] = {
    "AzureCloud": {
        "arm": "https://management.azure.com",
        "la": "https://api.loganalytics.io",
        "vault": "https://kv1.vault.azure.net",
        "blob": "https://apimrstate.blob.core.windows.net",
        "authority": "https://login.microsoftonline.com",
    },
    "AzureUSGovernment": {
        "arm": "https://management.usgovcloudapi.net",
        "la": "https://api.loganalytics.us",
        "vault": "https://kv1.vault.usgovcloudapi.net",
        "blob": "https://apimrstate.blob.core.usgovcloudapi.net",
        "authority": "https://login.microsoftonline.us",
    },
    "AzureChinaCloud": {
        "arm": "https://management.chinacloudapi.cn",
        "la": "https://api.loganalytics.azure.cn",
        "vault": "https://kv1.vault.azure.cn",
        "blob": "https://apimrstate.blob.core.chinacloudapi.cn",
        "authority": "https://login.chinacloudapi.cn",
    },
    "Custom": {
        "arm": "https://127.0.0.1:8443",
        "la": "https://127.0.0.1:8444",
        "vault": "https://127.0.0.1:8445",
        "blob": "https://apimrstate.blob.stack.local",
        "authority": "https://127.0.0.1:8446",
    },
}


def settings_for(cloud: str) -> Settings:
    env = {
        "APIMR_CLOUD": cloud,
        "APIMR_SUBSCRIPTION_IDS": SUB,
        "APIMR_STORAGE_ACCOUNT": "apimrstate",
        "APIMR_RETRY_TOTAL": "3",
    }
    if cloud == "Custom":
        env.update(
            APIMR_ARM_ENDPOINT="https://127.0.0.1:8443",
            APIMR_AUTHORITY_HOST="https://127.0.0.1:8446",
            APIMR_LOG_ANALYTICS_ENDPOINT="https://127.0.0.1:8444",
            APIMR_KEYVAULT_VERIFY_CHALLENGE_RESOURCE="false",
            APIMR_STORAGE_ENDPOINT_SUFFIX="stack.local",
        )
    return load_settings(env)


@pytest.fixture(autouse=True)
def service_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    # azure-identity reads these itself; the product never does.
    monkeypatch.setenv("AZURE_TENANT_ID", "72f988bf-0000-0000-0000-000000000000")
    monkeypatch.setenv("AZURE_CLIENT_ID", "22222222-0000-0000-0000-000000000000")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-a-real-secret")


def user_agent(client: Any) -> str:
    return str(client._config.user_agent_policy.user_agent)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_arm_clients(cloud: str) -> None:
    expected = CLOUDS[cloud]
    factory = ClientFactory(settings_for(cloud))
    for client in (factory.apim(SUB), factory.apim_async(SUB), factory.monitor(SUB), factory.monitor_async(SUB)):
        assert client._client._base_url == expected["arm"]
        assert client._config.credential_scopes == [f"{expected['arm']}/.default"]
        assert client._config.subscription_id == SUB
        assert client._config.retry_policy.total_retries == 3
        assert user_agent(client).startswith(f"apim-remediator/{__version__} ")
    for graph in (factory.resource_graph(), factory.resource_graph_async()):
        assert graph._client._base_url == expected["arm"]
        assert graph._config.credential_scopes == [f"{expected['arm']}/.default"]
    ops = factory.monitor(SUB).diagnostic_settings
    assert DIAGNOSTIC_SETTINGS_API_VERSION.replace("-", "_") in type(ops).__module__


@pytest.mark.parametrize("cloud", CLOUDS)
def test_credential_uses_the_cloud_authority(cloud: str) -> None:
    factory = ClientFactory(settings_for(cloud))
    # EnvironmentCredential comes first in the chain; locally it holds the service principal.
    sync_inner = factory.credential().credentials[0]._credential  # type: ignore[attr-defined]
    assert sync_inner._authority == CLOUDS[cloud]["authority"]
    # MSAL's instance discovery would ask login.microsoftonline.com about a custom authority.
    assert sync_inner._instance_discovery is (cloud != "Custom")
    async_inner = factory.async_credential().credentials[0]._credential  # type: ignore[attr-defined]
    assert async_inner._client._authority == CLOUDS[cloud]["authority"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_key_vault_and_logs_clients(cloud: str) -> None:
    expected = CLOUDS[cloud]
    factory = ClientFactory(settings_for(cloud))
    for secrets in (factory.secrets(expected["vault"] + "/"), factory.secrets_async(expected["vault"])):
        assert secrets.vault_url == expected["vault"]
        policy = secrets._client._config.authentication_policy
        assert policy._verify_challenge_resource is (cloud != "Custom")
    for logs in (factory.logs(), factory.logs_async()):
        assert logs._endpoint == expected["la"]
        assert logs._client._base_url == "{endpoint}/{apiVersion}"
        assert logs._config.authentication_policy._scopes == (f"{expected['la']}/.default",)
        assert user_agent(logs).startswith("apim-remediator/")


@pytest.mark.parametrize("cloud", CLOUDS)
def test_storage_clients_are_identity_based(cloud: str) -> None:
    expected = CLOUDS[cloud]
    factory = ClientFactory(settings_for(cloud))
    blob, blob_async = factory.blob_service(), factory.blob_service_async()
    for client in (blob, blob_async):
        assert client.url.rstrip("/") == expected["blob"]
        assert client._config.retry_policy.total_retries == 3
        assert user_agent(client).startswith("apim-remediator/")
    assert blob.credential is factory.credential()
    # Async clients need the async kind of the storage retry policy (the sync one breaks them).
    assert type(blob_async._config.retry_policy).__module__.startswith("azure.storage.blob._shared.policies_async")
    assert blob_async.credential is factory.async_credential()
    queue = factory.queue_service()
    assert queue.url.rstrip("/") == expected["blob"].replace(".blob.", ".queue.")
    for queue_client in (factory.queue("scan"), factory.queue_async("scan")):
        assert queue_client.queue_name == "scan"
        assert type(queue_client._message_encode_policy).__name__ == "BinaryBase64EncodePolicy"
        assert type(queue_client._message_decode_policy).__name__ == "BinaryBase64DecodePolicy"
    table = factory.table_service()
    assert table.url.rstrip("/") == expected["blob"].replace(".blob.", ".table.")
    assert factory.table_service_async().url == table.url


def test_connection_string_when_configured() -> None:
    settings = load_settings(
        {
            "APIMR_SUBSCRIPTION_IDS": SUB,
            "APIMR_STORAGE_CONNECTION_STRING": (
                "DefaultEndpointsProtocol=https;AccountName=devstoreaccount1;AccountKey=a2V5;"
                "BlobEndpoint=https://127.0.0.1:10000/devstoreaccount1;"
                "QueueEndpoint=https://127.0.0.1:10001/devstoreaccount1;"
                "TableEndpoint=https://127.0.0.1:10002/devstoreaccount1;"
            ),
        }
    )
    factory = ClientFactory(settings)
    assert factory.blob_service().url.rstrip("/") == "https://127.0.0.1:10000/devstoreaccount1"
    assert factory.queue_service().url.rstrip("/") == "https://127.0.0.1:10001/devstoreaccount1"
    assert factory.blob_service().credential.account_name == "devstoreaccount1"


def test_clients_are_built_once_per_process() -> None:
    factory = ClientFactory(settings_for("AzureCloud"))
    assert factory.apim(SUB) is factory.apim(SUB)
    assert factory.credential() is factory.credential()
    assert factory.secrets("https://kv1.vault.azure.net") is factory.secrets("https://KV1.vault.azure.net/")
    other = "99999999-2222-3333-4444-555555555555"
    assert factory.apim(other) is not factory.apim(SUB)


@pytest.mark.parametrize(
    "url",
    ["http://kv1.vault.azure.net", "https://kv1.vault.azure.net.evil.example", "https://attacker.example", "kv1"],
)
def test_vault_url_outside_the_cloud_is_refused(url: str) -> None:
    factory = ClientFactory(settings_for("AzureCloud"))
    with pytest.raises(PermanentError, match="Key Vault URL"):
        factory.secrets(url)


def test_ca_bundle_reaches_every_pipeline(tmp_path: Any) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        {"APIMR_SUBSCRIPTION_IDS": SUB, "APIMR_STORAGE_ACCOUNT": "apimrstate", "APIMR_CA_BUNDLE": str(bundle)}
    )
    factory = ClientFactory(settings)
    # Every client's transport is the shared pool's: sync ones verify with the bundle's path
    # (urllib3 pools per CA file), async ones with the pool's one SSL context.
    assert factory.pool.ca_bundle == str(bundle)
    sync = factory._client_kwargs(is_async=False)["transport"]
    assert sync.connection_config.verify == str(bundle)
    assert factory._storage_kwargs("blob", is_async=False)["transport"].connection_config.verify == str(bundle)
    assert factory._client_kwargs(is_async=True)["transport"].connection_config.verify is True
    assert factory._credential_kwargs()["connection_verify"] == str(bundle)
