"""`discover` against the twin: Resource Graph finds exactly the APIM services in scope, and
the per-subscription fallback finds the same ones when Resource Graph fails."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from shared import inventory
from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.inventory import InstanceRef, discover
from shared.settings import load_settings
from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

PROD = "3f2a1b0c-0000-4000-8000-000000000101"
DEV = "3f2a1b0c-0000-4000-8000-000000000202"


def service_id(sub: str, rg: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{name}"


A = service_id(PROD, "rg-apim-prod", "apim-a")
B = service_id(PROD, "rg-apim-prod", "apim-b")
C = service_id(PROD, "RG-Apim-Edge", "apim-c")
DEV_ID = service_id(DEV, "rg-apim-dev", "apim-dev")
ALL = [A, B, C, DEV_ID]


def seed(twin: TwinHandle) -> None:
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": PROD,
                    "resource_groups": [
                        {
                            "name": "rg-apim-prod",
                            "location": "westeurope",
                            "apim": [
                                {"name": "apim-a", "tags": {"env": "prod", "Owner": "team-a"}},
                                {"name": "apim-b", "tags": {"env": "Prod"}},
                            ],
                            "key_vaults": [{"name": "kv-not-apim", "tags": {"env": "prod"}}],
                        },
                        {
                            "name": "RG-Apim-Edge",
                            "location": "West Europe",
                            "apim": [{"name": "apim-c", "tags": {"ENV": "prod", "owner": "team-a"}}],
                        },
                    ],
                },
                {
                    "id": DEV,
                    "resource_groups": [
                        {
                            "name": "rg-apim-dev",
                            "location": "northeurope",
                            "apim": [{"name": "apim-dev", "tags": {"env": "dev"}}],
                        }
                    ],
                },
            ]
        }
    )


@pytest.fixture(autouse=True)
def _identity(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])


@asynccontextmanager
async def product_factory(twin: TwinHandle, **settings: str) -> AsyncIterator[ClientFactory]:
    built = ClientFactory(load_settings({**twin.env, **settings}))
    try:
        yield built
    finally:
        await built.aclose()


async def found(twin: TwinHandle, **settings: str) -> tuple[InstanceRef, ...]:
    async with product_factory(twin, **settings) as factory:
        return await discover(factory, factory.settings)


def graph_requests(twin: TwinHandle) -> list[dict[str, Any]]:
    _, body = twin.control("GET", "/_twin/log?service=arm")
    return [e for e in body["entries"] if "Microsoft.ResourceGraph" in e["path"]]


def fail_resource_graph(twin: TwinHandle, status: int = 403, code: str = "AuthorizationFailed") -> None:
    status_code, body = twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": "Microsoft.ResourceGraph", "status": status, "code": code, "times": 0},
    )
    assert status_code == 201, body


SCOPES: list[tuple[dict[str, str], list[str]]] = [
    ({}, ALL),
    ({"APIMR_RESOURCE_GROUPS": "RG-APIM-PROD"}, [A, B]),
    ({"APIMR_RESOURCE_GROUPS": "rg-apim-edge, rg-apim-dev"}, [C, DEV_ID]),
    # Tag names match case-insensitively, values case-sensitively: apim-b's "Prod" is out.
    ({"APIMR_TAG_SELECTOR": "Env=prod"}, [A, C]),
    ({"APIMR_TAG_SELECTOR": "env=prod,owner=team-a"}, [A, C]),
    ({"APIMR_TAG_SELECTOR": "env=prod", "APIMR_RESOURCE_GROUPS": "rg-apim-prod"}, [A]),
    ({"APIMR_SUBSCRIPTION_IDS": DEV}, [DEV_ID]),
    ({"APIMR_TAG_SELECTOR": "env=staging"}, []),
]


@pytest.mark.parametrize(("settings", "expected"), SCOPES)
async def test_resource_graph_finds_exactly_the_services_in_scope(
    twin: TwinHandle, settings: dict[str, str], expected: list[str]
) -> None:
    seed(twin)
    refs = await found(twin, **settings)
    assert [r.id for r in refs] == sorted(expected, key=str.lower)
    assert len(graph_requests(twin)) == 2  # which subscriptions Graph sees, then the services
    # The fallback never ran; ARM's list was asked only about a subscription where Graph showed
    # no service in the configured groups (it cannot tell "none" from "none you may read").
    _, body = twin.control("GET", "/_twin/log?service=arm")
    listed = [e["path"] for e in body["entries"] if e["path"].endswith("/providers/Microsoft.ApiManagement/service")]
    assert listed == [f"/subscriptions/{s}/providers/Microsoft.ApiManagement/service" for s in empty_in_graph(settings)]


def empty_in_graph(settings: dict[str, str]) -> list[str]:
    """The configured subscriptions without a service in the configured groups (tags are
    filtered after the query, so they do not empty a subscription)."""
    subscriptions = settings.get("APIMR_SUBSCRIPTION_IDS", f"{PROD},{DEV}").split(",")
    groups = {g.strip().lower() for g in settings.get("APIMR_RESOURCE_GROUPS", "").split(",") if g.strip()}
    return [
        s
        for s in subscriptions
        if not any(i.split("/")[2] == s and (not groups or i.split("/")[4].lower() in groups) for i in ALL)
    ]


@pytest.mark.parametrize(("settings", "expected"), SCOPES)
async def test_the_fallback_finds_the_same_services_when_resource_graph_fails(
    twin: TwinHandle, settings: dict[str, str], expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    seed(twin)
    fail_resource_graph(twin)
    caplog.set_level(logging.WARNING, logger="shared.inventory")
    refs = await found(twin, **settings)
    assert [r.id for r in refs] == sorted(expected, key=str.lower)
    assert [e["status"] for e in graph_requests(twin)] == [403]
    assert "Resource Graph could not list APIM services (403 AuthorizationFailed)" in caplog.text


async def test_instance_refs_carry_where_each_service_is(twin: TwinHandle) -> None:
    seed(twin)
    by_graph = await found(twin)
    fail_resource_graph(twin, status=400, code="BadRequest")
    by_list = await found(twin)
    assert by_graph == by_list
    refs = {r.name: r for r in by_graph}
    c = refs["apim-c"]
    assert (c.id, c.subscription_id, c.resource_group, c.location) == (C, PROD, "RG-Apim-Edge", "westeurope")
    assert dict(c.tags) == {"ENV": "prod", "owner": "team-a"}
    dev = refs["apim-dev"]
    assert (dev.subscription_id, dev.resource_group, dev.location) == (DEV, "rg-apim-dev", "northeurope")
    assert len({*by_graph}) == 4  # refs are hashable (tags are left out of the hash)


async def test_resource_graph_pages_with_the_skip_token(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(twin)
    monkeypatch.setattr(inventory, "GRAPH_PAGE", 1)
    refs = await found(twin)
    assert [r.id for r in refs] == sorted(ALL, key=str.lower)
    # One row a page: four pages, then the end (only APIM services match the query); the
    # subscriptions check before them is one page of its own.
    assert len(graph_requests(twin)) == 1 + 4


async def test_when_the_fallback_fails_too_the_error_is_raised(twin: TwinHandle) -> None:
    seed(twin)
    fail_resource_graph(twin, status=503, code="ServiceUnavailable")
    twin.control(
        "POST",
        "/_twin/faults",
        {"service": "arm", "path": f"^/subscriptions/{DEV}/providers/Microsoft.ApiManagement/service$",
         "status": 403, "code": "AuthorizationFailed", "times": 0},
    )  # fmt: skip
    with pytest.raises(HttpResponseError) as caught:
        await found(twin, APIMR_RETRY_TOTAL="0")
    assert caught.value.status_code == 403


UNSEEN = "3f2a1b0c-0000-4000-8000-0000000009ff"  # not in the twin: Graph leaves it out, like one without a role


async def test_a_configured_subscription_resource_graph_cannot_see_is_an_error(twin: TwinHandle) -> None:
    seed(twin)
    with pytest.raises(PermanentError) as raised:
        await found(twin, APIMR_SUBSCRIPTION_IDS=f"{PROD},{UNSEEN},{DEV}")
    message = str(raised.value)
    assert f"Resource Graph cannot see subscription(s) {UNSEEN} of APIMR_SUBSCRIPTION_IDS" in message
    assert PROD not in message
    assert DEV not in message
    # Refused before the services were asked for: nothing was scanned as if it were all.
    assert len(graph_requests(twin)) == 1
