"""The HTTP API over real HTTP (uvicorn on a local port) with real tokens from the twin's
token service, against the twin and Azurite: authentication (each role; expired,
wrong-audience, wrong-issuer, unsigned, forged and missing tokens), authorization, scope,
input validation, the plan (nothing written), applies as background operations (the change
made, the caller in the journal), and manual remediation of a detect-mode rule.

The function key is the Functions host's check and is not part of this app; the app is
driven here as the host hands it requests (tests/functions drives the ASGI function)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import uvicorn

from handlers.api import MAX_BODY_BYTES, create_api
from handlers.context import AppContext
from shared.azure import ClientFactory
from shared.journal import Journal, JournalEntry, TriggerKind
from shared.settings import load_settings
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import GW, compliant, drift, fragment_for
from tests.integration.test_remediate import apim_writes

pytestmark = pytest.mark.integration

AUDIENCE = "api://apim-remediator-tests"
READ, OPERATE, ADMIN = "Remediator.Read", "Remediator.Operate", "Remediator.Admin"
# TLS-001 is fixed by the product; MGMT-001 is only detected (manual remediation: Admin).
POLICY = "version: 1\nrules:\n  TLS-001: {mode: remediate}\n  MGMT-001: {mode: detect}\n"
API_ENV_KEYS = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET")


class ApiServer:
    """The API app under uvicorn in a thread, with its own event loop (as a host would run
    it); the AppContext is closed on that loop after the server stops."""

    def __init__(self, env: dict[str, str]) -> None:
        self.context = AppContext.load(env)
        self.app = create_api(lambda: self.context)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
            await self.app.state.background.drain()
        finally:
            await self.context.aclose()

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def api_env(twin: TwinHandle, tmp_path: Path) -> dict[str, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    env.update(twin.env)
    env.update(
        APIMR_RESOURCE_GROUPS="rg-drift",
        APIMR_POLICY_FILE=str(policy),
        APIMR_LEASE_SECONDS="15",
        APIMR_API_AUDIENCE=AUDIENCE,
        APIMR_API_TENANT_ID=twin.tenant_id,
    )
    return env


@pytest.fixture(scope="module")
def api(twin: TwinHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    env = api_env(twin, tmp_path_factory.mktemp("api"))
    with pytest.MonkeyPatch.context() as patch:
        for key in API_ENV_KEYS:  # the product's own identity (DefaultAzureCredential reads these)
            patch.setenv(key, twin.env[key])
        with ApiServer(env) as server:
            yield server


def operator_principal(twin: TwinHandle) -> tuple[str, str]:
    """(client id, object id) of the estate's second principal: the person's app calling the API."""
    client_id = next(c for c in twin.server.state.principals if c != twin.client_id)
    return client_id, twin.server.state.principals[client_id][1].object_id


def token(twin: TwinHandle, *roles: str, **options: Any) -> str:
    client_id, _ = operator_principal(twin)
    return twin.token(options.pop("audience", AUDIENCE), client_id=client_id, roles=list(roles), **options)


def call(api: ApiServer, method: str, path: str, bearer: str | None = None, **kwargs: Any) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return requests.request(method, api.url + path, headers=headers, timeout=120, **kwargs)


def seed(twin: TwinHandle, name: str, *rule_ids: str) -> str:
    spec = compliant(name, twin.subscription_id)
    for rule_id in rule_ids:
        drift(rule_id, spec)
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


def path_of(service_id: str) -> str:
    parts = service_id.split("/")
    return f"/api/instances/{parts[2]}/{parts[4]}/{parts[8]}"


def poll(api: ApiServer, url: str, bearer: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(url, headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] != "running":
            return body
        assert time.monotonic() < deadline, f"operation still running: {body}"
        time.sleep(0.2)


def journal(twin: TwinHandle, service_id: str) -> list[JournalEntry]:
    async def read() -> list[JournalEntry]:
        factory = ClientFactory(load_settings(twin.env))
        try:
            return await Journal(factory.table_service_async()).history(service_id)
        finally:
            await factory.aclose()
            factory.close()

    return asyncio.run(read())


def error_of(response: requests.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body) >= {"error"}, body
    assert "Traceback" not in response.text
    return body


# -- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [READ, OPERATE, ADMIN])
def test_each_role_lists_instances_and_reads_findings(twin: TwinHandle, api: ApiServer, role: str) -> None:
    service_id = seed(twin, f"api-list-{role.split('.')[1].lower()}", "TLS-001")
    bearer = token(twin, role)
    listed = call(api, "GET", "/api/instances", bearer)
    assert listed.status_code == 200, listed.text
    [entry] = [i for i in listed.json()["instances"] if i["id"].lower() == service_id.lower()]
    assert entry["reconciled"] is None  # discovered, never reconciled: no stored counts
    stored = call(api, "GET", path_of(service_id) + "/findings", bearer)
    assert stored.status_code == 200, stored.text
    assert (stored.json()["source"], stored.json()["findings"]) == ("stored", [])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "a bearer token is required"),
        ("not-bearer", "the Authorization header must be 'Bearer <token>'"),
        ("expired", "the token has expired"),
        ("wrong-audience", "the token is for another audience"),
        ("wrong-issuer", "the token is from another issuer"),
        ("v1-token-with-v2-issuer", "the token's issuer does not match its version"),
        ("other-tenant", "the token is from another tenant"),
        ("unsigned", "the token's algorithm 'none' is not accepted (RS256 only)"),
        ("hs256", "the token's algorithm 'HS256' is not accepted (RS256 only)"),
        ("forged", "the token's signature does not verify"),
        ("no-oid", "the token does not name the calling principal (oid) and application"),
        ("garbage", "the token is not a JWT"),
    ],
)
def test_unacceptable_tokens_are_401_with_a_challenge(
    twin: TwinHandle, api: ApiServer, case: str, expected: str
) -> None:
    headers: dict[str, str] = {}
    bearer: str | None = None
    if case == "not-bearer":
        headers["Authorization"] = "Basic dXNlcjpwYXNz"
    elif case == "expired":
        bearer = token(twin, ADMIN, lifetime=-300)  # past the 60 s leeway
    elif case == "wrong-audience":
        bearer = token(twin, ADMIN, audience=twin.urls["arm"])  # a real token, for ARM
    elif case == "wrong-issuer":
        bearer = token(twin, ADMIN, claims={"iss": "https://sts.windows.net/72f988bf-0000-4000-8000-000000000000/"})
    elif case == "v1-token-with-v2-issuer":
        bearer = token(twin, ADMIN, claims={"iss": f"{twin.urls['login']}/{twin.tenant_id}/v2.0"})
    elif case == "other-tenant":
        bearer = token(twin, ADMIN, claims={"tid": "72f988bf-0000-4000-8000-000000000000"})
    elif case == "unsigned":
        bearer = token(twin, ADMIN, unsigned=True)
    elif case == "hs256":
        claims = jwt.decode(token(twin, ADMIN), options={"verify_signature": False})
        bearer = jwt.encode(claims, "a-shared-secret-anyone-could-guess-0123456789", algorithm="HS256")
    elif case == "forged":
        bearer = token(twin, ADMIN, foreign_key=True)
    elif case == "no-oid":
        bearer = token(twin, ADMIN, claims={"oid": None})
    elif case == "garbage":
        bearer = "not.a.jwt"
    response = call(api, "GET", "/api/instances", bearer, headers=headers)
    assert response.status_code == 401, response.text
    assert error_of(response)["error"]["message"] == expected
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="apim-remediator"')
    if case == "missing":
        assert "error=" not in challenge  # RFC 6750: no error code when no token was sent
    else:
        assert 'error="invalid_token"' in challenge


def test_v2_tokens_are_accepted(twin: TwinHandle, api: ApiServer) -> None:
    response = call(api, "GET", "/api/instances", token(twin, READ, version="2.0"))
    assert response.status_code == 200, response.text


def test_a_rolled_signing_key_is_fetched_when_a_token_names_it(twin: TwinHandle, api: ApiServer) -> None:
    assert call(api, "GET", "/api/instances", token(twin, READ)).status_code == 200  # keys cached
    keys = api.context.token_validator().keys
    # Unknown kids refetch at most once a minute (tests/unit/test_entra.py); not within this test.
    keys.refresh_interval = 0
    status, _ = twin.control("POST", "/_twin/signing-key/rotate")
    assert status == 200
    fetched = keys.fetches
    response = call(api, "GET", "/api/instances", token(twin, READ))  # signed with the new key
    assert response.status_code == 200, response.text
    assert keys.fetches == fetched + 1


def test_openapi_document_is_served_behind_the_same_auth(twin: TwinHandle, api: ApiServer) -> None:
    assert call(api, "GET", "/api/openapi.json").status_code == 401
    document = call(api, "GET", "/api/openapi.json", token(twin, READ))
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert "/api/instances" in paths
    assert "/api/instances/{subscription_id}/{resource_group}/{name}/remediations" in paths
    assert "/api/operations/{operation_id}" in paths


# -- authorization and scope ------------------------------------------------------------------------


def test_a_role_that_does_not_allow_the_request_is_403(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-roles", "TLS-001")
    no_role = call(api, "GET", "/api/instances", token(twin))
    assert no_role.status_code == 403, no_role.text
    assert 'error="insufficient_scope"' in no_role.headers["WWW-Authenticate"]
    unknown_role = call(api, "GET", "/api/instances", token(twin, "Remediator.Everything"))
    assert unknown_role.status_code == 403
    reader = token(twin, READ)
    for path, body in (("/scans", None), ("/remediations", {})):
        response = call(api, "POST", path_of(service_id) + path, reader, json=body)
        assert response.status_code == 403, (path, response.text)
        assert error_of(response)["error"]["message"].endswith("needs the Remediator.Operate role")


def test_out_of_scope_is_403_and_unknown_is_404(twin: TwinHandle, api: ApiServer) -> None:
    bearer = token(twin, ADMIN)
    other_group = f"/api/instances/{twin.subscription_id}/rg-apim-prod/apim-anything/findings"
    other_subscription = "/api/instances/9b1c0000-0000-4000-8000-000000000999/rg-drift/apim-anything/findings"
    for path in (other_group, other_subscription):
        response = call(api, "GET", path, bearer)
        assert response.status_code == 403, (path, response.text)
        assert error_of(response)["error"]["code"] == "OutOfScope"
    unknown = call(api, "GET", f"/api/instances/{twin.subscription_id}/rg-drift/apim-nowhere/findings", bearer)
    assert unknown.status_code == 404, unknown.text
    assert error_of(unknown)["error"]["code"] == "NotFound"
    plan_of_other = call(api, "POST", other_group.replace("/findings", "/remediations"), bearer, json={})
    assert plan_of_other.status_code == 403
    assert call(api, "GET", "/api/operations/0f0e0d0c-0000-4000-8000-000000000000", bearer).status_code == 404


# -- input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"dry_run": "perhaps"}, "body.dry_run"),
        ({"rule_ids": "TLS-001"}, "body.rule_ids"),
        ({"rule_ids": ["NOPE-999"]}, "body.rule_ids[0]"),
        ({"force_rule_ids": ["TLS-001", "MGMT-004"]}, "body.force_rule_ids[1]"),  # no remediation
        ({"colour": "red"}, "body.colour"),
        ("not json", "body"),
    ],
)
def test_malformed_bodies_are_422_naming_the_field(twin: TwinHandle, api: ApiServer, body: Any, field: str) -> None:
    service_id = seed(twin, "api-input", "TLS-001")
    kwargs: dict[str, Any] = (
        {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    response = call(api, "POST", path_of(service_id) + "/remediations", token(twin, ADMIN), **kwargs)
    assert response.status_code == 422, response.text
    fields = [f["field"] for f in error_of(response)["fields"]]
    assert field in fields, fields
    assert "perhaps" not in response.text  # input is not echoed
    assert "red" not in response.text


def test_malformed_paths_are_422_naming_the_parameter(twin: TwinHandle, api: ApiServer) -> None:
    response = call(api, "GET", "/api/instances/not-a-guid/rg-drift/apim!/findings", token(twin, READ))
    assert response.status_code == 422
    assert {f["field"] for f in error_of(response)["fields"]} == {"path.subscription_id", "path.name"}


def test_bodies_over_the_limit_are_413(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-big", "TLS-001")
    padding = "x" * MAX_BODY_BYTES
    response = call(api, "POST", path_of(service_id) + "/remediations", token(twin, ADMIN), json={"pad": padding})
    assert response.status_code == 413, response.text
    assert error_of(response)["error"]["code"] == "RequestTooLarge"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"rule_ids": ["'
        for _ in range(20):
            yield b"A" * 1024
        yield b'"]}'

    streamed = call(
        api, "POST", path_of(service_id) + "/remediations", token(twin, ADMIN), data=chunked(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert streamed.status_code == 413, streamed.text


# -- plan, scan, apply ------------------------------------------------------------------------------


def test_the_plan_answers_with_the_plan_and_writes_nothing(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-plan", "TLS-001", "MGMT-001")
    twin.control("DELETE", "/_twin/log")
    response = call(api, "POST", path_of(service_id) + "/remediations", token(twin, OPERATE), json={})
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["dry_run"] is True
    statuses = {r["rule"]: (r["status"], r["detail"]) for r in plan["results"]}
    assert statuses["TLS-001"] == ("would", "")
    assert statuses["MGMT-001"] == ("would", "MGMT-001 is in detect mode: --apply would skip it")
    [tls] = [r for r in plan["results"] if r["rule"] == "TLS-001"]
    assert tls["requests"][0].startswith(f"PATCH {service_id}")
    assert apim_writes(twin) == []  # the twin's request log: the plan only read


def test_a_fresh_scan_and_a_scan_operation_read_only(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-scan", "TLS-001")
    twin.control("DELETE", "/_twin/log")
    fresh = call(api, "GET", path_of(service_id) + "/findings?fresh=true", token(twin, READ))
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["source"] == "scan"
    assert "TLS-001" in {f["rule"] for f in fresh.json()["findings"]}

    operator = token(twin, OPERATE)
    started = call(api, "POST", path_of(service_id) + "/scans", operator)
    assert started.status_code == 202, started.text
    assert started.headers["Location"] == started.json()["url"]
    done = poll(api, started.headers["Location"], operator)
    assert (done["status"], done["kind"]) == ("succeeded", "scan")
    assert "TLS-001" in {f["rule"] for f in done["result"]["findings"]}
    assert apim_writes(twin) == []


def test_apply_is_an_operation_that_ends_with_the_report_and_names_the_caller(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-apply", "TLS-001", "MGMT-001")
    operator = token(twin, OPERATE)
    started = call(api, "POST", path_of(service_id) + "/remediations", operator, json={"dry_run": False})
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "running"
    done = poll(api, started.headers["Location"], operator)
    assert done["status"] == "succeeded", done
    report = done["result"]
    statuses = {r["rule"]: r["status"] for r in report["results"]}
    assert statuses == {"TLS-001": "fixed", "MGMT-001": "skipped"}  # detect mode: not applied
    service = twin.arm("GET", f"{service_id}?api-version=2024-05-01").json()
    tls10 = service["properties"]["customProperties"][GW + "Security.Protocols.Tls10"]
    assert tls10.lower() == "false"

    client_id, object_id = operator_principal(twin)
    entries = journal(twin, service_id)
    assert entries, "nothing journaled"
    assert {(e.trigger.kind, e.trigger.detail) for e in entries} == {
        (TriggerKind.HTTP, f"oid={object_id} appid={client_id}")
    }
    assert done["caller"] == {"oid": object_id, "appid": client_id}
    # An unnarrowed apply is a reconcile: the stored findings now show what is left.
    listed = call(api, "GET", path_of(service_id) + "/findings", operator).json()
    assert listed["reconciled"] is not None
    # LOG-004 too: the reconcile ran the runtime signals, and the instance's diagnostic setting
    # sends gateway logs to a workspace that has none.
    assert {f["rule"] for f in listed["findings"]} == {"MGMT-001", "LOG-004"}


def test_admin_applies_a_detect_mode_rule_by_naming_it_operate_cannot(twin: TwinHandle, api: ApiServer) -> None:
    service_id = seed(twin, "api-force", "MGMT-001")
    path = path_of(service_id) + "/remediations"
    operator = token(twin, OPERATE)
    for body in ({"dry_run": False, "force_rule_ids": ["MGMT-001"]}, {"dry_run": False, "rule_ids": ["MGMT-001"]}):
        denied = call(api, "POST", path, operator, json=body)
        assert denied.status_code == 403, (body, denied.text)
        assert "Remediator.Admin" in error_of(denied)["error"]["message"]
    twin.control("DELETE", "/_twin/log")
    admin = token(twin, ADMIN)
    started = call(api, "POST", path, admin, json={"dry_run": False, "force_rule_ids": ["MGMT-001"]})
    assert started.status_code == 202, started.text
    done = poll(api, started.headers["Location"], admin)
    assert done["status"] == "succeeded", done
    assert {r["rule"]: r["status"] for r in done["result"]["results"]} == {"MGMT-001": "fixed"}
    access = twin.arm("GET", f"{service_id}/tenant/access?api-version=2024-05-01").json()
    assert access["properties"]["enabled"] is False
    assert [w for w in apim_writes(twin) if w.lower().startswith("patch")] == [f"PATCH {service_id}/tenant/access"]


def test_forcing_never_applies_an_exempt_finding(twin: TwinHandle, api: ApiServer) -> None:
    spec = compliant("api-exempt", twin.subscription_id)
    drift("MGMT-001", spec)
    spec["tags"] = {"apim-remediator-exempt": "MGMT-001", "apim-remediator-exempt-reason": "migration"}
    fragment, ids = fragment_for({"api-exempt": spec}, twin.subscription_id)
    twin.seed(fragment)
    twin.control("DELETE", "/_twin/log")
    admin = token(twin, ADMIN)
    body = {"dry_run": False, "force_rule_ids": ["MGMT-001"]}
    started = call(api, "POST", path_of(ids["api-exempt"]) + "/remediations", admin, json=body)
    assert started.status_code == 202, started.text
    done = poll(api, started.headers["Location"], admin)
    assert [(r["rule"], r["status"], r["detail"]) for r in done["result"]["results"]] == [
        ("MGMT-001", "skipped", "exempt: migration")
    ]
    assert apim_writes(twin) == []
