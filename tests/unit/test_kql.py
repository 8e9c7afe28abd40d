"""The twin's KQL subset: exact results over a small ApiManagementGatewayLogs table, KQL null and case rules,
and a clear KqlError naming every construct outside the subset."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from twin.kql import Column, KqlError, QueryResult, Table, run_query

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LOGS = "ApiManagementGatewayLogs"
COLUMNS = (
    Column("TimeGenerated", "datetime"),
    Column("ApimSubscriptionId", "string"),
    Column("ResponseCode", "int"),
    Column("TotalTime", "long"),
    Column("CallerIpAddress", "string"),
    Column("IsRequestSuccess", "bool"),
    Column("ApiId", "string"),
    Column("Url", "string"),
)
# time (HH:MM[:SS] on 2026-11-23), subscription, response code, total ms, caller, success, api, url
DATA: list[tuple[str, str | None, int | None, int | None, str, bool, str, str]] = [
    ("09:05", "sub-a", 200, 120, "10.0.0.1", True, "orders", "/api/orders/1"),
    ("09:10", "sub-a", 200, 80, "10.0.0.1", True, "orders", "/api/orders/2"),
    ("09:20", "sub-b", 404, 15, "10.0.0.2", False, "orders", "/api/orders/999"),
    ("09:45", "sub-b", 500, 900, "10.0.0.3", False, "payments", "/api/payments/charge"),
    ("10:00", "sub-a", 200, 60, "10.0.0.1", True, "payments", "/api/payments/status"),
    ("10:05", "SUB-A", 200, 70, "10.0.0.4", True, "orders", "/api/Orders/3"),
    ("10:15", "sub-c", 429, 5, "10.0.0.5", False, "orders", "/api/orders/4"),
    ("10:30", "sub-c", 429, 7, "10.0.0.5", False, "orders", "/api/orders/5"),
    ("10:40", "sub-c", 200, 110, "10.0.0.5", True, "users", "/api/users/me"),
    ("10:55", None, 401, 3, "10.0.0.6", False, "users", "/api/users/me"),
    ("11:00", "sub-a", 200, 95, "10.0.0.1", True, "orders", "/api/orders/6"),
    ("11:05", "sub-b", 503, 1500, "10.0.0.2", False, "payments", "/api/payments/refund"),
    ("11:10", "sub-a", 201, 130, "10.0.0.1", True, "orders", "/api/orders"),
    ("11:20", "sub-d", None, None, "10.0.0.7", False, "orders", "/api/orders/7"),
    ("11:25", "sub-a", 200, 85, "10.0.0.1", True, "users", "/api/users/42"),
    ("11:30", "sub-b", 500, 700, "10.0.0.2", False, "payments", "/api/payments/charge"),
    ("11:40", "sub-c", 200, 100, "10.0.0.5", True, "orders", "/api/orders/8?expand=items"),
    ("11:50", "sub-a", 204, 40, "10.0.0.1", True, "orders", "/api/orders/9"),
    ("11:55", "sub-b", 200, 90, "10.0.0.2", True, "users", "/api/userservice/x"),
    ("11:59:30", "sub-a", 200, 50, "10.0.0.1", True, "orders", "/api/orders/10"),
]


def at(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-23T{hhmm}+00:00")


def gateway_logs() -> Table:
    rows: list[dict[str, object]] = []
    for stamp, *rest in DATA:
        rows.append({col.name: value for col, value in zip(COLUMNS, (at(stamp), *rest), strict=True)})
    return Table(COLUMNS, tuple(rows))


def q(query: str, *, now: datetime = NOW, timespan: tuple[datetime, datetime] | None = None) -> QueryResult:
    return run_query(query, {LOGS: gateway_logs()}, now=now, timespan=timespan)


def times(query: str) -> list[str]:
    """The rows a query keeps, as their HH:MM."""
    stamps = values(f"{LOGS} | {query} | project TimeGenerated")
    assert all(isinstance(t, datetime) for t in stamps)
    return [t.strftime("%H:%M") for t in stamps if isinstance(t, datetime)]


def count(query: str) -> int:
    result = q(f"{LOGS} | {query} | count")
    assert result.columns == (Column("Count", "long"),)
    (value,) = result.rows[0]
    assert isinstance(value, int)
    return value


def values(query: str) -> list[object]:
    """The single output column of a query, as a list."""
    result = q(query)
    assert len(result.columns) == 1
    return [row[0] for row in result.rows]


# ---------------------------------------------------------------------------------------------- shape and types


def test_bare_table_returns_every_row_and_column_with_source_types() -> None:
    result = q(LOGS)
    assert result.columns == COLUMNS
    assert len(result.rows) == 20
    assert result.rows[0] == (at("09:05"), "sub-a", 200, 120, "10.0.0.1", True, "orders", "/api/orders/1")


def test_missing_string_cell_reads_as_empty_string_and_missing_number_as_null() -> None:
    rows = q(f"{LOGS} | where ResponseCode == 401 or isnull(ResponseCode) | project ApimSubscriptionId, TotalTime")
    assert rows.rows == (("", 3), ("sub-d", None))


def test_result_column_types_are_inferred() -> None:
    result = q(
        f"{LOGS} | summarize n = count(), mean = avg(TotalTime), top_ = max(ResponseCode), total = sum(TotalTime),"
        " ok = countif(IsRequestSuccess), apis = make_set(ApiId) by Hour = bin(TimeGenerated, 1h)"
        " | extend slow = mean > 100, label = tostring(n), span = now() - Hour"
    )
    assert [(c.name, c.type) for c in result.columns] == [
        ("Hour", "datetime"),
        ("n", "long"),
        ("mean", "real"),
        ("top_", "int"),
        ("total", "long"),
        ("ok", "long"),
        ("apis", "dynamic"),
        ("slow", "bool"),
        ("label", "string"),
        ("span", "timespan"),
    ]


# ---------------------------------------------------------------------------------------------- where, null, case


def test_where_comparisons_skip_null() -> None:
    assert times("where ResponseCode >= 500") == ["09:45", "11:05", "11:30"]
    assert count("where ResponseCode == 200") == 10
    assert count("where ResponseCode != 200") == 9  # the null row is neither == nor != 200
    assert count("where ResponseCode < 500") == 16
    assert count("where isnull(ResponseCode)") == 1
    assert count("where isnotnull(TotalTime)") == 19


def test_three_valued_and_or_not() -> None:
    assert count("where ApiId == 'orders' and (ResponseCode >= 400 or isnull(ResponseCode))") == 4
    assert count("where ResponseCode >= 400 or IsRequestSuccess") == 19  # null or false -> null: dropped
    assert count("where not(ResponseCode >= 400)") == 12  # not(null) -> null: dropped
    assert count("where not(IsRequestSuccess)") == 8
    assert count("where IsRequestSuccess == true") == 12


def test_equality_is_case_sensitive_and_tilde_is_not() -> None:
    assert count("where ApimSubscriptionId == 'sub-a'") == 8
    assert count('where ApimSubscriptionId == "SUB-A"') == 1
    assert count("where ApimSubscriptionId =~ 'Sub-A'") == 9
    assert count("where ApimSubscriptionId !~ 'sub-a'") == 11
    assert count("where ApimSubscriptionId != 'sub-a'") == 12


def test_has_matches_whole_terms_case_insensitively() -> None:
    assert count("where Url has 'users'") == 3  # not /api/userservice/x
    assert count("where Url contains 'users'") == 4
    assert count("where Url has 'ORDERS'") == 12
    assert count("where Url has_cs 'orders'") == 11
    assert count("where Url !has 'orders'") == 8
    assert count("where ApimSubscriptionId has 'su'") == 0  # a term prefix is not a term
    assert count("where ApimSubscriptionId contains 'su'") == 19
    assert count("where Url has 'orders/8'") == 1
    assert times("where Url has 'expand=items'") == ["11:40"]


def test_contains_startswith_endswith() -> None:
    assert times("where Url contains_cs 'Orders'") == ["10:05"]
    assert count("where Url !contains 'ORDERS'") == 8
    assert count("where Url startswith '/API/PAY'") == 4
    assert count("where Url !startswith '/api/orders'") == 8
    assert times("where Url endswith '/ME'") == ["10:40", "10:55"]
    assert count("where Url !endswith '/me'") == 18


def test_in_and_between() -> None:
    assert count("where ApimSubscriptionId in ('sub-a', 'sub-b')") == 13
    assert count("where ApimSubscriptionId in~ ('SUB-A')") == 9
    assert count("where ApimSubscriptionId !in ('sub-a', 'sub-b')") == 7
    assert times("where ResponseCode in (429, 401)") == ["10:15", "10:30", "10:55"]
    assert count("where ResponseCode !in (200)") == 9
    assert count("where TotalTime between (80 .. 120)") == 7
    assert count("where TotalTime !between (10 .. 1000)") == 4
    assert times("where TimeGenerated between (datetime(2026-11-23T10:00:00Z) .. 30m)") == [
        "10:00",
        "10:05",
        "10:15",
        "10:30",
    ]
    assert times("where TimeGenerated between (datetime(2026-11-23 10:30) .. datetime(2026-11-23 10:55))") == [
        "10:30",
        "10:40",
        "10:55",
    ]


# ---------------------------------------------------------------------------------------------- time


def test_ago_is_relative_to_the_twin_clock() -> None:
    assert count("where TimeGenerated > ago(1h)") == 9
    assert count("where TimeGenerated >= ago(1h)") == 10
    moved = q(f"{LOGS} | where TimeGenerated > ago(1h) | count", now=NOW - timedelta(hours=1))
    assert moved.rows == ((15,),)
    assert q(f"{LOGS} | project n = now(), later = now(1d) | take 1").rows == ((NOW, NOW + timedelta(days=1)),)


def test_timespan_prefilters_the_source_start_inclusive_end_exclusive() -> None:
    result = q(
        f"{LOGS} | summarize n = count(), first = min(TimeGenerated), last = max(TimeGenerated)",
        timespan=(at("10:00"), at("11:00")),
    )
    assert result.rows == ((6, at("10:00"), at("10:55")),)
    narrowed = q(f"{LOGS} | where TimeGenerated > ago(90m) | count", timespan=(at("10:00"), at("11:00")))
    assert narrowed.rows == ((2,),)  # 10:40 and 10:55


def test_timespan_needs_the_time_column() -> None:
    table = Table((Column("Name", "string"),), ({"Name": "x"},))
    with pytest.raises(KqlError, match="TimeGenerated"):
        run_query("Names", {"Names": table}, now=NOW, timespan=(at("10:00"), at("11:00")))
    assert run_query("Names", {"Names": table}, now=NOW).rows == (("x",),)


def test_datetime_and_timespan_literals_and_arithmetic() -> None:
    result = q(
        f"{LOGS} | take 1 | project a = 1d, b = 2h, c = 30m, d = 10s, e = 100ms, f = timespan(1d), g = 1.5h,"
        " h = timespan(01:30:00), i = datetime(2026-11-23T12:00:00Z) - datetime(2026-11-23T10:30:00Z),"
        " j = 1h / 30m, k = 2 * 1h, l = TimeGenerated + 55m, m = -1d"
    )
    assert result.rows == (
        (
            timedelta(days=1),
            timedelta(hours=2),
            timedelta(minutes=30),
            timedelta(seconds=10),
            timedelta(milliseconds=100),
            timedelta(days=1),
            timedelta(minutes=90),
            timedelta(minutes=90),
            timedelta(minutes=90),
            2.0,
            timedelta(hours=2),
            at("10:00"),
            timedelta(days=-1),
        ),
    )


def test_startofday_and_bin_on_datetime() -> None:
    assert values(f"{LOGS} | project d = startofday(TimeGenerated) | distinct d") == [at("00:00")]
    assert values(f"{LOGS} | where TotalTime == 70 | project bin(TimeGenerated, 1d)") == [at("00:00")]
    assert values(f"{LOGS} | where TotalTime == 70 | project bin(TimeGenerated, 15m)") == [at("10:00")]


# ---------------------------------------------------------------------------------------------- summarize


def test_summarize_count_by_hour_bin() -> None:
    result = q(f"{LOGS} | summarize count() by bin(TimeGenerated, 1h)")
    assert result.columns == (Column("TimeGenerated", "datetime"), Column("count_", "long"))
    assert result.rows == ((at("09:00"), 4), (at("10:00"), 6), (at("11:00"), 10))


def test_summarize_aggregations_without_by() -> None:
    result = q(
        f"{LOGS} | summarize n = count(), errors = countif(ResponseCode >= 500), ips = dcount(CallerIpAddress),"
        " worst = max(TotalTime), best = min(TotalTime), mean = avg(TotalTime), total = sum(TotalTime),"
        " codes = dcount(ResponseCode)"
    )
    assert result.rows == ((20, 3, 7, 1500, 3, pytest.approx(4160 / 19), 4160, 8),)


def test_summarize_default_names() -> None:
    result = q(f"{LOGS} | summarize count(), dcount(CallerIpAddress), avg(TotalTime), make_set(ApiId), countif(true)")
    assert [c.name for c in result.columns] == [
        "count_",
        "dcount_CallerIpAddress",
        "avg_TotalTime",
        "set_ApiId",
        "countif_",
    ]
    assert result.rows == ((20, 7, pytest.approx(4160 / 19), ["orders", "payments", "users"], 20),)


def test_summarize_by_column_with_make_set() -> None:
    result = q(
        f"{LOGS} | summarize calls = count(), apis = make_set(ApiId) by ApimSubscriptionId"
        " | order by ApimSubscriptionId asc"
    )
    assert result.rows == (
        ("", 1, ["users"]),
        ("SUB-A", 1, ["orders"]),
        ("sub-a", 8, ["orders", "payments", "users"]),
        ("sub-b", 5, ["orders", "payments", "users"]),
        ("sub-c", 4, ["orders", "users"]),
        ("sub-d", 1, ["orders"]),
    )


def test_summarize_by_expression_keeps_a_null_group() -> None:
    result = q(f"{LOGS} | summarize n = count() by Class = ResponseCode / 100")
    assert result.columns == (Column("Class", "long"), Column("n", "long"))
    assert result.rows == ((2, 12), (4, 4), (5, 3), (None, 1))


def test_summarize_numeric_bin() -> None:
    result = q(f"{LOGS} | summarize n = count() by bucket = bin(TotalTime, 100) | order by bucket asc")
    assert result.rows == ((None, 1), (0, 12), (100, 4), (700, 1), (900, 1), (1500, 1))


def test_summarize_over_no_rows() -> None:
    empty = f"{LOGS} | where ResponseCode == 999 | summarize count(), sum(TotalTime), max(TotalTime), make_set(ApiId)"
    assert q(empty).rows == ((0, 0, None, []),)
    assert q(f"{LOGS} | where ResponseCode == 999 | summarize count() by ApiId").rows == ()


def test_make_set_size_limit_and_dcount_ignore_nulls() -> None:
    assert values(f"{LOGS} | summarize make_set(ResponseCode, 3)") == [[200, 404, 500]]
    assert values(f"{LOGS} | where isnull(TotalTime) | summarize dcount(TotalTime)") == [0]


# ---------------------------------------------------------------------------------------------- project, extend


def test_project_with_renames_and_expressions() -> None:
    result = q(f"{LOGS} | project ApiId, Code = ResponseCode, Slow = TotalTime > 500, tolower(ApimSubscriptionId)")
    assert result.columns == (
        Column("ApiId", "string"),
        Column("Code", "int"),
        Column("Slow", "bool"),
        Column("Column1", "string"),
    )
    assert result.rows[:4] == (
        ("orders", 200, False, "sub-a"),
        ("orders", 200, False, "sub-a"),
        ("orders", 404, False, "sub-b"),
        ("payments", 500, True, "sub-b"),
    )
    assert result.rows[5] == ("orders", 200, False, "sub-a")


def test_project_away() -> None:
    result = q(f"{LOGS} | project-away Url, CallerIpAddress, TimeGenerated | take 1")
    assert [c.name for c in result.columns] == [
        "ApimSubscriptionId",
        "ResponseCode",
        "TotalTime",
        "IsRequestSuccess",
        "ApiId",
    ]
    assert result.rows == (("sub-a", 200, 120, True, "orders"),)


def test_extend_sees_earlier_items_and_replaces_in_place() -> None:
    slow = q(
        f"{LOGS} | extend Seconds = todouble(TotalTime) / 1000, Slow = Seconds > 0.5 | where Slow"
        " | project TotalTime, Seconds"
    )
    assert slow.rows == ((900, 0.9), (1500, 1.5), (700, 0.7))
    replaced = q(f"{LOGS} | extend ResponseCode = tostring(ResponseCode) | take 1")
    assert replaced.columns[2] == Column("ResponseCode", "string")
    assert replaced.rows[0][2] == "200"


def test_scalar_functions() -> None:
    result = q(
        f"{LOGS} | where ResponseCode == 404 | project a = tolower('AbC'), b = toupper(ApiId), c = strlen(Url),"
        " d = tostring(ResponseCode), e = toint('42'), f = tolong('x'), g = todouble('1.5'),"
        " h = iff(IsRequestSuccess, 'ok', 'fail'), i = coalesce(ApimSubscriptionId, 'anon'), j = isempty(''),"
        " k = isnotempty(ApiId), l = tostring(TimeGenerated), m = tostring(90m), n = tostring(IsRequestSuccess)"
    )
    assert [c.type for c in result.columns] == [
        *("string", "string", "long", "string", "int", "long", "real", "string", "string", "bool", "bool"),
        *("string", "string", "string"),
    ]
    assert result.rows == (
        (
            *("abc", "ORDERS", 15, "404", 42, None, 1.5, "fail", "sub-b", True, True),
            *("2026-11-23T09:20:00Z", "01:30:00", "false"),
        ),
    )


def test_coalesce_skips_empty_strings_and_nulls() -> None:
    assert values(f"{LOGS} | where ResponseCode == 401 | project coalesce(ApimSubscriptionId, 'anon')") == ["anon"]
    assert values(f"{LOGS} | where isnull(ResponseCode) | project coalesce(ResponseCode, TotalTime, -1)") == [-1]
    assert values(f"{LOGS} | where isnull(ResponseCode) | project iff(ResponseCode > 0, 'yes', 'no')") == ["no"]


def test_integer_arithmetic_follows_kql() -> None:
    result = q(f"{LOGS} | take 1 | project a = 7 / 2, b = -7 / 2, c = 7 % 3, d = 2.5 * 2, e = 1 / 0, f = 1 + 2 * 3")
    assert result.rows == ((3, -3, 1, 5.0, None, 7),)
    assert [c.type for c in result.columns] == ["long", "long", "long", "real", "long", "long"]


def test_let_statements_and_comments() -> None:
    query = f"""
        // errors in the last two hours
        let threshold = 500;
        let window = 2h;  // relative to now
        {LOGS}
        | where ResponseCode >= threshold and TimeGenerated > ago(window)
        | project TotalTime;
    """
    assert q(query).rows == ((1500,), (700,))


# ---------------------------------------------------------------------------------------------- order, take, top


def test_order_by_default_is_descending_with_nulls_last() -> None:
    ordered = values(f"{LOGS} | order by TotalTime | project TotalTime")
    assert ordered[:3] == [1500, 900, 700]
    assert ordered[-1] is None
    assert values(f"{LOGS} | sort by TotalTime desc | take 2 | project TotalTime") == [1500, 900]


def test_order_ascending_puts_nulls_first_unless_told() -> None:
    assert values(f"{LOGS} | order by TotalTime asc | take 2 | project TotalTime") == [None, 3]
    assert values(f"{LOGS} | order by TotalTime asc nulls last | take 2 | project TotalTime") == [3, 5]
    assert values(f"{LOGS} | order by TotalTime desc nulls first | take 2 | project TotalTime") == [None, 1500]


def test_order_by_several_keys() -> None:
    result = q(f"{LOGS} | order by ApiId asc, TotalTime desc | project ApiId, TotalTime | take 4")
    assert result.rows == (("orders", 130), ("orders", 120), ("orders", 100), ("orders", 95))


def test_take_limit_and_top() -> None:
    assert times("take 2") == ["09:05", "09:10"]
    assert times("limit 3") == ["09:05", "09:10", "09:20"]
    assert values(f"{LOGS} | top 3 by TotalTime | project TotalTime") == [1500, 900, 700]
    assert times("top 2 by TimeGenerated asc") == ["09:05", "09:10"]
    assert values(f"{LOGS} | top 1 by strlen(Url) | project Url") == ["/api/orders/8?expand=items"]


def test_distinct_and_count() -> None:
    assert values(f"{LOGS} | distinct ApiId") == ["orders", "payments", "users"]
    result = q(f"{LOGS} | distinct ApiId, IsRequestSuccess")
    assert result.columns == (Column("ApiId", "string"), Column("IsRequestSuccess", "bool"))
    assert result.rows == (
        ("orders", True),
        ("orders", False),
        ("payments", False),
        ("payments", True),
        ("users", True),
        ("users", False),
    )
    assert count("where ApiId == 'payments'") == 4
    assert q(f"{LOGS} | distinct *").rows == q(LOGS).rows  # every row is already distinct


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("query", "named"),
    [
        (f"{LOGS} | join (Other) on ApiId", "unsupported KQL operator 'join'"),
        (f"union {LOGS}, Other", "unsupported KQL operator 'union'"),
        (f"{LOGS} | union Other", "unsupported KQL operator 'union'"),
        (f"{LOGS} | parse Url with * '/api/' rest", "unsupported KQL operator 'parse'"),
        (f"{LOGS} | mv-expand Url", "unsupported KQL operator 'mv-expand'"),
        (f"{LOGS} | render timechart", "unsupported KQL operator 'render'"),
        (f"{LOGS} | make-series count() on TimeGenerated step 1h", "unsupported KQL operator 'make-series'"),
        (f"{LOGS} | project-rename Api = ApiId", "unsupported KQL operator 'project-rename'"),
        (f"{LOGS} | lookup Other on ApiId", "unsupported KQL operator 'lookup'"),
        (f"{LOGS} | evaluate bag_unpack(x)", "unsupported KQL operator 'evaluate'"),
        (f"{LOGS} | extend x = extract('a(b)', 1, Url)", "unsupported KQL function 'extract'"),
        (f"{LOGS} | where Url matches regex 'orders/[0-9]+'", "unsupported KQL operator 'matches regex'"),
        (f"{LOGS} | where Url has_any ('a', 'b')", "unsupported KQL operator 'has_any'"),
        (f"{LOGS} | extend x = strcat(ApiId, Url)", "unsupported KQL function 'strcat'"),
        (f"{LOGS} | summarize arg_max(TimeGenerated, *) by ApiId", "unsupported KQL function 'arg_max'"),
        (f"{LOGS} | summarize percentile(TotalTime, 95)", "unsupported KQL function 'percentile'"),
        (f"let t = materialize({LOGS}); t", "unsupported KQL function 'materialize'"),
        (f"let t = {LOGS} | where ResponseCode > 400; t", "unsupported tabular let"),
        (f"let t = {LOGS}; t", "unsupported tabular let"),
        ("let f = (x: long) { x + 1 }; f(1)", "unsupported tabular let or function definition"),
        (f"{LOGS} | extend h = parse_json(Url).host", "unsupported KQL function 'parse_json'"),
        (f"{LOGS} | extend h = Url.host", "unsupported dynamic property access"),
        (f"{LOGS} | where ApiId in ({LOGS} | project ApiId)", "unsupported tabular subquery"),
        ("print 1", "unsupported KQL operator 'print'"),
        ("datatable(x: long) [1]", "unsupported KQL operator 'datatable'"),
    ],
)
def test_unsupported_constructs_are_named(query: str, named: str) -> None:
    with pytest.raises(KqlError, match=re.escape(named)):
        q(query)


def test_error_message_gives_the_position() -> None:
    with pytest.raises(KqlError, match=r"^unsupported KQL operator 'join' at position 27$"):
        q(f"{LOGS} | join (Other) on ApiId")


def test_kql_error_is_a_value_error() -> None:
    assert issubclass(KqlError, ValueError)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("Requests | take 1", "unknown table 'Requests'"),
        (f"{LOGS} | where Status == 200", "unknown column 'Status'"),
        (f"{LOGS} | project ApiId, Region", "unknown column 'Region'"),
        (f"{LOGS} | project-away Region", "unknown column 'Region'"),
        (f"{LOGS} | order by Region", "unknown column 'Region'"),
        (f"{LOGS} | distinct Region", "unknown column 'Region'"),
        (f"{LOGS} | project ApiId | where Url has 'x'", "unknown column 'Url'"),
        (f"{LOGS} | where ResponseCode == '200'", "cannot compare int with string"),
        (f"{LOGS} | where ResponseCode contains '20'", "operator 'contains' needs string operands, got int"),
        (f"{LOGS} | where TotalTime", "where needs a bool predicate, got long"),
        (f"{LOGS} | where ApiId + 1 > 2", "operator '+' is not defined for string and long"),
        (f"{LOGS} | where count() > 1", "aggregation 'count()' is only allowed in summarize"),
        (f"{LOGS} | summarize tolower(ApiId)", "summarize needs one aggregation call per column"),
        (f"{LOGS} | where ago(1w) < TimeGenerated", "invalid timespan literal '1w'"),
        (f"{LOGS} | where Url == 'open", "unterminated string literal"),
        (f"{LOGS} | where", "expected an expression but found end of query"),
        (f"{LOGS} | take -1", "take count must be a non-negative integer constant"),
        (f"{LOGS} | take 1 extra", "expected '|' or end of query but found 'extra'"),
        (f"{LOGS}; {LOGS}", "only one tabular expression statement is supported"),
        (f"{LOGS} | project a = 1, a = 2", "duplicate column name 'a'"),
        (f"{LOGS} | where tolower(ResponseCode) == 'x'", "tolower() needs a string, got int"),
        (f"{LOGS} | where isnull()", "isnull() takes 1 argument(s), got 0"),
        (f"{LOGS} | where datetime(yesterday) < TimeGenerated", "invalid datetime literal 'yesterday'"),
        ("let x = 1", "expected ';' but found end of query"),
    ],
)
def test_invalid_queries_say_what_is_wrong(query: str, message: str) -> None:
    with pytest.raises(KqlError, match=re.escape(message)):
        q(query)


def test_clock_and_seed_values_are_checked() -> None:
    with pytest.raises(KqlError, match="now must be timezone-aware"):
        run_query(LOGS, {LOGS: gateway_logs()}, now=datetime(2026, 11, 23, 12, 0))
    bad = Table((Column("Code", "int"),), ({"Code": "200"},))
    with pytest.raises(KqlError, match=r"table 'Bad' column 'Code' is int but holds str"):
        run_query("Bad", {"Bad": bad}, now=NOW)
    odd = Table((Column("X", "decimal"),), ())
    with pytest.raises(KqlError, match="unsupported type 'decimal'"):
        run_query("Odd", {"Odd": odd}, now=NOW)


def test_indexof_and_substring_cut_the_query_string_off_a_url() -> None:
    """What the BOLA signal (THR-004) needs: the path of a URL without its query string."""
    result = q(
        f"{LOGS} | where ApiId == 'orders' and CallerIpAddress == '10.0.0.5'"
        " | extend at = indexof(Url, '?') | project at, path = iff(at < 0, Url, substring(Url, 0, at)),"
        " tail = substring(Url, 8), none = substring(Url, 100, 3), two = substring(Url, 1, 2)"
    )
    assert [c.type for c in result.columns] == ["long", "string", "string", "string", "string"]
    assert result.rows == (
        (-1, "/api/orders/4", "ers/4", "", "ap"),
        (-1, "/api/orders/5", "ers/5", "", "ap"),
        (13, "/api/orders/8", "ers/8?expand=items", "", "ap"),
    )


def test_indexof_is_case_sensitive_and_needs_strings() -> None:
    assert values(f"{LOGS} | where Url == '/api/Orders/3' | project indexof(Url, 'orders')") == [-1]
    with pytest.raises(KqlError, match=r"indexof\(\) needs a string"):
        q(f"{LOGS} | project indexof(ResponseCode, '2')")
    with pytest.raises(KqlError, match=r"substring\(\) needs a whole-number start"):
        q(f"{LOGS} | project substring(Url, '2')")
