"""Session fixtures: the twin (with Azurite) started once; every test that uses it starts
from the seeded estate again (`twin.control("POST", "/_twin/reset")` before each test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.identity import ClientSecretCredential
from azure.identity.aio import ClientSecretCredential as AsyncClientSecretCredential

ROOT = Path(__file__).resolve().parents[1]
TEST_ESTATE = ROOT / "estates" / "test.yaml"
FAST_RETRY_AFTER = "0.02"  # seconds; azure-core and the product parse fractions too


class TwinHandle:
    """What a test needs of the running twin. Talk to it over HTTPS, as a client would."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.urls: dict[str, str] = server.state.urls
        self.ca_file = str(server.certs.ca)
        self.tenant_id: str = server.state.tenant_id
        self.client_id, self.client_secret = server.product_principal()
        subs = list(server.state.subscriptions.values())
        self.subscription_id: str = subs[0]["subscriptionId"]
        self.subscription_ids: list[str] = [s["subscriptionId"] for s in subs]
        self.sdk_kwargs: dict[str, Any] = {"connection_verify": self.ca_file}
        self._session = requests.Session()

    @property
    def env(self) -> dict[str, str]:
        """The twin's client environment: AZURE_* variables and the product's settings."""
        env: dict[str, str] = self.server.env()
        return env

    def credential(self, client_id: str | None = None, secret: str | None = None) -> ClientSecretCredential:
        return ClientSecretCredential(
            self.tenant_id,
            client_id or self.client_id,
            secret or self.client_secret,
            authority=self.urls["login"],
            disable_instance_discovery=True,
            connection_verify=self.ca_file,
        )

    def async_credential(self) -> AsyncClientSecretCredential:
        return AsyncClientSecretCredential(
            self.tenant_id,
            self.client_id,
            self.client_secret,
            authority=self.urls["login"],
            disable_instance_discovery=True,
            connection_verify=self.ca_file,
        )

    def control(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        # verify= per request: requests lets REQUESTS_CA_BUNDLE override a session's verify.
        response = self._session.request(method, self.urls["arm"] + path, json=json, timeout=60, verify=self.ca_file)
        body = response.json() if response.content else None
        return response.status_code, body

    def seed(self, fragment: dict[str, Any]) -> None:
        status, body = self.control("POST", "/_twin/estate", json=fragment)
        if status != 200:
            raise AssertionError(f"seeding the twin failed ({status}): {body}")

    @property
    def product_object_id(self) -> str:
        principal = self.server.state.principal(self.client_id)
        return str(principal.object_id)

    def grant(self, role: str, scope: str | None = None, principal: str | dict[str, str] | None = None) -> None:
        """Assign a role for this test (the twin enforces Azure RBAC; `reset` takes it away again).

        `principal`: a name or object id of the estate (default the product's identity), or
        `{"managed_identity_of": <APIM service name or id, or a user-assigned identity id>}`
        (that identity as it is now); `scope`: default the first subscription."""
        assignment = {
            "principal": principal or self.product_object_id,
            "role": role,
            "scope": scope or f"/subscriptions/{self.subscription_id}",
        }
        self.seed({"role_assignments": [assignment]})

    def token(self, audience: str, **options: Any) -> str:
        status, body = self.control("POST", "/_twin/token", json={"audience": audience, **options})
        assert status == 200, body
        return str(body["access_token"])

    def arm(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> requests.Response:
        """A raw ARM request (a general tool's view), with the product principal's token by default."""
        headers = dict(kwargs.pop("headers", {}))
        if token is None:
            token = self.credential().get_token(self.urls["arm"] + "/.default").token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self._session.request(
            method, self.urls["arm"] + path, headers=headers, timeout=60, verify=self.ca_file, **kwargs
        )


@pytest.fixture(scope="session")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwinHandle]:
    from twin.server import TwinServer

    # Azure's LROs say Retry-After: 60 (the twin's default); the suite polls fast on purpose.
    server = TwinServer(TEST_ESTATE, tmp_path_factory.mktemp("twin"), retry_after=FAST_RETRY_AFTER)
    server.start()
    try:
        yield TwinHandle(server)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _fresh_twin(request: pytest.FixtureRequest) -> None:
    if "twin" in request.fixturenames:
        handle: TwinHandle = request.getfixturevalue("twin")
        status, body = handle.control("POST", "/_twin/reset")
        assert status == 204, body
