"""No lock-outs (issue 8): the engine, run as the installed command against the twin,
gathers evidence before planning, and the dry run shows the same refusal the apply gives.
KEY-001 suspends only a key the gateway logs show unused; API-003 turns validation on only
after a TLS handshake to the backend validated (and its guard, output and journal carry no
credential of the backend URL); SEC-001 right after ID-001 names the role to grant instead
of copying a secret the brand-new identity cannot read."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme

from shared.azure import ClientFactory
from shared.journal import Journal
from shared.settings import load_settings
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, VAULT, compliant, drift, fragment_for, vault_id
from tests.integration.test_remediate import apim_writes, cli, product_env

pytestmark = pytest.mark.integration

KEY_REMEDIATE = "version: 1\nrules:\n  KEY-001: {mode: remediate}\n"


def seed_spec(twin: TwinHandle, spec: dict[str, Any], gateway_rows: list[dict[str, Any]] | None = None) -> str:
    fragment, ids = fragment_for({spec["name"]: spec}, twin.subscription_id)
    service_id = ids[spec["name"]]
    if gateway_rows is not None:
        [group] = fragment["subscriptions"][0]["resource_groups"]
        group["workspaces"][0]["tables"] = {
            "ApiManagementGatewayLogs": {"rows": [{"_ResourceId": service_id, **r} for r in gateway_rows]}
        }
    twin.seed(fragment)
    return service_id


def key_001_instance(twin: TwinHandle, name: str, rows: list[dict[str, Any]]) -> str:
    spec = compliant(name, twin.subscription_id)
    drift("KEY-001", spec)
    return seed_spec(twin, spec, rows)


def subscription_state(twin: TwinHandle, service_id: str, sid: str) -> str:
    body = twin.arm("GET", f"{service_id}/subscriptions/{sid}?api-version=2024-05-01").json()
    return str(body["properties"]["state"])


def test_key_001_refuses_in_dry_run_and_apply_a_key_the_logs_show_in_use(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = key_001_instance(
        twin,
        "key-in-use",
        [
            {"ago": "29.9d", "ApimSubscriptionId": "orders-mobile"},
            {"ago": "2d", "ApimSubscriptionId": "all-apis", "repeat": 3},
        ],
    )
    env = product_env(twin, tmp_path, KEY_REMEDIATE)
    twin.control("DELETE", "/_twin/log")
    for apply in ((), ("--apply",)):
        result = cli(env, "remediate", "--instance", service_id, "--rule", "KEY-001", *apply)
        assert "REFUSED   KEY-001" in result.stdout, result.stdout + result.stderr
        assert "show subscription 'all-apis' in use: 3 request(s) in the last 30 days, last at" in result.stdout
    assert apim_writes(twin) == []
    assert subscription_state(twin, service_id, "all-apis") == "active"


def test_key_001_refuses_when_no_workspace_receives_gateway_logs(twin: TwinHandle, tmp_path: Path) -> None:
    spec = compliant("key-no-logs", twin.subscription_id)
    drift("KEY-001", spec)
    spec["_diagnostic_setting"] = False
    service_id = seed_spec(twin, spec)
    result = cli(product_env(twin, tmp_path, KEY_REMEDIATE), "remediate", "--instance", service_id, "--rule", "KEY-001")
    assert "REFUSED   KEY-001" in result.stdout, result.stdout + result.stderr
    assert "cannot show subscription 'all-apis' unused for 30 days: no diagnostic setting sends" in result.stdout


def test_key_001_suspends_a_key_the_logs_show_unused(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = key_001_instance(
        twin,
        "key-unused",
        [{"ago": "29.9d", "ApimSubscriptionId": "orders-mobile"}, {"ago": "1h", "ApimSubscriptionId": "orders-mobile"}],
    )
    env = product_env(twin, tmp_path, KEY_REMEDIATE)
    result = cli(env, "remediate", "--instance", service_id, "--rule", "KEY-001", "--apply", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    [fixed] = json.loads(result.stdout)["results"]
    assert (fixed["rule"], fixed["status"]) == ("KEY-001", "fixed")
    assert "unused for 30 days" in fixed["summary"]
    assert subscription_state(twin, service_id, "all-apis") == "suspended"


# -- API-003 ----------------------------------------------------------------------------------


@contextmanager
def tls_backend(context: ssl.SSLContext) -> Iterator[int]:
    """Completes TLS handshakes on 127.0.0.1 (loopback only) until closed; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(5)
                context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def leaf_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


SECRETS_IN_URL = ("P4ssw0rd", "svc-user", "s1g-CANARY", "c0de-CANARY", "sig=", "code=")


def api_003_instance(twin: TwinHandle, name: str, port: int) -> str:
    spec = compliant(name, twin.subscription_id)
    drift("API-003", spec)
    spec["backends"][0]["url"] = f"https://svc-user:P4ssw0rd@127.0.0.1:{port}/api?code=c0de-CANARY&sig=s1g-CANARY"
    return seed_spec(twin, spec)


def api_003_env(twin: TwinHandle, tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    env = product_env(twin, tmp_path, "version: 1\nrules:\n  API-003: {mode: remediate}\n")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(env["APIMR_CA_BUNDLE"]).read_bytes() + b"\n" + ca.cert_pem.bytes())
    env["APIMR_CA_BUNDLE"] = str(bundle)
    return env


