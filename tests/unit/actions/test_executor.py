"""The executor with a recording fake of its narrow ArmApi: create-only writes, the
ETag chain between a plan's steps, and null-tolerant comparison."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from shared.actions import APIM_API_VERSION, ArmWrite, CopySecretToVault, Digest, Expectation, RemediationPlan
from shared.actions.executor import ArmResponse, PreconditionFailed, apply_plan, matches

NV = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a/namedValues/db"


class Recording:
    def __init__(self, answers: dict[tuple[str, str], list[ArmResponse]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, str | None]] = []

    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
    ) -> ArmResponse:
        self.calls.append((method, path, if_match))
        return self.answers[(method, path)].pop(0)


class Vault:
    def __init__(self) -> None:
        self.stored: list[str] = []

    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        self.stored.append(name)
        return f"{vault_url}/secrets/{name}/1"


def plan(*steps: ArmWrite | CopySecretToVault) -> RemediationPlan:
    return RemediationPlan("SEC-001", "i", NV, "Move it", (), tuple(steps), ())


SWITCH = ArmWrite(
    "PATCH", NV, APIM_API_VERSION, {"properties": {"keyVault": {}}}, None, "switch", etag_from_read=True,
    guard=(Expectation(NV, APIM_API_VERSION, "properties.secret", True),),
)  # fmt: skip
COPY = CopySecretToVault(NV, "https://kv.vault.azure.net", "db", "copy")


def test_copy_then_switch_uses_one_etag_chain() -> None:
    arm = Recording({
        ("POST", f"{NV}/listValue"): [ArmResponse(200, '"e1"', {"value": "s3cr3t"})],
        ("GET", NV): [ArmResponse(200, '"e1"', {"properties": {"secret": True}})],
        ("PATCH", NV): [ArmResponse(202, None, None)],
    })  # fmt: skip
    asyncio.run(apply_plan(plan(COPY, SWITCH), arm, Vault()))
    assert arm.calls[-1] == ("PATCH", NV, '"e1"')


def test_value_changed_between_copy_and_switch_is_a_precondition_failure() -> None:
    arm = Recording({
        ("POST", f"{NV}/listValue"): [ArmResponse(200, '"e1"', {"value": "old"})],
        ("GET", NV): [ArmResponse(200, '"e2"', {"properties": {"secret": True}})],
    })  # fmt: skip
    with pytest.raises(PreconditionFailed, match="changed since an earlier step"):
        asyncio.run(apply_plan(plan(COPY, SWITCH), arm, Vault()))
    assert [c[0] for c in arm.calls] == ["POST", "GET"]  # never PATCHed


def test_create_only_refuses_when_somebody_created_it() -> None:
    create = ArmWrite("PUT", NV, APIM_API_VERSION, {"properties": {}}, None, "create", create_only=True)
    arm = Recording({("GET", NV): [ArmResponse(200, '"x"', {})]})
    with pytest.raises(PreconditionFailed, match="somebody created it"):
        asyncio.run(apply_plan(plan(create), arm, Vault()))
    absent = Recording({("GET", NV): [ArmResponse(404, None, None)], ("PUT", NV): [ArmResponse(201, '"n"', {})]})
    asyncio.run(apply_plan(plan(create), absent, Vault()))
    assert absent.calls == [("GET", NV, None), ("PUT", NV, None)]


def test_dicts_match_whether_unset_is_null_or_absent() -> None:
    assert matches({"a": 1, "b": None, "c": {"d": None}}, {"a": 1, "c": {}})
    assert not matches({"a": 1, "b": 2}, {"a": 1})


BACKEND = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ApiManagement/service/a/backends/b"
SECRET_URL = "https://u:P4ssw0rd@b.example/x?sig=s1g-CANARY"
TLS_ON = ArmWrite(
    "PATCH", BACKEND, APIM_API_VERSION, {"properties": {"tls": {"validateCertificateChain": True}}}, None, "tls",
    etag_from_read=True, guard=(Expectation(BACKEND, APIM_API_VERSION, "properties.url", Digest.of(SECRET_URL)),),
)  # fmt: skip


def test_a_hashed_guard_holds_for_the_same_value() -> None:
    arm = Recording({
        ("GET", BACKEND): [ArmResponse(200, '"e1"', {"properties": {"url": SECRET_URL}})],
        ("PATCH", BACKEND): [ArmResponse(200, '"e2"', None)],
    })  # fmt: skip
    asyncio.run(apply_plan(plan(TLS_ON), arm, Vault()))
    assert arm.calls[-1] == ("PATCH", BACKEND, '"e1"')


def test_a_hashed_guard_stops_the_write_and_says_nothing_of_either_value() -> None:
    changed = "https://u:N3wPassw0rd@b.example/x?sig=other-CANARY"
    arm = Recording({("GET", BACKEND): [ArmResponse(200, '"e1"', {"properties": {"url": changed}})]})
    with pytest.raises(PreconditionFailed) as caught:
        asyncio.run(apply_plan(plan(TLS_ON), arm, Vault()))
    message = str(caught.value)
    assert "properties.url changed" in message
    for canary in ("P4ssw0rd", "N3wPassw0rd", "CANARY", "sig=", Digest.of(SECRET_URL).sha256):
        assert canary not in message
    assert [c[0] for c in arm.calls] == ["GET"]


def test_digest_matches_only_the_same_string() -> None:
    assert matches(SECRET_URL, Digest.of(SECRET_URL))
    assert not matches(SECRET_URL.upper(), Digest.of(SECRET_URL))
    assert not matches(None, Digest.of(SECRET_URL))
    assert "P4ssw0rd" not in repr(Digest.of(SECRET_URL))
