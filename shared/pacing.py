"""Client-side pacing against ARM's throttling: requests wait for capacity instead of
spending attempts on 429s.

ARM throttles with token buckets per region, subscription and principal (reads: 250,
refilling 25/s; writes and deletes: 200, refilling 10/s) and tells the caller what is left
on every answer (`x-ms-ratelimit-remaining-subscription-reads` / `-writes` / `-deletes`,
`-tenant-*` outside a subscription). Without pacing, every request of a fan-out finds the
bucket empty on its own, backs off on its own, and a third of the attempts are wasted
429s. `ArmPacer` keeps one estimate per (scope, kind) for the process's principal:

- The first request of a bucket goes alone (a probe): until an answer says how much is
  left, nothing is known, and a burst could overrun a small bucket.
- Each answer's header can lower the estimate to what the service says is left, minus
  the requests this process has sent (or reserved) that the answer did not yet count;
  only the refill raises it (answers overtake each other, so a late one's count is stale).
- A request takes a token; when none is left it reserves the next one and sleeps until
  the refill brings it (reservations queue up in order, so waiters do not stampede).
- The refill rate is ARM's documented ratio of refill to capacity (reads 1/10, writes and
  deletes 1/20) applied to the largest remaining count seen; it is lowered, never raised,
  by what the headers show over time (another process sharing the principal's bucket).
- A 429 (should one still come: another client spent the bucket) closes the bucket for
  everybody until its Retry-After, instead of each request backing off alone.

Resource Graph has its own per-user quota (`x-ms-user-quota-remaining`,
`x-ms-user-quota-resets-after`, about 15 queries per 5 s): when it says none is left, its
queries wait for the window to reset.

The core is synchronous and takes the time as an argument (unit-tested without a clock);
`AsyncPacingPolicy` / `PacingPolicy` put it into azure-core pipelines after the retry
policy, so every attempt, retries included, is paced.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from azure.core.pipeline import PipelineRequest, PipelineResponse

# ARM's documented buckets, per subscription (or tenant) and principal: (capacity, refill/s).
ARM_BUCKETS = {"reads": (250.0, 25.0), "writes": (200.0, 10.0), "deletes": (200.0, 10.0)}
# Tokens kept back: the header is a whole number read before the answer travelled back.
RESERVE = 1.0
# Refill is re-estimated over windows at least this long (shorter ones are mostly noise).
LEARN_WINDOW = 2.0
# Longest a 429's Retry-After closes a bucket (a bad header must not stop a sweep for hours).
MAX_BLOCK = 60.0
GRAPH_PATH = "/providers/microsoft.resourcegraph/"

_SUBSCRIPTION = re.compile(r"^/subscriptions/([^/]+)", re.IGNORECASE)
_QUOTA_RESET = re.compile(r"^(?:(\d+)\.)?(\d+):(\d+):(\d+(?:\.\d+)?)$")


def bucket_of(method: str, url: str) -> tuple[str, str]:
    """(scope, kind) of an ARM request: the subscription id (or "tenant") and reads/writes/
    deletes as ARM counts them; ("graph", "queries") for Resource Graph."""
    path = urlsplit(url).path
    if path.lower().startswith(GRAPH_PATH):
        return "graph", "queries"
    match = _SUBSCRIPTION.match(path)
    scope = match.group(1).lower() if match else "tenant"
    upper = method.upper()
    kind = "reads" if upper in ("GET", "HEAD") else "deletes" if upper == "DELETE" else "writes"
    return scope, kind


def parse_quota_reset(value: str) -> float | None:
    """Seconds in Resource Graph's `x-ms-user-quota-resets-after` (`hh:mm:ss[.fff]`)."""
    match = _QUOTA_RESET.match(value.strip())
    if match is None:
        return None
    days, hours, minutes, seconds = match.groups()
    return (int(days or 0) * 24 + int(hours)) * 3600 + int(minutes) * 60 + float(seconds)


