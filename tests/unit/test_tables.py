"""Every Table store checks its table name the same way and names itself in the error."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import PermanentError
from shared.findings_store import FindingsStore
from shared.journal import Journal
from shared.message_ledger import MessageLedger
from shared.operations import OperationsStore


@pytest.mark.parametrize(
    ("store", "kind"),
    [(Journal, "journal"), (FindingsStore, "findings"), (MessageLedger, "message"), (OperationsStore, "operations")],
)
def test_a_bad_table_name_is_refused_naming_the_store(store: Any, kind: str) -> None:
    for bad in ("1abc", "ab", "has-dash", "x" * 64):
        with pytest.raises(PermanentError, match=rf"^{kind} table name "):
            store(object(), bad)
    assert store(object(), "fine123").table_name == "fine123"
