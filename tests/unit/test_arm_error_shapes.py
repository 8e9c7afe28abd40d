"""The product reads both error shapes Azure answers (issue 10, item 3): ARM's
`{"error": {code, message}}` and Microsoft.Insights' flat `{code, message}`
(diagnosticsSettings_API.json, 2021-05-01-preview, ErrorResponse)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.actions.executor import ArmResponse, _error_text
from shared.errors import error_code_and_message

ARM = {"error": {"code": "ResourceGroupNotFound", "message": "Resource group 'rg' could not be found."}}
INSIGHTS = {
    "code": "BadRequest",
    "message": "Diagnostic setting does not support mix of log category and log category group.",
}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (ARM, ("ResourceGroupNotFound", "Resource group 'rg' could not be found.")),
        (INSIGHTS, ("BadRequest", INSIGHTS["message"])),
        ({"error": "text"}, ("", "")),
        ({}, ("", "")),
        (None, ("", "")),
        ("not json", ("", "")),
        ({"code": 5, "message": None}, ("", "")),
    ],
)
def test_error_code_and_message_reads_both_shapes(body: Any, expected: tuple[str, str]) -> None:
    assert error_code_and_message(body) == expected


def test_the_executor_names_an_insights_error() -> None:
    text = _error_text(ArmResponse(status=409, etag=None, body={"code": "Conflict", "message": "Data sink reused"}))
    assert text == "409 Conflict: Data sink reused"
    assert _error_text(ArmResponse(status=404, etag=None, body=ARM)).startswith("404 ResourceGroupNotFound: ")
