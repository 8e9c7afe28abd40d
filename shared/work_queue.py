"""The work queue: one message per APIM instance to reconcile (`APIMR_WORK_QUEUE`).

The sweep (and anything else that wants an instance reconciled later) sends a
`WorkMessage`; the queue-triggered function `work` parses it back and reconciles. Messages
are JSON, base64-encoded on the wire (host.json's `messageEncoding`; the factory's queue
clients encode the same way). A message is data from storage, not from us for sure: parsing
checks every field and raises `MalformedMessage` (permanent: retrying cannot fix it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, ResourceExistsError

from shared.errors import PermanentError
from shared.journal import TriggerKind
from shared.tables import storage_error

if TYPE_CHECKING:  # the queue SDK is imported by the factory when a queue client is built
    from azure.storage.queue.aio import QueueClient

MAX_MESSAGE_BYTES = 48 * 1024  # 64 KiB per message once base64-encoded
_SERVICE_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ApiManagement/service/[^/]+$", re.IGNORECASE
)
_TOKEN = re.compile(r"^[A-Za-z0-9._:@/+-]{1,200}$")  # ids and reasons we write: no spaces, no control characters
_FIELDS = {"instance_id", "reason", "correlation_id", "sweep_id", "requested_at", "trigger", "version"}
VERSION = 1


class MalformedMessage(PermanentError):
    """A work message that cannot be read; `instance_id` is set when the message named one."""

    def __init__(self, reason: str, instance_id: str | None = None) -> None:
        super().__init__(f"malformed work message: {reason}")
        self.instance_id = instance_id


@dataclass(frozen=True)
class WorkMessage:
    instance_id: str  # the APIM service's ARM id
    reason: str  # why: "sweep", an event type, "http"
    correlation_id: str
    requested_at: datetime  # the moment the work was asked for: an instance reconciled since is not redone
    trigger: TriggerKind = TriggerKind.TIMER
    sweep_id: str | None = None  # the sweep that sent it (None: a targeted item)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "version": VERSION,
            "instance_id": self.instance_id,
            "reason": self.reason,
            "correlation_id": self.correlation_id,
            "requested_at": self.requested_at.astimezone(UTC).isoformat(),
            "trigger": self.trigger.value,
        }
        if self.sweep_id is not None:
            body["sweep_id"] = self.sweep_id
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str], instance_id: str | None) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise MalformedMessage(f"{key!r} is missing or not well-formed", instance_id)
    return value


def parse_work_message(raw: bytes | str) -> WorkMessage:
    """A WorkMessage from a queue message body (already base64-decoded by the host)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"{len(raw)} bytes is more than any work message ({MAX_MESSAGE_BYTES})")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"a JSON {type(body).__name__}, not an object")
    candidate = body.get("instance_id")
    instance_id = candidate if isinstance(candidate, str) and _SERVICE_ID.match(candidate) else None
    if instance_id is None:
        raise MalformedMessage("'instance_id' is not an APIM service id")
    if body.get("version") != VERSION:
        raise MalformedMessage(f"unknown version {body.get('version')!r} (this worker reads {VERSION})", instance_id)
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise MalformedMessage(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}", instance_id)
    reason = _text(body, "reason", _TOKEN, instance_id)
    correlation_id = _text(body, "correlation_id", _TOKEN, instance_id)
    sweep_id = _text(body, "sweep_id", _TOKEN, instance_id) if "sweep_id" in body else None
    try:
        trigger = TriggerKind(str(body.get("trigger")))
    except ValueError:
        raise MalformedMessage("'trigger' is not a trigger kind", instance_id) from None
    stamp = body.get("requested_at")
    try:
        requested_at = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        requested_at = None
    if requested_at is None or requested_at.tzinfo is None:
        raise MalformedMessage("'requested_at' is not an ISO 8601 time with a zone", instance_id)
    return WorkMessage(
        instance_id=instance_id,
        reason=reason,
        correlation_id=correlation_id,
        requested_at=requested_at.astimezone(UTC),
        trigger=trigger,
        sweep_id=sweep_id,
    )


class AzureWorkQueue:
    """Sends work messages to the product's queue (created on first use if missing)."""

    def __init__(self, client: QueueClient) -> None:
        self._client = client
        self._ready = False

    @property
    def _what(self) -> str:
        return f"work queue {self._client.queue_name!r}"

    async def _ensure(self) -> None:
        if self._ready:
            return
        try:
            await self._client.create_queue()
        except ResourceExistsError:
            pass  # the usual case after the first sweep: nothing to do
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="create queue") from exc
        self._ready = True

    async def send(self, message: WorkMessage) -> None:
        await self._ensure()
        try:
            await self._client.send_message(message.to_json())
        except AzureError as exc:
            raise storage_error(exc, what=self._what, operation="send a message") from exc
