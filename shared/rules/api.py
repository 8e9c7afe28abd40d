"""API family: how APIs are exposed, how the gateway calls backends, and what the policy chain enforces.

Policy rules read the chain APIM evaluates (global -> product -> API -> operation) from
the global, product and API policies in the snapshot (see `_policy_xml` for the `<base />`
semantics). Known limits, stated in each rule's rationale where they matter:
- operation-scope policies are not in the snapshot, so a control added (or a `<base />`
  dropped) only on an operation is not seen;
- `<include-fragment>` contents are not in the snapshot: a control that lives only in a
  policy fragment is not seen (findings say when a fragment is in the chain);
- a control inside `<choose>` counts as present, although it may apply to some requests only.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from shared.model import Api, Backend, Finding, PolicyScope, Severity, Snapshot
from shared.rules import Param, References, Rule, rule
from shared.rules._policy_xml import (
    SECTIONS,
    PolicyDocument,
    PolicyXmlError,
    Statements,
    effective_section,
    find,
    parse_policy,
)

_AUTH_POLICIES = ("validate-jwt", "validate-azure-ad-token", "validate-client-certificate")
_LIMIT_POLICIES = (
    "rate-limit",
    "rate-limit-by-key",
    "quota",
    "quota-by-key",
    "llm-token-limit",
    "azure-openai-token-limit",
)
_BACKEND_AUTH_POLICIES = ("authentication-managed-identity", "authentication-certificate", "authentication-basic")
_BACKEND_AUTH_HEADERS = ("authorization", "api-key", "x-functions-key")
_UNENCRYPTED = {"http": "https", "ws": "wss"}


# -- shared helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Policies:
    """The snapshot's policy documents, parsed once; unparseable ones are listed in `broken`."""

    service: PolicyDocument | None
    products: Mapping[str, PolicyDocument]  # by lower-cased product name
    apis: Mapping[str, PolicyDocument]  # by lower-cased API name
    broken: frozenset[tuple[PolicyScope, str]]
    workspace: PolicyDocument | None = None  # in a workspace's view: the workspace policy

    @property
    def in_workspace(self) -> bool:
        return self.workspace is not None

    @property
    def top(self) -> tuple[PolicyDocument | None, ...]:
        """What runs before product and API policies: global, then the workspace policy if any."""
        return (self.service,) if self.workspace is None else (self.service, self.workspace)

    def product(self, name: str) -> PolicyDocument | None:
        return self.products.get(name.lower())

    def api(self, name: str) -> PolicyDocument | None:
        return self.apis.get(name.lower())

    def is_broken(self, scope: PolicyScope, owner: str = "") -> bool:
        return (scope, owner.lower()) in self.broken

    def documents(self) -> list[tuple[PolicyScope, str, PolicyDocument]]:
        found: list[tuple[PolicyScope, str, PolicyDocument]] = []
        if self.service is not None:
            found.append((PolicyScope.SERVICE, "", self.service))
        if self.workspace is not None:
            found.append((PolicyScope.WORKSPACE, "", self.workspace))
        found.extend((PolicyScope.PRODUCT, name, doc) for name, doc in self.products.items())
        found.extend((PolicyScope.API, name, doc) for name, doc in self.apis.items())
        return found


def _parse_all(snapshot: Snapshot) -> _Policies:
    service: PolicyDocument | None = None
    workspace: PolicyDocument | None = None
    products: dict[str, PolicyDocument] = {}
    apis: dict[str, PolicyDocument] = {}
    broken: set[tuple[PolicyScope, str]] = set()
    for policy in snapshot.policies:
        owner = policy.owner.lower()
        try:
            document = parse_policy(policy.xml)
        except PolicyXmlError:
            broken.add((policy.scope, owner))
            continue
        if policy.scope is PolicyScope.SERVICE:
            service = document
        elif policy.scope is PolicyScope.WORKSPACE:
            workspace = document
        elif policy.scope is PolicyScope.PRODUCT:
            products[owner] = document
        else:
            apis[owner] = document
    return _Policies(service, products, apis, frozenset(broken), workspace=workspace)


@dataclass(frozen=True)
class _Chain:
    label: str  # "global -> API" or "global -> product 'x' -> API"
    documents: tuple[PolicyDocument | None, ...]