@dataclass
class Bucket:
    """What this process knows of one of ARM's buckets."""

    kind: str
    known: bool = False
    tokens: float = 0.0  # estimated tokens left for us; negative = reservations queued
    capacity: float = 0.0  # the largest remaining count seen, plus the request it answered
    refill: float = 0.0  # tokens per second
    stamp: float = 0.0
    outstanding: int = 0  # requests reserved or sent whose answer has not come back
    blocked_until: float = 0.0
    probing: bool = False
    unmetered: bool = False  # answers carry no remaining count: nothing to pace by
    learned: float | None = None  # refill observed over a window, when lower than assumed
    _anchor: tuple[float, float, int] | None = None  # (time, remaining, answers) for learning
    answers: int = 0  # answered requests ARM counted (not refused), for learning the refill
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def _advance(self, now: float) -> None:
        if self.known and now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = max(self.stamp, now)

    def reserve(self, now: float) -> float | None:
        """Take a token: the seconds to wait before sending, or None when the request must
        wait for the probe's answer first."""
        blocked = max(0.0, self.blocked_until - now)
        if not self.known:
            if self.unmetered:
                self.outstanding += 1
                return blocked
            if self.probing:
                return None
            self.probing = True
            self.outstanding += 1
            return blocked
        self._advance(now)
        self.tokens -= 1
        self.outstanding += 1
        short = RESERVE - self.tokens
        wait = short / self.refill if short > 0 and self.refill > 0 else 0.0
        return max(wait, blocked)

    def observe(
        self, now: float, remaining: float | None, *, answered: bool, throttled: bool, retry_after: float | None
    ) -> None:
        """A request's attempt ended: with an answer (which may or may not carry the
        remaining count) or without one (`answered` false: no response, cancelled)."""
        self.outstanding = max(0, self.outstanding - 1)
        self.probing = False
        if throttled:
            pause = min(MAX_BLOCK, retry_after if retry_after is not None else 1.0)
            self.blocked_until = max(self.blocked_until, now + pause)
        if answered and not throttled:
            self.answers += 1  # ARM counted it, whether or not it said what is left
        if remaining is None:
            if answered and not self.known:
                self.unmetered = True
            return
        self.capacity = max(self.capacity, remaining + 1)
        documented_capacity, documented_refill = ARM_BUCKETS.get(self.kind, (250.0, 25.0))
        assumed = self.capacity * documented_refill / documented_capacity
        self._learn(now, remaining, assumed)
        self.refill = min(assumed, self.learned) if self.learned else assumed
        # What ARM says is left, less what we have in flight or queued that it has not seen.
        said = remaining - self.outstanding
        if not self.known:
            self.known, self.stamp, self.tokens = True, now, said
            return
        # Answers overtake each other: one ARM counted early can arrive after later ones, its
        # count stale and too high. A header can only lower the estimate; the estimate rises
        # by the refill alone.
        self._advance(now)
        self.tokens = min(self.tokens, said)

    def _learn(self, now: float, remaining: float, assumed: float) -> None:
        if remaining + 1 >= self.capacity - RESERVE:
            # A full bucket hides its refill (it is capped): start a new window.
            self._anchor = (now, remaining, self.answers)
            return
        if self._anchor is None:
            self._anchor = (now, remaining, self.answers)
            return
        since, before, answered = self._anchor
        if now - since < LEARN_WINDOW:
            return
        observed = (remaining - before + (self.answers - answered)) / (now - since)
        self._anchor = (now, remaining, self.answers)
        if 0 < observed < assumed * 0.9:
            self.learned = observed if self.learned is None else (self.learned + observed) / 2
        elif observed >= assumed * 0.9:
            self.learned = None


class GraphQuota:
    """Resource Graph's per-user window: `remaining` queries until `resets_at`."""

    def __init__(self) -> None:
        self.remaining: int | None = None
        self.resets_at = 0.0

    def reserve(self, now: float) -> float:
        if self.remaining is None or now >= self.resets_at:
            self.remaining = None
            return 0.0
        if self.remaining > 0:
            self.remaining -= 1
            return 0.0
        return self.resets_at - now

    def observe(self, now: float, remaining: int | None, resets_after: float | None) -> None:
        if remaining is not None and resets_after is not None:
            self.remaining = remaining
            self.resets_at = now + min(MAX_BLOCK, resets_after)


