"""The pacer's bookkeeping, on a simulated clock: requests wait for ARM's refill instead of
being refused, a 429 closes the bucket for everybody, and Resource Graph's quota window is
respected."""

from __future__ import annotations

import heapq

import pytest

from shared.pacing import ArmPacer, Bucket, bucket_of, parse_quota_reset

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
URL = f"https://management.azure.com/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ServerBucket:
    """ARM's bucket as the twin keeps it (capacity, refill per second)."""

    def __init__(self, capacity: float, refill: float, now: float) -> None:
        self.capacity, self.refill, self.tokens, self.stamp = capacity, refill, capacity, now

    def take(self, now: float) -> tuple[int, int]:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 200, int(self.tokens)
        return 429, 0


def _headers(remaining: int, status: int) -> dict[str, str]:
    headers = {"x-ms-ratelimit-remaining-subscription-reads": str(remaining)}
    if status == 429:
        headers["Retry-After"] = "1"
    return headers


def simulate(requests: int, capacity: float, refill: float, *, in_flight: int = 32, latency: float = 0.05):
    """`requests` reads through the pacer, `in_flight` at a time, against one server bucket."""
    clock = Clock()
    pacer = ArmPacer(clock=clock)
    server = ServerBucket(capacity, refill, clock.now)
    statuses: list[int] = []
    events: list[tuple[float, int, str]] = []  # (time, seq, what)
    seq = 0
    waiting = 0  # requests held back for the probe's answer
    pending = requests

    def start() -> None:
        nonlocal seq, waiting
        _, wait = pacer.reserve("GET", URL)
        if wait is None:
            waiting += 1
            return
        seq += 1
        heapq.heappush(events, (clock.now + wait, seq, "send"))

    def begin() -> None:
        nonlocal pending
        pending -= 1
        start()

    for _ in range(min(in_flight, requests)):
        begin()
    while events:
        at, _, what = heapq.heappop(events)
        clock.now = at
        if what == "send":
            status, remaining = server.take(at + latency / 2)
            statuses.append(status)
            seq += 1
            heapq.heappush(events, (at + latency, seq, f"answer:{status}:{remaining}"))
            continue
        _, status_text, remaining_text = what.split(":")
        status = int(status_text)
        pacer.observe(("3f2a1b0c-0000-4000-8000-000000000101", "reads"), status, _headers(int(remaining_text), status))
        if status == 429:  # the retry policy tries again: a new attempt through the pacer
            pending += 1
        released, waiting = waiting, 0
        for _ in range(released):
            start()
        if pending:
            begin()
    return statuses, clock.now - 1000.0, pacer


def test_a_fan_out_waits_for_the_refill_instead_of_spending_429s() -> None:
    statuses, elapsed, pacer = simulate(600, capacity=250, refill=25)
    assert statuses.count(200) == 600
    assert statuses.count(429) == 0
    bound = (600 - 250) / 25
    assert bound <= elapsed <= bound * 1.1, "paced at the refill, not slower"
    assert pacer.stats["requests"] == 600 + 31, "each attempt reserves once; the 31 held for the probe twice"


def test_a_scaled_bucket_is_paced_by_its_own_headers() -> None:
    """The twin scaled to 0.1 (25 refilling 2.5/s): the capacity seen gives the refill."""
    statuses, elapsed, _ = simulate(100, capacity=25, refill=2.5)
    assert statuses.count(429) == 0
    assert (100 - 25) / 2.5 <= elapsed <= (100 - 25) / 2.5 * 1.1


def test_the_first_request_of_a_bucket_goes_alone() -> None:
    bucket = Bucket(kind="reads")
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) is None, "nothing is known until the probe is answered"
    bucket.observe(0.1, 9, answered=True, throttled=False, retry_after=None)
    assert bucket.capacity == 10
    assert bucket.refill == pytest.approx(1.0), "ARM's ratio: a tenth of the capacity per second"
    waits = [bucket.reserve(0.1) for _ in range(10)]
    assert waits[:8] == [0.0] * 8, "tokens left, one kept back"
    assert waits[8] == pytest.approx(1.0), "reservations queue in order"
    assert waits[9] == pytest.approx(2.0)


def test_a_429_closes_the_bucket_for_everybody_until_retry_after() -> None:
    bucket = Bucket(kind="reads")
    bucket.reserve(0.0)
    bucket.observe(0.0, 200, answered=True, throttled=False, retry_after=None)
    bucket.reserve(1.0)
    bucket.observe(1.0, 0, answered=True, throttled=True, retry_after=7)
    assert bucket.reserve(1.0) == pytest.approx(7.0)
    assert bucket.reserve(9.0) is not None
    assert bucket.blocked_until == pytest.approx(8.0)


