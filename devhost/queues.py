"""Queue triggers and queue output bindings against Azure Storage queues (Azurite locally),
through azure-storage-queue, with the host's semantics from host.json `extensions.queues`.

Connections: a binding's `connection` names a setting prefix (default AzureWebJobsStorage;
like the host, `X` is also looked up as `AzureWebJobsX`). Supported, first match wins:
- `<prefix>`: a connection string (`DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...`,
  `...;QueueEndpoint=...`, or `UseDevelopmentStorage=true`);
- `<prefix>__queueServiceUri`: the queue endpoint URL, with an Entra ID credential;
- `<prefix>__accountName`: `https://<name>.queue.core.windows.net`, with an Entra ID credential.
The credential is azure-identity's DefaultAzureCredential (environment service principal,
then managed identity with `<prefix>__clientId` when set); with AZURE_AUTHORITY_HOST naming a
non-public authority (the twin), instance discovery is off. A CA bundle named by
SSL_CERT_FILE or REQUESTS_CA_BUNDLE is trusted by the queue client and the credential.

Trigger semantics: messages are received in batches of `batchSize` with a lease (10 min, or
the function timeout if longer); a new batch is fetched once no more than
`newBatchThreshold` messages are running; an empty queue is polled with exponential backoff
from 100 ms up to `maxPollingInterval`. Success deletes the message; failure makes it visible
again after `visibilityTimeout`; a message whose dequeue count has reached
`maxDequeueCount` when it fails (or exceeds it when received) moves to `<queue>-poison`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from devhost.config import ConfigError, MissingSettingError, QueueOptions
from devhost.functions import FunctionSpec, InvocationResult, queue_message

log = logging.getLogger("devhost")

MIN_POLLING_INTERVAL = 0.1
LEASE_SECONDS = 600
PUBLIC_AUTHORITIES = ("login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn")


@dataclass(frozen=True)
class QueueConnection:
    """Where a connection prefix points, without the secret in its description."""

    prefix: str
    connection_string: str | None = None
    service_url: str | None = None
    client_id: str | None = None

    def describe(self) -> str:
        if self.connection_string is not None:
            return f"{self.prefix} (connection string)"
        return f"{self.prefix} ({self.service_url}, Entra ID)"


def resolve_connection(prefix: str, settings: Mapping[str, str], where: str) -> QueueConnection:
    """The queue endpoint a binding's `connection` names; MissingSettingError if none is set."""
    for name in (prefix, f"AzureWebJobs{prefix}"):
        if settings.get(name):
            return QueueConnection(prefix=name, connection_string=settings[name])
        url = settings.get(f"{name}__queueServiceUri")
        account = settings.get(f"{name}__accountName")
        client_id = settings.get(f"{name}__clientId") or None
        if url:
            return QueueConnection(prefix=name, service_url=url.rstrip("/"), client_id=client_id)
        if account:
            return QueueConnection(
                prefix=name, service_url=f"https://{account}.queue.core.windows.net", client_id=client_id
            )
    raise MissingSettingError(
        prefix, f"{where} connection '{prefix}' (expects {prefix}, {prefix}__queueServiceUri or {prefix}__accountName)"
    )


def storage_settings_for(product_settings: Mapping[str, str], prefix: str = "AzureWebJobsStorage") -> dict[str, str]:
    """Settings that point a connection prefix at the storage the product's own settings
    name (APIMR_STORAGE_*): in tests and the demo, the twin's Azurite with Entra ID tokens."""
    connection_string = product_settings.get("APIMR_STORAGE_CONNECTION_STRING")
    if connection_string:
        return {prefix: connection_string}
    found = {
        f"{prefix}__{service}ServiceUri": product_settings[f"APIMR_STORAGE_{service.upper()}_ENDPOINT"]
        for service in ("blob", "queue", "table")
        if product_settings.get(f"APIMR_STORAGE_{service.upper()}_ENDPOINT")
    }
    if not found and product_settings.get("APIMR_STORAGE_ACCOUNT"):
        found[f"{prefix}__accountName"] = product_settings["APIMR_STORAGE_ACCOUNT"]
    return found


def _ca_bundle(settings: Mapping[str, str]) -> str | None:
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = settings.get(name) or os.environ.get(name)
        if value:
            return value
    return None


class QueueService:
    """One service client (and credential) per connection; queue clients memoised by name."""

    def __init__(self, connection: QueueConnection, settings: Mapping[str, str], encoding: str) -> None:
        self.connection = connection
        self.encoding = encoding
        self._credential: Any = None
        kwargs: dict[str, Any] = {}
        ca = _ca_bundle(settings)
        if ca:
            kwargs["connection_verify"] = ca
        if connection.connection_string is not None:
            self._service = QueueServiceClient.from_connection_string(connection.connection_string, **kwargs)
        else:
            from azure.identity.aio import DefaultAzureCredential

            authority = settings.get("AZURE_AUTHORITY_HOST") or os.environ.get("AZURE_AUTHORITY_HOST") or ""
            custom = bool(authority) and not any(host in authority for host in PUBLIC_AUTHORITIES)
            self._credential = DefaultAzureCredential(
                managed_identity_client_id=connection.client_id, disable_instance_discovery=custom, **kwargs
            )
            self._service = QueueServiceClient(str(connection.service_url), credential=self._credential, **kwargs)
        self._queues: dict[str, QueueClient] = {}
        self._created: set[str] = set()

    def queue(self, name: str) -> QueueClient:
        if name not in self._queues:
            self._queues[name] = self._service.get_queue_client(name)
        return self._queues[name]

    def encode(self, body: bytes) -> str:
        return base64.b64encode(body).decode("ascii") if self.encoding == "base64" else body.decode("utf-8")

    def decode(self, content: str) -> bytes:
        if self.encoding == "base64":
            return base64.b64decode(content.encode("ascii"), validate=True)
        return content.encode("utf-8")

    async def send(self, queue_name: str, content: str) -> None:
        """Send already-encoded content, creating the queue the first time (as the host does)."""
        client = self.queue(queue_name)
        if queue_name not in self._created:
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()
            self._created.add(queue_name)
        await client.send_message(content)

    async def close(self) -> None:
        for client in self._queues.values():
            await client.close()
        await self._service.close()
        if self._credential is not None:
            await self._credential.close()


