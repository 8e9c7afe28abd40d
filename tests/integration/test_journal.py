"""The intent journal against Azurite, through the product's client factory and identity."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.journal import (
    MAX_STRING_BYTES,
    Journal,
    JournalConflict,
    JournalEntry,
    Phase,
    Trigger,
    TriggerKind,
    instance_key,
)
from shared.settings import load_settings
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SERVICE = "/subscriptions/{sub}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/{name}"
CUSTOM_PROPERTIES = {"Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10": "True"}


@pytest_asyncio.fixture(loop_scope="function")
async def factory(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ClientFactory]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built = ClientFactory(load_settings(twin.env))
    yield built
    await built.aclose()
    built.close()


@pytest.fixture
def journal(factory: ClientFactory) -> Journal:
    # A table per test: Azurite outlives the twin's per-test reset.
    return Journal(factory.table_service_async(), f"journal{uuid.uuid4().hex[:12]}")


@pytest.fixture
def instance(twin: TwinHandle) -> str:
    return SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:8]}")


async def intent(journal: Journal, instance: str, rule_id: str = "TLS-001", **changes: object) -> JournalEntry:
    fields: dict[str, object] = {
        "correlation_id": f"corr-{uuid.uuid4().hex[:8]}",
        "rule_id": rule_id,
        "resource_id": instance,
        "action": "PATCH service customProperties",
        "trigger": Trigger(TriggerKind.EVENT, "eventgrid:3f1c2d4e"),
        "before": json.dumps({"customProperties": CUSTOM_PROPERTIES}),
        "after": json.dumps({"customProperties": dict.fromkeys(CUSTOM_PROPERTIES, "False")}),
        "etag_before": '"AAAAAAAB"',
        **changes,
    }
    return await journal.record_intent(instance, **fields)  # type: ignore[arg-type]


async def test_intent_and_outcomes_round_trip(journal: Journal, instance: str) -> None:
    entry = await intent(journal, instance)
    assert entry.phase is Phase.INTENT
    assert entry.error is None
    assert entry.etag
    assert entry.started_at == entry.updated_at
    assert await journal.get(instance, entry.row_key) == entry
    assert await journal.history(instance) == [entry]

    applied = await journal.record_outcome(entry, Phase.APPLIED)
    assert applied.phase is Phase.APPLIED
    assert applied.etag != entry.etag
    assert applied.updated_at > entry.updated_at
    assert applied.started_at == entry.started_at
    observed = json.dumps({"customProperties": dict.fromkeys(CUSTOM_PROPERTIES, "False"), "etag": '"AAAAAAAC"'})
    verified = await journal.record_outcome(applied, Phase.VERIFIED, after=observed)
    stored = await journal.get(instance, entry.row_key)
    assert stored == verified
    assert stored.after == observed
    assert stored.before == entry.before
    assert stored.etag_before == '"AAAAAAAB"'
    assert stored.trigger == Trigger(TriggerKind.EVENT, "eventgrid:3f1c2d4e")


async def test_a_finished_entry_takes_no_further_outcome(journal: Journal, instance: str) -> None:
    entry = await journal.record_outcome(await intent(journal, instance), Phase.FAILED, error="412 twice")
    with pytest.raises(PermanentError, match="is failed: cannot record verified"):
        await journal.record_outcome(entry, Phase.VERIFIED)
    with pytest.raises(PermanentError, match="cannot record intent"):
        await journal.record_outcome(await intent(journal, instance), Phase.INTENT)


async def test_unfinished_lists_what_a_crashed_worker_left(journal: Journal, instance: str, twin: TwinHandle) -> None:
    crashed_before_write = await intent(journal, instance, "TLS-001")
    done = await intent(journal, instance, "TLS-002")
    await journal.record_outcome(await journal.record_outcome(done, Phase.APPLIED), Phase.VERIFIED)
    crashed_after_write = await journal.record_outcome(await intent(journal, instance, "MGMT-001"), Phase.APPLIED)
    failed = await intent(journal, instance, "NET-001")
    await journal.record_outcome(failed, Phase.FAILED, error="precondition: no private endpoint")
    abandoned = await intent(journal, instance, "API-001")
    await journal.record_outcome(abandoned, Phase.ABANDONED)
    # Another instance's open intent is not this one's business.
    await intent(journal, SERVICE.format(sub=twin.subscription_id, name="apim-other"))

    unfinished = await journal.unfinished(instance)
    assert [(e.rule_id, e.phase) for e in unfinished] == [("MGMT-001", Phase.APPLIED), ("TLS-001", Phase.INTENT)]
    assert unfinished == [crashed_after_write, crashed_before_write]
    # The next worker completes one and rolls back the other.
    await journal.record_outcome(unfinished[0], Phase.RECOVERED)
    await journal.record_outcome(unfinished[1], Phase.ABANDONED, error="re-plan found no drift")
    assert await journal.unfinished(instance) == []


async def test_history_reads_newest_first_within_one_partition(journal: Journal, instance: str) -> None:
    written = [await intent(journal, instance, f"RULE-{n}") for n in range(5)]
    assert [e.rule_id for e in await journal.history(instance)] == ["RULE-4", "RULE-3", "RULE-2", "RULE-1", "RULE-0"]
    assert await journal.history(instance, limit=2) == [written[4], written[3]]
    # ARM ids are case-insensitive: the same instance, the same partition.
    assert await journal.history(instance.upper(), limit=1) == [written[4]]
    assert all(e.partition_key == instance_key(instance) for e in written)
    with pytest.raises(PermanentError, match="at least 1"):
        await journal.history(instance, limit=0)


async def test_concurrent_outcomes_the_second_writer_gets_a_conflict(
    factory: ClientFactory, journal: Journal, instance: str
) -> None:
    entry = await intent(journal, instance)
    other_worker = Journal(factory.table_service_async(), journal.table_name)
    stale = await other_worker.get(instance, entry.row_key)
    await journal.record_outcome(entry, Phase.APPLIED)
    with pytest.raises(JournalConflict, match="changed by another writer since it was read") as caught:
        await other_worker.record_outcome(stale, Phase.ABANDONED)
    assert entry.row_key in str(caught.value)
    assert journal.table_name in str(caught.value)
    assert (await journal.get(instance, entry.row_key)).phase is Phase.APPLIED
    # Re-reading gives the current ETag; then the update goes through.
    fresh = await other_worker.get(instance, entry.row_key)
    assert (await other_worker.record_outcome(fresh, Phase.RECOVERED)).phase is Phase.RECOVERED


async def test_oversized_before_and_after_are_truncated_not_refused(journal: Journal, instance: str) -> None:
    big = json.dumps({"policy": "<policies>" + "<set-header/>" * 20_000 + "</policies>"})
    assert len(big.encode("utf-16-le")) > 4 * MAX_STRING_BYTES
    entry = await intent(journal, instance, before=big, after=big)
    stored = await journal.get(instance, entry.row_key)
    for text in (stored.before, stored.after):
        assert text is not None
        assert len(text.encode("utf-16-le")) <= MAX_STRING_BYTES
        kept = text.index("\n…[truncated by apim-remediator: ")
        assert text[:kept] == big[:kept]
        assert text.endswith(f"{kept} of {len(big)} characters kept]")
    huge_error = "backend said: " + "x" * 200_000
    failed = await journal.record_outcome(entry, Phase.FAILED, error=huge_error, after=big)
    assert (await journal.get(instance, entry.row_key)) == failed
    assert failed.error is not None
    assert len(failed.error.encode("utf-16-le")) <= MAX_STRING_BYTES


async def test_secrets_are_refused_before_anything_is_written(journal: Journal, instance: str) -> None:
    leaked = json.dumps({"properties": {"primaryKey": "4f1b2c3d4e5f", "state": "active"}})
    with pytest.raises(
        PermanentError, match=r"before looks like it carries secret values at \$\.properties\.primaryKey"
    ):
        await intent(journal, instance, before=leaked)
    named_value = json.dumps({"properties": {"displayName": "backend-key", "value": "s3cr3t", "secret": True}})
    with pytest.raises(PermanentError, match=r"after .* at \$\.properties\.value"):
        await intent(journal, instance, after=named_value)
    assert await journal.history(instance) == []

    redacted = json.dumps({"properties": {"primaryKey": "***", "state": "active"}})
    entry = await intent(journal, instance, before=redacted)
    with pytest.raises(PermanentError, match="after looks like"):
        await journal.record_outcome(entry, Phase.APPLIED, after=leaked)
    # Error text is scrubbed, not refused: the failure must still be recorded.
    failed = await journal.record_outcome(
        entry, Phase.FAILED, error="upload failed: DefaultEndpointsProtocol=https;AccountKey=Zm9vYmFy;x"
    )
    stored = await journal.get(instance, entry.row_key)
    assert stored == failed
    assert stored.error == "upload failed: DefaultEndpointsProtocol=https;AccountKey=***;x"


async def test_reading_a_missing_entry_is_a_permanent_error(journal: Journal, instance: str) -> None:
    await intent(journal, instance)
    with pytest.raises(PermanentError, match="does not exist"):
        await journal.get(instance, "0000000000000000000-missing")


def test_table_names_are_checked(factory: ClientFactory) -> None:
    with pytest.raises(PermanentError, match="3-63 letters and digits"):
        Journal(factory.table_service_async(), "remediation-journal")
