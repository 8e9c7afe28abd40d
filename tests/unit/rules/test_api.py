"""API family: protocols, anonymous APIs, backend TLS and credentials, limits, <base />."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.model import Api, Backend, Finding, Policy, PolicyScope, Product, Snapshot
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import API_POLICY, GLOBAL_POLICY, SERVICE_ID, compliant

ORDERS_ID = f"{SERVICE_ID}/apis/orders"
BACKEND_ID = f"{SERVICE_ID}/backends/orders"
GLOBAL_ID = f"{SERVICE_ID}/policies/policy"
API_POLICY_ID = f"{SERVICE_ID}/apis/orders/policies/policy"
PRODUCT_POLICY_ID = f"{SERVICE_ID}/products/mobile/policies/policy"

NO_LIMIT_GLOBAL = "<policies><inbound /><backend><forward-request /></backend><outbound /><on-error /></policies>"
JWT_GLOBAL = (
    "<policies><inbound><validate-jwt header-name='Authorization' /></inbound>"
    "<backend><forward-request /></backend><outbound /><on-error /></policies>"
)
OTHER_SECTIONS = "<backend><base /></backend><outbound><base /></outbound><on-error><base /></on-error>"
API_WITHOUT_BASE = f"<policies><inbound><cors /></inbound>{OTHER_SECTIONS}</policies>"


def _api(snapshot: Snapshot) -> Api:
    return snapshot.apis[0]


def with_api(**changes: Any) -> Snapshot:
    base = compliant()
    return replace(base, apis=(replace(_api(base), **changes),))


def with_backend(snapshot: Snapshot | None = None, **changes: Any) -> Snapshot:
    base = snapshot or compliant()
    return replace(base, backends=(replace(base.backends[0], **changes),))


def with_policies(
    snapshot: Snapshot | None = None,
    *,
    global_xml: str | None = GLOBAL_POLICY,
    api_xml: str | None = API_POLICY,
    product_xml: str | None = None,
) -> Snapshot:
    """The snapshot with its global / API / product ('mobile') policies replaced; None leaves one out."""
    base = snapshot or compliant()
    policies = []
    if global_xml is not None:
        policies.append(Policy(id=GLOBAL_ID, scope=PolicyScope.SERVICE, owner="", xml=global_xml))
    if product_xml is not None:
        policies.append(Policy(id=PRODUCT_POLICY_ID, scope=PolicyScope.PRODUCT, owner="mobile", xml=product_xml))
    if api_xml is not None:
        policies.append(Policy(id=API_POLICY_ID, scope=PolicyScope.API, owner="orders", xml=api_xml))
    return replace(base, policies=tuple(policies))


def inbound(*statements: str, base: bool = True) -> str:
    body = ("<base />" if base else "") + "".join(statements)
    return f"<policies><inbound>{body}</inbound>{OTHER_SECTIONS}</policies>"


def only(findings: list[Finding], rule_id: str, resource_id: str) -> Finding:
    assert len(findings) == 1, findings
    assert findings[0].rule_id == rule_id
    assert findings[0].resource_id == resource_id
    assert findings[0].instance_id == SERVICE_ID
    return findings[0]


@pytest.mark.parametrize("rule_id", ["API-001", "API-002", "API-003", "API-004", "API-005", "API-006"])
def test_compliant_snapshot_passes(rule_id: str) -> None:
    assert evaluate_rule(rule_id, compliant()) == []


@pytest.mark.parametrize(
    ("rule_id", "part"),
    [
        ("API-001", "apis"),
        ("API-002", "apis"),
        ("API-002", "policies"),
        ("API-003", "backends"),
        ("API-004", "backends"),
        ("API-004", "policies"),
        ("API-005", "policies"),
        ("API-005", "products"),
        ("API-006", "policies"),
    ],
)
def test_unreadable_input_says_nothing(rule_id: str, part: str) -> None:
    drifted = {
        "API-001": lambda: with_api(protocols=("http",)),
        "API-002": lambda: with_api(subscription_required=False),
        "API-003": lambda: with_backend(url="http://orders.internal.example"),
        "API-004": lambda: with_backend(has_credentials=False),
        "API-005": lambda: with_policies(global_xml=NO_LIMIT_GLOBAL),
        "API-006": lambda: with_policies(api_xml=API_WITHOUT_BASE),
    }[rule_id]()
    assert evaluate_rule(rule_id, drifted), "the drifted snapshot must fail the rule while readable"
    assert evaluate_rule(rule_id, replace(drifted, unreadable=(f"{part}: 403 AuthorizationFailed",))) == []


def test_rules_declare_remediation_and_severity() -> None:
    assert {
        r: (REGISTRY[r].severity.value, REGISTRY[r].remediable) for r in sorted(REGISTRY) if r.startswith("API")
    } == {
        "API-001": ("high", True),
        "API-002": ("high", False),
        "API-003": ("high", True),
        "API-004": ("medium", False),
        "API-005": ("medium", False),
        "API-006": ("medium", False),
    }


# -- API-001 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocols", "expected"),
    [
        (("http", "https"), "[https]"),
        (("HTTP",), "[https]"),
        (("Http", "HTTPS"), "[https]"),
        (("ws",), "[wss]"),
        (("WS", "wss"), "[wss]"),
    ],
)
def test_api001_flags_plain_protocols_case_insensitively(protocols: tuple[str, ...], expected: str) -> None:
    finding = only(evaluate_rule("API-001", with_api(protocols=protocols)), "API-001", ORDERS_ID)
    assert finding.evidence.path == "protocols"
    assert finding.evidence.actual == "[" + ", ".join(protocols) + "]"
    assert finding.evidence.expected == expected
    assert finding.remediable


@pytest.mark.parametrize("protocols", [("https",), ("wss",), ("HTTPS", "WSS"), ()])
def test_api001_passes_encrypted_or_empty_protocols(protocols: tuple[str, ...]) -> None:
    assert evaluate_rule("API-001", with_api(protocols=protocols)) == []


# -- API-002 ----------------------------------------------------------------------------------


def test_api002_flags_anonymous_api_without_token_validation() -> None:
    finding = only(evaluate_rule("API-002", with_api(subscription_required=False)), "API-002", ORDERS_ID)
    assert finding.evidence.path == "subscriptionRequired, policies.inbound"
    assert finding.evidence.actual.startswith("subscriptionRequired=false; no validate-jwt/")
    assert not finding.remediable


@pytest.mark.parametrize("required", [True, None])
def test_api002_ignores_subscription_required_or_unknown(required: bool | None) -> None:
    assert (
        evaluate_rule("API-002", with_policies(with_api(subscription_required=required), global_xml=NO_LIMIT_GLOBAL))
        == []
    )


@pytest.mark.parametrize(
    "api_xml",
    [
        inbound("<validate-jwt header-name='Authorization' />"),
        inbound("<validate-azure-ad-token tenant-id='t' />"),
        inbound("<validate-client-certificate validate-trust='true' />"),
        inbound(
            "<choose><when condition='@(context.Request.Method != &quot;OPTIONS&quot;)'>"
            "<validate-jwt header-name='Authorization' /></when></choose>"
        ),
    ],
    ids=["validate-jwt", "validate-azure-ad-token", "client-certificate", "inside-choose"],
)
def test_api002_passes_token_validation_at_api_scope(api_xml: str) -> None:
    assert evaluate_rule("API-002", with_policies(with_api(subscription_required=False), api_xml=api_xml)) == []


def test_api002_global_validate_jwt_reaches_api_through_base() -> None:
    drifted = with_api(subscription_required=False)
    assert evaluate_rule("API-002", with_policies(drifted, global_xml=JWT_GLOBAL)) == []
    assert evaluate_rule("API-002", with_policies(drifted, global_xml=JWT_GLOBAL, api_xml=None)) == []


def test_api002_missing_base_at_api_scope_hides_global_validate_jwt() -> None:
    snapshot = with_policies(with_api(subscription_required=False), global_xml=JWT_GLOBAL, api_xml=API_WITHOUT_BASE)
    finding = only(evaluate_rule("API-002", snapshot), "API-002", ORDERS_ID)
    assert "the global policy validates tokens but the API's inbound has no <base />" in finding.message


def test_api002_product_policy_does_not_protect_an_api_without_subscription() -> None:
    snapshot = with_policies(
        with_api(subscription_required=False), product_xml=inbound("<validate-jwt header-name='Authorization' />")
    )
    only(evaluate_rule("API-002", snapshot), "API-002", ORDERS_ID)


def test_api002_operation_scope_is_not_read_and_says_so() -> None:
    # The snapshot holds no operation policies: auth added only on operations is not seen.
    only(evaluate_rule("API-002", with_api(subscription_required=False)), "API-002", ORDERS_ID)
    assert "operation-scope" in REGISTRY["API-002"].rationale


def test_api002_names_fragments_it_could_not_inspect() -> None:
    snapshot = with_policies(
        with_api(subscription_required=False), api_xml=inbound("<include-fragment fragment-id='auth' />")
    )
    assert (
        "policy fragments not inspected: auth" in only(evaluate_rule("API-002", snapshot), "API-002", ORDERS_ID).message
    )


def test_api002_auth_policies_parameter() -> None:
    snapshot = with_policies(with_api(subscription_required=False), api_xml=inbound("<check-header name='X-Key' />"))
    assert len(evaluate_rule("API-002", snapshot)) == 1
    assert evaluate_rule("API-002", snapshot, {"auth_policies": ["Check-Header"]}) == []


def test_api002_skips_api_whose_policy_cannot_be_parsed() -> None:
    snapshot = with_policies(with_api(subscription_required=False), api_xml="<policies><inbound>")
    assert evaluate_rule("API-002", snapshot) == []
    only(evaluate_rule("API-006", snapshot), "API-006", API_POLICY_ID)


# -- API-003 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chain", "name", "actual"),
    [
        (False, True, "validateCertificateChain=false, validateCertificateName=true"),
        (None, False, "validateCertificateChain=(not set), validateCertificateName=false"),
        (False, False, "validateCertificateChain=false, validateCertificateName=false"),
    ],
)
def test_api003_flags_https_backend_skipping_validation(chain: bool | None, name: bool | None, actual: str) -> None:
    snapshot = with_backend(validate_certificate_chain=chain, validate_certificate_name=name)
    finding = only(evaluate_rule("API-003", snapshot), "API-003", BACKEND_ID)
    assert finding.evidence.path == "tls"
    assert finding.evidence.actual == actual
    assert finding.evidence.expected == "validateCertificateChain=true, validateCertificateName=true"
    assert finding.remediable


@pytest.mark.parametrize("chain", [True, None])
def test_api003_unset_validation_is_apim_default_true(chain: bool | None) -> None:
    assert (
        evaluate_rule("API-003", with_backend(validate_certificate_chain=chain, validate_certificate_name=None)) == []
    )


def test_api003_upper_case_scheme() -> None:
    snapshot = with_backend(url="HTTPS://orders.internal.example", validate_certificate_chain=False)
    only(evaluate_rule("API-003", snapshot), "API-003", BACKEND_ID)


def test_api003_plain_http_backend_is_flagged_once_not_remediable_and_without_secrets() -> None:
    snapshot = with_backend(
        url="http://svc:p4ss@orders.internal.example:8080/api?code=S3CRET#frag",
        validate_certificate_chain=False,
    )
    finding = only(evaluate_rule("API-003", snapshot), "API-003", BACKEND_ID)
    assert finding.evidence.path == "url"
    assert finding.evidence.actual == "http://orders.internal.example:8080/api"
    assert finding.evidence.expected == "https://orders.internal.example:8080/api"
    assert not finding.remediable
    text = f"{finding.message} {finding.evidence}"
    assert "S3CRET" not in text
    assert "p4ss" not in text


def test_api003_malformed_http_url_is_reported_without_crashing_or_leaking() -> None:
    snapshot = with_backend(url="http://u:S3CRET@orders.internal.example:notaport/x")
    finding = only(evaluate_rule("API-003", snapshot), "API-003", BACKEND_ID)
    assert finding.evidence.actual == "http://(unparseable URL)"
    assert "S3CRET" not in finding.message


def test_api003_skips_pool_backend_without_url() -> None:
    assert evaluate_rule("API-003", with_backend(url=None, validate_certificate_chain=False)) == []


# -- API-004 ----------------------------------------------------------------------------------


def unused_backend(snapshot: Snapshot | None = None) -> Snapshot:
    """A second backend nobody references, without credentials."""
    base = snapshot or compliant()
    legacy = Backend(
        id=f"{SERVICE_ID}/backends/legacy",
        name="legacy",
        url="https://legacy.internal.example",
        protocol="http",
        validate_certificate_chain=None,
        validate_certificate_name=None,
        has_credentials=False,
    )
    return replace(base, backends=(*base.backends, legacy))


def test_api004_flags_backend_without_credentials() -> None:
    finding = only(evaluate_rule("API-004", unused_backend()), "API-004", f"{SERVICE_ID}/backends/legacy")
    assert finding.evidence.path == "credentials"
    assert finding.evidence.actual == "(none)"
    assert not finding.remediable


@pytest.mark.parametrize(
    "api_xml",
    [
        inbound("<authentication-managed-identity resource='api://orders' />"),
        inbound("<authentication-certificate certificate-id='orders-client' />"),
        inbound("<authentication-basic username='u' password='{{orders-password}}' />"),
        inbound("<set-header name='AUTHORIZATION' exists-action='override'><value>{{token}}</value></set-header>"),
        "<policies><inbound><base /></inbound><backend><base /><set-header name='api-key'><value>{{k}}</value>"
        "</set-header></backend><outbound><base /></outbound><on-error><base /></on-error></policies>",
    ],
    ids=["managed-identity", "certificate", "basic", "authorization-header", "api-key-in-backend-section"],
)
def test_api004_passes_backend_authenticated_in_policy_of_api_using_its_url(api_xml: str) -> None:
    # The compliant API's serviceUrl is the backend's URL.
    snapshot = with_backend(
        with_policies(api_xml=api_xml), has_credentials=False, url="https://ORDERS.internal.example/"
    )
    assert evaluate_rule("API-004", snapshot) == []


def test_api004_flags_backend_when_the_api_using_it_does_not_authenticate() -> None:
    snapshot = with_backend(has_credentials=False)
    finding = only(evaluate_rule("API-004", snapshot), "API-004", BACKEND_ID)
    assert "APIs calling it without policy authentication: Orders" in finding.message


def test_api004_header_deletion_is_not_authentication() -> None:
    api_xml = inbound("<set-header name='Authorization' exists-action='delete' />")
    snapshot = with_backend(with_policies(api_xml=api_xml), has_credentials=False)
    only(evaluate_rule("API-004", snapshot), "API-004", BACKEND_ID)


def test_api004_global_authentication_reaches_api_unless_base_is_dropped() -> None:
    global_xml = (
        "<policies><inbound><authentication-managed-identity resource='api://orders' /></inbound>"
        "<backend><forward-request /></backend><outbound /><on-error /></policies>"
    )
    snapshot = with_backend(with_policies(global_xml=global_xml), has_credentials=False)
    assert evaluate_rule("API-004", snapshot) == []
    dropped = with_backend(with_policies(global_xml=global_xml, api_xml=API_WITHOUT_BASE), has_credentials=False)
    only(evaluate_rule("API-004", dropped), "API-004", BACKEND_ID)


def test_api004_backend_referenced_by_set_backend_service() -> None:
    referenced = inbound(
        "<set-backend-service backend-id='Legacy' />",
        "<authentication-managed-identity resource='api://legacy' />",
    )
    assert evaluate_rule("API-004", with_policies(unused_backend(), api_xml=referenced)) == []
    without_auth = inbound("<set-backend-service backend-id='legacy' />")
    finding = only(
        evaluate_rule("API-004", with_policies(unused_backend(), api_xml=without_auth)),
        "API-004",
        f"{SERVICE_ID}/backends/legacy",
    )
    assert "Orders" in finding.message


def test_api004_backend_referenced_from_product_policy_covers_the_product_apis() -> None:
    product_xml = inbound(
        "<set-backend-service backend-id='legacy' />", "<authentication-managed-identity resource='api://legacy' />"
    )
    assert evaluate_rule("API-004", with_policies(unused_backend(), product_xml=product_xml)) == []


def test_api004_one_api_without_authentication_is_enough_to_flag() -> None:
    base = with_backend(
        with_policies(api_xml=inbound("<authentication-managed-identity resource='api://orders' />")),
        has_credentials=False,
    )
    second = replace(_api(base), id=f"{SERVICE_ID}/apis/orders-v2", name="orders-v2", display_name="Orders v2")
    snapshot = replace(base, apis=(*base.apis, second))
    finding = only(evaluate_rule("API-004", snapshot), "API-004", BACKEND_ID)
    assert finding.message.endswith("without policy authentication: Orders v2.")


def test_api004_skips_pool_backend_without_url() -> None:
    assert evaluate_rule("API-004", with_backend(url=None, has_credentials=False)) == []


# -- API-005 ----------------------------------------------------------------------------------


def test_api005_flags_api_when_no_chain_limits() -> None:
    snapshot = with_policies(global_xml=NO_LIMIT_GLOBAL)
    finding = only(evaluate_rule("API-005", snapshot), "API-005", ORDERS_ID)
    assert finding.evidence.path == "policies.inbound"
    assert finding.evidence.actual == "none in global -> API; global -> product 'mobile' -> API"
    assert finding.evidence.expected.startswith("one of rate-limit/rate-limit-by-key/quota/")
    assert not finding.remediable


def test_api005_missing_base_at_api_scope_drops_global_rate_limit() -> None:
    only(evaluate_rule("API-005", with_policies(api_xml=API_WITHOUT_BASE)), "API-005", ORDERS_ID)


def test_api005_product_policy_with_rate_limit_covers_its_apis() -> None:
    product_xml = inbound("<quota calls='1000' renewal-period='3600' />")
    assert evaluate_rule("API-005", with_policies(global_xml=NO_LIMIT_GLOBAL, product_xml=product_xml)) == []


def test_api005_product_policy_does_not_cover_api_without_subscription() -> None:
    product_xml = inbound("<rate-limit calls='10' renewal-period='60' />")
    snapshot = with_policies(with_api(subscription_required=False), global_xml=NO_LIMIT_GLOBAL, product_xml=product_xml)
    finding = only(evaluate_rule("API-005", snapshot), "API-005", ORDERS_ID)
    assert finding.evidence.actual == "none in global -> API"


def test_api005_product_that_does_not_contain_the_api_does_not_cover_it() -> None:
    product_xml = inbound("<rate-limit calls='10' renewal-period='60' />")
    other = Product(id=f"{SERVICE_ID}/products/mobile", name="mobile", state="published", subscription_required=True)
    snapshot = with_policies(
        replace(compliant(), products=(other,)), global_xml=NO_LIMIT_GLOBAL, product_xml=product_xml
    )
    only(evaluate_rule("API-005", snapshot), "API-005", ORDERS_ID)


@pytest.mark.parametrize(
    "statement",
    [
        "<llm-token-limit tokens-per-minute='500' counter-key='@(context.Subscription.Id)' />",
        "<azure-openai-token-limit tokens-per-minute='500' counter-key='k' />",
        "<quota-by-key calls='10' renewal-period='60' counter-key='@(context.Request.IpAddress)' />",
        "<choose><when condition='true'><rate-limit calls='5' renewal-period='1' /></when></choose>",
    ],
)
def test_api005_api_scope_limits_count(statement: str) -> None:
    assert evaluate_rule("API-005", with_policies(global_xml=NO_LIMIT_GLOBAL, api_xml=inbound(statement))) == []


def test_api005_names_fragments_and_skips_unparseable_global() -> None:
    fragment = with_policies(global_xml=NO_LIMIT_GLOBAL, api_xml=inbound("<include-fragment fragment-id='limits' />"))
    assert (
        "(policy fragments not inspected: limits)"
        in only(evaluate_rule("API-005", fragment), "API-005", ORDERS_ID).message
    )
    broken = with_policies(global_xml="<policies><inbound>")
    assert evaluate_rule("API-005", broken) == []
    only(evaluate_rule("API-006", broken), "API-006", GLOBAL_ID)


# -- API-006 ----------------------------------------------------------------------------------


def test_api006_flags_api_inbound_without_base() -> None:
    finding = only(evaluate_rule("API-006", with_policies(api_xml=API_WITHOUT_BASE)), "API-006", API_POLICY_ID)
    assert finding.evidence.path == "inbound/base"
    assert finding.evidence.actual == "section without <base />"
    assert finding.evidence.expected == "<base /> in the section"
    assert "api 'orders'" in finding.message


def test_api006_flags_product_policy_and_missing_sections() -> None:
    product_xml = "<policies><inbound><base /></inbound></policies>"
    findings = evaluate_rule(
        "API-006",
        with_policies(product_xml=product_xml),
        {"sections": ["INBOUND", "backend", "outbound", "on-error"]},
    )
    assert [(f.resource_id, f.evidence.path, f.evidence.actual) for f in findings] == [
        (PRODUCT_POLICY_ID, "backend/base", "section missing"),
        (PRODUCT_POLICY_ID, "outbound/base", "section missing"),
        (PRODUCT_POLICY_ID, "on-error/base", "section missing"),
    ]


def test_api006_only_checks_chosen_sections() -> None:
    api_xml = "<policies><inbound><base /></inbound><backend><forward-request /></backend></policies>"
    assert evaluate_rule("API-006", with_policies(api_xml=api_xml)) == []
    findings = evaluate_rule("API-006", with_policies(api_xml=api_xml), {"sections": ("backend",)})
    assert [f.evidence.actual for f in findings] == ["section without <base />"]


def test_api006_global_policy_is_exempt_from_base() -> None:
    assert (
        evaluate_rule("API-006", with_policies(global_xml=NO_LIMIT_GLOBAL), {"sections": ("inbound", "backend")}) == []
    )


def test_api006_base_after_other_statements_is_fine() -> None:
    api_xml = inbound("<cors><allowed-origins><origin>*</origin></allowed-origins></cors>", "<base />", base=False)
    assert evaluate_rule("API-006", with_policies(api_xml=api_xml)) == []


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        ("<policies><inbound>", "not well-formed"),
        ('<!DOCTYPE p [<!ENTITY a "aaaa">]><policies><inbound>&a;</inbound></policies>', "DOCTYPE"),
    ],
    ids=["truncated", "doctype"],
)
def test_api006_reports_unparseable_policy_once_without_crashing(xml: str, reason: str) -> None:
    finding = only(evaluate_rule("API-006", with_policies(api_xml=xml)), "API-006", API_POLICY_ID)
    assert finding.evidence.path == "value"
    assert finding.evidence.actual == "unparseable policy XML"
    assert reason in finding.message
    for rule_id in ("API-002", "API-004", "API-005"):
        evaluate_rule(
            rule_id,
            with_backend(with_policies(with_api(subscription_required=False), api_xml=xml), has_credentials=False),
        )
