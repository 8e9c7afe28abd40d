"""Incidents without Azure: which problems a run leaves to people and how they are grouped,
the resolution note, the sinks' payloads (generic JSON, Teams Adaptive Card, Slack Block
Kit) and signature, Sentinel's properties, the webhook's retries (through a recording fake
of the narrow `HttpPost` Protocol), redaction and the incident settings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from handlers.incidents import problems_from_report, resolution_note
from handlers.remediate import ActionResult, RemediationReport, Status
from shared.errors import PermanentError, SettingsError, TransientError
from shared.incidents import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentStatus,
    NoAnswer,
    Problem,
    ProblemKind,
    WebhookFormat,
    WebhookSink,
    fingerprint_of,
    incident_guid,
    payload,
    redact,
    sentinel_properties,
    signature,
    verify_signature,
)
from shared.model import Evidence, Exemption, Finding, Severity
from shared.settings import load_settings

SUB = "11111111-2222-3333-4444-555555555555"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.ApiManagement/service/apim-one"
NAMED_VALUE = f"{SERVICE}/namedValues/db-password"
WORKSPACE = f"/subscriptions/{SUB}/resourceGroups/rg-sec/providers/Microsoft.OperationalInsights/workspaces/law-sec"
T0 = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


def finding(rule_id: str, *, resource: str = SERVICE, entry: str = "", severity: Severity = Severity.HIGH,
            exempt: bool = False, remediable: bool = True) -> Finding:  # fmt: skip
    return Finding(
        rule_id=rule_id,
        resource_id=resource,
        instance_id=SERVICE,
        severity=severity,
        title=f"title of {rule_id}",
        message=f"{rule_id} drifts on apim-one ({entry or 'the service'})",
        evidence=Evidence(path=f"properties.customProperties.{entry or rule_id}", actual="True", expected="False"),
        remediable=remediable,
        exemption=Exemption("migration window", "policy") if exempt else None,
        entry=entry,
    )


def report(
    remaining: tuple[Finding, ...], results: tuple[ActionResult, ...] = (), **changes: object
) -> RemediationReport:
    base = RemediationReport(SERVICE, dry_run=False, correlation_id="run-1", results=results, remaining=remaining)
    return replace(base, **changes)  # type: ignore[arg-type]


def skipped(rule_id: str, resource: str = SERVICE) -> ActionResult:
    return ActionResult(rule_id, resource, Status.SKIPPED, "x", detail=f"{rule_id} is in detect mode; set rules...")


# -- which problems, grouped how ---------------------------------------------------------------


def test_twelve_tls_findings_on_one_instance_are_one_problem() -> None:
    tls = tuple(
        finding(rule, entry=f"suite-{i}", severity=Severity.MEDIUM if rule != "TLS-001" else Severity.HIGH)
        for i, rule in enumerate(["TLS-001"] * 2 + ["TLS-002"] * 3 + ["TLS-003"] * 7)
    )
    [problem] = problems_from_report(report(tls, tuple(skipped(r) for r in ("TLS-001", "TLS-002", "TLS-003"))))
    assert problem.fingerprint == fingerprint_of("TLS", SERVICE)
    assert problem.kind is ProblemKind.FINDING
    assert problem.severity is Severity.HIGH  # the worst of the group
    assert problem.title == "12 TLS findings on apim-one"
    assert problem.description.count("\n| TLS-") == 12  # one table row each
    assert "left to people: TLS-001 is in detect mode" in problem.description


def test_families_and_resources_make_separate_problems() -> None:
    found = problems_from_report(
        report((finding("TLS-001"), finding("SEC-001", resource=NAMED_VALUE), finding("NET-001")))
    )
    assert sorted(p.fingerprint for p in found) == sorted(
        [fingerprint_of("TLS", SERVICE), fingerprint_of("SEC", NAMED_VALUE), fingerprint_of("NET", SERVICE)]
    )
    [sec] = [p for p in found if p.family == "SEC"]
    assert sec.title == "SEC-001 title of SEC-001 (db-password) on apim-one"


def test_exempt_findings_and_pending_fixes_are_not_problems() -> None:
    pending = ActionResult("NET-001", SERVICE, Status.PENDING, "x", detail="Azure is applying the update")
    found = problems_from_report(report((finding("TLS-001", exempt=True), finding("NET-001")), (pending,)))
    assert found == []


def test_what_the_product_did_is_said_for_refusals_and_failures() -> None:
    refused = ActionResult(
        "NET-001", SERVICE, Status.REFUSED, "refused", detail="no private endpoint: would cut every client off"
    )
    failed = ActionResult("TLS-001", SERVICE, Status.FAILED, "x", detail="the service update was refused: Conflict")
    found = problems_from_report(
        report((finding("NET-001"), finding("TLS-001"), finding("API-002", remediable=False)), (refused, failed))
    )
    text = {p.family: p.description for p in found}
    assert "the fix was refused: no private endpoint: would cut every client off" in text["NET"]
    assert "the fix failed: the service update was refused: Conflict" in text["TLS"]
    assert "left to people: this finding has no automatic remediation" in text["API"]


def test_a_stopped_run_is_a_problem_of_its_own() -> None:
    found = problems_from_report(report((), stopped="10 writes planned, the limit is 5"))
    [run] = found
    assert (run.kind, run.family, run.severity) == (ProblemKind.RUN, "RUN", Severity.HIGH)
    assert "10 writes planned, the limit is 5" in run.description


def incident(**changes: object) -> Incident:
    base = Incident(
        fingerprint=fingerprint_of("TLS", SERVICE),
        kind=ProblemKind.FINDING,
        family="TLS",
        resource_id=SERVICE,
        instance_id=SERVICE,
        title="3 TLS findings on apim-one",
        description="**TLS** drift",
        severity=Severity.HIGH,
        status=IncidentStatus.ACTIVE,
        first_seen=T0,
        last_seen=T0,
        count=4,
        version=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_resolution_note_says_who_fixed_it() -> None:
    fixed = ActionResult("TLS-001", SERVICE, Status.FIXED, "set Tls10 to False")
    assert resolution_note(incident(), report((), (fixed,))).startswith(
        "fixed by apim-remediator in run run-1 (TLS-001: set Tls10 to False)"
    )
    assert resolution_note(incident(), report(())).startswith(
        "no longer seen by run run-1: fixed since the previous run"
    )
    exempt = finding("TLS-001", exempt=True)
    assert resolution_note(incident(), report((exempt,))).startswith("now exempt (migration window)")


# -- the problem and redaction ---------------------------------------------------------------


def test_a_problem_names_its_family_resource_and_title() -> None:
    with pytest.raises(PermanentError, match="family"):
        Problem(ProblemKind.BACKUP, "backup", SERVICE, "t", Severity.HIGH, "d")
    with pytest.raises(PermanentError, match="resource"):
        Problem(ProblemKind.BACKUP, "BACKUP", " ", "t", Severity.HIGH, "d")
    ok = Problem(ProblemKind.BACKUP, "BACKUP", SERVICE.upper(), "t", Severity.HIGH, "d")
    assert ok.fingerprint == f"BACKUP:{SERVICE.lower()}"
    assert incident_guid(ok.fingerprint) == incident_guid(fingerprint_of("BACKUP", SERVICE))


@pytest.mark.parametrize(
    "text",
    [
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0LWtleQ==;EndpointSuffix=x",
        "https://acct.blob.core.windows.net/c?sv=2024&sig=AbCdEf%2B123",
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123",
        "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl",
        '{"password": "hunter2hunter2"}',
    ],
)
def test_redaction_removes_credentials(text: str) -> None:
    cleaned = redact(text)
    for secret in ("c2VjcmV0LWtleQ", "AbCdEf", "abcdefghijklmnop", "eyJzdWIiOiIxMjMifQ", "hunter2"):
        assert secret not in cleaned


# -- payloads and the signature ----------------------------------------------------------------


def change(kind: ChangeKind = ChangeKind.OPENED, **changes: object) -> IncidentChange:
    return IncidentChange(kind, incident(**changes), "run-1")


def test_generic_json_carries_the_delivery_id_and_the_incident() -> None:
    body = payload(change(), WebhookFormat.JSON)
    assert body["delivery_id"] == change().delivery_id
    assert body["change"] == "opened"
    assert body["incident"]["id"] == incident_guid(incident().fingerprint)
    assert body["incident"]["count"] == 4


def test_teams_gets_an_adaptive_card_for_a_workflows_webhook() -> None:
    body = payload(change(ChangeKind.RESOLVED, status=IncidentStatus.RESOLVED, note="fixed"), WebhookFormat.TEAMS)
    assert body["type"] == "message"
    [attachment] = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    assert card["body"][0]["text"] == "Incident resolved: 3 TLS findings on apim-one"
    assert {"title": "Resolution", "value": "fixed"} in card["body"][1]["facts"]


def test_slack_gets_block_kit() -> None:
    body = payload(change(), WebhookFormat.SLACK)
    assert body["text"] == "New incident: 3 TLS findings on apim-one"
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "section"]
    assert body["blocks"][0]["text"]["type"] == "plain_text"
    assert all(len(f["text"]) <= 2000 for f in body["blocks"][1]["fields"])


def test_signature_verifies_only_the_same_body_key_and_a_fresh_timestamp() -> None:
    key, body, stamp = b"k", b'{"a":1}', "1764486000"
    header = signature(key, stamp, body)
    assert header.startswith("sha256=")
    assert verify_signature(key, stamp, body, header, now=1764486000 + 10)
    assert not verify_signature(key, stamp, body + b" ", header, now=1764486000)
    assert not verify_signature(b"other", stamp, body, header, now=1764486000)
    assert not verify_signature(key, stamp, body, header, now=1764486000 + 3600)  # a replay an hour later
    assert not verify_signature(key, "not-a-time", body, header, now=1764486000)


# -- Sentinel's properties ---------------------------------------------------------------------


def test_sentinel_properties_map_severity_status_and_keep_the_analysts() -> None:
    owner = {"assignedTo": "Dana", "objectId": None, "email": None, "userPrincipalName": None, "ownerType": "User"}
    labels = [{"labelName": "triage", "labelType": "User"}, {"labelName": "apim-remediator", "labelType": "User"}]
    props = sentinel_properties(incident(), owner=owner, labels=labels)
    assert (props["severity"], props["status"]) == ("High", "Active")
    assert props["owner"] == owner
    assert [label["labelName"] for label in props["labels"]] == ["triage", "apim-remediator", "TLS"]
    assert "classification" not in props
    closed = sentinel_properties(incident(status=IncidentStatus.RESOLVED, note="fixed by apim-remediator"))
    assert (closed["status"], closed["classification"]) == ("Closed", "TruePositive")
    assert closed["classificationComment"] == "fixed by apim-remediator"
    assert "owner" not in closed  # nobody assigned: the service's default stays


def test_sentinel_description_stays_short() -> None:
    props = sentinel_properties(incident(description="x" * 50_000))
    assert len(props["description"]) <= 5000
    assert "Seen 4 time(s)" in props["description"]


# -- the webhook sink (a recording fake of HttpPost) --------------------------------------------


class Post:
    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, bytes, dict[str, str], float]] = []

    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> int:
        self.calls.append((url, body, dict(headers), seconds))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def sink(post: Post, **kwargs: object) -> WebhookSink:
    async def key() -> bytes:
        return b"hmac-key"

    url = "https://hooks.example/in?sig=SECRETSIG"
    return WebhookSink(url, post, secret=key, backoff=0, clock=lambda: 1764486000.0, **kwargs)  # type: ignore[arg-type]


def test_webhook_retries_transient_answers_and_signs_every_attempt() -> None:
    post = Post(503, OSError("refused"), 204)
    asyncio.run(sink(post, timeout=3.0).deliver(change(), {}))
    assert len(post.calls) == 3
    for _, body, headers, seconds in post.calls:
        assert seconds == 3.0
        assert verify_signature(b"hmac-key", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER], now=1764486000)
        assert headers["X-Apimr-Delivery"] == change().delivery_id


def test_webhook_does_not_hammer_a_client_error_and_never_names_the_url() -> None:
    post = Post(400, 204)
    with pytest.raises(TransientError) as info:
        asyncio.run(sink(post).deliver(change(), {}))
    assert len(post.calls) == 1
    assert "hooks.example answered HTTP 400" in str(info.value)
    assert "SECRETSIG" not in str(info.value)


def test_webhook_gives_up_after_its_attempts() -> None:
    post = Post(TimeoutError(), NoAnswer("ClientConnectorError: ConnectionRefusedError"), TimeoutError())
    with pytest.raises(TransientError, match=r"no answer from hooks\.example"):
        asyncio.run(sink(post).deliver(change(), {}))
    assert len(post.calls) == 3


def test_webhook_names_the_kind_of_failure_it_got() -> None:
    post = Post(NoAnswer("ClientConnectorError: ConnectionRefusedError"))
    with pytest.raises(TransientError) as info:
        asyncio.run(sink(post, attempts=1).deliver(change(), {}))
    assert "no answer from hooks.example (ClientConnectorError: ConnectionRefusedError)" in str(info.value)


def test_teams_and_slack_bodies_are_what_is_signed() -> None:
    post = Post(200)
    asyncio.run(sink(post, fmt=WebhookFormat.TEAMS).deliver(change(), {}))
    assert json.loads(post.calls[0][1])["type"] == "message"


# -- settings -------------------------------------------------------------------------------------


def base(**extra: str) -> dict[str, str]:
    return {"APIMR_SUBSCRIPTION_IDS": SUB, "APIMR_STORAGE_ACCOUNT": "apimrstate", **extra}


def problems(env: Mapping[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_incident_settings_defaults_and_a_full_configuration() -> None:
    assert load_settings(base()).incidents.sentinel_workspace is None
    assert load_settings(base()).incidents.max_new_per_sweep == 10
    settings = load_settings(
        base(
            APIMR_KEY_VAULT_URL="https://kv.vault.azure.net",
            APIMR_INCIDENT_SENTINEL_WORKSPACE=WORKSPACE,
            APIMR_INCIDENT_WEBHOOK_URL="https://prod-01.westeurope.logic.azure.com/workflows/x?sig=SECRETSIG",
            APIMR_INCIDENT_WEBHOOK_FORMAT="Teams",
            APIMR_INCIDENT_MAX_NEW_PER_SWEEP="3",
        )
    ).incidents
    assert settings.sentinel_workspace == WORKSPACE
    assert settings.webhook_format == "teams"
    assert settings.webhook_host == "prod-01.westeurope.logic.azure.com"
    assert "SECRETSIG" not in repr(settings)
    assert settings.max_new_per_sweep == 3


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (base(APIMR_INCIDENT_SENTINEL_WORKSPACE="/subscriptions/x/law"), "INCIDENT_SENTINEL_WORKSPACE: must be a Log"),
        (base(APIMR_INCIDENT_WEBHOOK_URL="http://hooks.example/in?sig=SECRETSIG",
              APIMR_INCIDENT_WEBHOOK_FORMAT="slack"),
         "INCIDENT_WEBHOOK_URL: must be an https:// URL (http:// only to localhost)"),
        (base(APIMR_INCIDENT_WEBHOOK_URL="https://hooks.example/in"),
         "INCIDENT_WEBHOOK_SECRET_NAME: is required for a json"),
        (base(APIMR_INCIDENT_WEBHOOK_URL="https://h.example/in", APIMR_INCIDENT_WEBHOOK_SECRET_NAME="hmac"),
         "INCIDENT_WEBHOOK_SECRET_NAME: needs APIMR_KEY_VAULT_URL"),
        (base(APIMR_INCIDENT_WEBHOOK_FORMAT="email"), "INCIDENT_WEBHOOK_FORMAT: must be one of json, teams, slack"),
        (base(APIMR_INCIDENT_MAX_NEW_PER_SWEEP="0"), "INCIDENT_MAX_NEW_PER_SWEEP: must be from 1 to 1000"),
    ],
)  # fmt: skip
def test_incident_settings_problems_are_named(env: dict[str, str], expected: str) -> None:
    found = problems(env)
    assert any(expected in p for p in found), found
    assert not any("SECRETSIG" in p for p in found)


def test_a_loopback_http_webhook_is_allowed_for_local_receivers() -> None:
    settings = load_settings(
        base(
            APIMR_INCIDENT_WEBHOOK_URL="http://127.0.0.1:8080/hook",
            APIMR_INCIDENT_WEBHOOK_FORMAT="slack",
        )
    )
    assert settings.incidents.webhook_host == "127.0.0.1"


# -- least privilege, written twice ---------------------------------------------------------------


def test_the_sentinel_actions_named_are_what_the_deployed_role_grants() -> None:
    """handlers/incidents.py and the Sentinel sink name their Azure actions;
    infra/sentinel-role.bicep assigns "Microsoft Sentinel Responder", whose definition (the
    twin carries Azure's) must grant each of them."""
    import re
    from pathlib import Path

    import handlers.incidents
    import shared.incidents
    from twin.rbac import BUILTIN_ROLES, permits

    named = set(re.findall(r"Microsoft\.SecurityInsights/[A-Za-z/]+", handlers.incidents.__doc__ or ""))
    assert named == set(
        re.findall(r"Microsoft\.SecurityInsights/[A-Za-z/]+", shared.incidents.SentinelSink.__doc__ or "")
    )
    assert named == {"Microsoft.SecurityInsights/incidents/read", "Microsoft.SecurityInsights/incidents/write"}
    bicep = (Path(__file__).resolve().parents[2] / "infra" / "sentinel-role.bicep").read_text()
    [role_id] = re.findall(r"var sentinelResponder = '([0-9a-f-]{36})'", bicep)
    [role] = [r for r in BUILTIN_ROLES if r.id == role_id]
    assert role.name == "Microsoft Sentinel Responder"
    assert all(permits(role, action) for action in named)
