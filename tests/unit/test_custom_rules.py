"""Custom rules (the policy file's `custom_rules:`): load-time validation with file:line, and
evaluation of every operator on every resource kind over one snapshot, each rule firing
exactly on the resources it should (shared/custom_rules.py, docs/policy.md)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from textwrap import dedent

import pytest

from handlers import cli
from shared.evaluation import evaluate
from shared.model import (
    Api,
    ApimCertificate,
    ApimDiagnostic,
    Backend,
    Logger,
    Mode,
    NamedValue,
    PolicyScope,
    Product,
    Snapshot,
    frozen_map,
)
from shared.model import Policy as PolicyDoc
from shared.policy import Policy, PolicyError, parse_policy
from shared.report import InstanceResult, ScanReport, render_sarif
from shared.rules import REGISTRY
from tests.factories import NOW, SERVICE_ID, compliant, service, subscription

ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2026, 11, 23)
JWT = (
    '<validate-jwt header-name="Authorization"><openid-config url="https://login.example/.well-known" /></validate-jwt>'
)


def load(text: str) -> Policy:
    return parse_policy(dedent(text), source="policy.yaml", today=TODAY)


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return info.value.problems


def rule_yaml(rule_id: str, resource: str, body: str) -> str:
    return (
        f"  - id: {rule_id}\n    title: t {rule_id}\n    severity: medium\n    rationale: r\n"
        f"    resource: {resource}\n" + "".join(f"    {line}\n" for line in dedent(body).strip().splitlines())
    )


def estate() -> Snapshot:
    """The factory's compliant instance plus resources on each side of every test below."""
    base = compliant()
    apis = (
        replace(base.apis[0]),  # orders: https, subscription, in product mobile, JWT in its own policy
        Api(
            id=f"{SERVICE_ID}/apis/open",
            name="open",
            display_name="Open",
            path="open",
            protocols=("http", "https"),
            subscription_required=False,
            service_url=None,
            api_type="soap",
        ),
        Api(
            id=f"{SERVICE_ID}/apis/legacy",
            name="legacy",
            display_name=None,
            path="orders-legacy/v1",
            protocols=("https",),
            subscription_required=True,
            service_url="http://legacy.internal.example",
            api_type="http",
        ),
    )
    products = (
        replace(base.products[0], approval_required=True, subscriptions_limit=1),  # mobile: orders
        Product(
            id=f"{SERVICE_ID}/products/starter",
            name="starter",
            state="published",
            subscription_required=True,
            api_ids=("orders", "legacy"),
            approval_required=False,
            subscriptions_limit=None,
        ),
        Product(
            id=f"{SERVICE_ID}/products/internal",
            name="internal",
            state="notPublished",
            subscription_required=False,
            api_ids=(),
            subscriptions_limit=10,
        ),
    )
    policies = (
        *base.policies[:1],
        PolicyDoc(
            id=f"{SERVICE_ID}/apis/orders/policies/policy",
            scope=PolicyScope.API,
            owner="orders",
            xml=f"<policies><inbound><base />{JWT}</inbound><backend><base /></backend><outbound /></policies>",
        ),
        # starter's policy adds a JWT check (inside <choose>): global -> starter -> legacy has it,
        # global -> legacy does not, so not every chain to legacy validates a JWT.
        PolicyDoc(
            id=f"{SERVICE_ID}/products/starter/policies/policy",
            scope=PolicyScope.PRODUCT,
            owner="starter",
            xml=f"<policies><inbound><base /><choose><when condition='true'>{JWT}</when></choose></inbound></policies>",
        ),
    )
    subscriptions = (
        subscription("orders-mobile"),  # created 30 days ago, expires in 180
        subscription("old", created_date=NOW - timedelta(days=400)),
        subscription("edge", created_date=NOW - timedelta(days=365)),  # exactly 365: not older than 365
        subscription("soon", expiration_date=NOW + timedelta(days=29)),
        subscription("boundary", expiration_date=NOW + timedelta(days=30)),  # not within 30
        subscription("expired", expiration_date=NOW - timedelta(days=1), state="expired"),
        subscription("forever", expiration_date=None),
        subscription("gone", state="cancelled"),
    )
    named_values = (
        *base.named_values,  # payments-key (Key Vault, Success), region (plain)
        NamedValue(
            id=f"{SERVICE_ID}/namedValues/broken",
            name="broken",
            display_name="broken",
            secret=True,
            key_vault_secret_id="https://kv.vault.azure.net/secrets/broken",
            key_vault_last_status_code="Forbidden",
            key_vault_last_status_time=NOW - timedelta(days=3),
        ),
        NamedValue(id=f"{SERVICE_ID}/namedValues/db", name="db", display_name="db", secret=True, tags=("pci",)),
    )
    backends = (
        *base.backends,
        Backend(
            id=f"{SERVICE_ID}/backends/legacy",
            name="legacy",
            url="http://legacy.internal.example",
            protocol="http",
            validate_certificate_chain=None,
            validate_certificate_name=False,
            has_credentials=False,
        ),
    )
    diagnostics = (
        *base.apim_diagnostics,  # sampling 100
        ApimDiagnostic(
            id=f"{SERVICE_ID}/diagnostics/applicationinsights",
            name="applicationinsights",
            logger_id=f"{SERVICE_ID}/loggers/appinsights",
            sampling_percentage=25.0,
            backend_request_headers=("Authorization",),
        ),
    )
    loggers = (
        *base.loggers,
        Logger(id=f"{SERVICE_ID}/loggers/hub", name="hub", logger_type="azureEventHub", resource_id="/x/hub"),
    )
    return replace(
        base,
        service=service(tags=frozen_map({"env": "prod"}), sku_capacity=2),
        apis=apis,
        products=products,
        policies=policies,
        subscriptions=subscriptions,
        named_values=named_values,
        backends=backends,
        apim_diagnostics=diagnostics,
        loggers=loggers,
        certificates=(
            ApimCertificate(
                id=f"{SERVICE_ID}/certificates/mtls",
                name="mtls",
                subject="CN=mtls",
                thumbprint="AB" * 20,
                expiration_date=NOW + timedelta(days=10),
                key_vault_secret_id="https://kv.vault.azure.net/secrets/mtls",
                key_vault_last_status_code="Success",
            ),
            ApimCertificate(
                id=f"{SERVICE_ID}/certificates/uploaded",
                name="uploaded",
                subject="CN=uploaded",
                thumbprint="CD" * 20,
                expiration_date=NOW + timedelta(days=300),
            ),
        ),
    )


