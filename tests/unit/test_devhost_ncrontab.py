"""devhost's NCRONTAB parser: six fields seconds first, ranges, lists, steps, names, and the
next occurrence the Functions host would fire at."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devhost.ncrontab import CronError, CronSchedule


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_star_is_every_value_of_each_field() -> None:
    schedule = CronSchedule.parse("* * * * * *")
    assert schedule.seconds == frozenset(range(60))
    assert schedule.days == frozenset(range(1, 32))
    assert schedule.weekdays == frozenset(range(7))


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("5", {5}),
        ("1-4", {1, 2, 3, 4}),
        ("1,3,7", {1, 3, 7}),
        ("*/15", {0, 15, 30, 45}),
        ("10-40/10", {10, 20, 30, 40}),
        ("5/20", {5, 25, 45}),
        ("0-5,30,50-59/5", {0, 1, 2, 3, 4, 5, 30, 50, 55}),
    ],
)
def test_second_field_forms(field: str, expected: set[int]) -> None:
    assert CronSchedule.parse(f"{field} * * * * *").seconds == frozenset(expected)


def test_month_and_weekday_names() -> None:
    schedule = CronSchedule.parse("0 0 9 * Jan-Mar Mon,FRI")
    assert schedule.months == frozenset({1, 2, 3})
    assert schedule.weekdays == frozenset({1, 5})


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * * *", "expected six fields"),
        ("* * * * * * *", "expected six fields"),
        ("60 * * * * *", "second field: 60 is outside 0-59"),
        ("* * 24 * * *", "hour field: 24 is outside 0-23"),
        ("* * * 0 * *", "day field: 0 is outside 1-31"),
        ("* * * * 13 *", "month field: 13 is outside 1-12"),
        ("* * * * * 7", "day-of-week field: 7 is outside 0-6"),
        ("*/0 * * * * *", "step '0' must be a positive number"),
        ("5-1 * * * * *", "range '5-1' runs backwards"),
        ("1,,2 * * * * *", "empty list item"),
        ("x * * * * *", "'x' is not a number"),
        ("%SCHEDULE% * * * * *", "is not a number"),
    ],
)
def test_invalid_expressions_say_which_field(expression: str, message: str) -> None:
    with pytest.raises(CronError, match=message.replace("(", r"\(")):
        CronSchedule.parse(expression)


def test_every_five_minutes() -> None:
    schedule = CronSchedule.parse("0 */5 * * * *")
    assert schedule.next_after(at(2026, 11, 30, 10, 2, 7)) == at(2026, 11, 30, 10, 5, 0)
    # Strictly after: an exact match moves on to the next one.
    assert schedule.next_after(at(2026, 11, 30, 10, 5, 0)) == at(2026, 11, 30, 10, 10, 0)


def test_seconds_granular_schedule_ignores_microseconds() -> None:
    schedule = CronSchedule.parse("*/2 * * * * *")
    assert schedule.next_after(datetime(2026, 1, 1, 0, 0, 1, 999999, tzinfo=UTC)) == at(2026, 1, 1, 0, 0, 2)


def test_rolls_over_hour_day_month_and_year() -> None:
    schedule = CronSchedule.parse("30 15 2 * * *")
    assert schedule.next_after(at(2026, 12, 31, 3, 0, 0)) == at(2027, 1, 1, 2, 15, 30)


def test_day_of_month_and_day_of_week_must_both_match() -> None:
    # NCRONTAB (unlike Vixie cron): the 13th that is a Friday, not every 13th and every Friday.
    schedule = CronSchedule.parse("0 0 0 13 * 5")
    assert schedule.next_after(at(2026, 1, 1)) == at(2026, 2, 13)
    assert schedule.next_after(at(2026, 2, 13)) == at(2026, 3, 13)
    assert schedule.next_after(at(2026, 3, 13)) == at(2026, 11, 13)


def test_weekdays_sunday_is_zero() -> None:
    schedule = CronSchedule.parse("0 30 9 * * 0")
    assert schedule.next_after(at(2026, 11, 30)) == at(2026, 12, 6, 9, 30)  # 2026-12-06 is a Sunday


def test_leap_day_and_impossible_dates() -> None:
    assert CronSchedule.parse("0 0 0 29 2 *").next_after(at(2026, 3, 1)) == at(2028, 2, 29)
    with pytest.raises(CronError, match="never fires"):
        CronSchedule.parse("0 0 0 30 2 *").next_after(at(2026, 1, 1))


def test_matches_agrees_with_next_after() -> None:
    schedule = CronSchedule.parse("*/20 5-6 */6 1-10 * 1-5")
    moment = at(2026, 11, 30)
    for _ in range(50):
        moment = schedule.next_after(moment)
        assert schedule.matches(moment)
