"""The hand-built ARM pipeline (`ClientFactory.arm_async`, used by `AzureArm`) behaves like
the generated SDK clients: the bearer token never follows a redirect to another host, and a
request that hangs ends after the per-request read timeout instead of azure-core's 300 s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from shared import azure as azure_module
from shared.armapi import AzureArm
from shared.azure import ClientFactory
from shared.errors import TransientError
from shared.settings import load_settings
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SUB = "3f2a1b0c-0000-4000-8000-000000000101"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/apim-x"


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


@asynccontextmanager
async def product_factory(twin: TwinHandle, **settings: str) -> AsyncIterator[ClientFactory]:
    factory = ClientFactory(load_settings({**twin.env, "APIMR_RETRY_TOTAL": "0", **settings}))
    try:
        yield factory
    finally:
        await factory.aclose()
        factory.close()


@asynccontextmanager
async def redirecting_endpoint(twin: TwinHandle) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTPS endpoint (trusted through the twin's CA) that answers 307 to another host:
    the port differs, which is another domain to azure-core's redirect policy. The other
    host records the headers it was sent."""
    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"id": SERVICE})

    foreign_port: list[int] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"https://127.0.0.1:{foreign_port[0]}{request.path_qs}")

    foreign = web.Application()
    foreign.router.add_get("/{tail:.*}", elsewhere)
    origin = web.Application()
    origin.router.add_get("/{tail:.*}", redirect)
    runners = [web.AppRunner(foreign), web.AppRunner(origin)]
    for runner in runners:
        await runner.setup()
    context = twin.server.certs.server_context()
    foreign_site = web.TCPSite(runners[0], "127.0.0.1", 0, ssl_context=context)
    await foreign_site.start()
    foreign_port.append(foreign_site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    origin_site = web.TCPSite(runners[1], "127.0.0.1", 0, ssl_context=context)
    await origin_site.start()
    origin_port = origin_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{origin_port}", seen
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_the_bearer_token_does_not_follow_a_redirect_to_another_host(twin: TwinHandle) -> None:
    async with (
        redirecting_endpoint(twin) as (endpoint, seen),
        product_factory(twin, APIMR_ARM_ENDPOINT=endpoint, APIMR_ARM_AUDIENCE=twin.urls["arm"]) as factory,
    ):
        answer = await AzureArm(factory).send("GET", SERVICE, "2022-08-01")
    assert answer.status == 200
    [headers] = seen
    assert {k.lower() for k in headers} >= {"user-agent", "x-ms-client-request-id"}  # it was the product's request
    assert "authorization" not in {k.lower() for k in headers}


async def test_a_hanging_request_ends_at_the_read_timeout(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure_module, "ARM_READ_TIMEOUT", 0.5)
    status, body = twin.control(
        "POST", "/_twin/faults", {"service": "arm", "path": "/service/apim-x$", "action": "hang", "delay": 3}
    )
    assert status == 201, body
    async with product_factory(twin) as factory:
        started = time.monotonic()
        with pytest.raises(TransientError) as raised:
            await AzureArm(factory).send("GET", SERVICE, "2022-08-01")
        elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed  # the twin holds the request for 3 s
    assert "timed out" in str(raised.value)
