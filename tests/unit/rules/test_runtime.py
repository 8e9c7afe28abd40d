"""The runtime rules over hand-made `RuntimeSignals` (pure): silent without signals, the
baseline is the median with missing days counted as zero, a blind query silences its rule
and is reported by LOG-004, and nothing but IPs, subscription ids and names is shown."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from shared.rules import evaluate_rule
from shared.signals import (
    API_CALLERS,
    AUTH_FAILURES,
    KEY_SPREAD,
    LOG_FLOW,
    REQUEST_RATE,
    SIGNAL_RULES,
    ApiCallers,
    CallerFailures,
    DayCount,
    KeySpread,
    QueryRun,
    RuntimeSignals,
)
from tests.factories import compliant

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def run(name: str, problem: str | None = None, window: int = 60) -> QueryRun:
    return QueryRun(name, f"ApiManagementGatewayLogs | {name}", window, ("law",), problem)


def signals(**fields: object) -> RuntimeSignals:
    base = RuntimeSignals(table="ApiManagementGatewayLogs", workspaces=("law",), queried_at=NOW)
    return replace(base, **fields)  # type: ignore[arg-type]


def days(*values: int) -> tuple[DayCount, ...]:
    return tuple(DayCount(i, v) for i, v in enumerate(values))


def test_every_signal_rule_is_silent_without_signals_or_without_a_workspace() -> None:
    missing = signals(missing="no diagnostic setting sends the service's GatewayLogs to a workspace")
    for rule_id in SIGNAL_RULES:
        assert evaluate_rule(rule_id, compliant()) == []
        assert evaluate_rule(rule_id, compliant(signals=missing)) == []


def test_thr_001_baseline_is_the_median_and_missing_days_count_zero() -> None:
    # days 1..7: three days without rows (0), four with 50: median 50 -> 500 fires, 499 not
    by_day = (DayCount(0, 500), DayCount(1, 50), DayCount(2, 50), DayCount(4, 50), DayCount(6, 50))
    snap = compliant(signals=signals(runs=(run(REQUEST_RATE),), requests_by_day=by_day))
    [finding] = evaluate_rule("THR-001", snap)
    assert "baseline of 50" in finding.message
    quieter = replace(snap.signals, requests_by_day=(DayCount(0, 499), *by_day[1:]))  # type: ignore[arg-type]
    assert evaluate_rule("THR-001", replace(snap, signals=quieter)) == []
    # four of seven days empty: the median is 0, there is no baseline, nothing to compare
    sparse = replace(snap.signals, requests_by_day=(DayCount(0, 5000), *by_day[1:4]))  # type: ignore[arg-type]
    assert evaluate_rule("THR-001", replace(snap, signals=sparse)) == []


def test_thr_001_needs_min_requests() -> None:
    snap = compliant(signals=signals(runs=(run(REQUEST_RATE),), requests_by_day=days(99, 1, 1, 1, 1, 1, 1, 1)))
    assert evaluate_rule("THR-001", snap) == []
    assert len(evaluate_rule("THR-001", snap, {"min_requests": 99})) == 1


def test_a_blind_query_silences_its_rule_and_is_a_log_004_finding() -> None:
    failed = run(KEY_SPREAD, problem="querying workspace law failed (HttpResponseError: (BadArgumentError) ...)")
    snap = compliant(
        signals=signals(
            runs=(failed, run(LOG_FLOW)),
            log_rows=3,
            key_spread=(KeySpread("leaked", 500, 900, ("192.0.2.1",)),),
        )
    )
    assert evaluate_rule("THR-003", snap) == []
    [finding] = evaluate_rule("LOG-004", snap)
    assert finding.entry == KEY_SPREAD
    assert "blind" in finding.message


def test_thr_002_names_at_most_five_offenders_by_count() -> None:
    rows = tuple(CallerFailures(f"203.0.113.{i}", "", 200 + i) for i in range(8))
    snap = compliant(signals=signals(runs=(run(AUTH_FAILURES, window=15),), auth_failures=rows))
    [finding] = evaluate_rule("THR-002", snap)
    assert finding.entry == "caller_ip"
    assert "8 client IP(s)" in finding.message
    assert "203.0.113.7 (207)" in finding.message
    assert "203.0.113.2 (202)" not in finding.message


def test_thr_005_ai_apis_by_endpoint_or_by_name_and_revisions_count() -> None:
    snap = compliant(
        signals=signals(runs=(run(API_CALLERS),), api_callers=(ApiCallers("orders;rev=2", 25, 80, ("10.0.0.1",)),))
    )
    assert evaluate_rule("THR-005", snap) == []  # orders is not an AI API
    [finding] = evaluate_rule("THR-005", snap, {"ai_apis": ("orders",)})
    assert finding.entry == "callers orders"