# (id, kind, rule body, the short names of the resources it must report)
CASES = [
    ("X-EQ-001", "products", "require: {field: approvalRequired, eq: true}", {"starter", "internal"}),
    ("X-EQ-002", "service", "require: {field: sku.name, eq: premium}", set()),  # case-insensitive
    ("X-NE-001", "apis", "require: {field: type, ne: soap}", {"open"}),
    ("X-IN-001", "subscriptions", "require: {field: state, in: [active, suspended]}", {"expired", "gone"}),
    (
        "X-NOTIN-001",
        "named_values",
        "where: {field: keyVault.secretIdentifier, present: true}\n"
        "require: {field: keyVault.lastStatus.code, not-in: [Forbidden, NotFound]}",
        {"broken"},
    ),
    ("X-PRESENT-001", "backends", "require: {field: tls.validateCertificateChain, present: true}", {"legacy"}),
    ("X-ABSENT-001", "diagnostics", "require: {field: backend.request.headers, absent: true}", {"applicationinsights"}),
    ("X-REGEX-001", "apis", 'require: {field: path, regex: "^orders(/|$)"}', {"open", "legacy"}),
    ("X-GT-001", "service", "require: {field: sku.capacity, gt: 2}", {"apim-good"}),
    ("X-GE-001", "diagnostics", "require: {field: sampling.percentage, ge: 100}", {"applicationinsights"}),
    ("X-LT-001", "products", "require: {field: subscriptionsLimit, lt: 10}", {"starter", "internal"}),
    ("X-LE-001", "products", "require: {field: subscriptionsLimit, le: 10}", {"starter"}),
    (
        "X-OLD-001",
        "subscriptions",
        "where: {field: createdDate, older-than-days: 365}\nrequire: {field: state, ne: active}",
        {"old"},
    ),
    ("X-NEW-001", "subscriptions", "require: {field: createdDate, newer-than-days: 365}", {"old"}),
    (
        "X-SOON-001",
        "subscriptions",
        "require: {not: {field: expirationDate, within-days: 30}}",
        {"soon", "expired"},
    ),
    ("X-CONT-001", "apis", "require: {field: protocols, contains: HTTPS}", set()),
    ("X-CONT-002", "apis", "require: {not: {field: protocols, contains: http}}", {"open"}),
    ("X-CONT-003", "products", "require: {field: apis, contains: orders}", {"internal"}),
    ("X-CONT-004", "named_values", "require: {not: {field: tags, contains: pci}}", {"db"}),
    # Policy XML: every chain of an API (global -> API, and per product when it takes subscriptions).
    ("X-JWT-001", "apis", "require: {field: policy.inbound, contains: validate-jwt}", {"open", "legacy"}),
    ("X-JWT-002", "products", "require: {field: policy.inbound, contains: validate-jwt}", {"mobile", "internal"}),
    ("X-JWT-003", "service", "require: {field: policy.inbound, contains: rate-limit-by-key}", set()),
    (
        "X-POL-001",
        "policies",
        "where: {field: scope, eq: api}\nrequire: {field: policy.outbound, contains: base}",
        {"api orders"},
    ),
    ("X-POL-002", "policies", "require: {field: policy.backend, absent: true}", {"service", "api orders"}),
    (
        "X-ALL-001",
        "apis",
        "require:\n  all:\n    - {field: subscriptionRequired, eq: true}\n    - {field: serviceUrl, regex: '^https://'}",
        {"open", "legacy"},
    ),
    (
        "X-ANY-001",
        "backends",
        "require:\n  any:\n    - {field: credentials, eq: true}\n    - {field: url, regex: '^https://'}",
        {"legacy"},
    ),
    ("X-LOG-001", "loggers", "require: {field: loggerType, in: [azureMonitor, applicationInsights]}", {"hub"}),
    ("X-TAG-001", "service", "require: {field: tags, contains: owner}", {"apim-good"}),
    (
        "X-CERT-001",
        "certificates",
        "require:\n  all:\n    - {field: keyVault.secretIdentifier, present: true}\n"
        "    - {not: {field: expirationDate, within-days: 30}}",
        {"mtls", "uploaded"},
    ),
]


