"""A request that gets no HTTP answer names where it went and why, never its query.

The real SDK pipelines against an ARM endpoint nobody listens on (a closed local port):
the twin's token service still answers, the ARM connection is refused.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from shared.armapi import AzureArm
from shared.azure import ClientFactory
from shared.errors import TransientError
from shared.inventory import InstanceRef
from shared.settings import load_settings
from shared.source import AzureInstanceSource
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/apim-x"


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: connecting to it is refused


@asynccontextmanager
async def unreachable_arm(twin: TwinHandle) -> AsyncIterator[tuple[ClientFactory, str]]:
    host = f"127.0.0.1:{closed_port()}"
    settings = {
        **twin.env,
        "APIMR_ARM_ENDPOINT": f"https://{host}",
        "APIMR_ARM_AUDIENCE": twin.urls["arm"],  # the token service answers for the twin's audience
        "APIMR_RETRY_TOTAL": "0",
    }
    factory = ClientFactory(load_settings(settings))
    try:
        yield factory, host
    finally:
        await factory.aclose()
        factory.close()


async def test_a_raw_arm_request_names_the_endpoint_and_the_cause(twin: TwinHandle) -> None:
    async with unreachable_arm(twin) as (factory, host):
        with pytest.raises(TransientError) as raised:
            await AzureArm(factory).send("GET", SERVICE, "2022-08-01")
    message = str(raised.value)
    assert message.startswith(f"GET {host}{SERVICE}: no answer from ARM (ServiceRequestError: ")
    assert "ConnectionRefusedError: connection refused" in message
    assert "api-version" not in message


async def test_a_snapshot_read_names_the_host_and_the_cause(twin: TwinHandle) -> None:
    ref = InstanceRef(id=SERVICE, name="apim-x", subscription_id=SUB, resource_group="rg-apim-prod", location="x")
    async with unreachable_arm(twin) as (factory, host):
        with pytest.raises(TransientError) as raised:
            await AzureInstanceSource(factory, factory.settings).read(ref)
    assert str(raised.value) == (
        f"reading {SERVICE}: no response from {host} (ServiceRequestError: ConnectionRefusedError: connection refused)"
    )
