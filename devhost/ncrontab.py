"""NCRONTAB schedules as the Functions timer trigger reads them: six fields, seconds first.

`{second} {minute} {hour} {day} {month} {day-of-week}`; each field is `*`, a value, a range
`a-b`, a list `a,b,c`, or a step over any of those (`*/5`, `10-40/10`). Months and days of
the week also take their three-letter English names (`Jan`, `Mon`); day-of-week is 0-6 with
Sunday = 0. Like NCrontab (the library the Functions host uses) a time matches only when
the day of the month AND the day of the week both match; Vixie cron's "either" rule for
two restricted day fields does not apply. Times are UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# A schedule that has not fired within this many years never will (e.g. 30 February).
HORIZON_YEARS = 5


class CronError(ValueError):
    """A schedule expression that is not a valid six-field NCRONTAB expression."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_base: int = 0


FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day", 1, 31),
    _Field("month", 1, 12, MONTHS, 1),
    _Field("day-of-week", 0, 6, DAYS, 0),
)


def _value(text: str, field: _Field, expression: str) -> int:
    lowered = text.lower()
    if field.names and lowered in field.names:
        return field.names.index(lowered) + field.name_base
    if not text.isdigit():
        raise CronError(f"{expression!r}: {field.name} field: {text!r} is not a number")
    number = int(text)
    if not field.low <= number <= field.high:
        raise CronError(f"{expression!r}: {field.name} field: {number} is outside {field.low}-{field.high}")
    return number


def _parse_field(text: str, field: _Field, expression: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{expression!r}: {field.name} field: empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{expression!r}: {field.name} field: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            low, high = field.low, field.high
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _value(first, field, expression), _value(last, field, expression)
            if low > high:
                raise CronError(f"{expression!r}: {field.name} field: range {base!r} runs backwards")
        else:
            low = _value(base, field, expression)
            # `5/15` means 5, 20, 35, 50: a start with a step runs to the field's end.
            high = field.high if slash else low
        values.update(range(low, high + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed NCRONTAB expression; `next_after` gives the next matching second."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        parts = expression.split()
        if len(parts) != len(FIELDS):
            raise CronError(
                f"{expression!r}: expected six fields (second minute hour day month day-of-week), got {len(parts)}"
            )
        sets = [_parse_field(part, field, expression) for part, field in zip(parts, FIELDS, strict=True)]
        return cls(expression, *sets)

    def matches(self, moment: datetime) -> bool:
        return (
            moment.second in self.seconds
            and moment.minute in self.minutes
            and moment.hour in self.hours
            and self._day_matches(moment)
        )

    def _day_matches(self, moment: datetime) -> bool:
        # datetime.weekday(): Monday = 0; NCRONTAB: Sunday = 0.
        return moment.month in self.months and moment.day in self.days and (moment.weekday() + 1) % 7 in self.weekdays

    def next_after(self, moment: datetime) -> datetime:
        """The first matching time strictly after `moment` (whole seconds, same tzinfo)."""
        current = moment.replace(microsecond=0) + timedelta(seconds=1)
        horizon = current.replace(year=current.year + HORIZON_YEARS, month=1, day=1)
        while current < horizon:
            if current.month not in self.months:
                year, month = (current.year + 1, 1) if current.month == 12 else (current.year, current.month + 1)
                current = current.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
            elif not self._day_matches(current):
                current = current.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif current.hour not in self.hours:
                current = current.replace(minute=0, second=0) + timedelta(hours=1)
            elif current.minute not in self.minutes:
                current = current.replace(second=0) + timedelta(minutes=1)
            elif current.second not in self.seconds:
                current += timedelta(seconds=1)
            else:
                return current
        raise CronError(f"{self.expression!r} never fires within {HORIZON_YEARS} years of {moment.isoformat()}")
