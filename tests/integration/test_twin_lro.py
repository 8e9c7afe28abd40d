"""Long-running operations through azure-mgmt-core's real pollers: both header styles,
polls before completion, and the Failed and Canceled endings."""

from __future__ import annotations

import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.apimanagement.aio import ApiManagementClient as AsyncApiManagementClient
from azure.mgmt.apimanagement.models import ApiManagementServiceUpdateParameters

from tests.conftest import TwinHandle
from tests.integration.test_twin_apim import RG, SUB, client, seed_service

pytestmark = pytest.mark.integration

PUBLIC_OFF = ApiManagementServiceUpdateParameters(public_network_access="Disabled")


@pytest.mark.parametrize("style", ["async", "location", "both"])
def test_patch_completes_through_each_header_style(twin: TwinHandle, style: str) -> None:
    seed_service(twin, "apim-lro")
    assert twin.control("PUT", "/_twin/lro", {"style": style, "polls": 2})[0] == 200
    poller = client(twin).api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0)
    assert poller.result().public_network_access == "Disabled"
    _, log = twin.control("GET", "/_twin/log?service=arm")
    status_reads = [e for e in log["entries"] if "/operationresults/" in e["path"]]
    # Two InProgress answers, then the outcome (Location style answers 202 while running).
    assert len(status_reads) >= 3
    patch = next(e for e in log["entries"] if e["method"] == "PATCH")
    assert patch["status"] == 202


def test_operation_is_not_done_before_its_polls(twin: TwinHandle) -> None:
    seed_service(twin, "apim-lro")
    twin.control("PUT", "/_twin/lro", {"polls": 50})
    poller = client(twin).api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0)
    assert poller.status() in ("InProgress", "Updating", "Accepted")
    current = client(twin).api_management_service.get(RG, "apim-lro")
    assert current.public_network_access == "Enabled"  # applied only when the operation completes
    assert poller.result().public_network_access == "Disabled"


@pytest.mark.parametrize(("action", "ending"), [("lro_fail", "Failed"), ("lro_cancel", "Canceled")])
def test_failed_and_canceled_operations_raise_and_change_nothing(twin: TwinHandle, action: str, ending: str) -> None:
    seed_service(twin, "apim-lro")
    twin.control("PUT", "/_twin/lro", {"style": "async"})
    twin.control("POST", "/_twin/faults", {"service": "arm", "method": "PATCH", "path": "/service/apim-lro$",
                                            "action": action, "code": "GatewayUpdateFailed"})  # fmt: skip
    poller = client(twin).api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0)
    with pytest.raises(HttpResponseError) as info:
        poller.result()
    assert ending.lower() in str(info.value).lower() or "GatewayUpdateFailed" in str(info.value)
    assert client(twin).api_management_service.get(RG, "apim-lro").public_network_access == "Enabled"


def test_unpolled_operation_still_finishes_by_its_deadline(twin: TwinHandle) -> None:
    seed_service(twin, "apim-lro")
    twin.control("PUT", "/_twin/lro", {"polls": 1000})
    client(twin).api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0)
    time.sleep(2.2)  # the twin's operations finish within 2 s whether or not anybody polls
    assert client(twin).api_management_service.get(RG, "apim-lro").public_network_access == "Disabled"


async def test_async_poller_with_location_only(twin: TwinHandle) -> None:
    seed_service(twin, "apim-lro")
    twin.control("PUT", "/_twin/lro", {"style": "location", "polls": 1})
    async with (
        twin.async_credential() as credential,
        AsyncApiManagementClient(
            credential,
            SUB,
            base_url=twin.urls["arm"],
            credential_scopes=[twin.urls["arm"] + "/.default"],
            **twin.sdk_kwargs,
        ) as apim,
    ):
        poller = await apim.api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0)
        result = await poller.result()
    assert result.public_network_access == "Disabled"


def test_latency_model_delays_every_answer(twin: TwinHandle) -> None:
    assert twin.control("PUT", "/_twin/latency", {"arm": 0.25})[0] == 200
    start = time.monotonic()
    twin.arm("GET", "/subscriptions?api-version=2022-12-01")
    assert time.monotonic() - start >= 0.25
    assert twin.control("PUT", "/_twin/latency", {"arm": -1})[0] == 400


# -- Retry-After: Azure's whole seconds by default, fast only where a test says so (issue 10, item 4) --


def test_the_default_retry_after_is_what_apim_sends() -> None:
    """APIM answers its LROs with `Retry-After: 60` (a recorded service create and every poll:
    Azure/azure-sdk-for-js, arm-apimanagement recording_apimanagementservice_create_test.json)."""
    from twin.state import LroConfig, TwinState

    assert LroConfig().retry_after == "60"
    state = TwinState(tenant_id="t")
    state.mark_seeded()
    state.lro.retry_after = "5"
    state.reset()
    assert state.lro.retry_after == "60"  # reset() goes back to the default, not to "fast"


def test_the_suite_sets_its_fast_retry_after_explicitly_and_reset_keeps_it(twin: TwinHandle) -> None:
    from tests.conftest import FAST_RETRY_AFTER

    twin.control("PUT", "/_twin/lro", {"retry_after": "7"})
    twin.control("POST", "/_twin/reset")
    assert twin.control("PUT", "/_twin/lro", {})[1]["retry_after"] == FAST_RETRY_AFTER


def test_the_sdk_waits_a_whole_second_retry_after_even_with_polling_interval_zero(twin: TwinHandle) -> None:
    """Why the suite must ask for speed: azure-core's poller sleeps the Retry-After the
    service sends, whatever `polling_interval` the caller passed."""
    seed_service(twin, "apim-lro")
    twin.control("PUT", "/_twin/lro", {"retry_after": "1", "polls": 1})
    started = time.monotonic()
    client(twin).api_management_service.begin_update(RG, "apim-lro", PUBLIC_OFF, polling_interval=0).result()
    assert time.monotonic() - started >= 1.0