def _short(resource_id: str) -> str:
    if resource_id == SERVICE_ID:
        return "apim-good"
    if resource_id.endswith("/policies/policy"):
        parts = resource_id[len(SERVICE_ID) + 1 :].split("/")
        return "service" if len(parts) == 2 else f"{parts[0][:-1]} {parts[1]}"
    return resource_id.rsplit("/", 1)[-1]


def test_every_operator_and_kind_fires_exactly_where_it_should() -> None:
    text = "version: 1\ncustom_rules:\n" + "".join(rule_yaml(rid, kind, body) for rid, kind, body, _ in CASES)
    policy = load(text)
    result = evaluate(estate(), policy, today=TODAY)
    assert result.failures == ()
    custom = [f for f in result.findings if f.rule_id.startswith("X-")]
    for rule_id, _, _, expected in CASES:
        got = {_short(f.resource_id) for f in custom if f.rule_id == rule_id}
        assert got == expected, rule_id
    # Each resource reported once per rule.
    assert len(custom) == sum(len(expected) for *_, expected in CASES)
    operators = {"eq", "ne", "in", "not-in", "present", "absent", "regex", "gt", "ge", "lt", "le"}
    operators |= {"older-than-days", "newer-than-days", "within-days", "contains", "all", "any", "not"}
    assert all(re.search(rf"\b{re.escape(op)}\b:", text) for op in operators)
    kinds = {"service", "apis", "products", "subscriptions", "named_values", "backends", "diagnostics"}
    assert {kind for _, kind, _, _ in CASES} == kinds | {"loggers", "policies", "certificates"}