async def test_api_003_validated_backend_is_fixed_guarded_by_hash_with_no_credential_anywhere(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    ca = trustme.CA()
    with tls_backend(leaf_context(ca, tmp_path)) as port:
        # Its own instance name: the journal (in Azurite) outlives the twin's per-test reset.
        service_id = api_003_instance(twin, "api3-valid", port)
        env = api_003_env(twin, tmp_path, ca)
        dry = await asyncio.to_thread(cli, env, "remediate", "--instance", service_id, "--rule", "API-003")
        assert "WOULD     API-003" in dry.stdout, dry.stdout + dry.stderr
        assert f"a TLS handshake to https://127.0.0.1:{port} validated both" in dry.stdout
        assert "properties.url unchanged (compared by SHA-256)" in dry.stdout
        applied = await asyncio.to_thread(
            cli, env, "remediate", "--instance", service_id, "--rule", "API-003", "--apply", "--format", "json"
        )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    [fixed] = json.loads(applied.stdout)["results"]
    assert (fixed["rule"], fixed["status"]) == ("API-003", "fixed")
    for secret in SECRETS_IN_URL:
        assert secret not in dry.stdout + dry.stderr + applied.stdout + applied.stderr
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    factory = ClientFactory(load_settings(env))
    try:
        entries = await Journal(factory.table_service_async()).history(service_id)
    finally:
        await factory.aclose()
        factory.close()
    assert entries
    for entry in entries:
        for secret in SECRETS_IN_URL:
            assert secret not in repr(entry)


def test_api_003_untrusted_backend_is_refused_in_dry_run_and_apply(twin: TwinHandle, tmp_path: Path) -> None:
    trusted, stranger = trustme.CA(), trustme.CA()
    with tls_backend(leaf_context(stranger, tmp_path)) as port:
        service_id = api_003_instance(twin, "api3-untrusted", port)
        env = api_003_env(twin, tmp_path, trusted)
        twin.control("DELETE", "/_twin/log")
        outputs = [
            cli(env, "remediate", "--instance", service_id, "--rule", "API-003", *apply) for apply in ((), ("--apply",))
        ]
    for result in outputs:
        assert "REFUSED   API-003" in result.stdout, result.stdout + result.stderr
        assert (
            f"a TLS handshake to backend 'orders' (https://127.0.0.1:{port}) did not validate: issuer not trusted"
            in result.stdout
        )
        for secret in SECRETS_IN_URL:
            assert secret not in result.stdout + result.stderr
    assert apim_writes(twin) == []


# -- SEC-001 right after ID-001 -----------------------------------------------------------------


def test_sec_001_right_after_id_001_names_the_role_instead_of_moving_the_secret(
    twin: TwinHandle, tmp_path: Path
) -> None:
    spec = compliant("fresh-identity", twin.subscription_id)
    drift("ID-001", spec)
    drift("SEC-001", spec)
    service_id = seed_spec(twin, spec)
    env = product_env(twin, tmp_path, "version: 1\nrules:\n  ID-001: {mode: remediate}\n  SEC-001: {mode: remediate}\n")
    dry = cli(env, "remediate", "--instance", service_id, "--rule", "ID-001", "--rule", "SEC-001")
    assert "WOULD     ID-001" in dry.stdout, dry.stdout + dry.stderr
    assert "REFUSED   SEC-001" in dry.stdout
    assert "grant 'Key Vault Secrets User' on the vault to the principal of the new system-assigned identity" in (
        dry.stdout
    )
    applied = cli(env, "remediate", "--instance", service_id, "--rule", "ID-001", "--rule", "SEC-001", "--apply",
                  "--format", "json")  # fmt: skip
    results = {r["rule"]: r for r in json.loads(applied.stdout)["results"]}
    assert results["ID-001"]["status"] == "fixed"
    assert results["SEC-001"]["status"] == "refused"
    principal = twin.arm("GET", f"{service_id}?api-version=2024-05-01").json()["identity"]["principalId"]
    assert f"grant 'Key Vault Secrets User' on the vault to principal {principal}" in results["SEC-001"]["detail"]
    assert "The next run moves named value 'db-password' once that is granted" in results["SEC-001"]["detail"]
    # Nothing was copied: the named value is still APIM's own secret.
    named_value = twin.arm("GET", f"{service_id}/namedValues/db-password?api-version=2024-05-01").json()
    assert not (named_value["properties"].get("keyVault") or {}).get("secretIdentifier")
    assert CANARY not in applied.stdout + applied.stderr + dry.stdout

    # The operator does what the refusal says: the new identity gets "Key Vault Secrets User" on
    # the vault. The next run moves the secret, and APIM's read of the new reference with that
    # identity succeeds (the twin enforces Key Vault RBAC: without the grant it is Forbidden).
    twin.grant("Key Vault Secrets User", vault_id(twin.subscription_id), principal={"managed_identity_of": service_id})
    moved = cli(env, "remediate", "--instance", service_id, "--rule", "SEC-001", "--apply", "--format", "json")
    [result] = json.loads(moved.stdout)["results"]
    assert (result["rule"], result["status"]) == ("SEC-001", "fixed"), moved.stdout + moved.stderr
    vault = twin.arm("GET", f"{service_id}/namedValues/db-password?api-version=2024-05-01").json()["properties"]
    assert vault["keyVault"]["secretIdentifier"].startswith(twin.urls[f"vault:{VAULT}"] + "/secrets/")
    assert vault["keyVault"]["lastStatus"]["code"] == "Success"
    assert CANARY not in moved.stdout + moved.stderr