class ArmPacer:
    """One process's view of its ARM buckets (and its Resource Graph quota).

    Thread-safe for sync clients (a lock around the bookkeeping); async clients wait with
    asyncio.sleep. Also counts what it did, for benchmarks and tests (`stats`)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.graph = GraphQuota()
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "waited": 0, "wait_seconds": 0.0, "throttled": 0}

    def bucket(self, scope: str, kind: str) -> Bucket:
        key = (scope, kind)
        found = self.buckets.get(key)
        if found is None:
            found = self.buckets[key] = Bucket(kind=kind)
        return found

    def reserve(self, method: str, url: str) -> tuple[tuple[str, str], float | None]:
        scope, kind = bucket_of(method, url)
        with self.lock:
            self.stats["requests"] += 1
            if scope == "graph":
                return (scope, kind), self.graph.reserve(self.clock())
            return (scope, kind), self.bucket(scope, kind).reserve(self.clock())

    def observe(self, key: tuple[str, str], status: int | None, headers: Any) -> None:
        scope, kind = key
        now = self.clock()
        with self.lock:
            if status == 429:
                self.stats["throttled"] += 1
            if scope == "graph":
                remaining = _number(headers, "x-ms-user-quota-remaining")
                reset_text = headers.get("x-ms-user-quota-resets-after") if headers is not None else None
                resets = parse_quota_reset(reset_text) if reset_text else None
                if status == 429 and remaining is None:
                    remaining, resets = 0, _number(headers, "Retry-After")
                self.graph.observe(now, None if remaining is None else int(remaining), resets)
                return
            bucket = self.bucket(scope, kind)
            prefix = "subscription" if scope != "tenant" else "tenant"
            remaining = _number(headers, f"x-ms-ratelimit-remaining-{prefix}-{kind}")
            bucket.observe(
                now,
                remaining,
                answered=status is not None,
                throttled=status == 429,
                retry_after=_number(headers, "Retry-After"),
            )
            waiters, bucket.waiters = bucket.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_release, waiter)

    def abandon(self, key: tuple[str, str]) -> None:
        """A reserved request was never answered (cancelled, or no response at all)."""
        self.observe(key, None, None)

    def note_wait(self, seconds: float) -> None:
        if seconds > 0:
            with self.lock:
                self.stats["waited"] += 1
                self.stats["wait_seconds"] += seconds

    async def acquire_async(self, method: str, url: str) -> tuple[str, str]:
        while True:
            key, wait = self.reserve(method, url)
            if wait is not None:
                break
            # The bucket's probe is out: wait for its answer, then reserve again.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with self.lock:
                bucket = self.bucket(*key)
                if bucket.known or not bucket.probing:
                    continue
                bucket.waiters.append(waiter)
            await waiter
        if wait > 0:
            self.note_wait(wait)
            try:
                await asyncio.sleep(wait)
            except BaseException:
                self.abandon(key)
                raise
        return key

    def acquire(self, method: str, url: str) -> tuple[str, str]:
        while True:
            key, wait = self.reserve(method, url)
            if wait is not None:
                break
            time.sleep(0.05)  # a sync caller polls for the probe's answer
        if wait > 0:
            self.note_wait(wait)
            time.sleep(wait)
        return key


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _number(headers: Any, name: str) -> float | None:
    raw = headers.get(name) if headers is not None else None
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


@functools.cache
def _build_policies() -> tuple[type[Any], type[Any]]:
    """The two policy classes, built on first use (azure-core is imported lazily)."""
    from azure.core.pipeline.policies import AsyncHTTPPolicy, HTTPPolicy

    class AsyncPacingPolicy(AsyncHTTPPolicy):  # type: ignore[type-arg]
        """Waits for the pacer before each attempt; tells it what the answer said."""

        def __init__(self, pacer: ArmPacer) -> None:
            super().__init__()
            self.pacer = pacer

        async def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
            http = request.http_request
            key = await self.pacer.acquire_async(http.method, http.url)
            try:
                response = await self.next.send(request)
            except BaseException:
                self.pacer.abandon(key)
                raise
            self.pacer.observe(key, response.http_response.status_code, response.http_response.headers)
            return response

    class PacingPolicy(HTTPPolicy):  # type: ignore[type-arg]
        """The same for sync clients."""

        def __init__(self, pacer: ArmPacer) -> None:
            super().__init__()
            self.pacer = pacer

        def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
            http = request.http_request
            key = self.pacer.acquire(http.method, http.url)
            try:
                response = self.next.send(request)
            except BaseException:
                self.pacer.abandon(key)
                raise
            self.pacer.observe(key, response.http_response.status_code, response.http_response.headers)
            return response

    return AsyncPacingPolicy, PacingPolicy


def pacing_policy(pacer: ArmPacer, *, is_async: bool) -> Any:
    """An azure-core policy (async or sync) that paces every attempt through `pacer`."""
    return _build_policies()[0 if is_async else 1](pacer)
