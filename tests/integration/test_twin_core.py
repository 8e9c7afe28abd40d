"""The twin's core against real clients: the token service, ARM basics, strictness
(auth, api-version), throttling, faults, the request log, the clock, and Azurite reached
with twin-issued tokens."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy
from azure.core.rest import HttpRequest
from azure.data.tables import TableServiceClient
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.mgmt.core import ARMPipelineClient
from azure.storage.blob import BlobServiceClient
from azure.storage.blob.aio import BlobServiceClient as AsyncBlobServiceClient
from azure.storage.queue import QueueClient
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

SUBS_VERSION = "2022-12-01"


def error_code(response: requests.Response) -> str:
    return str(response.json()["error"]["code"])


# -- token service ---------------------------------------------------------------------------


def test_client_secret_credential_gets_a_signed_token_for_the_scope(twin: TwinHandle) -> None:
    token = twin.credential().get_token(twin.urls["arm"] + "/.default")
    assert token.expires_on > time.time() + 3000
    discovery = requests.get(
        f"{twin.urls['login']}/{twin.tenant_id}/v2.0/.well-known/openid-configuration", verify=twin.ca_file, timeout=10
    ).json()
    keys = requests.get(discovery["jwks_uri"], verify=twin.ca_file, timeout=10).json()["keys"]
    [signing] = [k for k in keys if k["kid"] == jwt.get_unverified_header(token.token)["kid"]]
    signing_key = jwt.PyJWK(signing).key
    claims = jwt.decode(token.token, signing_key, algorithms=["RS256"], audience=twin.urls["arm"])
    assert claims["iss"] == f"https://sts.windows.net/{twin.tenant_id}/"
    assert claims["appid"] == twin.client_id
    assert claims["tid"] == twin.tenant_id
    assert {"oid", "iat", "nbf", "exp", "roles"} <= set(claims)


def test_test_tokens_as_entra_issues_them_v1_and_v2_with_roles(twin: TwinHandle) -> None:
    """The control route mints what an API's tests need: app roles, a chosen audience, v1 and
    v2 forms (each issuer as its OpenID document names it), unsigned tokens, and key rollover."""

    def document(path: str) -> dict[str, object]:
        url = f"{twin.urls['login']}/{twin.tenant_id}/{path}"
        return dict(requests.get(url, verify=twin.ca_file, timeout=10).json())

    v1, v2 = document(".well-known/openid-configuration"), document("v2.0/.well-known/openid-configuration")

    def verified(token: str, meta: dict[str, object]) -> dict[str, object]:
        keys = jwt.PyJWKSet.from_dict(requests.get(str(meta["jwks_uri"]), verify=twin.ca_file, timeout=10).json())
        key = keys[jwt.get_unverified_header(token)["kid"]].key
        return dict(jwt.decode(token, key, algorithms=["RS256"], audience="api://x", issuer=str(meta["issuer"])))

    claims = verified(twin.token("api://x", roles=["Remediator.Read"]), v1)
    assert (claims["ver"], claims["roles"], claims["appid"]) == ("1.0", ["Remediator.Read"], twin.client_id)
    claims = verified(twin.token("api://x", version="2.0"), v2)
    assert claims["iss"] == f"{twin.urls['login']}/{twin.tenant_id}/v2.0"
    assert (claims["ver"], claims["azp"], "appid" in claims) == ("2.0", twin.client_id, False)

    unsigned = twin.token("api://x", unsigned=True)
    assert jwt.get_unverified_header(unsigned)["alg"] == "none"
    assert unsigned.endswith(".")  # no signature
    assert "roles" not in jwt.decode(twin.token("api://x", claims={"roles": None}), options={"verify_signature": False})

    status, rotated = twin.control("POST", "/_twin/signing-key/rotate")
    assert status == 200
    after = twin.token("api://x")
    assert jwt.get_unverified_header(after)["kid"] == rotated["kid"]
    verified(after, v1)  # the JWKS lists the new key (and still the old ones)
    assert twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}").status_code == 200


def test_default_credential_from_the_env_file_works_sync_and_async(
    twin: TwinHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_AUTHORITY_HOST"):
        monkeypatch.setenv(key, twin.env[key])
    credential = DefaultAzureCredential(disable_instance_discovery=True, connection_verify=twin.ca_file)
    assert credential.get_token(twin.urls["logs"] + "/.default").token

    async def get_async() -> str:
        async with AsyncDefaultAzureCredential(
            disable_instance_discovery=True, connection_verify=twin.ca_file
        ) as async_credential:
            return (await async_credential.get_token("https://vault.azure.net/.default")).token

    import asyncio

    claims = jwt.decode(asyncio.run(get_async()), options={"verify_signature": False})
    assert claims["aud"] == "https://vault.azure.net"


def test_wrong_secret_and_unknown_client_are_refused(twin: TwinHandle) -> None:
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        twin.credential(secret="not-the-secret").get_token(twin.urls["arm"] + "/.default")
    unknown = ClientSecretCredential(
        twin.tenant_id,
        str(uuid.uuid4()),
        "x",
        authority=twin.urls["login"],
        disable_instance_discovery=True,
        connection_verify=twin.ca_file,
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS700016"):
        unknown.get_token(twin.urls["arm"] + "/.default")


# -- ARM basics ------------------------------------------------------------------------------


def test_subscriptions_and_resource_groups(twin: TwinHandle) -> None:
    listed = twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}").json()["value"]
    assert [s["subscriptionId"] for s in listed] == twin.subscription_ids
    one = twin.arm("GET", f"/subscriptions/{twin.subscription_id}?api-version={SUBS_VERSION}").json()
    assert one["displayName"] == "platform-prod"
    assert one["tenantId"] == twin.tenant_id
    groups = twin.arm("GET", f"/subscriptions/{twin.subscription_id}/resourcegroups?api-version=2021-04-01").json()
    assert [g["name"] for g in groups["value"]] == ["rg-apim-prod", "rg-monitoring"]
    missing = twin.arm("GET", f"/subscriptions/{uuid.uuid4()}?api-version={SUBS_VERSION}")
    assert missing.status_code == 404
    assert error_code(missing) == "SubscriptionNotFound"
    no_group = twin.arm("GET", f"/subscriptions/{twin.subscription_id}/resourceGroups/nope?api-version=2021-04-01")
    assert (no_group.status_code, error_code(no_group)) == (404, "ResourceGroupNotFound")


def test_metadata_endpoints_need_no_token(twin: TwinHandle) -> None:
    response = twin.arm("GET", "/metadata/endpoints?api-version=2022-09-01", token="")
    assert response.status_code == 200
    cloud = response.json()
    assert cloud["resourceManager"].rstrip("/") == twin.urls["arm"]
    assert cloud["authentication"]["loginEndpoint"].rstrip("/") == twin.urls["login"]


def test_unknown_route_is_an_arm_404(twin: TwinHandle) -> None:
    response = twin.arm("GET", f"/subscriptions/{twin.subscription_id}/providers/Microsoft.Nope/things?api-version=1")
    assert response.status_code == 404
    assert error_code(response) == "InvalidResourceType"


# -- strictness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("missing", 401, "AuthenticationFailed"),
        ("not-bearer", 401, "InvalidAuthenticationToken"),
        ("wrong-audience", 401, "InvalidAuthenticationTokenAudience"),
        ("expired", 401, "ExpiredAuthenticationToken"),
        ("foreign-signature", 401, "InvalidAuthenticationToken"),
        ("garbage", 401, "InvalidAuthenticationToken"),
    ],
)
def test_bad_tokens_are_refused(twin: TwinHandle, case: str, status: int, code: str) -> None:
    headers: dict[str, str] = {}
    if case == "not-bearer":
        headers["Authorization"] = "Basic dXNlcjpwYXNz"
    elif case == "wrong-audience":
        headers["Authorization"] = "Bearer " + twin.token(twin.urls["logs"])
    elif case == "expired":
        headers["Authorization"] = "Bearer " + twin.token(twin.urls["arm"], lifetime=-60)
    elif case == "foreign-signature":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        forged = jwt.encode(
            {"aud": twin.urls["arm"], "iss": f"https://sts.windows.net/{twin.tenant_id}/", "iat": now, "nbf": now,
             "exp": now + 600, "oid": str(uuid.uuid4())},
            other,
            algorithm="RS256",
        )  # fmt: skip
        headers["Authorization"] = "Bearer " + forged
    elif case == "garbage":
        headers["Authorization"] = "Bearer not.a.jwt"
    response = twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}", token="", headers=headers)
    assert response.status_code == status
    assert error_code(response) == code


def test_api_version_is_required_and_checked(twin: TwinHandle) -> None:
    missing = twin.arm("GET", "/subscriptions")
    assert (missing.status_code, error_code(missing)) == (400, "MissingApiVersionParameter")
    unknown = twin.arm("GET", "/subscriptions?api-version=2099-01-01")
    assert (unknown.status_code, error_code(unknown)) == (400, "InvalidApiVersionParameter")
    assert "2022-12-01" in unknown.json()["error"]["message"]


# -- throttling ------------------------------------------------------------------------------


def test_throttling_answers_429_with_retry_after(twin: TwinHandle) -> None:
    path = f"/subscriptions/{twin.subscription_id}?api-version={SUBS_VERSION}"
    # Off: a subscription with room to spare, nothing counted, a full bucket reported.
    for _ in range(2):
        unthrottled = twin.arm("GET", path)
        assert unthrottled.headers["x-ms-ratelimit-remaining-subscription-reads"] == "250"
    assert twin.control("PUT", "/_twin/throttle", {"enabled": True, "scale": 0.02}) == (
        200,
        {"enabled": True, "scale": 0.02},
    )
    token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    statuses = [twin.arm("GET", path, token=token) for _ in range(8)]
    codes = [r.status_code for r in statuses]
    assert codes[:5] == [200] * 5  # bucket of 250 * 0.02 reads
    # On: every answer counts down, as ARM's front door does.
    assert [r.headers["x-ms-ratelimit-remaining-subscription-reads"] for r in statuses[:5]] == ["4", "3", "2", "1", "0"]
    throttled = statuses[codes.index(429)]
    assert error_code(throttled) == "SubscriptionRequestsThrottled"
    assert int(throttled.headers["Retry-After"]) >= 1
    assert throttled.headers["x-ms-ratelimit-remaining-subscription-reads"] == "0"
    # Writes have their own bucket: a write is still allowed.
    other = twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}", token=token)
    assert other.status_code == 200  # tenant-level reads are a different bucket


def test_sdk_pipeline_honours_retry_after_and_recovers(twin: TwinHandle) -> None:
    twin.control("POST", "/_twin/faults", {"service": "arm", "path": "^/subscriptions$", "status": 429,
                                            "code": "TooManyRequests", "retry_after": 0.1, "times": 2})  # fmt: skip
    client = ARMPipelineClient(
        base_url=twin.urls["arm"],
        policies=[
            RetryPolicy(retry_total=3, retry_backoff_factor=0.01),
            BearerTokenCredentialPolicy(twin.credential(), twin.urls["arm"] + "/.default"),
        ],
        connection_verify=twin.ca_file,
    )
    start = time.monotonic()
    response = client.send_request(HttpRequest("GET", f"{twin.urls['arm']}/subscriptions?api-version={SUBS_VERSION}"))
    assert response.status_code == 200
    assert time.monotonic() - start >= 0.2  # waited Retry-After twice
    _, log = twin.control("GET", "/_twin/log?service=arm")
    assert [e["status"] for e in log["entries"] if e["path"] == "/subscriptions"] == [429, 429, 200]


# -- faults, log, clock ----------------------------------------------------------------------


def test_fault_status_n_times_then_normal(twin: TwinHandle) -> None:
    status, fault = twin.control(
        "POST", "/_twin/faults", {"service": "arm", "path": "/subscriptions/", "status": 503, "times": 2}
    )
    assert status == 201
    path = f"/subscriptions/{twin.subscription_id}?api-version={SUBS_VERSION}"
    token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    assert [twin.arm("GET", path, token=token).status_code for _ in range(3)] == [503, 503, 200]
    assert fault["id"]


def test_fault_connection_reset_and_delay(twin: TwinHandle) -> None:
    twin.control("POST", "/_twin/faults", {"service": "arm", "path": "^/subscriptions$", "action": "reset"})
    token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    with pytest.raises(requests.ConnectionError):
        twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}", token=token)
    twin.control(
        "POST", "/_twin/faults", {"service": "arm", "path": "^/subscriptions$", "action": "delay", "delay": 0.3}
    )
    start = time.monotonic()
    assert twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}", token=token).status_code == 200
    assert time.monotonic() - start >= 0.3


def test_bad_fault_is_refused(twin: TwinHandle) -> None:
    status, body = twin.control("POST", "/_twin/faults", {"path": "x", "action": "explode"})
    assert status == 400
    assert "action must be one of" in body["error"]["message"]


def test_request_log_counts_reads_writes_per_route_and_principal(twin: TwinHandle) -> None:
    token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    for _ in range(3):
        twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}", token=token)
    status, counters = twin.control("GET", "/_twin/counters")
    assert status == 200
    assert counters["by_route"]["GET /subscriptions"] == 3
    assert counters["by_principal"][twin.client_id] == 3
    assert counters["reads"] >= 3


def test_clock_moves_forward_only(twin: TwinHandle) -> None:
    _, before = twin.control("GET", "/_twin/clock")
    status, after = twin.control("POST", "/_twin/clock/advance", {"days": 100})
    assert status == 200
    from datetime import datetime

    gap = datetime.fromisoformat(after["now"]) - datetime.fromisoformat(before["now"])
    assert 99.9 < gap.total_seconds() / 86400 < 100.1
    assert twin.control("POST", "/_twin/clock/advance", {"days": -1})[0] == 400
    # Tokens are checked against real time: moving the estate's clock logs nobody out.
    assert twin.arm("GET", f"/subscriptions?api-version={SUBS_VERSION}").status_code == 200


def test_bad_estate_fragment_names_the_problem(twin: TwinHandle) -> None:
    status, body = twin.control(
        "POST",
        "/_twin/estate",
        {"subscriptions": [{"id": twin.subscription_id, "resource_groups": [{"name": "rg-x", "bogus": []}]}]},
    )
    assert status == 400
    message = body["error"]["message"]
    assert "fragment.subscriptions[0].resource_groups[0]" in message
    assert "unknown section 'bogus'" in message


# -- storage through Azurite with twin tokens --------------------------------------------------


def storage(twin: TwinHandle, service: str, account: str = "apimrstate") -> str:
    return twin.env[f"APIMR_STORAGE_{service.upper()}_ENDPOINT"].replace("apimrstate", account)


def test_blob_queue_table_with_identity_sync(twin: TwinHandle) -> None:
    credential = twin.credential()
    blobs = BlobServiceClient(storage(twin, "blob"), credential=credential, **twin.sdk_kwargs)
    container = blobs.get_container_client(f"c{uuid.uuid4().hex[:10]}")
    container.create_container()
    container.upload_blob("hello.txt", b"hello")
    assert container.download_blob("hello.txt").readall() == b"hello"
    lease = container.get_blob_client("hello.txt").acquire_lease(lease_duration=15)
    with pytest.raises(HttpResponseError):
        container.upload_blob("hello.txt", b"overwrite", overwrite=True)  # leased: refused
    lease.release()

    queue = QueueClient(storage(twin, "queue"), f"q{uuid.uuid4().hex[:10]}", credential=credential, **twin.sdk_kwargs)
    queue.create_queue()
    queue.send_message("scan apim-prod")
    assert [m.content for m in queue.receive_messages()] == ["scan apim-prod"]

    tables = TableServiceClient(storage(twin, "table"), credential=credential, **twin.sdk_kwargs)
    table = tables.create_table_if_not_exists(f"t{uuid.uuid4().hex[:10]}")
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "state": "intent"})
    assert table.get_entity("p", "r")["state"] == "intent"


async def test_blob_with_identity_async(twin: TwinHandle) -> None:
    async with (
        twin.async_credential() as credential,
        AsyncBlobServiceClient(
            storage(twin, "blob", "apimrbackups"), credential=credential, **twin.sdk_kwargs
        ) as blobs,
    ):
        container = blobs.get_container_client(f"c{uuid.uuid4().hex[:10]}")
        await container.create_container()
        await container.upload_blob("b.bin", b"\x00\x01")
        downloaded = await (await container.download_blob("b.bin")).readall()
        assert downloaded == b"\x00\x01"


def test_azurite_refuses_a_token_for_another_audience(twin: TwinHandle) -> None:
    arm_token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    response = requests.get(
        storage(twin, "blob") + "?comp=list",
        headers={"Authorization": f"Bearer {arm_token}", "x-ms-version": "2021-08-06"},
        verify=twin.ca_file,
        timeout=10,
    )
    assert response.status_code in (401, 403)


def test_connection_refused_when_nothing_listens() -> None:
    from twin.azurite import free_port

    client = ARMPipelineClient(
        base_url=f"https://127.0.0.1:{free_port()}", policies=[RetryPolicy(retry_total=0)], connection_verify=False
    )
    with pytest.raises(ServiceRequestError):
        client.send_request(HttpRequest("GET", client._base_url + "/subscriptions"))