def test_a_finding_names_the_resource_the_fields_and_the_condition() -> None:
    policy = load("version: 1\ncustom_rules:\n" + rule_yaml("X-EQ-001", "products", CASES[0][2]))
    [finding, _] = sorted(
        (f for f in evaluate(estate(), policy, today=TODAY).findings if f.rule_id == "X-EQ-001"),
        key=lambda f: f.resource_id,
    )
    assert finding.resource_id == f"{SERVICE_ID}/products/internal"
    assert finding.instance_id == SERVICE_ID
    assert finding.message == "product 'internal' does not meet X-EQ-001: t X-EQ-001."
    assert finding.evidence.path == "approvalRequired"
    assert finding.evidence.actual == "approvalRequired=(not set)"
    assert finding.evidence.expected == "approvalRequired eq true"
    assert finding.remediable is False


def test_a_rule_whose_part_was_not_read_says_nothing() -> None:
    policy = load(
        "version: 1\ncustom_rules:\n"
        + rule_yaml("X-JWT-001", "apis", "require: {field: policy.inbound, contains: validate-jwt}")
        + rule_yaml("X-NE-001", "apis", "require: {field: type, ne: soap}")
    )
    snapshot = replace(estate(), unreadable=("policies: 403 AuthorizationFailed",))
    rules = {f.rule_id for f in evaluate(snapshot, policy, today=TODAY).findings if f.rule_id.startswith("X-")}
    assert rules == {"X-NE-001"}  # the policy rule needs `policies`; the other does not


def test_an_unparseable_document_in_the_chain_skips_that_resource() -> None:
    snapshot = estate()
    broken = PolicyDoc(id=f"{SERVICE_ID}/apis/open/policies/policy", scope=PolicyScope.API, owner="open", xml="<x")
    snapshot = replace(snapshot, policies=(*snapshot.policies, broken))
    policy = load("version: 1\ncustom_rules:\n" + rule_yaml("X-JWT-001", "apis", CASES[19][2]))
    got = {_short(f.resource_id) for f in evaluate(snapshot, policy, today=TODAY).findings if f.rule_id == "X-JWT-001"}
    assert got == {"legacy"}


def test_modes_and_exemptions_apply_as_to_catalogue_rules() -> None:
    policy = load(
        "version: 1\ncustom_rules:\n"
        + rule_yaml("X-EQ-001", "products", CASES[0][2])
        + rule_yaml("X-NE-001", "apis", CASES[2][2])
        + dedent(
            f"""\
            rules:
              X-NE-001: {{mode: "off"}}
            exemptions:
              - rule: X-EQ-001
                resource: "{SERVICE_ID}/products/starter"
                reason: "self-service by design (ARCH-12)"
                expires: 2099-12-31
            """
        )
    )
    assert policy.mode_of("X-NE-001") is Mode.OFF
    assert policy.mode_of("X-EQ-001") is Mode.DETECT
    found = [f for f in evaluate(estate(), policy, today=TODAY).findings if f.rule_id.startswith("X-")]
    assert {(f.rule_id, _short(f.resource_id), f.exempt) for f in found} == {
        ("X-EQ-001", "starter", True),
        ("X-EQ-001", "internal", False),
    }
    # The exemption tag names custom rules too.
    tagged = replace(estate(), service=service(tags=frozen_map({"apim-remediator-exempt": "X-EQ-001"})))
    assert all(f.exempt for f in evaluate(tagged, policy, today=TODAY).findings if f.rule_id == "X-EQ-001")
    assert policy.tag_problems({"apim-remediator-exempt": "X-EQ-001"}) == []