def test_answers_without_a_remaining_count_are_not_serialised() -> None:
    bucket = Bucket(kind="writes")
    assert bucket.reserve(0.0) == 0.0
    bucket.observe(0.1, None, answered=True, throttled=False, retry_after=None)
    assert [bucket.reserve(0.1) for _ in range(5)] == [0.0] * 5


def test_a_request_that_got_no_answer_lets_another_probe() -> None:
    bucket = Bucket(kind="reads")
    bucket.reserve(0.0)
    assert bucket.reserve(0.0) is None
    bucket.observe(0.5, None, answered=False, throttled=False, retry_after=None)
    assert bucket.reserve(0.5) == 0.0
    assert not bucket.unmetered


def test_a_bucket_shared_with_another_process_lowers_the_refill() -> None:
    """Someone else takes half the refill: the headers show it and the estimate follows."""
    bucket = Bucket(kind="reads")
    bucket.reserve(0.0)
    bucket.observe(0.0, 249, answered=True, throttled=False, retry_after=None)
    remaining = 100.0
    now = 0.0
    for _ in range(40):  # we take 10 per second, the bucket refills 25 but the other takes 22.5
        now += 1.0
        for _ in range(10):
            bucket.reserve(now)
        remaining += 25 - 22.5 - 10
        for _ in range(10):
            bucket.observe(now, max(0, remaining), answered=True, throttled=False, retry_after=None)
    assert bucket.refill < 25 * 0.9


def test_bucket_of_names_scope_and_kind_as_arm_counts_them() -> None:
    assert bucket_of("GET", URL) == (SUB, "reads")
    assert bucket_of("post", URL + "/subscriptions/s/listSecrets") == (SUB, "writes")
    assert bucket_of("DELETE", URL) == (SUB, "deletes")
    assert bucket_of("GET", "https://management.azure.com/subscriptions?api-version=2022-12-01") == ("tenant", "reads")
    graph = "https://management.azure.com/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
    assert bucket_of("POST", graph) == ("graph", "queries")


def test_resource_graph_waits_for_its_quota_window() -> None:
    clock = Clock()
    pacer = ArmPacer(clock=clock)
    graph = "https://management.azure.com/providers/Microsoft.ResourceGraph/resources"
    key, wait = pacer.reserve("POST", graph)
    assert wait == 0.0
    pacer.observe(key, 200, {"x-ms-user-quota-remaining": "1", "x-ms-user-quota-resets-after": "00:00:04.500"})
    assert pacer.reserve("POST", graph)[1] == 0.0
    assert pacer.reserve("POST", graph)[1] == pytest.approx(4.5)
    clock.now += 5
    assert pacer.reserve("POST", graph)[1] == 0.0


@pytest.mark.parametrize(
    ("text", "seconds"), [("00:00:04.500", 4.5), ("00:01:00", 60.0), ("1.00:00:01", 86401.0), ("soon", None)]
)
def test_parse_quota_reset(text: str, seconds: float | None) -> None:
    assert parse_quota_reset(text) == seconds


def test_a_late_answer_with_a_stale_count_does_not_raise_the_estimate() -> None:
    """Answers overtake each other: one ARM counted right after the probe (46 left) arrives
    after later ones (18 left). Believing it would let 25 more requests into a bucket that
    has none for them."""
    bucket = Bucket(kind="reads")
    bucket.reserve(0.0)
    bucket.observe(0.0, 49, answered=True, throttled=False, retry_after=None)  # capacity 50, refill 5/s
    for _ in range(32):
        bucket.reserve(0.0)
    for remaining in range(47, 17, -1):  # 30 answers in order
        bucket.observe(0.0, remaining, answered=True, throttled=False, retry_after=None)
    low = bucket.tokens
    bucket.observe(0.0, 46, answered=True, throttled=False, retry_after=None)  # the straggler
    assert bucket.tokens <= low
    bucket.reserve(2.0)
    assert bucket.tokens == pytest.approx(low + 2 * 5 - 1), "the refill still raises it"


def test_answers_without_a_count_still_count_for_the_refill() -> None:
    """ARM counts every request it answers (a 404 too): a share of answers without the header
    must not read as a slow refill."""
    bucket = Bucket(kind="reads")
    bucket.reserve(0.0)
    bucket.observe(0.0, 99, answered=True, throttled=False, retry_after=None)  # capacity 100, refill 10/s
    remaining, now = 60.0, 0.0
    for _ in range(10):  # 10 requests a second, the refill puts 10 back: the count holds
        now += 1.0
        for n in range(10):
            bucket.reserve(now)
            has_header = n % 3 != 0
            bucket.observe(now, remaining if has_header else None, answered=True, throttled=False, retry_after=None)
    assert bucket.refill == pytest.approx(10.0)