def output_messages(value: Any) -> list[bytes]:
    """An output binding's value as message bodies: str/bytes, JSON-able values, or a list of them."""
    import json

    items = value if isinstance(value, list) else [value]
    bodies: list[bytes] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, bytes):
            bodies.append(item)
        elif isinstance(item, str):
            bodies.append(item.encode("utf-8"))
        elif isinstance(item, func.QueueMessage):
            bodies.append(item.get_body())
        else:
            bodies.append(json.dumps(item).encode("utf-8"))
    return bodies


class QueuePoller:
    """Drives one queue-triggered function."""

    def __init__(
        self,
        spec: FunctionSpec,
        service: QueueService,
        options: QueueOptions,
        run: Callable[[func.QueueMessage], Awaitable[InvocationResult]],
        *,
        max_polling_interval: float | None,
        function_timeout: float | None,
    ) -> None:
        self.spec = spec
        self.service = service
        self.options = options
        self.run = run
        self.queue_name = spec.queue_name
        self.poison_name = f"{spec.queue_name}-poison"
        self.max_interval = options.max_polling_interval if max_polling_interval is None else max_polling_interval
        self.lease = max(LEASE_SECONDS, int(function_timeout or 0) + 60)
        self.wake = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        if options.message_encoding != service.encoding:
            raise ConfigError("a queue service's encoding must match host.json messageEncoding")

    async def run_forever(self) -> None:
        interval = MIN_POLLING_INTERVAL
        client = self.service.queue(self.queue_name)
        while True:
            if self.in_flight > self.options.threshold:
                self.slot_freed.clear()
                await self.slot_freed.wait()
                continue
            messages = await self._receive(client)
            if messages:
                interval = MIN_POLLING_INTERVAL
                for message in messages:
                    self.in_flight += 1
                    task = asyncio.get_running_loop().create_task(self._process(client, message))
                    self.tasks.add(task)
                    task.add_done_callback(self._done)
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)
            interval = MIN_POLLING_INTERVAL if self.wake.is_set() else min(interval * 2, self.max_interval)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight -= 1
        self.slot_freed.set()

    async def _receive(self, client: QueueClient) -> list[Any]:
        try:
            pages = client.receive_messages(
                messages_per_page=self.options.batch_size,
                max_messages=self.options.batch_size,
                visibility_timeout=self.lease,
            )
            return [message async for message in pages]
        except ResourceNotFoundError:
            return []  # the host waits for the queue to exist; so does devhost
        except AzureError as error:
            log.warning(
                "Queue '%s' (%s): receive failed: %s", self.queue_name, self.service.connection.describe(), error
            )
            return []

    async def _process(self, client: QueueClient, message: Any) -> None:
        try:
            await self._handle(client, message)
        except asyncio.CancelledError:
            # The host is stopping: give the message back now rather than after the lease.
            with contextlib.suppress(AzureError):
                await client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
            raise
        except AzureError as error:
            log.error("Queue '%s': message %s: storage call failed: %s", self.queue_name, message.id, error)

    async def _handle(self, client: QueueClient, message: Any) -> None:
        limit = self.options.max_dequeue_count
        if message.dequeue_count > limit:
            await self._poison(client, message)
            return
        try:
            body = self.service.decode(message.content or "")
        except (binascii.Error, ValueError, UnicodeError):
            log.error(
                "Queue '%s': message %s is not valid base64 (host.json messageEncoding is base64)",
                self.queue_name,
                message.id,
            )
            succeeded = False
        else:
            result = await self.run(
                queue_message(
                    id=message.id,
                    body=body,
                    dequeue_count=message.dequeue_count,
                    expiration_time=message.expires_on,
                    insertion_time=message.inserted_on,
                    time_next_visible=message.next_visible_on,
                    pop_receipt=message.pop_receipt,
                )
            )
            succeeded = result.succeeded
        if succeeded:
            await client.delete_message(message.id, message.pop_receipt)
        elif message.dequeue_count >= limit:
            await self._poison(client, message)
        else:
            await client.update_message(
                message.id, message.pop_receipt, visibility_timeout=int(self.options.visibility_timeout)
            )

    async def _poison(self, client: QueueClient, message: Any) -> None:
        log.warning(
            "Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
            self.options.max_dequeue_count,
            self.poison_name,
        )
        await self.service.send(self.poison_name, message.content or "")
        await client.delete_message(message.id, message.pop_receipt)

    async def idle(self) -> bool:
        """True when nothing runs and the queue holds no message (visible or not)."""
        if self.in_flight:
            return False
        try:
            properties = await self.service.queue(self.queue_name).get_queue_properties()
        except ResourceNotFoundError:
            return True
        return int(properties.approximate_message_count or 0) == 0 and self.in_flight == 0

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