def test_remediate_is_refused_for_a_custom_rule() -> None:
    text = "version: 1\ncustom_rules:\n" + rule_yaml("X-EQ-001", "products", CASES[0][2])
    assert problems(text + "rules:\n  X-EQ-001: {mode: remediate}\n") == [
        "policy.yaml:10: rules.X-EQ-001.mode: rule X-EQ-001 has no remediation; use detect (or off)"
    ]


BAD = """\
version: 1
custom_rules:
  - id: X-BAD-001
    title: t
    severity: urgent
    rationale: r
    resource: apis
    colour: red
    require:
      any:
        - {field: pth, eq: x}
        - {field: path, regex: "([a-"}
        - {field: subscriptionRequired, eq: "yes"}
        - {field: protocols, gt: 3}
        - {field: path, eq: x, ne: y}
        - {field: path, present: false}
        - {field: path, in: x}
        - {all: []}
  - id: TLS-001
    title: t
    severity: low
    rationale: r
    resource: operations
    require: {field: name, eq: x}
  - id: X-BAD-001
    title: t
    resource: sql
    require: {field: name, eq: x}
  - id: X-BAD-002
    severity: low
    title: t
    rationale: r
    resource: subscriptions
    require: {field: createdDate, older-than-days: soon}
rules:
  X-NOPE: {mode: detect}
"""


def test_a_malformed_custom_rule_names_file_line_and_key() -> None:
    assert problems(BAD) == [
        "policy.yaml:5: custom_rules[0].severity: expected one of critical, high, medium, low, info, got 'urgent'",
        "policy.yaml:8: custom_rules[0].colour: unknown key; allowed: id, title, severity, rationale, resource, "
        "where, require, references",
        "policy.yaml:11: custom_rules[0].require.any[0].field: unknown field 'pth' of apis; allowed: name, "
        "displayName, path, protocols, subscriptionRequired, serviceUrl, type, "
        "subscriptionKeyParameterNames.header, subscriptionKeyParameterNames.query, products, policy.inbound, "
        "policy.backend, policy.outbound, policy.on-error",
        "policy.yaml:12: custom_rules[0].require.any[1].regex: bad regular expression '([a-': unterminated "
        "character set at position 1",
        "policy.yaml:13: custom_rules[0].require.any[2].eq: expected a boolean, got 'yes'",
        "policy.yaml:14: custom_rules[0].require.any[3].gt: gt does not apply to protocols (a list of strings); "
        "allowed: present, absent, contains",
        "policy.yaml:15: custom_rules[0].require.any[4]: expected exactly one operator (eq, ne, in, not-in, "
        "present, absent, regex, gt, ge, lt, le, older-than-days, newer-than-days, within-days, contains), "
        "got eq, ne",
        "policy.yaml:16: custom_rules[0].require.any[5].present: expected true (write `present: true`), got false",
        "policy.yaml:17: custom_rules[0].require.any[6].in: expected a non-empty list of string values, got 'x'",
        "policy.yaml:18: custom_rules[0].require.any[7].all: expected a non-empty list of conditions, got a list",
        "policy.yaml:19: custom_rules[1].id: 'TLS-001' is not a custom rule id: expected X- then upper-case "
        "letters, digits and dashes (e.g. X-JWT-001); the catalogue's ids are reserved",
        "policy.yaml:23: custom_rules[1].resource: operations: API operations are not read by the snapshot yet; "
        "allowed: service, apis, products, subscriptions, named_values, backends, diagnostics, loggers, policies, "
        "certificates, workspaces",
        "policy.yaml:25: custom_rules[2].severity: is required",
        "policy.yaml:25: custom_rules[2].rationale: is required",
        "policy.yaml:25: custom_rules[2].id: X-BAD-001 is declared twice (first at line 3)",
        "policy.yaml:27: custom_rules[2].resource: unknown resource kind 'sql'; allowed: service, apis, products, "
        "subscriptions, named_values, backends, diagnostics, loggers, policies, certificates, workspaces",
        "policy.yaml:34: custom_rules[3].require.older-than-days: expected a number of days (an integer >= 0), "
        "got 'soon'",
        "policy.yaml:36: rules.X-NOPE: unknown rule id; known: " + ", ".join(sorted(REGISTRY)),
    ]


