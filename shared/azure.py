"""The one composition root: the credential and every Azure client the product uses.

SDK modules are imported when their client is first built, not when this module is: a
Functions worker's cold start pays only for the clients its first invocation uses.

Built once per process (cold start) from validated `Settings` and passed to handlers;
handlers never construct clients. Every client gets the same retry configuration, the
same user agent (`apim-remediator/<version>`), the cloud profile's endpoints and token
scopes, and the operator's CA bundle when one is configured.

Sync clients serve one-shot paths (CLI, HTTP API); async clients serve fan-out (sweeps,
scans). Async clients are bound to the event loop that first uses them: one factory per
loop.

Every client sends through the factory's one `ConnectionPool` (`shared/connections.py`:
one SSL context, one aiohttp session for async clients, one `requests` session for sync
ones; closed by `aclose` / `close`), and every ARM client (APIM, Monitor, Resource Graph,
the raw pipeline) through the factory's one `ArmPacer` (`shared/pacing.py`), which waits
for ARM's capacity instead of spending attempts on 429s. A new client gets both by
building with `self._client_kwargs(is_async=...)` (plus `self._arm_policies(...)` for ARM).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.core.rest import AsyncHttpResponse, HttpRequest
    from azure.data.tables import TableServiceClient
    from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient
    from azure.keyvault.secrets import SecretClient
    from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient
    from azure.mgmt.apimanagement import ApiManagementClient
    from azure.mgmt.apimanagement.aio import ApiManagementClient as AsyncApiManagementClient
    from azure.mgmt.core import AsyncARMPipelineClient
    from azure.mgmt.monitor import MonitorManagementClient
    from azure.mgmt.monitor.aio import MonitorManagementClient as AsyncMonitorManagementClient
    from azure.mgmt.resourcegraph import ResourceGraphClient
    from azure.mgmt.resourcegraph.aio import ResourceGraphClient as AsyncResourceGraphClient
    from azure.monitor.query import LogsQueryClient
    from azure.monitor.query.aio import LogsQueryClient as AsyncLogsQueryClient
    from azure.storage.blob import BlobServiceClient
    from azure.storage.blob.aio import BlobServiceClient as AsyncBlobServiceClient
    from azure.storage.blob.aio import ContainerClient as AsyncContainerClient
    from azure.storage.queue import QueueClient, QueueServiceClient
    from azure.storage.queue.aio import QueueClient as AsyncQueueClient
    from azure.storage.queue.aio import QueueServiceClient as AsyncQueueServiceClient

from shared import __version__
from shared.connections import ConnectionPool
from shared.errors import PermanentError
from shared.pacing import ArmPacer, pacing_policy
from shared.settings import CloudName, Settings

USER_AGENT = f"apim-remediator/{__version__}"
# Per-request limits for the raw ARM pipeline (azure-core's defaults are 300 s each): ARM
# answers a read or the start of a write within seconds, and a connection that hangs must
# end in a retry (or a reported failure) long before the Functions host's 10-minute limit.
ARM_CONNECTION_TIMEOUT = 15.0
ARM_READ_TIMEOUT = 60.0
STORAGE_CONNECTION_TIMEOUT = 20.0
STORAGE_READ_TIMEOUT = 60.0

# Diagnostic settings live in the multi-api monitor client; pin the version the product
# and the twin speak.
DIAGNOSTIC_SETTINGS_API_VERSION = "2021-05-01-preview"

# Key Vault DNS suffixes of the public clouds. A vault URL outside them is refused so a
# crafted URL (from a tag or an event) cannot make the product send a token elsewhere.
KEYVAULT_SUFFIXES: dict[CloudName, str] = {
    CloudName.AZURE_CLOUD: ".vault.azure.net",
    CloudName.AZURE_US_GOVERNMENT: ".vault.usgovcloudapi.net",
    CloudName.AZURE_CHINA_CLOUD: ".vault.azure.cn",
}

_C = TypeVar("_C")


class ClientFactory:
    """Builds and memoises the credential and clients for one process (or one event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[tuple[str, str], Any] = {}
        # One SSL context and connection pool, one view of ARM's throttling buckets.
        self.pool = ConnectionPool(settings.ca_bundle)
        self.pacer = ArmPacer()

    # -- shared configuration ------------------------------------------------------------

    def _transport_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        """The user agent and a transport over the shared pool (which carries the CA bundle)."""
        transport = self.pool.async_transport() if is_async else self.pool.sync_transport()
        return {"user_agent": USER_AGENT, "transport": transport}

    def _client_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        """Retry + transport options for azure-core pipelines (ARM, Key Vault, Logs)."""
        retry = self.settings.retry
        return {
            **self._transport_kwargs(is_async=is_async),
            "retry_total": retry.total,
            "retry_backoff_factor": retry.backoff_factor,
            "retry_backoff_max": retry.backoff_max,
        }

    def _credential_kwargs(self) -> dict[str, Any]:
        cloud = self.settings.cloud
        kwargs: dict[str, Any] = {
            "authority": cloud.authority_host,
            # Instance discovery asks login.microsoftonline.com about the authority; a
            # custom cloud's authority is not known there.
            "disable_instance_discovery": cloud.is_custom,
        }
        if self.settings.managed_identity_client_id:
            kwargs["managed_identity_client_id"] = self.settings.managed_identity_client_id
        if self.settings.ca_bundle:
            kwargs["connection_verify"] = self.settings.ca_bundle
        return kwargs

    def _memo(self, kind: str, key: str, build: Any) -> Any:
        slot = (kind, key)
        if slot not in self._cache:
            self._cache[slot] = build()
        return self._cache[slot]

    # -- credentials ---------------------------------------------------------------------

    def credential(self) -> TokenCredential:
        """Managed identity in Azure; environment (service principal) credentials locally."""
        from azure.identity import DefaultAzureCredential

        cred: TokenCredential = self._memo(
            "credential", "", lambda: DefaultAzureCredential(**self._credential_kwargs())
        )
        return cred

    def async_credential(self) -> AsyncTokenCredential:
        from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential

        cred: AsyncTokenCredential = self._memo(
            "credential_async", "", lambda: AsyncDefaultAzureCredential(**self._credential_kwargs())
        )
        return cred

    # -- ARM -----------------------------------------------------------------------------

    def _arm_policies(self, *, is_async: bool) -> list[Any]:
        """Policies every ARM pipeline runs per attempt, after its retry policy: pacing."""
        return [pacing_policy(self.pacer, is_async=is_async)]

    def _arm_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        cloud = self.settings.cloud
        return {
            **self._client_kwargs(is_async=is_async),
            "base_url": cloud.resource_manager,
            "credential_scopes": [cloud.arm_scope],
            "per_retry_policies": self._arm_policies(is_async=is_async),
        }

    def apim(self, subscription_id: str) -> ApiManagementClient:
        from azure.mgmt.apimanagement import ApiManagementClient

        client: ApiManagementClient = self._memo(
            "apim",
            subscription_id,
            lambda: ApiManagementClient(self.credential(), subscription_id, **self._arm_kwargs(is_async=False)),
        )
        return client

    def apim_async(self, subscription_id: str) -> AsyncApiManagementClient:
        from azure.mgmt.apimanagement.aio import ApiManagementClient as AsyncApiManagementClient

        client: AsyncApiManagementClient = self._memo(
            "apim_async",
            subscription_id,
            lambda: AsyncApiManagementClient(
                self.async_credential(), subscription_id, **self._arm_kwargs(is_async=True)
            ),
        )
        return client

    def monitor(self, subscription_id: str) -> MonitorManagementClient:
        """Azure Monitor management (diagnostic settings on any resource id)."""
        from azure.mgmt.monitor import MonitorManagementClient

        client: MonitorManagementClient = self._memo(
            "monitor",
            subscription_id,
            lambda: MonitorManagementClient(
                self.credential(),
                subscription_id,
                api_version=DIAGNOSTIC_SETTINGS_API_VERSION,
                **self._arm_kwargs(is_async=False),
            ),
        )
        return client

    def monitor_async(self, subscription_id: str) -> AsyncMonitorManagementClient:
        from azure.mgmt.monitor.aio import MonitorManagementClient as AsyncMonitorManagementClient

        client: AsyncMonitorManagementClient = self._memo(
            "monitor_async",
            subscription_id,
            lambda: AsyncMonitorManagementClient(
                self.async_credential(),
                subscription_id,
                api_version=DIAGNOSTIC_SETTINGS_API_VERSION,
                **self._arm_kwargs(is_async=True),
            ),
        )
        return client

    def arm_async(self) -> AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse]:
        """A raw ARM pipeline (bearer token, retry, user agent) for requests remediation
        plans spell out exactly."""
        client: AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse] = self._memo(
            "arm_async", "", self._build_arm_async
        )
        return client

    def _build_arm_async(self) -> AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse]:
        from azure.core.pipeline import policies
        from azure.mgmt.core import AsyncARMPipelineClient
        from azure.mgmt.core.policies import ARMHttpLoggingPolicy, AsyncARMChallengeAuthenticationPolicy

        cloud = self.settings.cloud
        retry = self.settings.retry
        pipeline = [
            policies.RequestIdPolicy(),
            policies.HeadersPolicy(),
            policies.UserAgentPolicy(base_user_agent=USER_AGENT),
            policies.ProxyPolicy(),
            policies.ContentDecodePolicy(),
            policies.AsyncRedirectPolicy(),
            policies.AsyncRetryPolicy(
                retry_total=retry.total, retry_backoff_factor=retry.backoff_factor, retry_backoff_max=retry.backoff_max
            ),
            *self._arm_policies(is_async=True),
            AsyncARMChallengeAuthenticationPolicy(self.async_credential(), cloud.arm_scope),
            policies.DistributedTracingPolicy(),
            # Where the generated SDK clients put it: after authentication (which adds the
            # bearer token again on every redirect hop), so a redirect to another host never
            # carries the token there.
            policies.SensitiveHeaderCleanupPolicy(),
            ARMHttpLoggingPolicy(),
        ]
        return AsyncARMPipelineClient(
            base_url=cloud.resource_manager,
            policies=pipeline,
            transport=self.pool.async_transport(
                connection_timeout=ARM_CONNECTION_TIMEOUT, read_timeout=ARM_READ_TIMEOUT
            ),
        )

    def _graph_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        return {**self._arm_kwargs(is_async=is_async), "base_url": self.settings.cloud.resource_graph}

    def resource_graph(self) -> ResourceGraphClient:
        from azure.mgmt.resourcegraph import ResourceGraphClient

        client: ResourceGraphClient = self._memo(
            "resource_graph", "", lambda: ResourceGraphClient(self.credential(), **self._graph_kwargs(is_async=False))
        )
        return client

    def resource_graph_async(self) -> AsyncResourceGraphClient:
        from azure.mgmt.resourcegraph.aio import ResourceGraphClient as AsyncResourceGraphClient

        client: AsyncResourceGraphClient = self._memo(
            "resource_graph_async",
            "",
            lambda: AsyncResourceGraphClient(self.async_credential(), **self._graph_kwargs(is_async=True)),
        )
        return client

    # -- Key Vault -----------------------------------------------------------------------

    def _vault_url(self, vault_url: str) -> str:
        parts = urlsplit(vault_url)
        if parts.scheme != "https" or not parts.hostname:
            raise PermanentError(f"Key Vault URL must be https://<vault-host>/, got {vault_url!r}")
        suffix = KEYVAULT_SUFFIXES.get(self.settings.cloud.name)
        if suffix and not parts.hostname.lower().endswith(suffix):
            raise PermanentError(
                f"Key Vault URL {vault_url!r} is not in the {self.settings.cloud.name.value} "
                f"cloud (expected a host ending in {suffix})"
            )
        return f"https://{parts.netloc.lower()}"

    def _secrets_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        return {
            **self._client_kwargs(is_async=is_async),
            "verify_challenge_resource": self.settings.cloud.keyvault_verify_challenge_resource,
        }

    def secrets(self, vault_url: str) -> SecretClient:
        from azure.keyvault.secrets import SecretClient

        url = self._vault_url(vault_url)
        client: SecretClient = self._memo(
            "secrets", url, lambda: SecretClient(url, self.credential(), **self._secrets_kwargs(is_async=False))
        )
        return client

    def secrets_async(self, vault_url: str) -> AsyncSecretClient:
        from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient

        url = self._vault_url(vault_url)
        client: AsyncSecretClient = self._memo(
            "secrets_async",
            url,
            lambda: AsyncSecretClient(url, self.async_credential(), **self._secrets_kwargs(is_async=True)),
        )
        return client

    # -- Log Analytics -------------------------------------------------------------------

    def _logs_kwargs(self, *, is_async: bool) -> dict[str, Any]:
        cloud = self.settings.cloud
        # Without audience the SDK asks for a token scoped to the endpoint's own host.
        return {
            **self._client_kwargs(is_async=is_async),
            "endpoint": cloud.log_analytics,
            "audience": cloud.log_analytics,
        }

    def logs(self) -> LogsQueryClient:
        from azure.monitor.query import LogsQueryClient

        client: LogsQueryClient = self._memo(
            "logs", "", lambda: LogsQueryClient(self.credential(), **self._logs_kwargs(is_async=False))
        )
        return client

    def logs_async(self) -> AsyncLogsQueryClient:
        from azure.monitor.query.aio import LogsQueryClient as AsyncLogsQueryClient

        client: AsyncLogsQueryClient = self._memo(
            "logs_async", "", lambda: AsyncLogsQueryClient(self.async_credential(), **self._logs_kwargs(is_async=True))
        )
        return client

    # -- TLS probes of backends (API-003's evidence) ------------------------------------

    def tls_probe_context(self) -> ssl.SSLContext:
        """One client SSL context for probing backends: chain and host name verified against
        the system store plus APIMR_CA_BUNDLE (a private CA the backends use)."""

        def build() -> ssl.SSLContext:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.settings.ca_bundle:
                context.load_verify_locations(cafile=self.settings.ca_bundle)
            return context

        built: ssl.SSLContext = self._memo("tls_probe", "", build)
        return built

    def https_context(self) -> ssl.SSLContext:
        """One client SSL context for plain HTTPS outside the SDKs (the authority's OpenID
        documents and signing keys): the system store plus APIMR_CA_BUNDLE."""

        return self.pool.ssl_context()

    # -- Storage (the product's own queue, journal, leases) ------------------------------

    def _storage_kwargs(self, service: str, *, is_async: bool) -> dict[str, Any]:
        """Blob and queue SDKs bring their own retry policy (sync and async kinds); give it
        the same budget."""
        from azure.storage.blob import ExponentialRetry as BlobRetry
        from azure.storage.blob.aio import ExponentialRetry as AsyncBlobRetry
        from azure.storage.queue import ExponentialRetry as QueueRetry

        # Not re-exported by azure.storage.queue.aio; the async policy lives in its _shared package.
        from azure.storage.queue._shared.policies_async import ExponentialRetry as AsyncQueueRetry

        retry = self.settings.retry
        if service == "table":
            return self._client_kwargs(is_async=is_async)
        policy_class: Any = {
            ("blob", False): BlobRetry,
            ("blob", True): AsyncBlobRetry,
            ("queue", False): QueueRetry,
            ("queue", True): AsyncQueueRetry,
        }[(service, is_async)]
        # The storage SDKs' own connection and read timeouts (20 s, 60 s), which they give
        # only to a transport they build themselves.
        pool = self.pool
        timeouts = {"connection_timeout": STORAGE_CONNECTION_TIMEOUT, "read_timeout": STORAGE_READ_TIMEOUT}
        kwargs: dict[str, Any] = {
            "user_agent": USER_AGENT,
            "transport": pool.async_transport(**timeouts) if is_async else pool.sync_transport(**timeouts),
            "retry_policy": policy_class(
                initial_backoff=max(1, round(retry.backoff_factor)),
                increment_base=2,
                retry_total=retry.total,
            ),
        }
        return kwargs

    def _storage_client(self, service: str, cls: Any, *, is_async: bool) -> Any:
        storage = self.settings.storage
        kind = f"{service}_async" if is_async else service
        kwargs = self._storage_kwargs(service, is_async=is_async)
        if storage.connection_string is not None:
            conn = storage.connection_string.reveal()
            return self._memo(kind, "", lambda: cls.from_connection_string(conn, **kwargs))
        url = {"blob": storage.blob_url, "queue": storage.queue_url, "table": storage.table_url}[service]
        if url is None:
            raise PermanentError(f"no {service} storage endpoint is configured")
        credential = self.async_credential() if is_async else self.credential()
        return self._memo(kind, url, lambda: cls(url, credential=credential, **kwargs))

    def blob_service(self) -> BlobServiceClient:
        from azure.storage.blob import BlobServiceClient

        client: BlobServiceClient = self._storage_client("blob", BlobServiceClient, is_async=False)
        return client

    def blob_service_async(self) -> AsyncBlobServiceClient:
        from azure.storage.blob.aio import BlobServiceClient as AsyncBlobServiceClient

        client: AsyncBlobServiceClient = self._storage_client("blob", AsyncBlobServiceClient, is_async=True)
        return client

    def backup_container_async(self, blob_url: str, container: str) -> AsyncContainerClient:
        """The backup storage account's container (APIMR_BACKUP_*), reached with the product's
        own identity: it is not the product's account, so never its connection string."""
        from azure.storage.blob.aio import ContainerClient as AsyncContainerClient

        kwargs = self._storage_kwargs("blob", is_async=True)
        client: AsyncContainerClient = self._memo(
            "backup_container_async",
            f"{blob_url}/{container}",
            lambda: AsyncContainerClient(blob_url, container, credential=self.async_credential(), **kwargs),
        )
        return client

    def queue_service(self) -> QueueServiceClient:
        from azure.storage.queue import QueueServiceClient

        client: QueueServiceClient = self._storage_client("queue", QueueServiceClient, is_async=False)
        return client

    def queue_service_async(self) -> AsyncQueueServiceClient:
        from azure.storage.queue.aio import QueueServiceClient as AsyncQueueServiceClient

        client: AsyncQueueServiceClient = self._storage_client("queue", AsyncQueueServiceClient, is_async=True)
        return client

    def queue(self, name: str) -> QueueClient:
        """A queue the Functions host reads: messages base64-encoded, as host.json says."""
        from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy

        client: QueueClient = self._memo(
            "queue_client",
            name,
            lambda: self.queue_service().get_queue_client(
                name, message_encode_policy=BinaryBase64EncodePolicy(), message_decode_policy=BinaryBase64DecodePolicy()
            ),
        )
        return client

    def queue_async(self, name: str) -> AsyncQueueClient:
        from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy

        client: AsyncQueueClient = self._memo(
            "queue_client_async",
            name,
            lambda: self.queue_service_async().get_queue_client(
                name, message_encode_policy=BinaryBase64EncodePolicy(), message_decode_policy=BinaryBase64DecodePolicy()
            ),
        )
        return client

    def table_service(self) -> TableServiceClient:
        from azure.data.tables import TableServiceClient

        client: TableServiceClient = self._storage_client("table", TableServiceClient, is_async=False)
        return client

    def table_service_async(self) -> AsyncTableServiceClient:
        from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

        client: AsyncTableServiceClient = self._storage_client("table", AsyncTableServiceClient, is_async=True)
        return client

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every sync client, the sync credential and the sync pool (async ones: `aclose`)."""
        for (kind, _), client in list(self._cache.items()):
            if not kind.endswith("_async") and hasattr(client, "close"):
                client.close()
                del self._cache[(kind, _)]
        self.pool.close()

    async def aclose(self) -> None:
        """Close every async client, the async credential and the shared aiohttp session."""
        for (kind, key), client in list(self._cache.items()):
            if kind.endswith("_async") and hasattr(client, "close"):
                await client.close()
                del self._cache[(kind, key)]
        await self.pool.aclose()
