"""The plumbing every Table-storage store of the product shares: a checked table name, the
table created on first use (idempotent: two workers creating it at once both succeed), and
storage errors named after the store."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError, ClientAuthenticationError, ServiceRequestError, ServiceResponseError
from azure.data.tables.aio import TableClient
from azure.data.tables.aio import TableServiceClient as AsyncTableServiceClient

from shared.errors import PermanentError, RemediatorError, TransientError

_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
# Statuses worth retrying: timeouts, throttling, server-side failures.
_TRANSIENT_STATUSES = frozenset({408, 429})


def storage_error(exc: AzureError, *, what: str, operation: str) -> RemediatorError:
    """A product error for a storage failure: transient (throttling, 5xx, network) or
    permanent, naming `what` (e.g. "journal table 'x'") and the operation.

    Only the status and the service's error code are quoted: an SDK message or URL could
    carry a SAS token."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return TransientError(f"{operation} on {what} failed: network error ({type(exc).__name__})")
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None)
    detail = f"HTTP {status}" + (f" {code}" if code else "") if status else type(exc).__name__
    if isinstance(exc, ClientAuthenticationError) and status is None:
        return PermanentError(f"{operation} on {what} failed: could not get a token ({type(exc).__name__})")
    if isinstance(status, int) and (status in _TRANSIENT_STATUSES or status >= 500):
        return TransientError(f"{operation} on {what} failed: {detail}")
    return PermanentError(f"{operation} on {what} failed: {detail}")


class TableStore:
    """Base of the journal, findings, message and operations stores."""

    kind = "table"  # what the store is called in errors: "journal table 'x'"

    def __init__(self, tables: AsyncTableServiceClient, table_name: str) -> None:
        if not _TABLE_NAME.match(table_name):
            raise PermanentError(
                f"{self.kind} table name {table_name!r} must be 3-63 letters and digits, starting with a letter"
            )
        self._tables = tables
        self.table_name = table_name
        self._table: TableClient | None = None

    @property
    def _what(self) -> str:
        return f"{self.kind} table {self.table_name!r}"

    async def _client(self) -> TableClient:
        if self._table is None:
            try:
                self._table = await self._tables.create_table_if_not_exists(self.table_name)
            except AzureError as exc:
                raise storage_error(exc, what=self._what, operation="create table") from exc
        return self._table


def utc_of(value: Any) -> datetime:
    """A Table property read back as a UTC datetime (the SDK returns aware or naive datetimes,
    or ISO text for a value written as a string)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).astimezone(UTC)
