"""The twin's whole world: estate, clock, request log, faults, throttling, events.

Everything lives in one `TwinState` owned by the server's event loop (no locks needed:
aiohttp handlers run on that loop). `reset()` brings it back to the seeded estate.
"""

from __future__ import annotations

import bisect
import copy
import re
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from twin.tokens import Principal


def norm(resource_id: str) -> str:
    """ARM ids compare case-insensitively; keys use the lowercased id without trailing slash."""
    return resource_id.rstrip("/").lower()


def new_etag() -> str:
    return f'"{uuid.uuid4().hex}"'


class Clock:
    """Real UTC time plus an offset tests can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@dataclass
class Resource:
    id: str
    body: dict[str, Any]
    etag: str = field(default_factory=new_etag)


class ArmStore:
    """Every ARM resource by normalised id, with indexes so a list answers in time
    proportional to what it returns, not to the whole estate (a 1,000-instance estate holds
    tens of thousands of resources, and a scan lists children thousands of times):

    - direct children by their collection (`{parent}/{child_type}`), in insertion order;
    - every id in sorted order, so the resources under an id are one contiguous range;
    - ids by resource type.

    Change resources only through `put`, `delete` and `load` (which keep the indexes).
    """

    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self._collections: dict[str, dict[str, None]] = {}
        self._sorted: list[str] = []
        self._types: dict[str, dict[str, None]] = {}

    def load(self, resources: dict[str, Resource]) -> None:
        """Replace everything (reset to the seeded estate) and rebuild the indexes."""
        self.resources = resources
        self._collections = {}
        self._types = {}
        self._sorted = sorted(resources)
        for key, resource in resources.items():
            self._index(key, resource)

    def _index(self, key: str, resource: Resource) -> None:
        self._collections.setdefault(key.rsplit("/", 1)[0], {})[key] = None
        self._types.setdefault(_type_of(resource), {})[key] = None

    def get(self, resource_id: str) -> Resource | None:
        return self.resources.get(norm(resource_id))

    def put(self, resource_id: str, body: dict[str, Any]) -> Resource:
        key = norm(resource_id)
        existing = self.resources.get(key)
        if existing is not None:
            before = _type_of(existing)
            existing.body = body
            existing.etag = new_etag()
            if _type_of(existing) != before:
                self._types.get(before, {}).pop(key, None)
                self._types.setdefault(_type_of(existing), {})[key] = None
            return existing
        resource = Resource(id=resource_id.rstrip("/"), body=body)
        self.resources[key] = resource
        bisect.insort(self._sorted, key)
        self._index(key, resource)
        return resource

    def _remove(self, key: str) -> Resource | None:
        gone = self.resources.pop(key, None)
        if gone is None:
            return None
        self._collections.get(key.rsplit("/", 1)[0], {}).pop(key, None)
        self._types.get(_type_of(gone), {}).pop(key, None)
        at = bisect.bisect_left(self._sorted, key)
        if at < len(self._sorted) and self._sorted[at] == key:
            del self._sorted[at]
        return gone

    def delete(self, resource_id: str) -> Resource | None:
        key = norm(resource_id)
        gone = self._remove(key)
        if gone is not None:
            for child in self.descendant_keys(key):
                self._remove(child)
        return gone

    def descendant_keys(self, resource_id: str) -> list[str]:
        """The keys of every resource under `resource_id` (not itself), in id order."""
        prefix = norm(resource_id) + "/"
        start = bisect.bisect_left(self._sorted, prefix)
        # "/" + 1 is "0": every key starting with the prefix sorts below prefix[:-1] + "0".
        end = bisect.bisect_left(self._sorted, prefix[:-1] + "0")
        return self._sorted[start:end]

    def descendants(self, resource_id: str) -> list[Resource]:
        return [self.resources[k] for k in self.descendant_keys(resource_id)]

    def children(self, parent_id: str, child_type: str) -> list[Resource]:
        """Direct children `{parent}/{child_type}/{name}` in insertion order."""
        collection = norm(parent_id) + "/" + child_type.lower()
        return [self.resources[k] for k in self._collections.get(collection, ())]

    def by_type(self, resource_type: str) -> list[Resource]:
        return [self.resources[k] for k in self._types.get(resource_type.lower(), ())]


def _type_of(resource: Resource) -> str:
    return str(resource.body.get("type", "")).lower()


@dataclass
class LogEntry:
    at: float
    service: str
    method: str
    path: str
    query: str
    route: str
    status: int
    principal: str | None
    subscription: str | None
    # The TCP connection it came on, numbered in the order the twin first saw them: tests
    # count connections to show that clients reuse them.
    connection: int | None = None

    @property
    def kind(self) -> str:
        if self.method in ("GET", "HEAD"):
            return "read"
        if self.method == "DELETE":
            return "delete"
        return "write"


@dataclass
class Fault:
    """An injected failure. Matches service, method and a regex over the path."""

    id: str
    service: str  # arm, login, logs, keyvault, or * for all
    path: str  # regex searched in the request path
    method: str = "*"
    action: str = "status"  # status | reset | delay | hang | lro_fail | lro_cancel | partial (Log Analytics)
    status: int = 500
    code: str = "InternalServerError"
    retry_after: float | None = None
    delay: float = 0.0
    times: int = 1  # how many matching requests it affects; 0 = until removed

    def matches(self, service: str, method: str, path: str) -> bool:
        return (
            self.service in ("*", service)
            and self.method in ("*", method)
            and re.search(self.path, path, re.IGNORECASE) is not None
        )


@dataclass
class Bucket:
    capacity: float
    refill: float
    tokens: float
    stamp: float

    def take(self) -> tuple[bool, float]:
        """Take one token; return (allowed, seconds until one is available)."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, 0.0
        return False, (1 - self.tokens) / self.refill


