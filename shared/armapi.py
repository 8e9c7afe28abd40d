"""The production `ArmApi` and `SecretApi`: raw ARM requests through azure-mgmt-core's
async pipeline (bearer token, the product's retry policy and user agent), waiting out
long-running operations the way ARM documents them; Key Vault through SecretClient.

Raw requests because a remediation plan IS a request: the body the dry run shows and the
journal records is byte for byte what is sent, with the plan's ETag as If-Match.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from azure.core.exceptions import AzureError
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.mgmt.core import AsyncARMPipelineClient

from shared.actions.executor import ArmResponse, OperationState
from shared.azure import ClientFactory
from shared.errors import PermanentError, TransientError, error_code_and_message
from shared.inventory import endpoint_of, why_no_response

# Longest wait for one long-running operation when the caller names no `max_wait`: well
# inside the Functions host's 10-minute timeout. Operations that can take longer (APIM
# service updates: an hour or more) are sent with `max_wait` and resumed by a later run
# from the operation URL the engine journals.
LRO_TIMEOUT = 4 * 60.0
MAX_POLL_INTERVAL = 30.0
TERMINAL = {"succeeded", "failed", "canceled", "cancelled"}


def _json(response: AsyncHttpResponse) -> Any:
    try:
        return response.json() if response.content else None
    except ValueError:
        return None


def _retry_after(response: AsyncHttpResponse, default: float) -> float:
    raw = response.headers.get("Retry-After")
    try:
        return min(MAX_POLL_INTERVAL, max(0.0, float(raw))) if raw else default
    except ValueError:
        return default


class AzureArm:
    """`ArmApi` over the factory's ARM pipeline."""

    def __init__(self, factory: ClientFactory, *, poll_default: float = 5.0) -> None:
        self.client: AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse] = factory.arm_async()
        self.base = factory.settings.cloud.resource_manager
        self.poll_default = poll_default

    async def _request(self, method: str, url: str, **kwargs: Any) -> AsyncHttpResponse:
        try:
            # stream=False (the default): the body is already read when this returns.
            response = await self.client.send_request(HttpRequest(method, url, **kwargs))
        except AzureError as error:
            # Where it went (host and path, never the query) and why, e.g. connection refused.
            raise TransientError(
                f"{method} {endpoint_of(url)}: no answer from ARM ({type(error).__name__}: {why_no_response(error)})"
            ) from error
        return response

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
        max_wait: float | None = None,
    ) -> ArmResponse:
        url = f"{self.base}{path}"
        headers = {"If-Match": if_match} if if_match else {}
        response = await self._request(
            method,
            url,
            params={"api-version": api_version},
            json=dict(body) if body is not None else None,
            headers=headers,
        )
        if response.status_code in (201, 202) and (
            "Azure-AsyncOperation" in response.headers or "Location" in response.headers
        ):
            waited = await self._wait(method, url, api_version, response, max_wait)
            if waited is None:
                operation = response.headers.get("Azure-AsyncOperation") or response.headers.get("Location")
                return ArmResponse(status=202, etag=None, body=None, operation_url=operation)
            response = waited
        return ArmResponse(status=response.status_code, etag=response.headers.get("ETag"), body=_json(response))

    async def operation_status(self, operation_url: str) -> OperationState:
        """One read of an Azure-AsyncOperation (status body) or Location (202 = running) URL."""
        response = await self._request("GET", operation_url)
        if response.status_code == 404:
            return OperationState("Unknown", "the operation's status URL answers 404 (expired or unknown)")
        if response.status_code == 202:
            return OperationState("InProgress")
        body = _json(response) or {}
        state = str(body.get("status", "")) if isinstance(body, dict) else ""
        if response.status_code >= 400:
            code, _ = error_code_and_message(body)
            return OperationState("Failed", f"{response.status_code} {code}".strip())
        if not state:  # a Location URL that answered with the final resource
            return OperationState("Succeeded")
        normalised = {"inprogress": "InProgress", "succeeded": "Succeeded", "failed": "Failed"}.get(
            state.lower(), "Canceled" if state.lower() in ("canceled", "cancelled") else "InProgress"
        )
        error = body.get("error") if normalised == "Failed" else None
        detail = (
            f"{error.get('code', '')} {str(error.get('message', ''))[:300]}".strip() if isinstance(error, dict) else ""
        )
        return OperationState(normalised, detail)

    async def _wait(
        self, method: str, url: str, api_version: str, first: AsyncHttpResponse, max_wait: float | None
    ) -> AsyncHttpResponse | None:
        """The operation's final response; None when `max_wait` ran out while it still runs."""
        deadline = time.monotonic() + (LRO_TIMEOUT if max_wait is None else min(max_wait, LRO_TIMEOUT))
        status_url = first.headers.get("Azure-AsyncOperation")
        location = first.headers.get("Location")
        response = first
        while time.monotonic() < deadline:
            pause = _retry_after(response, self.poll_default)
            if max_wait is not None and time.monotonic() + pause > deadline:
                return None
            await asyncio.sleep(pause)
            if status_url:
                response = await self._request("GET", status_url)
                state = str((_json(response) or {}).get("status", "")).lower()
                if response.status_code >= 400:
                    return response
                if state not in TERMINAL:
                    continue
                if state != "succeeded":
                    error = (_json(response) or {}).get("error") or {}
                    raise PermanentError(
                        f"{method} {url.split('?')[0]}: the operation ended {state}: "
                        f"{error.get('code', '')} {str(error.get('message', ''))[:300]}".strip()
                    )
                break
            assert location is not None
            response = await self._request("GET", location)
            if response.status_code == 202:
                continue
            if method == "POST" or response.status_code >= 400:
                return response
            break
        else:
            if max_wait is not None:
                return None
            raise TransientError(f"{method} {url.split('?')[0]}: still running after {LRO_TIMEOUT:.0f} s")
        if method in ("PUT", "PATCH"):
            return await self._request("GET", url, params={"api-version": api_version})
        if location and method == "POST":
            return await self._request("GET", location)
        return response


class AzureSecrets:
    """`SecretApi` over the factory's Key Vault clients."""

    def __init__(self, factory: ClientFactory) -> None:
        self.factory = factory

    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        client = self.factory.secrets_async(vault_url)
        try:
            secret = await client.set_secret(name, value, tags=dict(tags), content_type="text/plain")
        except AzureError as error:
            status = getattr(error, "status_code", None)
            kind = TransientError if status in (None, 408, 429, 500, 502, 503, 504) else PermanentError
            raise kind(f"storing secret {name!r} in {vault_url}: {status} {type(error).__name__}") from error
        return str(secret.id)