def _chains(policies: _Policies, snapshot: Snapshot, api: Api, *, with_products: bool) -> list[_Chain] | None:
    """Every policy chain a request to `api` can run through; None if one of its documents is unparseable.

    Without a subscription (subscriptionRequired false) no product policy applies: APIM picks
    the product policy from the caller's subscription. So callers reach an API through the
    global + API chain, plus (with subscriptions) one global + product + API chain per
    product that contains it.
    """
    if (
        policies.is_broken(PolicyScope.SERVICE)
        or policies.is_broken(PolicyScope.WORKSPACE)
        or policies.is_broken(PolicyScope.API, api.name)
    ):
        return None
    api_doc = policies.api(api.name)
    top = "global -> workspace" if policies.in_workspace else "global"
    chains = [_Chain(f"{top} -> API", (*policies.top, api_doc))]
    if with_products:
        for product in snapshot.products:
            if not any(a.lower() == api.name.lower() for a in product.api_ids):
                continue
            if policies.is_broken(PolicyScope.PRODUCT, product.name):
                return None
            chains.append(
                _Chain(
                    f"{top} -> product '{product.name}' -> API",
                    (*policies.top, policies.product(product.name), api_doc),
                )
            )
    return chains


def _names(value: Any) -> tuple[str, ...]:
    """A list-of-strings parameter, lower-cased (accepts a tuple, a list or one string)."""
    if isinstance(value, str):
        return (value.lower(),) if value else ()
    return tuple(str(v).lower() for v in value or ())


def _fragments(statements: Statements) -> list[str]:
    return [e.get("fragment-id", "?") for e in find(statements, ["include-fragment"])]


def _readable(snapshot: Snapshot, *parts: str) -> bool:
    return all(snapshot.readable(p) for p in parts)