# ARM's documented token buckets (per region, per subscription and principal).
ARM_LIMITS = {"read": (250.0, 25.0), "write": (200.0, 10.0), "delete": (200.0, 10.0)}


@dataclass
class Throttle:
    enabled: bool = False
    scale: float = 1.0
    buckets: dict[tuple[str, str, str], Bucket] = field(default_factory=dict)

    def bucket(self, scope: str, principal: str, kind: str) -> Bucket:
        key = (scope, principal, kind)
        if key not in self.buckets:
            capacity, refill = ARM_LIMITS[kind]
            capacity, refill = capacity * self.scale, refill * self.scale
            self.buckets[key] = Bucket(capacity, refill, capacity, time.monotonic())
        return self.buckets[key]


@dataclass
class Operation:
    """A long-running operation: finishes after `polls` status reads."""

    id: str
    resource_id: str
    polls_left: int
    outcome: str  # Succeeded | Failed | Canceled
    result: dict[str, Any] | None
    error: dict[str, Any] | None = None
    on_complete: Callable[[], dict[str, Any] | None] | None = None
    completed: bool = False
    # Azure finishes an operation whether or not anybody polls: so does the twin, by then.
    deadline: float = field(default_factory=lambda: time.monotonic() + 2.0)
    # An operation that takes time on the twin's movable clock (APIM service updates): it
    # answers InProgress until the clock reaches this moment, however often it is polled.
    ready_at: datetime | None = None
    clock: Clock | None = None

    def finish(self) -> None:
        self.completed = True
        if self.outcome == "Succeeded" and self.on_complete is not None:
            self.result = self.on_complete()

    def status(self) -> str:
        if self.completed:
            return self.outcome
        if self.ready_at is not None and self.clock is not None:
            if self.clock.now() < self.ready_at:
                return "InProgress"
            self.finish()
            return self.outcome
        if self.polls_left > 0 and time.monotonic() < self.deadline:
            self.polls_left -= 1
            return "InProgress"
        self.finish()
        return self.outcome


AZURE_RETRY_AFTER = "60"


@dataclass
class LroConfig:
    polls: int = 1  # status reads that answer InProgress before the outcome
    # What APIM sends on its LROs: whole seconds, 60 (a recorded service create and its polls,
    # Azure/azure-sdk-for-js arm-apimanagement recording_apimanagementservice_create_test.json).
    # Tests that want speed say so: TwinServer(retry_after=...) sets the value reset() restores.
    retry_after: str = AZURE_RETRY_AFTER
    style: str | None = None  # force "async", "location" or "both" headers on every LRO (tests)
    # How long an APIM service update (PATCH/PUT of the service) runs on the twin clock.
    # Azure documents that protocol and cipher changes can take an hour or more; the
    # default keeps ordinary tests fast, tests of long updates set it and move the clock.
    service_update_seconds: float = 0.0
    # Azure's service PATCH declares no If-Match (the spec's ApiManagementService_Update):
    # the twin ignores the header there unless a test asks it to enforce it.
    enforce_service_if_match: bool = False


