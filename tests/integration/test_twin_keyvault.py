"""The twin's Key Vault secrets data plane, driven by the real SecretClient (sync and async).

Every strictness rule the twin enforces has a test that sends the wrong request and sees
Key Vault's answer: bad api-version, no token, wrong audience, disabled secret, deleted
name reuse, invalid names and bodies, out-of-range page sizes and skip tokens.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient

pytestmark = pytest.mark.integration

VAULT = "kv-twin-tests"
RESOURCE_GROUP = "rg-kv-tests"
KEYVAULT_AUDIENCE = "https://vault.azure.net"
VERSION_ID = re.compile(r"^[0-9a-f]{32}$")


def _fragment(subscription_id: str, secrets: list[dict[str, Any]], vault: str = VAULT) -> dict[str, Any]:
    return {
        "subscriptions": [
            {
                "id": subscription_id,
                "resource_groups": [
                    {
                        "name": RESOURCE_GROUP,
                        "location": "westeurope",
                        "key_vaults": [{"name": vault, "tags": {"team": "platform"}, "secrets": secrets}],
                    }
                ],
            }
        ]
    }


def _seed_vault(twin: Any, secrets: list[dict[str, Any]] | None = None) -> str:
    twin.seed(_fragment(twin.subscription_id, secrets or []))
    url: str = twin.urls[f"vault:{VAULT}"]
    return url


@pytest.fixture
def vault_url(twin: Any) -> str:
    return _seed_vault(twin)


@pytest.fixture
def client(twin: Any, vault_url: str) -> Iterator[SecretClient]:
    with SecretClient(vault_url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as secrets:
        yield secrets


def _vault_token(twin: Any) -> str:
    token: str = twin.credential().get_token(f"{KEYVAULT_AUDIENCE}/.default").token
    return token


def _raw(twin: Any, method: str, url: str, *, token: str | None, **kwargs: Any) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, url, headers=headers, verify=twin.ca_file, timeout=30, **kwargs)


def _events(twin: Any, event_type: str) -> list[dict[str, Any]]:
    state = twin.server.state
    events: list[dict[str, Any]] = twin.server.call(lambda: copy.deepcopy(state.events))
    return [e for e in events if e["eventType"] == event_type]


def _vault_id(twin: Any) -> str:
    return (
        f"/subscriptions/{twin.subscription_id}/resourceGroups/{RESOURCE_GROUP}"
        f"/providers/Microsoft.KeyVault/vaults/{VAULT}"
    )


# -- the SDK's everyday calls ------------------------------------------------------------------


def test_set_get_latest_and_specific_version(client: SecretClient, vault_url: str) -> None:
    first = client.set_secret("apim-sub-key", "value-one", content_type="text/plain", tags={"CredentialId": "key1"})
    second = client.set_secret("apim-sub-key", "value-two", tags={"CredentialId": "key2"})

    assert first.properties.version is not None
    assert VERSION_ID.match(first.properties.version)
    assert second.properties.version != first.properties.version
    assert first.id == f"{vault_url}/secrets/apim-sub-key/{first.properties.version}"
    assert first.properties.vault_url == vault_url
    assert first.properties.content_type == "text/plain"
    assert first.properties.recovery_level == "Recoverable+Purgeable"
    assert first.properties.recoverable_days == 90

    latest = client.get_secret("apim-sub-key")
    assert latest.value == "value-two"
    assert latest.properties.version == second.properties.version
    assert latest.properties.tags == {"CredentialId": "key2"}
    older = client.get_secret("apim-sub-key", first.properties.version)
    assert older.value == "value-one"
    assert older.properties.created_on is not None
    assert older.properties.enabled is True

    # Key Vault names compare case-insensitively.
    assert client.get_secret("APIM-SUB-KEY").value == "value-two"

    versions = list(client.list_properties_of_secret_versions("apim-sub-key"))
    assert {v.version for v in versions} == {first.properties.version, second.properties.version}


def test_unknown_secret_and_version_are_404(client: SecretClient) -> None:
    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_secret("never-set")
    assert missing.value.error is not None
    assert missing.value.error.code == "SecretNotFound"
    client.set_secret("present", "v")
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("present", "0" * 32)


def test_list_secrets_pages_without_values(twin: Any) -> None:
    url = _seed_vault(twin, [{"name": f"seeded-{i}", "value": f"v{i}"} for i in range(7)])
    with SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as client:
        pages = [list(page) for page in client.list_properties_of_secrets(max_page_size=3).by_page()]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(str(p.name) for page in pages for p in page) == sorted(f"seeded-{i}" for i in range(7))

    # The wire: items carry no value and no version; nextLink is absolute, with a $skiptoken.
    response = _raw(twin, "GET", f"{url}/secrets?api-version=7.4&maxresults=3", token=_vault_token(twin))
    assert response.status_code == 200
    body = response.json()
    assert all("value" not in item for item in body["value"])
    assert all(re.fullmatch(rf"{re.escape(url)}/secrets/seeded-\d", item["id"]) for item in body["value"])
    assert body["nextLink"].startswith(f"{url}/secrets?")
    assert "$skiptoken=" in body["nextLink"]


def test_list_versions_pages(twin: Any) -> None:
    url = _seed_vault(
        twin,
        [
            {
                "name": "rotated",
                "value": "current",
                "versions": [{"value": f"old-{i}"} for i in range(4)],
            }
        ],
    )
    with SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as client:
        pages = [list(page) for page in client.list_properties_of_secret_versions("rotated", max_page_size=2).by_page()]
        assert [len(page) for page in pages] == [2, 2, 1]
        created = [p.created_on.timestamp() for page in pages for p in page if p.created_on is not None]
        assert len(created) == 5
        assert created == sorted(created)  # seeded older versions are older
        assert client.get_secret("rotated").value == "current"


def test_update_properties_disable_and_enable(client: SecretClient) -> None:
    secret = client.set_secret("rotating", "s3cret")
    updated = client.update_secret_properties(
        "rotating", secret.properties.version, enabled=False, tags={"owner": "apim"}, content_type="key"
    )
    assert updated.enabled is False
    assert updated.tags == {"owner": "apim"}
    assert updated.content_type == "key"

    with pytest.raises(HttpResponseError) as disabled:
        client.get_secret("rotating")
    assert disabled.value.status_code == 403
    assert disabled.value.error is not None
    assert disabled.value.error.code == "Forbidden"
    assert "disabled secret" in str(disabled.value.message)

    client.update_secret_properties("rotating", enabled=True)  # no version: the latest
    assert client.get_secret("rotating").value == "s3cret"


def test_seeded_disabled_secret_is_forbidden(twin: Any) -> None:
    url = _seed_vault(twin, [{"name": "off", "value": "x", "enabled": False}])
    with (
        SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as client,
        pytest.raises(HttpResponseError) as forbidden,
    ):
        client.get_secret("off")
    assert forbidden.value.status_code == 403


def test_delete_list_deleted_recover_and_purge(client: SecretClient) -> None:
    client.set_secret("doomed", "bye")
    deleted = client.begin_delete_secret("doomed", _polling_interval=0).result()
    assert deleted.recovery_id is not None
    assert deleted.recovery_id.endswith("/deletedsecrets/doomed")
    assert deleted.deleted_date is not None
    assert deleted.scheduled_purge_date is not None
    assert (deleted.scheduled_purge_date - deleted.deleted_date).days == 90

    with pytest.raises(ResourceNotFoundError):
        client.get_secret("doomed")
    assert "doomed" not in {p.name for p in client.list_properties_of_secrets()}
    assert [d.name for d in client.list_deleted_secrets()] == ["doomed"]
    assert client.get_deleted_secret("doomed").name == "doomed"

    # A name in the deleted state cannot be reused until recovered or purged.
    with pytest.raises(ResourceExistsError) as conflict:
        client.set_secret("doomed", "again")
    assert conflict.value.status_code == 409

    poller = client.begin_recover_deleted_secret("doomed", _polling_interval=0)
    poller.wait()
    assert client.get_secret("doomed").value == "bye"
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret("doomed")

    client.begin_delete_secret("doomed", _polling_interval=0).wait()
    client.purge_deleted_secret("doomed")
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret("doomed")
    with pytest.raises(ResourceNotFoundError):
        client.purge_deleted_secret("doomed")
    assert client.set_secret("doomed", "reborn").value == "reborn"


def test_deleted_secret_is_purged_after_retention(twin: Any, client: SecretClient) -> None:
    client.set_secret("expiring", "x")
    client.begin_delete_secret("expiring", _polling_interval=0).wait()
    status, _ = twin.control("POST", "/_twin/clock/advance", json={"days": 91})
    assert status == 200
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret("expiring")


def test_delete_unknown_secret_is_404(client: SecretClient) -> None:
    with pytest.raises(ResourceNotFoundError):
        client.begin_delete_secret("not-there", _polling_interval=0)
    with pytest.raises(ResourceNotFoundError):
        client.begin_recover_deleted_secret("not-there", _polling_interval=0)


def test_older_api_version_client_works(twin: Any, vault_url: str) -> None:
    with SecretClient(
        vault_url, twin.credential(), api_version="7.0", verify_challenge_resource=False, **twin.sdk_kwargs
    ) as client:
        client.set_secret("old-api", "v")
        assert client.get_secret("old-api").value == "v"


async def test_async_client_round_trip(twin: Any, vault_url: str) -> None:
    credential = twin.async_credential()
    async with (
        credential,
        AsyncSecretClient(vault_url, credential, verify_challenge_resource=False, **twin.sdk_kwargs) as client,
    ):
        for i in range(4):
            await client.set_secret(f"async-{i}", f"value-{i}")
        secret = await client.get_secret("async-2")
        assert secret.value == "value-2"
        names = [p.name async for p in client.list_properties_of_secrets(max_page_size=3)]
        assert sorted(str(n) for n in names) == [f"async-{i}" for i in range(4)]
        await client.update_secret_properties("async-1", enabled=False)
        with pytest.raises(HttpResponseError) as forbidden:
            await client.get_secret("async-1")
        assert forbidden.value.status_code == 403
        poller = await client.delete_secret("async-3", _polling_interval=0)
        assert poller.recovery_id is not None
        assert [d.name async for d in client.list_deleted_secrets()] == ["async-3"]
        await client.recover_deleted_secret("async-3", _polling_interval=0)
        assert (await client.get_secret("async-3")).value == "value-3"


# -- authentication -----------------------------------------------------------------------------


def test_request_without_token_gets_the_challenge(twin: Any, vault_url: str) -> None:
    response = _raw(twin, "GET", f"{vault_url}/secrets/anything?api-version=7.4", token=None)
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'authorization="{twin.urls["login"]}/{twin.tenant_id}"' in challenge
    assert f'resource="{KEYVAULT_AUDIENCE}"' in challenge


def test_token_for_another_audience_is_rejected(twin: Any, vault_url: str) -> None:
    arm_token = twin.credential().get_token(twin.urls["arm"] + "/.default").token
    response = _raw(twin, "GET", f"{vault_url}/secrets?api-version=7.4", token=arm_token)
    assert response.status_code == 401
    # The same request with a vault token succeeds: the audience made the difference.
    assert _raw(twin, "GET", f"{vault_url}/secrets?api-version=7.4", token=_vault_token(twin)).status_code == 200


# -- strictness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["api-version=2099-01-01", "api-version=7.7", "api-version=", ""])
def test_unknown_or_missing_api_version_is_400(twin: Any, vault_url: str, query: str) -> None:
    response = _raw(twin, "GET", f"{vault_url}/secrets?{query}", token=_vault_token(twin))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BadParameter"


@pytest.mark.parametrize("version", ["2026-04-01", "2025-07-01", "7.6", "7.5", "7.4", "7.3", "7.2", "7.1", "7.0"])
def test_every_sdk_api_version_is_accepted(twin: Any, vault_url: str, version: str) -> None:
    response = _raw(twin, "GET", f"{vault_url}/secrets?api-version={version}", token=_vault_token(twin))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/secrets/bad_name", {"value": "x"}, "invalid name"),
        ("/secrets/" + "a" * 128, {"value": "x"}, "invalid name"),
        ("/secrets/good", {}, "value"),
        ("/secrets/good", {"value": 42}, "value"),
        ("/secrets/good", {"value": "x", "attributes": {"exp": "tomorrow"}}, "exp"),
        ("/secrets/good", {"value": "x", "attributes": {"enabled": "yes"}}, "enabled"),
        ("/secrets/good", {"value": "x", "attributes": {"nbf": 200, "exp": 100}}, "exp"),
        ("/secrets/good", {"value": "x", "tags": {"n": 1}}, "tags"),
        ("/secrets/good", {"value": "x", "tags": {f"t{i}": "v" for i in range(16)}}, "tags"),
        ("/secrets/good", {"value": "x" * (25 * 1024 + 1)}, "value"),
    ],
)
def test_invalid_set_requests_are_400(
    twin: Any, vault_url: str, path: str, body: dict[str, Any], fragment: str
) -> None:
    response = _raw(twin, "PUT", f"{vault_url}{path}?api-version=7.4", token=_vault_token(twin), json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "BadParameter"
    assert fragment in error["message"]


def test_invalid_json_body_is_400(twin: Any, vault_url: str) -> None:
    response = _raw(
        twin,
        "PUT",
        f"{vault_url}/secrets/good?api-version=7.4",
        token=_vault_token(twin),
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400


def test_update_cannot_change_the_value(twin: Any, client: SecretClient, vault_url: str) -> None:
    secret = client.set_secret("fixed", "v1")
    url = f"{vault_url}/secrets/fixed/{secret.properties.version}?api-version=7.4"
    response = _raw(twin, "PATCH", url, token=_vault_token(twin), json={"value": "v2"})
    assert response.status_code == 400
    assert client.get_secret("fixed").value == "v1"


@pytest.mark.parametrize("query", ["maxresults=0", "maxresults=26", "maxresults=many", "$skiptoken=%%%"])
def test_bad_paging_parameters_are_400(twin: Any, vault_url: str, query: str) -> None:
    response = _raw(twin, "GET", f"{vault_url}/secrets?api-version=7.4&{query}", token=_vault_token(twin))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BadParameter"


# -- events -------------------------------------------------------------------------------------


def test_new_version_emits_event(twin: Any, client: SecretClient, vault_url: str) -> None:
    secret = client.set_secret("evented", "v", expires_on=None)
    events = _events(twin, "Microsoft.KeyVault.SecretNewVersionCreated")
    assert len(events) == 1
    event = events[0]
    assert event["topic"] == _vault_id(twin)
    assert event["subject"] == "evented"
    assert event["data"]["Id"] == secret.id
    assert event["data"]["VaultName"] == VAULT
    assert event["data"]["ObjectType"] == "Secret"
    assert event["data"]["Version"] == secret.properties.version
    assert event["dataVersion"] == "1"


def test_near_expiry_and_expired_events_follow_the_clock(twin: Any) -> None:
    _seed_vault(
        twin,
        [
            {"name": "soon", "value": "a", "expires_in_days": 40, "tags": {"CredentialId": "key1"}},
            {"name": "later", "value": "b", "expires_in_days": 100},
            {"name": "never", "value": "c"},
            # Only the current version counts: this one's older version expires soon, its current does not.
            {
                "name": "renewed",
                "value": "new",
                "expires_in_days": 365,
                "versions": [{"value": "old", "expires_in_days": 5}],
            },
        ],
    )

    def scan() -> list[dict[str, Any]]:
        status, body = twin.control("POST", "/_twin/keyvault/expiry-scan")
        assert status == 200, body
        return list(body["events"])

    assert scan() == []
    twin.control("POST", "/_twin/clock/advance", json={"days": 15})
    near = scan()
    assert [(e["eventType"], e["subject"]) for e in near] == [("Microsoft.KeyVault.SecretNearExpiry", "soon")]
    assert near[0]["topic"] == _vault_id(twin)
    assert near[0]["data"]["EXP"] is not None
    assert near[0]["data"]["EXP"].isdigit()
    assert near[0]["data"]["Id"].startswith(twin.urls[f"vault:{VAULT}"] + "/secrets/soon/")
    assert scan() == []  # once per version
    assert len(_events(twin, "Microsoft.KeyVault.SecretNearExpiry")) == 1

    twin.control("POST", "/_twin/clock/advance", json={"days": 30})
    expired = scan()
    assert [(e["eventType"], e["subject"]) for e in expired] == [("Microsoft.KeyVault.SecretExpired", "soon")]
    twin.control("POST", "/_twin/clock/advance", json={"days": 30})
    assert [(e["eventType"], e["subject"]) for e in scan()] == [("Microsoft.KeyVault.SecretNearExpiry", "later")]


def test_new_version_replaces_the_expiring_one(twin: Any) -> None:
    url = _seed_vault(twin, [{"name": "rotate-me", "value": "a", "expires_in_days": 10}])
    with SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as client:
        client.set_secret("rotate-me", "b")  # no expiry on the new current version
    status, body = twin.control("POST", "/_twin/keyvault/expiry-scan")
    assert status == 200
    assert body["events"] == []


# -- seeding ------------------------------------------------------------------------------------


def _vault_resource(twin: Any, vault: str) -> dict[str, Any]:
    status, body = twin.control("GET", "/_twin/state")
    assert status == 200
    vault_id = _vault_id(twin).rsplit("/", 1)[0] + f"/{vault}"
    found = [r["body"] for r in body["resources"] if r["id"].lower() == vault_id.lower()]
    assert len(found) == 1
    resource: dict[str, Any] = found[0]
    return resource


def test_seeded_vault_is_an_arm_resource_with_its_uri(twin: Any) -> None:
    _seed_vault(twin)
    twin.control("POST", "/_twin/reset")
    vault_url = _seed_vault(twin)  # the vault's port is known now: seeding writes it
    resource = _vault_resource(twin, VAULT)
    assert resource["type"] == "Microsoft.KeyVault/vaults"
    assert resource["properties"]["vaultUri"] == vault_url + "/"
    assert resource["tags"] == {"team": "platform"}


def test_first_seeded_vault_gets_its_uri_before_any_vault_request(twin: Any) -> None:
    twin.seed(_fragment(twin.subscription_id, [], vault="kv-twin-first-seed"))
    resource = _vault_resource(twin, "kv-twin-first-seed")
    assert resource["properties"]["vaultUri"] == twin.urls["vault:kv-twin-first-seed"] + "/"


def test_seeded_secret_attributes(twin: Any) -> None:
    url = _seed_vault(
        twin,
        [
            {
                "name": "seeded",
                "value": "v",
                "content_type": "application/x-apim-key",
                "expires": "2030-01-02T03:04:05Z",
                "not_before": "2020-01-01T00:00:00Z",
                "tags": {"CredentialId": "key1"},
                "created_days_ago": 80,
            }
        ],
    )
    with SecretClient(url, twin.credential(), verify_challenge_resource=False, **twin.sdk_kwargs) as client:
        secret = client.get_secret("seeded")
    assert secret.properties.expires_on is not None
    assert secret.properties.expires_on.isoformat().startswith("2030-01-02T03:04:05")
    assert secret.properties.not_before is not None
    assert secret.properties.not_before.year == 2020
    assert secret.properties.content_type == "application/x-apim-key"
    assert secret.properties.created_on is not None
    assert secret.properties.updated_on == secret.properties.created_on


@pytest.mark.parametrize(
    ("secrets", "where"),
    [
        ([{"name": "bad_name", "value": "x"}], "key_vaults: [0].secrets[0].name"),
        ([{"name": "ok"}], "key_vaults: [0].secrets[0].value"),
        ([{"name": "ok", "value": "x", "expires_in_days": 1, "expires": "2030-01-01T00:00:00Z"}], "secrets[0]"),
        ([{"name": "ok", "value": "x", "versions": [{"value": 3}]}], "secrets[0].versions[0].value"),
        ([{"name": "ok", "value": "x", "colour": "red"}], "colour"),
        ([{"name": "dup", "value": "x"}, {"name": "DUP", "value": "y"}], "secrets[1].name"),
    ],
)
def test_bad_estate_sections_are_refused(twin: Any, secrets: list[dict[str, Any]], where: str) -> None:
    status, body = twin.control("POST", "/_twin/estate", json=_fragment(twin.subscription_id, secrets))
    assert status == 400
    assert body["error"]["code"] == "InvalidEstate"
    assert where in body["error"]["message"]


def test_vault_names_are_global(twin: Any, vault_url: str) -> None:
    fragment = _fragment(twin.subscription_ids[-1], [])
    fragment["subscriptions"][0]["resource_groups"][0]["name"] = "rg-elsewhere"
    status, body = twin.control("POST", "/_twin/estate", json=fragment)
    assert status == 400
    assert "global" in body["error"]["message"]