def _safe_url(url: str) -> str:
    """scheme://host[:port]/path only: a backend URL may carry a key in its query or user info."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # e.g. a bad port or unbalanced IPv6 brackets: show nothing of it
        return f"{_scheme(url)}://(unparseable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _scheme(url: str) -> str:
    return url.strip().split("://", 1)[0].lower() if "://" in url else ""


def _api_label(api: Api) -> str:
    return api.display_name or api.name


# -- API-001 ----------------------------------------------------------------------------------


@rule(
    "API-001",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's APIs; findings there name the workspace "
        "and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="API accepts unencrypted http or ws",
    severity=Severity.HIGH,
    rationale=(
        "An API whose protocols include http or ws accepts requests in clear text: subscription keys, "
        "tokens and payloads cross the network readable by anyone on the path. Each API should accept "
        "https (and wss for WebSocket APIs) only. Protocol names are compared case-insensitively."
    ),
    references=References(
        azure_policy=("ee7495e7-3ba7-40b6-bfee-c29e22cc75d4",),
        mcsb=("DP-3",),
        owasp_api=("API8:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/api-management-howto-manage-protocols-ciphers",),
    ),
    remediable=True,
)
def unencrypted_api_protocols(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "apis"):
        return []
    findings: list[Finding] = []
    for api in snapshot.apis:
        plain = [p for p in api.protocols if p.lower() in _UNENCRYPTED]
        if not plain:
            continue
        expected: list[str] = []
        for protocol in api.protocols:
            secure = _UNENCRYPTED.get(protocol.lower(), protocol.lower())
            if secure not in expected:
                expected.append(secure)
        findings.append(
            rule.finding(
                snapshot,
                message=f"API '{_api_label(api)}' accepts unencrypted {', '.join(plain)}.",
                path="protocols",
                actual=api.protocols,
                expected=tuple(expected),
                resource_id=api.id,
            )
        )
    return findings


# -- API-002 ----------------------------------------------------------------------------------


@rule(
    "API-002",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's APIs, composing global -> workspace -> "
        "API (the workspace policy runs between the global and the API's); findings there name the "
        "workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="API open without subscription and without token validation",
    severity=Severity.HIGH,
    rationale=(
        "An API with subscriptionRequired false takes anonymous calls unless its policy chain validates "
        "a credential. The rule composes the inbound section APIM runs for such a call: the global policy "
        "and the API policy, joined at the API's <base />. Product policies are left out on purpose: APIM "
        "applies the policy of the product the caller's subscription belongs to, and without a "
        "subscription there is none. The API passes if the composed inbound holds one of `auth_policies` "
        "(validate-jwt, validate-azure-ad-token, validate-client-certificate by default), at any depth. "
        "Not seen: operation-scope policies and the contents of policy fragments. subscriptionRequired "
        "unknown (not returned) is not drift: APIM's default is true."
    ),
    references=References(
        azure_policy=("8ac833bd-f505-48d5-887e-c993a1d3eea0",),
        mcsb=("IM-4",),
        owasp_api=("API2:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/mitigate-owasp-api-threats",),
    ),
    params=[
        Param(
            "auth_policies",
            _AUTH_POLICIES,
            "Policy elements that authenticate the caller; one in the effective inbound section is enough.",
        )
    ],
    remediable=False,
)
def anonymous_api(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "apis", "policies"):
        return []
    wanted = _names(params["auth_policies"])
    policies = _parse_all(snapshot)
    findings: list[Finding] = []
    for api in snapshot.apis:
        if api.subscription_required is not False:
            continue
        chains = _chains(policies, snapshot, api, with_products=False)
        if chains is None:  # API-006 reports the unparseable document
            continue
        inbound = effective_section(chains[0].documents, "inbound")
        if find(inbound, wanted):
            continue
        notes = []
        api_doc = policies.api(api.name)
        hidden = any(d is not None for d in policies.top) and bool(
            find(effective_section(policies.top, "inbound"), wanted)
        )
        if hidden and api_doc is not None and not api_doc.has_base("inbound"):
            parent = "workspace" if policies.in_workspace else "global"
            notes.append(f"the {parent} policy validates tokens but the API's inbound has no <base />")
        if fragments := _fragments(inbound):
            notes.append(f"policy fragments not inspected: {', '.join(fragments)}")
        findings.append(
            rule.finding(
                snapshot,
                message=(
                    f"API '{_api_label(api)}' needs no subscription and its effective inbound policy "
                    f"({chains[0].label}) validates no token" + (f" ({'; '.join(notes)})" if notes else "") + "."
                ),
                path="subscriptionRequired, policies.inbound",
                actual="subscriptionRequired=false; no " + "/".join(wanted) + f" in {chains[0].label} inbound",
                expected="subscriptionRequired=true or one of " + "/".join(wanted) + " in the effective inbound",
                resource_id=api.id,
            )
        )
    return findings


# -- API-003 ----------------------------------------------------------------------------------


@rule(
    "API-003",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's backends; findings there name the "
        "workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Backend connection does not authenticate the backend server",
    severity=Severity.HIGH,
    rationale=(
        "With tls.validateCertificateChain or tls.validateCertificateName false on an https backend, the "
        "gateway accepts any certificate, so anyone who can intercept the connection can impersonate the "
        "backend and read credentials and data. Unset (null) means APIM's default, true, and passes. A "
        "backend URL with plain http (or ws) has no server authentication at all: it is reported under this "
        "rule as well (Checkov CKV_AZURE_215 'API management backend uses https'), but that finding is not "
        "remediable automatically, because moving a backend to https needs the backend to serve TLS. "
        "Backends without a URL (load-balanced pools) are skipped: their members carry the settings."
    ),
    references=References(
        azure_policy=("92bb331d-ac71-416a-8c91-02f2cb734ce4",),
        mcsb=("IM-4", "DP-3"),
        owasp_api=("API10:2023", "API8:2023"),
        checkov=("CKV_AZURE_215",),
        docs=("https://learn.microsoft.com/azure/api-management/backends",),
    ),
    remediable=True,
)
def backend_tls_validation(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "backends"):
        return []
    findings: list[Finding] = []
    for backend in snapshot.backends:
        if not backend.url:
            continue
        scheme = _scheme(backend.url)
        if scheme in _UNENCRYPTED:
            url = _safe_url(backend.url.strip())
            finding = rule.finding(
                snapshot,
                message=f"Backend '{backend.name}' is called over unencrypted {scheme}.",
                path="url",
                actual=url,
                expected=_UNENCRYPTED[scheme] + url[len(scheme) :],
                resource_id=backend.id,
            )
            findings.append(replace(finding, remediable=False))
            continue
        if scheme != "https":
            continue
        chain, name = backend.validate_certificate_chain, backend.validate_certificate_name
        if chain is not False and name is not False:
            continue
        skipped = [label for label, value in (("chain", chain), ("name", name)) if value is False]
        findings.append(
            rule.finding(
                snapshot,
                message=f"Backend '{backend.name}' skips certificate {' and '.join(skipped)} validation.",
                path="tls",
                actual=f"validateCertificateChain={_flag(chain)}, validateCertificateName={_flag(name)}",
                expected="validateCertificateChain=true, validateCertificateName=true",
                resource_id=backend.id,
            )
        )
    return findings


def _flag(value: bool | None) -> str:
    return "(not set)" if value is None else str(value).lower()


# -- API-004 ----------------------------------------------------------------------------------


@rule(
    "API-004",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's backends, with the workspace's APIs, "
        "products and policies deciding which APIs use a backend; findings there name the workspace and "
        "are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Backend called without credentials",
    severity=Severity.MEDIUM,
    rationale=(
        "A backend with no credentials (client certificate, Authorization, header or query credentials) "
        "trusts whoever reaches it; anyone who can bypass the gateway can call it. Many backends "
        "authenticate in policy instead (authentication-managed-identity, authentication-certificate, "
        "authentication-basic, or set-header of Authorization / api-key / x-functions-key), so a backend "
        "is not reported when every API that uses it authenticates that way in its effective policy chain "
        "(inbound and backend sections). An API uses a backend when its serviceUrl equals the backend URL "
        "or when a global, product or API policy names it in set-backend-service backend-id (the product "
        "and global cases cover the APIs of that product / all APIs). Not seen: backend-id given by a "
        "policy expression, operation-scope policies, policy fragments. Backends without a URL (pools) "
        "are skipped: their members carry credentials."
    ),
    references=References(
        azure_policy=("c15dcc82-b93c-4dcb-9332-fbf121685b54",),
        mcsb=("IM-4",),
        owasp_api=("API8:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/authentication-managed-identity-policy",),
    ),
    remediable=False,
)
def backend_without_credentials(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "backends", "apis", "policies", "products"):
        return []
    policies = _parse_all(snapshot)
    findings: list[Finding] = []
    for backend in snapshot.backends:
        if backend.has_credentials or not backend.url:
            continue
        users = _apis_using(backend, snapshot, policies)
        unauthenticated = [api for api in users if not _authenticates_backend(policies, snapshot, api)]
        if users and not unauthenticated:
            continue
        detail = (
            f"; APIs calling it without policy authentication: {', '.join(_api_label(a) for a in unauthenticated)}"
            if unauthenticated
            else ""
        )
        findings.append(
            rule.finding(
                snapshot,
                message=f"Backend '{backend.name}' has no credentials{detail}.",
                path="credentials",
                actual="(none)",
                expected="credentials, or authentication-* / Authorization header in every calling API's policy",
                resource_id=backend.id,
            )
        )
    return findings


def _apis_using(backend: Backend, snapshot: Snapshot, policies: _Policies) -> list[Api]:
    target = _normal_url(backend.url or "")
    using: dict[str, Api] = {a.id: a for a in snapshot.apis if a.service_url and _normal_url(a.service_url) == target}
    for scope, owner, document in policies.documents():
        names = {e.get("backend-id", "").lower() for e in find([document.root], ["set-backend-service"])}
        if backend.name.lower() not in names:
            continue
        if scope in (PolicyScope.SERVICE, PolicyScope.WORKSPACE):
            using.update((a.id, a) for a in snapshot.apis)
        elif scope is PolicyScope.PRODUCT:
            members: set[str] = set()
            for product in snapshot.products:
                if product.name.lower() == owner:
                    members.update(n.lower() for n in product.api_ids)
            using.update((a.id, a) for a in snapshot.apis if a.name.lower() in members)
        else:
            using.update((a.id, a) for a in snapshot.apis if a.name.lower() == owner)
    return list(using.values())


def _normal_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


def _authenticates_backend(policies: _Policies, snapshot: Snapshot, api: Api) -> bool:
    chains = _chains(policies, snapshot, api, with_products=api.subscription_required is not False)
    if chains is None:
        return False
    for chain in chains:
        statements = effective_section(chain.documents, "inbound") + effective_section(chain.documents, "backend")
        if _has_backend_auth(statements):
            return True
    return False


def _has_backend_auth(statements: Iterable[ET.Element]) -> bool:
    statements = tuple(statements)
    if find(statements, _BACKEND_AUTH_POLICIES):
        return True
    for header in find(statements, ["set-header"]):
        if header.get("name", "").lower() in _BACKEND_AUTH_HEADERS and header.get("exists-action", "") != "delete":
            return True
    return False


# -- API-005 ----------------------------------------------------------------------------------


@rule(
    "API-005",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's APIs, composing global -> workspace -> "
        "(product ->) API chains from the workspace's products; findings there name the workspace and are"
        " detect-only (the remediation acts on service-level resources only)."
    ),
    title="API without rate limit or quota",
    severity=Severity.MEDIUM,
    rationale=(
        "Without a rate limit or quota one client can exhaust the backend or run up its cost (OWASP "
        "API4:2023 unrestricted resource consumption). For each API the rule composes the inbound "
        "section of every chain a call can take: global -> API, and, when the API requires a "
        "subscription, global -> product -> API for each product containing it (without a subscription "
        "no product policy applies). The API passes if any of those chains holds one of `limit_policies`. "
        "Not seen: operation-scope policies and the contents of policy fragments."
    ),
    references=References(
        owasp_api=("API4:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/api-management-sample-flexible-throttling",),
    ),
    params=[
        Param(
            "limit_policies",
            _LIMIT_POLICIES,
            "Policy elements that limit consumption; one in an effective inbound section is enough.",
        )
    ],
    remediable=False,
)
def api_without_limits(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "apis", "policies", "products"):
        return []
    wanted = _names(params["limit_policies"])
    policies = _parse_all(snapshot)
    findings: list[Finding] = []
    for api in snapshot.apis:
        chains = _chains(policies, snapshot, api, with_products=api.subscription_required is not False)
        if chains is None:  # API-006 reports the unparseable document
            continue
        inbound = [effective_section(chain.documents, "inbound") for chain in chains]
        if any(find(statements, wanted) for statements in inbound):
            continue
        fragments = sorted({f for statements in inbound for f in _fragments(statements)})
        note = f" (policy fragments not inspected: {', '.join(fragments)})" if fragments else ""
        findings.append(
            rule.finding(
                snapshot,
                message=f"API '{_api_label(api)}' has no rate limit or quota in any policy chain{note}.",
                path="policies.inbound",
                actual="none in " + "; ".join(chain.label for chain in chains),
                expected="one of " + "/".join(wanted),
                resource_id=api.id,
            )
        )
    return findings


# -- API-006 ----------------------------------------------------------------------------------


@rule(
    "API-006",
    in_workspaces=True,
    workspace_note=(
        "Evaluated in every workspace too, over the workspace's workspace, product and API policies (a "
        "workspace policy has a parent, the global policy, so it must keep <base /> too); findings there "
        "name the workspace and are detect-only (the remediation acts on service-level resources only)."
    ),
    title="Policy section drops the parent scope's policies (no <base />)",
    severity=Severity.MEDIUM,
    rationale=(
        "In a product or API policy, <base /> runs the parent scope's policies for that section; a "
        "section without it (or a missing section) silently drops them, e.g. the global authentication, "
        "IP filter or rate limit. The rule checks the sections listed in `sections` (inbound by default; "
        "APIM's default policy has <base /> in all four) and accepts <base /> anywhere in the section, "
        "since some policies (cors) legitimately come first. Global (service) policies are exempt: they "
        "have no parent. A policy document at any scope that cannot be parsed (not well-formed, or carrying "
        "a DTD) is reported here once: API-002 and API-005 skip the APIs whose chain they cannot read. "
        "Operation-scope policies are not in the snapshot."
    ),
    references=References(
        azure_policy=("d5448c98-e503-4fdd-bcd2-784960c00d04",),
        owasp_api=("API8:2023",),
        docs=("https://learn.microsoft.com/azure/api-management/set-edit-policies",),
    ),
    params=[
        Param(
            "sections",
            ("inbound",),
            "Policy sections that must keep <base /> at product and API scope.",
            choices=SECTIONS,
        )
    ],
    remediable=False,
)
def policy_without_base(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not _readable(snapshot, "policies"):
        return []
    sections = [s for s in _names(params["sections"]) if s in SECTIONS]
    findings: list[Finding] = []
    for policy in snapshot.policies:
        where = (
            "global"
            if policy.scope is PolicyScope.SERVICE
            else "workspace"
            if policy.scope is PolicyScope.WORKSPACE
            else f"{policy.scope.value} '{policy.owner}'"
        )
        try:
            document = parse_policy(policy.xml)
        except PolicyXmlError as exc:
            findings.append(
                rule.finding(
                    snapshot,
                    message=f"The {where} policy cannot be parsed, so its chain cannot be checked: {exc}.",
                    path="value",
                    actual="unparseable policy XML",
                    expected="a well-formed <policies> document without DTD",
                    resource_id=policy.id,
                )
            )
            continue
        if policy.scope is not PolicyScope.SERVICE:  # the global policy has no parent to inherit
            findings.extend(_missing_base(rule, snapshot, policy.id, where, document, sections))
    return findings


def _missing_base(
    rule: Rule, snapshot: Snapshot, policy_id: str, where: str, document: PolicyDocument, sections: Sequence[str]
) -> list[Finding]:
    findings: list[Finding] = []
    for name in sections:
        if document.has_base(name):
            continue
        present = document.section(name) is not None
        findings.append(
            rule.finding(
                snapshot,
                message=(
                    f"The {where} policy's {name} section "
                    f"{'has no <base />' if present else 'is missing'}: the parent scope's {name} policies do not run."
                ),
                path=f"{name}/base",
                actual="section without <base />" if present else "section missing",
                expected="<base /> in the section",
                resource_id=policy_id,
            )
        )
    return findings