def test_the_cli_lists_custom_rules_and_refuses_a_malformed_file_with_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\ncustom_rules:\n" + rule_yaml("X-EQ-001", "products", CASES[0][2]))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["rules", "--policy", str(good)], out=out, err=err) == 0
    assert "X-EQ-001  medium   detect t X-EQ-001  (custom)\n" in out.getvalue()
    assert "TLS-001" in out.getvalue()
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["rules", "--policy", str(bad)], out=out, err=err) == 2
    assert out.getvalue() == ""
    assert f"{bad}:12: custom_rules[0].require.any[1].regex: bad regular expression" in err.getvalue()


def test_sarif_describes_custom_rules_with_their_metadata() -> None:
    policy = load(
        "version: 1\ncustom_rules:\n"
        + rule_yaml("X-EQ-001", "products", CASES[0][2] + "\nreferences: [https://wiki.example/approval]")
    )
    findings = evaluate(estate(), policy, today=TODAY).findings
    report = ScanReport(
        started=NOW,
        finished=NOW,
        policy_file="policy.yaml",
        instances=(InstanceResult(SERVICE_ID, findings=findings),),
        custom_rules=policy.custom_rules,
    )
    run = json.loads(render_sarif(report))["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    [custom] = [r for r in rules if r["id"] == "X-EQ-001"]
    assert custom["shortDescription"]["text"] == "t X-EQ-001"
    assert custom["fullDescription"]["text"] == "r"
    assert "custom" in custom["properties"]["tags"]
    assert "https://wiki.example/approval" in custom["help"]["text"]
    index = [r["id"] for r in rules].index("X-EQ-001")
    assert {r["ruleIndex"] for r in run["results"] if r["ruleId"] == "X-EQ-001"} == {index}


def docs_custom_rules() -> str:
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml custom-rules\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/policy.md should hold one ```yaml custom-rules block"
    return str(blocks[0])


def test_the_docs_custom_rule_examples_load_and_run() -> None:
    policy = load(docs_custom_rules())
    assert [r.id for r in policy.custom_rules] == ["X-JWT-001", "X-PROD-001", "X-SUB-001", "X-NAME-001", "X-LOG-001"]
    found = {(f.rule_id, _short(f.resource_id), f.exempt) for f in evaluate(estate(), policy, today=TODAY).findings}
    custom = {item for item in found if item[0].startswith("X-")}
    assert custom == {
        ("X-JWT-001", "legacy", False),  # reached without the starter product: no JWT on global -> API
        ("X-PROD-001", "starter", True),  # exempt by the example's exemption
        ("X-SUB-001", "old", False),
        ("X-SUB-001", "forever", False),
        ("X-NAME-001", "open", False),
        ("X-NAME-001", "legacy", False),
        ("X-LOG-001", "applicationinsights", False),
    }


def test_a_url_in_the_evidence_shows_only_scheme_host_and_port() -> None:
    """Backend and API URLs may carry credentials or a SAS: the condition sees the whole URL,
    the finding only scheme://host:port."""
    canary = "CANARY5e1"
    snapshot = estate()
    leaky = replace(snapshot.backends[1], url=f"http://svc:{canary}@legacy.internal.example:8080/x?sig={canary}")
    snapshot = replace(snapshot, backends=(snapshot.backends[0], leaky))
    policy = load(
        "version: 1\ncustom_rules:\n"
        + rule_yaml("X-BE-001", "backends", 'require: {not: {field: url, regex: "[?&]sig="}}')
    )
    [finding] = [f for f in evaluate(snapshot, policy, today=TODAY).findings if f.rule_id == "X-BE-001"]
    assert finding.evidence.actual == "url=http://legacy.internal.example:8080"
    assert canary not in repr(finding)
