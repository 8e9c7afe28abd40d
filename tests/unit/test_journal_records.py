"""The journal's pure parts: storage keys, row order, size limits, the secret guard, and how
storage failures become product errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ServiceRequestError,
    ServiceResponseError,
)

from shared.errors import PermanentError, TransientError
from shared.journal import (
    MAX_STRING_BYTES,
    fit,
    instance_key,
    refuse_secrets,
    row_key_for,
    scrub,
    storage_error,
)
from shared.locks import InstanceBusy, InstanceLocks

APIM = (
    "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-apim-prod"
    "/providers/Microsoft.ApiManagement/service/apim-prod"
)


def test_instance_key_is_stable_case_insensitive_and_table_safe() -> None:
    key = instance_key(APIM)
    assert key == instance_key(APIM.upper()) == instance_key(APIM + "/")
    assert not re.search(r"[/\\#?\x00-\x1f\x7f-\x9f]", key)
    assert key.startswith("subscriptions_00000000-0000-0000-0000-000000000001_resourcegroups_rg-apim-prod_")
    assert re.fullmatch(r".+~[0-9a-f]{16}", key)


def test_instance_keys_of_ids_that_read_alike_differ() -> None:
    # Both make "..._rg_a_b..." readable parts; the hash tells them apart.
    assert instance_key("/subscriptions/s/resourceGroups/rg#a/b") != instance_key(
        "/subscriptions/s/resourceGroups/rg?a/b"
    )
    long_a, long_b = "/x/" + "a" * 300 + "1", "/x/" + "a" * 300 + "2"
    assert len(instance_key(long_a)) <= 217
    assert instance_key(long_a) != instance_key(long_b)


def test_instance_key_refuses_an_empty_id() -> None:
    with pytest.raises(PermanentError, match="instance id is required"):
        instance_key(" / ")


def test_row_keys_sort_newest_first() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    keys = [row_key_for(start + timedelta(microseconds=n)) for n in (0, 1, 1_000_000, 86_400_000_000)]
    assert sorted(keys) == list(reversed(keys))
    assert all(re.fullmatch(r"\d{19}-[0-9a-f]{32}", k) for k in keys)


def test_fit_keeps_small_text_and_cuts_large_text_with_a_marker() -> None:
    assert fit("short") == "short"
    exactly = "x" * (MAX_STRING_BYTES // 2)
    assert fit(exactly) == exactly
    text = "y" * 100_000
    cut = fit(text)
    assert len(cut.encode("utf-16-le")) <= MAX_STRING_BYTES
    kept = cut.index("\n…[truncated")
    assert cut[:kept] == text[:kept]
    assert cut.endswith(f"[truncated by apim-remediator: {kept} of 100000 characters kept]")


def test_fit_measures_utf16_and_never_splits_a_surrogate_pair() -> None:
    text = "😀" * 20_000  # 4 bytes each in UTF-16: 80,000 bytes
    cut = fit(text)
    assert len(cut.encode("utf-16-le")) <= MAX_STRING_BYTES
    body = cut.split("\n…[truncated")[0]
    assert set(body) == {"😀"}


@pytest.mark.parametrize(
    "document",
    [
        {"primaryKey": "abc123"},
        {"properties": {"SecondaryKey": "abc123"}},
        {"accessKey": "k"},
        {"items": [{"connectionString": "Endpoint=sb://x/"}]},
        {"PASSWORD": "hunter2"},
        {"clientSecret": "s"},
        {"properties": {"displayName": "backend-key", "value": "s3cr3t", "secret": True}},
        {"note": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFy;EndpointSuffix=x"},
        {"url": "https://a.blob.core.windows.net/c?sv=2024&sig=abcdef%3D"},
    ],
)
def test_secret_guard_refuses_unredacted_values(document: object) -> None:
    with pytest.raises(PermanentError, match="looks like it carries secret values at \\$") as caught:
        refuse_secrets(json.dumps(document), "before")
    # The error names where, never what.
    for secret in ("abc123", "hunter2", "s3cr3t", "Zm9vYmFy", "abcdef"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize(
    "document",
    [
        {"primaryKey": "***", "secondaryKey": None, "password": ""},
        {"clientSecret": "<redacted>", "accessKey": "[REDACTED]"},
        {"properties": {"displayName": "backend-key", "value": "***", "secret": True}},
        # A `value` that is not a named value's (e.g. a header's value) is not a secret key.
        {"headers": [{"name": "x-env", "value": "prod"}]},
        {
            "properties": {
                "customProperties": {"Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10": "False"}
            }
        },
    ],
)
def test_secret_guard_accepts_redacted_or_harmless_documents(document: object) -> None:
    refuse_secrets(json.dumps(document), "after")


def test_secret_guard_requires_json() -> None:
    refuse_secrets(None, "before")
    with pytest.raises(PermanentError, match="must be JSON"):
        refuse_secrets("primaryKey=abc", "before")


def test_scrub_redacts_credentials_in_free_text() -> None:
    text = 'failed: AccountKey=Zm9v;x "primaryKey": "abc123" https://h/c?sig=xyz&se=1'
    cleaned = scrub(text)
    assert "Zm9v" not in cleaned
    assert "abc123" not in cleaned
    assert "xyz" not in cleaned
    assert "AccountKey=***" in cleaned
    assert '"primaryKey": "***"' in cleaned


def _http_error(status: int, code: str | None = None, cls: type[HttpResponseError] = HttpResponseError) -> Exception:
    error = cls(message=f"status {status} sig=SECRET")
    error.status_code = status
    error.error_code = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_transient_storage_statuses(status: int) -> None:
    error = storage_error(_http_error(status, "ServerBusy"), what="journal table 'j'", operation="record intent")  # type: ignore[arg-type]
    assert isinstance(error, TransientError)
    assert str(error) == f"record intent on journal table 'j' failed: HTTP {status} ServerBusy"


@pytest.mark.parametrize("status", [400, 403, 404, 409, 412])
def test_permanent_storage_statuses(status: int) -> None:
    error = storage_error(_http_error(status, "X", ResourceModifiedError), what="t", operation="op")  # type: ignore[arg-type]
    assert isinstance(error, PermanentError)
    assert "SECRET" not in str(error)


def test_network_errors_are_transient_and_token_failures_permanent() -> None:
    assert isinstance(storage_error(ServiceRequestError("sig=SECRET"), what="t", operation="op"), TransientError)
    assert isinstance(storage_error(ServiceResponseError("reset"), what="t", operation="op"), TransientError)
    token = storage_error(ClientAuthenticationError("no token"), what="t", operation="op")
    assert isinstance(token, PermanentError)
    assert not isinstance(token, TransientError)
    assert "SECRET" not in str(storage_error(ServiceRequestError("sig=SECRET"), what="t", operation="op"))


def test_instance_busy_is_transient_and_names_the_instance() -> None:
    busy = InstanceBusy(APIM, 10.0)
    assert isinstance(busy, TransientError)
    assert APIM in str(busy)
    assert "10.0s" in str(busy)


@pytest.mark.parametrize(("duration", "interval"), [(14, None), (61, None), (15, 13.5), (30, 0)])
def test_lease_bounds_are_checked(duration: int, interval: float | None) -> None:
    from azure.storage.blob.aio import BlobServiceClient

    with pytest.raises(PermanentError, match="lease"):
        InstanceLocks(BlobServiceClient("https://a.blob.core.windows.net"), duration=duration, renew_interval=interval)
