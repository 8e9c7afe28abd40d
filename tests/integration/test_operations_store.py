"""The operations store against Azurite: an operation starts running, ends succeeded with
its result (split over several properties when large) or failed with its error, and an
unknown or malformed id is NotFoundError."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.azure import ClientFactory
from shared.errors import NotFoundError
from shared.operations import CHUNK_CHARS, OperationKind, OperationsStore, OperationStatus
from shared.settings import load_settings
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

INSTANCE = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/apim"


@pytest_asyncio.fixture(loop_scope="function")
async def store(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OperationsStore]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    factory = ClientFactory(load_settings(twin.env))
    yield OperationsStore(factory.table_service_async(), f"ops{uuid.uuid4().hex[:12]}")
    await factory.aclose()
    factory.close()


async def test_an_operation_runs_then_succeeds_with_its_result(store: OperationsStore) -> None:
    started = await store.start(OperationKind.APPLY, INSTANCE, caller_oid="oid-1", caller_appid="app-1")
    assert started.status is OperationStatus.RUNNING
    read = await store.get(started.id)
    assert (read.status, read.kind, read.instance_id, read.result) == (
        OperationStatus.RUNNING,
        OperationKind.APPLY,
        INSTANCE,
        None,
    )
    # Larger than one Table string property holds: split and joined again.
    result = {"results": [{"rule": "TLS-001", "summary": "x" * (CHUNK_CHARS + 10)}], "writes": 1}
    done = await store.succeed(started.id, result)
    assert done.status is OperationStatus.SUCCEEDED
    assert (await store.get(started.id)).result == result
    assert done.public()["caller"] == {"oid": "oid-1", "appid": "app-1"}


async def test_a_failed_operation_keeps_its_error(store: OperationsStore) -> None:
    started = await store.start(OperationKind.SCAN, INSTANCE, caller_oid="o", caller_appid="a")
    failed = await store.fail(started.id, "not an APIM instance in the configured scope")
    assert (failed.status, failed.error, failed.result) == (
        OperationStatus.FAILED,
        "not an APIM instance in the configured scope",
        None,
    )


async def test_unknown_and_malformed_ids_are_not_found(store: OperationsStore) -> None:
    with pytest.raises(NotFoundError):
        await store.get(str(uuid.uuid4()))
    with pytest.raises(NotFoundError):
        await store.get("PartitionKey eq 'x'")  # never reaches a query
