"""Inventory helpers (pure): Resource Graph pages (a result cut off without a way to page
on is an error) and how a request without an answer is described."""

from __future__ import annotations

import errno

import pytest
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.mgmt.resourcegraph.models import QueryResponse

from shared.errors import PermanentError
from shared.inventory import describe_failure, endpoint_of, graph_page, why_no_response

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


def test_endpoint_of_keeps_host_and_path_only() -> None:
    assert endpoint_of("https://user:p4ss@kv.example.net:8443/secrets/x?api-version=7.4&sig=abc#f") == (
        "kv.example.net:8443/secrets/x"
    )


def test_why_no_response_names_the_root_cause_without_its_message() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 443) ?sig=abc")
    wrapped = ServiceRequestError("Cannot connect to host ?sig=abc", error=refused)
    assert why_no_response(wrapped) == "ConnectionRefusedError: connection refused"
    assert describe_failure(wrapped, "https://h.example/p?sig=abc") == (
        "no response from h.example/p (ServiceRequestError: ConnectionRefusedError: connection refused)"
    )
    timeout = ServiceResponseError("timed out", error=TimeoutError())
    assert why_no_response(timeout) == "TimeoutError: timed out"
    odd = ServiceRequestError("https://h/?sig=abc", error=ValueError("https://h/?sig=abc"))
    assert why_no_response(odd) == "ValueError"