@dataclass
class TwinState:
    tenant_id: str
    clock: Clock = field(default_factory=Clock)
    principals: dict[str, tuple[str, Principal]] = field(default_factory=dict)  # client_id -> (secret, principal)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)  # lowercase id -> {id, displayName, ...}
    store: ArmStore = field(default_factory=ArmStore)
    extra: dict[str, Any] = field(default_factory=dict)  # per-service state (vaults, workspaces, ...)
    log: list[LogEntry] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    throttle: Throttle = field(default_factory=Throttle)
    operations: dict[str, Operation] = field(default_factory=dict)
    lro: LroConfig = field(default_factory=LroConfig)
    default_retry_after: str = AZURE_RETRY_AFTER  # what reset() restores lro.retry_after to
    events: list[dict[str, Any]] = field(default_factory=list)  # emitted Event Grid events, newest last
    latency: dict[str, float] = field(default_factory=dict)  # service -> seconds added to every answer
    event_listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # service -> base URL, filled by the server
    # Set by the server: runs after an estate fragment is merged at run time (new vault ports).
    after_seed: Callable[[], Awaitable[None]] | None = None
    _seed: dict[str, Any] | None = None
    # Derived lookups providers rebuild from the state at will (RBAC's assignment index);
    # never part of the estate, emptied by reset().
    memo: dict[str, Any] = field(default_factory=dict)
    _connections: weakref.WeakKeyDictionary[Any, int] = field(default_factory=weakref.WeakKeyDictionary)
    _connection_count: int = 0

    # -- snapshots for reset ----------------------------------------------------------------

    def mark_seeded(self) -> None:
        self._seed = {
            "subscriptions": copy.deepcopy(self.subscriptions),
            "resources": copy.deepcopy(self.store.resources),
            "extra": copy.deepcopy(self.extra),
        }

    def reset(self) -> None:
        """Back to the seeded estate: state, clock, log, faults, throttling, operations, events."""
        assert self._seed is not None, "reset() before the estate was seeded"
        self.subscriptions = copy.deepcopy(self._seed["subscriptions"])
        self.store.load(copy.deepcopy(self._seed["resources"]))
        self.memo.clear()
        self.extra = copy.deepcopy(self._seed["extra"])
        self.clock = Clock()
        self.log.clear()
        self.faults.clear()
        self.throttle = Throttle()
        self.operations.clear()
        self.lro = LroConfig(retry_after=self.default_retry_after)
        self.events.clear()
        self.latency.clear()

    # -- helpers for services ---------------------------------------------------------------

    def connection_of(self, transport: Any) -> int | None:
        """A number per TCP connection (its transport), the same for every request on it."""
        if transport is None:
            return None
        found = self._connections.get(transport)
        if found is None:
            self._connection_count += 1
            found = self._connections[transport] = self._connection_count
        return found

    def principal(self, client_id: str) -> Principal | None:
        found = self.principals.get(client_id)
        return found[1] if found else None

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for listener in list(self.event_listeners):
            listener(event)

    def take_fault(self, service: str, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(service, method, path):
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                return fault
        return None

    def settle_due_operations(self) -> None:
        now = time.monotonic()
        for operation in self.operations.values():
            if not operation.completed and operation.ready_at is None and now >= operation.deadline:
                operation.finish()

    def running_operation(self, resource_id: str) -> Operation | None:
        """An unfinished operation on `resource_id` that runs on the clock (a service update)."""
        for operation in self.operations.values():
            if (
                operation.ready_at is not None
                and norm(operation.resource_id) == norm(resource_id)
                and operation.status() == "InProgress"
            ):
                return operation
        return None

    def counters(self) -> dict[str, Any]:
        by_kind = Counter(e.kind for e in self.log)
        return {
            "total": len(self.log),
            "reads": by_kind["read"],
            "writes": by_kind["write"],
            "deletes": by_kind["delete"],
            "by_route": dict(Counter(f"{e.method} {e.route}" for e in self.log)),
            "by_principal": dict(Counter(e.principal or "-" for e in self.log)),
            "by_status": dict(Counter(str(e.status) for e in self.log)),
            "throttled": sum(1 for e in self.log if e.status == 429),
            "connections": dict(Counter(e.service for e in {(e.service, e.connection): e for e in self.log}.values())),
        }
