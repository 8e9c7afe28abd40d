"""Per-instance leases against Azurite: one holder at a time, renewal, loss, expiry after kill -9."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from azure.storage.blob.aio import BlobLeaseClient

from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.journal import instance_key
from shared.locks import InstanceBusy, InstanceLocks
from shared.settings import load_settings
from tests.conftest import ROOT, TwinHandle

pytestmark = pytest.mark.integration

SERVICE = "/subscriptions/{sub}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/{name}"

HOLDER = """
import asyncio, sys
from shared.azure import ClientFactory
from shared.locks import InstanceLocks
from shared.settings import load_settings

async def main() -> None:
    factory = ClientFactory(load_settings())
    locks = InstanceLocks(factory.blob_service_async(), sys.argv[2], duration=15)
    async with locks.hold(sys.argv[1], wait=5):
        print("held", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest_asyncio.fixture(loop_scope="function")
async def factory(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ClientFactory]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built = ClientFactory(load_settings(twin.env))
    yield built
    await built.aclose()
    built.close()


@pytest.fixture
def container() -> str:
    # A container per test: Azurite outlives the twin's per-test reset.
    return f"locks-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def locks(factory: ClientFactory, container: str) -> InstanceLocks:
    return InstanceLocks(factory.blob_service_async(), container, duration=15)


@pytest.fixture
def instance(twin: TwinHandle) -> str:
    return SERVICE.format(sub=twin.subscription_id, name=f"apim-{uuid.uuid4().hex[:8]}")


async def lease_state(factory: ClientFactory, container: str, instance: str) -> str:
    blob = factory.blob_service_async().get_blob_client(container, instance_key(instance))
    properties = await blob.get_blob_properties()
    return str(properties.lease.state)


async def test_a_second_holder_waits_then_is_told_the_instance_is_busy(
    factory: ClientFactory, locks: InstanceLocks, container: str, instance: str
) -> None:
    async with locks.hold(instance) as lease:
        lease.assert_held()
        assert await lease_state(factory, container, instance) == "leased"
        started = time.monotonic()
        with pytest.raises(InstanceBusy) as caught:
            async with locks.hold(instance, wait=1.0):
                pytest.fail("two holders at once")
        assert 1.0 <= time.monotonic() - started < 4.0
        assert caught.value.instance_id == instance
        assert instance in str(caught.value)
        assert lease._client.id not in str(caught.value)
        # Other instances are not blocked.
        async with locks.hold(instance + "-other", wait=0):
            pass
    assert await lease_state(factory, container, instance) == "available"


async def test_release_lets_a_waiting_holder_in(locks: InstanceLocks, instance: str) -> None:
    first_done = asyncio.Event()

    async def first() -> None:
        async with locks.hold(instance):
            await asyncio.sleep(1.0)
        first_done.set()

    async def second() -> float:
        await asyncio.sleep(0.2)
        async with locks.hold(instance, wait=10.0) as lease:
            assert first_done.is_set()
            lease.assert_held()
            return time.monotonic()

    started = time.monotonic()
    _, got_it = await asyncio.gather(first(), second())
    assert 1.0 <= got_it - started < 5.0


async def test_the_lease_is_released_when_the_block_raises(
    factory: ClientFactory, locks: InstanceLocks, container: str, instance: str
) -> None:
    with pytest.raises(RuntimeError, match="apply failed"):
        async with locks.hold(instance):
            raise RuntimeError("apply failed")
    assert await lease_state(factory, container, instance) == "available"
    async with locks.hold(instance, wait=0) as lease:
        lease.assert_held()


async def test_renewal_keeps_the_lease_beyond_its_duration(
    factory: ClientFactory, locks: InstanceLocks, container: str, instance: str
) -> None:
    async with locks.hold(instance) as lease:
        await asyncio.sleep(20)  # > the 15 s duration: only renewal keeps it
        lease.assert_held()
        assert await lease_state(factory, container, instance) == "leased"
        with pytest.raises(InstanceBusy):
            async with locks.hold(instance, wait=0):
                pytest.fail("the lease expired although it was renewed")


async def test_a_broken_lease_is_detected_within_one_renewal_interval(
    factory: ClientFactory, container: str, instance: str
) -> None:
    locks = InstanceLocks(factory.blob_service_async(), container, duration=15, renew_interval=1.0)
    async with locks.hold(instance) as lease:
        lease.assert_held()
        blob = factory.blob_service_async().get_blob_client(container, instance_key(instance))
        await BlobLeaseClient(blob).break_lease(lease_break_period=0)
        broken_at = time.monotonic()
        while lease.held and time.monotonic() - broken_at < 3.0:  # noqa: ASYNC110 - polling what a holder sees
            await asyncio.sleep(0.1)
        assert time.monotonic() - broken_at <= 1.0 + 1.0  # one interval + a request's time
        with pytest.raises(PermanentError, match=r"lease lost on instance .*apim-.*renewal failed"):
            lease.assert_held()
        # Someone else may now take the instance; the old holder must not write any more.
        async with locks.hold(instance, wait=0) as other:
            other.assert_held()
            with pytest.raises(PermanentError, match="lease lost"):
                lease.assert_held()


async def test_a_killed_holders_lease_expires_by_itself(
    twin: TwinHandle, locks: InstanceLocks, container: str, instance: str, tmp_path: Path
) -> None:
    env = {**os.environ, **twin.env}
    errors_path = tmp_path / "holder.err"
    with errors_path.open("w") as errors:
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, instance, container, cwd=ROOT, env=env, stdout=PIPE, stderr=errors
        )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), timeout=30)
        assert line.strip() == b"held", errors_path.read_text()
    finally:
        holder.kill()  # SIGKILL: no release, no cleanup
        await holder.communicate()
    killed_at = time.monotonic()
    with pytest.raises(InstanceBusy):
        async with locks.hold(instance, wait=0):
            pytest.fail("the killed holder's lease vanished at once")
    async with locks.hold(instance, wait=20.0) as lease:
        waited = time.monotonic() - killed_at
        lease.assert_held()
    # The lease was taken a moment before the kill: it ends within one duration (15 s), plus backoff.
    assert 5.0 < waited <= 18.0
