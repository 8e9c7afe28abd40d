"""Resource Graph pages (pure): a result cut off without a way to page on is an error."""

from __future__ import annotations

import pytest
from azure.mgmt.resourcegraph.models import QueryResponse

from shared.errors import PermanentError
from shared.inventory import graph_page

ROW = {"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a"}


def test_a_truncated_result_without_a_skip_token_is_refused() -> None:
    response = QueryResponse(total_records=1200, count=1, result_truncated="true", data=[ROW])
    with pytest.raises(PermanentError, match=r"cut the result off after 1 of 1200 row\(s\)"):
        graph_page(response)


def test_pages_with_a_token_or_complete_pass() -> None:
    more = QueryResponse(total_records=2, count=1, result_truncated="false", data=[ROW], skip_token="next")
    assert graph_page(more) == ([ROW], "next")
    last = QueryResponse(total_records=1, count=1, result_truncated="false", data=[ROW])
    assert graph_page(last) == ([ROW], None)


def test_table_format_is_refused() -> None:
    table = QueryResponse(total_records=0, count=0, result_truncated="false", data={"columns": [], "rows": []})
    with pytest.raises(PermanentError, match="table format"):
        graph_page(table)
