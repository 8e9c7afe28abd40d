"""User-defined rules: the policy file's `custom_rules:` section, typed and evaluated on the snapshot.

An operator declares a rule with its own id (`X-...`, a namespace the catalogue never uses),
title, severity, rationale, the resource kind it looks at and a condition over that kind's
fields. The loader (`shared.policy`) hands each entry's YAML node here; every problem is
reported through the reader with file, line and key (unknown field, wrong type for the
field, bad regex), so a rule that would misbehave never reaches a scan.

A custom rule becomes an ordinary `shared.rules.Rule` (family `X`, no parameters, detect
only) whose `evaluate` walks the snapshot: it never calls Azure and reads only the parts the
kind (and, for `policy.<section>` fields, the policy documents) needs. When one of those
parts could not be read, the rule says nothing, as the catalogue's rules do.

Semantics, for docs/policy.md:
- `where` (optional) picks the resources the rule is about; `require` must hold for each of
  them, and every resource where it does not is a finding.
- A comparison on a field Azure did not return is false (use `present` / `absent` to ask;
  an empty string or list counts as absent).
- Strings compare case-insensitively (`eq`, `ne`, `in`, `not-in`, `contains`), as Azure
  compares names; `regex` is case-sensitive and searches (anchor it with ^...$).
- Dates: `older-than-days: N` (more than N days before the snapshot was read),
  `newer-than-days: N`, `within-days: N` (before N days after the read: expiring or past).
- `policy.<section>` (inbound, backend, outbound, on-error) is the list of policy elements,
  at any depth, in the section a call runs: composed through `<base />` from the global
  policy down; for an API, the elements present in every chain a call can take (through
  each product that contains it, when it requires a subscription). A resource whose chain
  holds an unparseable document is skipped (API-006 reports the document).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

import yaml

from shared.evidence import safe_target
from shared.model import Api, Finding, PolicyScope, Severity, Snapshot
from shared.rules import References, Rule
from shared.rules._policy_xml import SECTIONS, PolicyDocument, PolicyXmlError, effective_section, parse_policy

CUSTOM_ID = re.compile(r"X-[A-Z0-9]+(?:-[A-Z0-9]+)*")
CUSTOM_FAMILY = "X"
_RULE_KEYS = ("id", "title", "severity", "rationale", "resource", "where", "require", "references")
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"


class FieldType(StrEnum):
    STRING = "string"
    BOOLEAN = "boolean"
    NUMBER = "number"
    DATE = "date"
    LIST = "list of strings"


# Operators: which field types each accepts, and what its value must be.
_OPS_BY_TYPE: dict[str, tuple[FieldType, ...]] = {
    "eq": (FieldType.STRING, FieldType.BOOLEAN, FieldType.NUMBER),
    "ne": (FieldType.STRING, FieldType.BOOLEAN, FieldType.NUMBER),
    "in": (FieldType.STRING, FieldType.NUMBER),
    "not-in": (FieldType.STRING, FieldType.NUMBER),
    "present": tuple(FieldType),
    "absent": tuple(FieldType),
    "regex": (FieldType.STRING,),
    "gt": (FieldType.NUMBER,),
    "ge": (FieldType.NUMBER,),
    "lt": (FieldType.NUMBER,),
    "le": (FieldType.NUMBER,),
    "older-than-days": (FieldType.DATE,),
    "newer-than-days": (FieldType.DATE,),
    "within-days": (FieldType.DATE,),
    "contains": (FieldType.LIST,),
}
OPERATORS = tuple(_OPS_BY_TYPE)
_COMBINATORS = ("all", "any", "not")


class _Unknown(Exception):
    """A value the snapshot cannot judge (an unparseable policy in the chain): skip the resource."""


# -- resource kinds and their fields ------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What field getters share for one snapshot: the policy documents, parsed once."""

    snapshot: Snapshot
    documents: Mapping[tuple[PolicyScope, str], PolicyDocument | None]  # None: unparseable

    @staticmethod
    def of(snapshot: Snapshot) -> _Context:
        documents: dict[tuple[PolicyScope, str], PolicyDocument | None] = {}
        for policy in snapshot.policies:
            try:
                documents[(policy.scope, policy.owner.lower())] = parse_policy(policy.xml)
            except PolicyXmlError:
                documents[(policy.scope, policy.owner.lower())] = None
        return _Context(snapshot, documents)

    def document(self, scope: PolicyScope, owner: str = "") -> PolicyDocument | None:
        """The scope's document; None when it has none (the default policy); _Unknown if unparseable."""
        key = (scope, owner.lower())
        if key not in self.documents:
            return None
        found = self.documents[key]
        if found is None:
            raise _Unknown
        return found


def _all_elements(chain: Sequence[PolicyDocument | None], section: str) -> tuple[str, ...]:
    names: set[str] = set()
    for statement in effective_section(chain, section):
        for element in statement.iter():
            if isinstance(element.tag, str):
                names.add(element.tag.lower())
    return tuple(sorted(names))


def _own_elements(document: PolicyDocument | None, section: str) -> tuple[str, ...]:
    found = document.section(section) if document is not None else None
    if found is None:
        return ()
    names = {e.tag.lower() for child in found for e in child.iter() if isinstance(e.tag, str)}
    return tuple(sorted(names))


Getter = Callable[[_Context, Any], object]


@dataclass(frozen=True)
class Field:
    type: FieldType
    get: Getter = field(compare=False)
    description: str = ""
    # A URL that may carry credentials (user:password@, ?sig=...): conditions see it whole, a
    # finding's evidence shows only scheme://host:port.
    url: bool = False


@dataclass(frozen=True)
class Kind:
    """A resource kind a custom rule can look at."""

    name: str
    label: str  # "API", "product", ... for messages
    parts: tuple[str, ...]  # snapshot parts it reads
    items: Callable[[Snapshot], Iterable[Any]] = field(compare=False)
    resource_id: Callable[[Snapshot, Any], str] = field(compare=False)
    display: Callable[[Any], str] = field(compare=False)
    fields: Mapping[str, Field] = field(compare=False)
    policy_parts: tuple[str, ...] = ()  # parts `policy.<section>` fields read besides `policies`
    policy_chains: Callable[[_Context, Any], list[tuple[PolicyDocument | None, ...]]] | None = field(
        default=None, compare=False
    )
    own_document: bool = False  # `policy.<section>` is the document as written (`<base />` included)


def _attr(name: str) -> Getter:
    return lambda _ctx, item: getattr(item, name)


def _tuple(name: str) -> Getter:
    return lambda _ctx, item: tuple(getattr(item, name) or ())


def _parse_date(value: object) -> object:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return value


def _service_chains(ctx: _Context, _item: Any) -> list[tuple[PolicyDocument | None, ...]]:
    return [(ctx.document(PolicyScope.SERVICE),)]


def _product_chains(ctx: _Context, item: Any) -> list[tuple[PolicyDocument | None, ...]]:
    return [(ctx.document(PolicyScope.SERVICE), ctx.document(PolicyScope.PRODUCT, item.name))]


def _api_chains(ctx: _Context, item: Any) -> list[tuple[PolicyDocument | None, ...]]:
    # As APIM runs it: without a subscription no product policy applies; with one, the
    # caller's product's. So global -> API, plus global -> product -> API per product.
    api: Api = item
    service = ctx.document(PolicyScope.SERVICE)
    own = ctx.document(PolicyScope.API, api.name)
    chains: list[tuple[PolicyDocument | None, ...]] = [(service, own)]
    if api.subscription_required is not False:
        for product in ctx.snapshot.products:
            if any(a.lower() == api.name.lower() for a in product.api_ids):
                chains.append((service, ctx.document(PolicyScope.PRODUCT, product.name), own))
    return chains


def _policy_document_chain(ctx: _Context, item: Any) -> list[tuple[PolicyDocument | None, ...]]:
    document = ctx.documents.get((item.scope, item.owner.lower()))
    if document is None:
        raise _Unknown
    return [(document,)]


def _products_of(ctx: _Context, api: Any) -> tuple[str, ...]:
    return tuple(p.name for p in ctx.snapshot.products if any(a.lower() == api.name.lower() for a in p.api_ids))


_SERVICE_FIELDS: dict[str, Field] = {
    "name": Field(FieldType.STRING, _attr("name")),
    "location": Field(FieldType.STRING, _attr("location")),
    "sku.name": Field(FieldType.STRING, _attr("sku_name")),
    "sku.capacity": Field(FieldType.NUMBER, _attr("sku_capacity")),
    "publicNetworkAccess": Field(FieldType.STRING, _attr("public_network_access")),
    "virtualNetworkType": Field(FieldType.STRING, _attr("virtual_network_type")),
    "identity.type": Field(FieldType.STRING, _attr("identity_type")),
    "platformVersion": Field(FieldType.STRING, _attr("platform_version")),
    "apiVersionConstraint.minApiVersion": Field(FieldType.STRING, _attr("min_api_version")),
    "createdAtUtc": Field(FieldType.DATE, lambda _c, s: _parse_date(s.created_at)),
    "tags": Field(FieldType.LIST, lambda _c, s: tuple(s.tags)),  # tag names
}

KINDS: dict[str, Kind] = {
    "service": Kind(
        name="service",
        label="APIM instance",
        parts=(),
        items=lambda s: (s.service,),
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields=_SERVICE_FIELDS,
        policy_chains=_service_chains,
    ),
    "apis": Kind(
        name="apis",
        label="API",
        parts=("apis",),
        items=lambda s: s.apis,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "displayName": Field(FieldType.STRING, _attr("display_name")),
            "path": Field(FieldType.STRING, _attr("path")),
            "protocols": Field(FieldType.LIST, _tuple("protocols")),
            "subscriptionRequired": Field(FieldType.BOOLEAN, _attr("subscription_required")),
            "serviceUrl": Field(FieldType.STRING, _attr("service_url"), url=True),
            "type": Field(FieldType.STRING, _attr("api_type")),
            "subscriptionKeyParameterNames.header": Field(FieldType.STRING, _attr("subscription_key_header")),
            "subscriptionKeyParameterNames.query": Field(FieldType.STRING, _attr("subscription_key_query")),
            "products": Field(FieldType.LIST, _products_of, "names of the products that contain the API"),
        },
        policy_parts=("products",),
        policy_chains=_api_chains,
    ),
    "products": Kind(
        name="products",
        label="product",
        parts=("products",),
        items=lambda s: s.products,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "state": Field(FieldType.STRING, _attr("state")),
            "subscriptionRequired": Field(FieldType.BOOLEAN, _attr("subscription_required")),
            "approvalRequired": Field(FieldType.BOOLEAN, _attr("approval_required")),
            "subscriptionsLimit": Field(FieldType.NUMBER, _attr("subscriptions_limit")),
            "apis": Field(FieldType.LIST, _tuple("api_ids"), "names of the APIs in the product"),
        },
        policy_chains=_product_chains,
    ),
    "subscriptions": Kind(
        name="subscriptions",
        label="subscription",
        parts=("subscriptions",),
        items=lambda s: s.subscriptions,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.sid,
        fields={
            "name": Field(FieldType.STRING, _attr("sid")),
            "displayName": Field(FieldType.STRING, _attr("display_name")),
            "scope": Field(FieldType.STRING, _attr("scope")),
            "state": Field(FieldType.STRING, _attr("state")),
            "ownerId": Field(FieldType.STRING, _attr("owner_id")),
            "createdDate": Field(FieldType.DATE, _attr("created_date")),
            "expirationDate": Field(FieldType.DATE, _attr("expiration_date")),
            "allowTracing": Field(FieldType.BOOLEAN, _attr("allow_tracing")),
        },
    ),
    "named_values": Kind(
        name="named_values",
        label="named value",
        parts=("named_values",),
        items=lambda s: s.named_values,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "displayName": Field(FieldType.STRING, _attr("display_name")),
            "secret": Field(FieldType.BOOLEAN, _attr("secret")),
            "keyVault.secretIdentifier": Field(FieldType.STRING, _attr("key_vault_secret_id")),
            "keyVault.lastStatus.code": Field(FieldType.STRING, _attr("key_vault_last_status_code")),
            "keyVault.lastStatus.timeStampUtc": Field(FieldType.DATE, _attr("key_vault_last_status_time")),
            "tags": Field(FieldType.LIST, _tuple("tags")),
        },
    ),
    "backends": Kind(
        name="backends",
        label="backend",
        parts=("backends",),
        items=lambda s: s.backends,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "url": Field(FieldType.STRING, _attr("url"), url=True),
            "protocol": Field(FieldType.STRING, _attr("protocol")),
            "tls.validateCertificateChain": Field(FieldType.BOOLEAN, _attr("validate_certificate_chain")),
            "tls.validateCertificateName": Field(FieldType.BOOLEAN, _attr("validate_certificate_name")),
            "credentials": Field(FieldType.BOOLEAN, _attr("has_credentials"), "whether any credential is set"),
        },
    ),
    "diagnostics": Kind(
        name="diagnostics",
        label="diagnostic",
        parts=("apim_diagnostics",),
        items=lambda s: s.apim_diagnostics,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "loggerId": Field(FieldType.STRING, _attr("logger_id")),
            "sampling.percentage": Field(FieldType.NUMBER, _attr("sampling_percentage")),
            "frontend.request.headers": Field(FieldType.LIST, _tuple("frontend_request_headers")),
            "frontend.response.headers": Field(FieldType.LIST, _tuple("frontend_response_headers")),
            "backend.request.headers": Field(FieldType.LIST, _tuple("backend_request_headers")),
            "backend.response.headers": Field(FieldType.LIST, _tuple("backend_response_headers")),
        },
    ),
    "loggers": Kind(
        name="loggers",
        label="logger",
        parts=("loggers",),
        items=lambda s: s.loggers,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "loggerType": Field(FieldType.STRING, _attr("logger_type")),
            "resourceId": Field(FieldType.STRING, _attr("resource_id")),
        },
    ),
    "policies": Kind(
        name="policies",
        label="policy",
        parts=("policies",),
        items=lambda s: s.policies,
        resource_id=lambda s, i: i.id or s.service.id,
        display=lambda i: f"{i.scope.value} {i.owner}".strip(),
        fields={
            "scope": Field(FieldType.STRING, lambda _c, p: p.scope.value, "service, product or api"),
            "owner": Field(FieldType.STRING, _attr("owner"), "the product or API name; empty for the service"),
        },
        policy_chains=_policy_document_chain,
        own_document=True,
    ),
    "certificates": Kind(
        name="certificates",
        label="certificate",
        parts=("certificates",),
        items=lambda s: s.certificates,
        resource_id=lambda s, i: i.id,
        display=lambda i: i.name,
        fields={
            "name": Field(FieldType.STRING, _attr("name")),
            "subject": Field(FieldType.STRING, _attr("subject")),
            "thumbprint": Field(FieldType.STRING, _attr("thumbprint")),
            "expirationDate": Field(FieldType.DATE, _attr("expiration_date")),
            "keyVault.secretIdentifier": Field(FieldType.STRING, _attr("key_vault_secret_id")),
            "keyVault.lastStatus.code": Field(FieldType.STRING, _attr("key_vault_last_status_code")),
        },
    ),
}


def _names_of(part: str) -> Getter:
    return lambda _ctx, item: tuple(x.name for x in getattr(item, part))


# A workspace as a whole (what it holds, by name); the rules about what is inside it are the
# catalogue's, which run in every workspace.
KINDS["workspaces"] = Kind(
    name="workspaces",
    label="workspace",
    parts=("workspaces",),
    items=lambda s: s.workspaces,
    resource_id=lambda s, i: i.id,
    display=lambda i: i.name,
    fields={
        "name": Field(FieldType.STRING, _attr("name")),
        "displayName": Field(FieldType.STRING, _attr("display_name")),
        "apis": Field(FieldType.LIST, _names_of("apis"), "names of the workspace's APIs"),
        "products": Field(FieldType.LIST, _names_of("products"), "names of the workspace's products"),
        "subscriptions": Field(
            FieldType.LIST, lambda _c, w: tuple(x.sid for x in w.subscriptions), "ids (sid) of its subscriptions"
        ),
        "namedValues": Field(FieldType.LIST, _names_of("named_values"), "names of its named values"),
        "backends": Field(FieldType.LIST, _names_of("backends"), "names of its backends"),
    },
)

# Kinds the issue names that the snapshot does not read yet: refused at load with a reason.
NOT_YET = {
    "operations": "API operations are not read by the snapshot yet",
}


def register_kind(kind: Kind) -> None:
    """Add a resource kind (a module that teaches the snapshot a new part registers its kind)."""
    KINDS[kind.name] = kind
    NOT_YET.pop(kind.name, None)


def fields_of(kind: Kind) -> dict[str, FieldType]:
    """Every field a condition on `kind` may name, with its type (policy sections included)."""
    found = {name: f.type for name, f in kind.fields.items()}
    if kind.policy_chains is not None:
        found.update({f"policy.{section}": FieldType.LIST for section in SECTIONS})
    return found


# -- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    field: str
    op: str
    value: object  # prepared at load: a compiled regex, a tuple, a float, an int of days, True

    def text(self) -> str:
        if self.op in ("present", "absent"):
            return f"{self.field} {self.op}"
        shown = self.value.pattern if isinstance(self.value, re.Pattern) else self.value
        return f"{self.field} {self.op} {_shown(shown)}"

    def fields(self) -> tuple[str, ...]:
        return (self.field,)


@dataclass(frozen=True)
class All:
    items: tuple[Condition, ...]

    def text(self) -> str:
        return "all(" + "; ".join(i.text() for i in self.items) + ")"

    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for i in self.items for f in i.fields()))


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]

    def text(self) -> str:
        return "any(" + "; ".join(i.text() for i in self.items) + ")"

    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for i in self.items for f in i.fields()))


@dataclass(frozen=True)
class Not:
    item: Condition

    def text(self) -> str:
        return f"not({self.item.text()})"

    def fields(self) -> tuple[str, ...]:
        return self.item.fields()


Condition = Test | All | AnyOf | Not


class _Values:
    """A resource's field values, read on demand and remembered."""

    def __init__(self, kind: Kind, ctx: _Context, item: Any) -> None:
        self.kind, self.ctx, self.item = kind, ctx, item
        self.cache: dict[str, object] = {}

    def get(self, name: str) -> object:
        if name not in self.cache:
            self.cache[name] = self._read(name)
        return self.cache[name]

    def _read(self, name: str) -> object:
        if name.startswith("policy.") and self.kind.policy_chains is not None:
            section = name.removeprefix("policy.")
            chains = self.kind.policy_chains(self.ctx, self.item)
            if self.kind.own_document:
                return _own_elements(chains[0][0], section)
            per_chain = [set(_all_elements(chain, section)) for chain in chains]
            common = set.intersection(*per_chain) if per_chain else set()
            return tuple(sorted(common))
        return self.kind.fields[name].get(self.ctx, self.item)


def holds(condition: Condition, values: _Values, now: datetime) -> bool:
    if isinstance(condition, All):
        return all(holds(c, values, now) for c in condition.items)
    if isinstance(condition, AnyOf):
        return any(holds(c, values, now) for c in condition.items)
    if isinstance(condition, Not):
        return not holds(condition.item, values, now)
    return _test(condition, values.get(condition.field), now)


def _same(a: object, b: object) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _test(test: Test, actual: object, now: datetime) -> bool:
    op, expected = test.op, test.value
    if op == "present":
        return actual not in (None, "", ())
    if op == "absent":
        return actual in (None, "", ())
    if actual is None:
        return False
    if op == "eq":
        return _same(actual, expected)
    if op == "ne":
        return not _same(actual, expected)
    if op in ("in", "not-in"):
        assert isinstance(expected, tuple)
        inside = any(_same(actual, e) for e in expected)
        return inside if op == "in" else not inside
    if op == "regex":
        assert isinstance(expected, re.Pattern)
        return isinstance(actual, str) and expected.search(actual) is not None
    if op in ("gt", "ge", "lt", "le"):
        if not isinstance(actual, int | float) or isinstance(actual, bool):
            return False
        assert isinstance(expected, float)
        number = float(actual)
        return {"gt": number > expected, "ge": number >= expected, "lt": number < expected, "le": number <= expected}[
            op
        ]
    if op in ("older-than-days", "newer-than-days", "within-days"):
        if not isinstance(actual, datetime):
            return False
        assert isinstance(expected, int)
        when = actual if actual.tzinfo else actual.replace(tzinfo=UTC)
        if op == "older-than-days":
            return when < now - timedelta(days=expected)
        if op == "newer-than-days":
            return when >= now - timedelta(days=expected)
        return when < now + timedelta(days=expected)
    if op == "contains":
        assert isinstance(expected, str)
        return isinstance(actual, tuple) and any(_same(a, expected) for a in actual)
    raise AssertionError(f"operator {op} was validated at load")


@dataclass(frozen=True)
class CustomRule:
    """A validated custom rule as written; `as_rule()` is what the evaluation runs."""

    id: str
    title: str
    severity: Severity
    rationale: str
    kind: Kind
    require: Condition
    where: Condition | None = None
    docs: tuple[str, ...] = ()
    line: int = 0

    def parts(self) -> tuple[str, ...]:
        used = (*(self.where.fields() if self.where else ()), *self.require.fields())
        parts = list(self.kind.parts)
        if any(f.startswith("policy.") for f in used):
            parts += ["policies", *self.kind.policy_parts]
        return tuple(dict.fromkeys(parts))

    def as_rule(self) -> Rule:
        holder: list[Rule] = []

        def evaluate(snapshot: Snapshot, _params: Mapping[str, Any]) -> list[Finding]:
            return self.findings(holder[0], snapshot)

        made = Rule(
            id=self.id,
            family=CUSTOM_FAMILY,
            title=self.title,
            severity=self.severity,
            rationale=self.rationale,
            references=References(docs=self.docs),
            params=(),
            remediable=False,
            evaluate=evaluate,
        )
        holder.append(made)
        return made

    def _evidence(self, name: str, value: object) -> str:
        known = self.kind.fields.get(name)
        if known is not None and known.url and isinstance(value, str):
            return safe_target(value)  # never userinfo, path or query: they may carry secrets
        return _shown(value)

    def findings(self, rule: Rule, snapshot: Snapshot) -> list[Finding]:
        if not all(snapshot.readable(part) for part in self.parts()):
            return []  # its input is missing: say nothing (the scan reports the part as unread)
        ctx = _Context.of(snapshot)
        now = snapshot.read_at if snapshot.read_at.tzinfo else snapshot.read_at.replace(tzinfo=UTC)
        fields = self.require.fields()
        out: list[Finding] = []
        for item in self.kind.items(snapshot):
            values = _Values(self.kind, ctx, item)
            try:
                if self.where is not None and not holds(self.where, values, now):
                    continue
                if holds(self.require, values, now):
                    continue
                actual = ", ".join(f"{name}={self._evidence(name, values.get(name))}" for name in fields)
            except _Unknown:
                continue
            out.append(
                rule.finding(
                    snapshot,
                    message=f"{self.kind.label} '{self.kind.display(item)}' does not meet {self.id}: {self.title}.",
                    path=", ".join(fields),
                    actual=actual,
                    expected=self.require.text(),
                    resource_id=self.kind.resource_id(snapshot, item),
                )
            )
        return out


def _shown(value: object) -> str:
    """A field value as evidence text (for URL fields see `CustomRule._evidence`)."""
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- loading (called by shared.policy's reader) ---------------------------------------------------


class NodeReader(Protocol):
    """The part of the policy reader this module uses (file:line reporting, mappings, scalars)."""

    def problem(self, node: yaml.Node | None, key: str, message: str) -> None: ...

    def mapping(
        self, node: yaml.Node, key: str, allowed: Iterable[str] | None
    ) -> list[tuple[str, yaml.Node, yaml.Node]]: ...

    def scalar(self, node: yaml.Node) -> tuple[bool, Any]: ...

    def string(self, node: yaml.Node, key: str, what: str) -> str | None: ...


def read_custom_rules(reader: NodeReader, node: yaml.Node, catalogue: Iterable[str]) -> list[CustomRule]:
    """The `custom_rules:` list; every problem goes to `reader` with its line and key."""
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "custom_rules", f"expected a list of rules, got {_describe(node)}")
        return []
    taken = {rid.upper() for rid in catalogue}
    seen: dict[str, int] = {}
    out: list[CustomRule] = []
    for i, item in enumerate(node.value):
        key = f"custom_rules[{i}]"
        found = _read_rule(reader, item, key, taken, seen)
        if found is not None:
            out.append(found)
    return out


def _read_rule(
    reader: NodeReader, node: yaml.Node, key: str, taken: set[str], seen: dict[str, int]
) -> CustomRule | None:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, key, f"expected a mapping with id, title, severity, ..., got {_describe(node)}")
        return None
    entries = {name: value for name, _, value in reader.mapping(node, key, _RULE_KEYS)}
    for required in ("id", "title", "severity", "rationale", "resource", "require"):
        if required not in entries:
            reader.problem(node, f"{key}.{required}", "is required")
    rule_id = title = rationale = None
    severity: Severity | None = None
    kind: Kind | None = None
    ok = True
    if "id" in entries:
        rule_id = reader.string(entries["id"], f"{key}.id", "a rule id like X-JWT-001")
        if rule_id is not None:
            if not CUSTOM_ID.fullmatch(rule_id):
                reader.problem(
                    entries["id"],
                    f"{key}.id",
                    f"{rule_id!r} is not a custom rule id: expected X- then upper-case letters, digits and "
                    "dashes (e.g. X-JWT-001); the catalogue's ids are reserved",
                )
                rule_id = None
            elif rule_id.upper() in taken:
                reader.problem(entries["id"], f"{key}.id", f"{rule_id} is a catalogue rule id")
                rule_id = None
            elif rule_id in seen:
                reader.problem(
                    entries["id"], f"{key}.id", f"{rule_id} is declared twice (first at line {seen[rule_id]})"
                )
                rule_id = None
            else:
                seen[rule_id] = entries["id"].start_mark.line + 1
    if "title" in entries:
        title = reader.string(entries["title"], f"{key}.title", "a one-line title")
    if "rationale" in entries:
        rationale = reader.string(entries["rationale"], f"{key}.rationale", "why the rule matters")
    if "severity" in entries:
        raw = entries["severity"]
        names = ", ".join(s.value for s in Severity)
        if isinstance(raw, yaml.ScalarNode) and raw.tag == _STR and raw.value in {s.value for s in Severity}:
            severity = Severity(raw.value)
        else:
            reader.problem(raw, f"{key}.severity", f"expected one of {names}, got {_raw(raw)}")
    if "resource" in entries:
        raw = entries["resource"]
        name = raw.value if isinstance(raw, yaml.ScalarNode) and raw.tag == _STR else None
        if name in KINDS:
            kind = KINDS[name]
        elif name in NOT_YET:
            reader.problem(raw, f"{key}.resource", f"{name}: {NOT_YET[name]}; allowed: {', '.join(KINDS)}")
        else:
            reader.problem(raw, f"{key}.resource", f"unknown resource kind {_raw(raw)}; allowed: {', '.join(KINDS)}")
    docs: list[str] = []
    if "references" in entries:
        ref = entries["references"]
        if isinstance(ref, yaml.SequenceNode) and all(
            isinstance(r, yaml.ScalarNode) and r.tag == _STR and r.value for r in ref.value
        ):
            docs = [r.value for r in ref.value]
        else:
            reader.problem(ref, f"{key}.references", f"expected a list of links (text), got {_describe(ref)}")
    where: Condition | None = None
    require: Condition | None = None
    if kind is not None:
        if "where" in entries:
            where = _read_condition(reader, entries["where"], f"{key}.where", kind)
            ok = ok and where is not None
        if "require" in entries:
            require = _read_condition(reader, entries["require"], f"{key}.require", kind)
    if not ok or rule_id is None or title is None or rationale is None:
        return None
    if severity is None or kind is None or require is None:
        return None
    return CustomRule(
        id=rule_id,
        title=title,
        severity=severity,
        rationale=rationale,
        kind=kind,
        require=require,
        where=where,
        docs=tuple(docs),
        line=node.start_mark.line + 1,
    )


def _read_condition(reader: NodeReader, node: yaml.Node, key: str, kind: Kind) -> Condition | None:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(
            node,
            key,
            f"expected a condition (a mapping with field and an operator, or all/any/not), got {_describe(node)}",
        )
        return None
    names = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    combinators = [n for n in names if n in _COMBINATORS]
    if combinators:
        entries = reader.mapping(node, key, _COMBINATORS)
        if len(entries) != 1:
            reader.problem(node, key, "a condition has exactly one of all, any, not (nest them to combine)")
            return None
        name, _, value = entries[0]
        if name == "not":
            inner = _read_condition(reader, value, f"{key}.not", kind)
            return Not(inner) if inner is not None else None
        if not isinstance(value, yaml.SequenceNode) or not value.value:
            reader.problem(value, f"{key}.{name}", f"expected a non-empty list of conditions, got {_describe(value)}")
            return None
        items = [_read_condition(reader, v, f"{key}.{name}[{i}]", kind) for i, v in enumerate(value.value)]
        if any(item is None for item in items):
            return None
        kept = tuple(item for item in items if item is not None)
        return All(kept) if name == "all" else AnyOf(kept)
    entries = reader.mapping(node, key, ("field", *OPERATORS))
    by_name = {name: (key_node, value) for name, key_node, value in entries}
    if len(entries) != len(node.value):
        return None  # unknown or duplicate keys were reported
    if "field" not in by_name:
        reader.problem(node, f"{key}.field", "is required (or use all / any / not)")
        return None
    ops = [name for name in by_name if name != "field"]
    if len(ops) != 1:
        reader.problem(
            node, key, f"expected exactly one operator ({', '.join(OPERATORS)}), got {', '.join(ops) or 'none'}"
        )
        return None
    field_node = by_name["field"][1]
    field_name = reader.string(field_node, f"{key}.field", "a field name")
    if field_name is None:
        return None
    known = fields_of(kind)
    if field_name not in known:
        reader.problem(
            field_node, f"{key}.field", f"unknown field {field_name!r} of {kind.name}; allowed: {', '.join(known)}"
        )
        return None
    ftype = known[field_name]
    op = ops[0]
    value_node = by_name[op][1]
    if ftype not in _OPS_BY_TYPE[op]:
        allowed_ops = [o for o, types in _OPS_BY_TYPE.items() if ftype in types]
        reader.problem(
            by_name[op][0],
            f"{key}.{op}",
            f"{op} does not apply to {field_name} (a {ftype.value}); allowed: {', '.join(allowed_ops)}",
        )
        return None
    prepared = _read_value(reader, value_node, f"{key}.{op}", op, ftype)
    if prepared is None:
        return None
    return Test(field_name, op, prepared)


def _read_value(reader: NodeReader, node: yaml.Node, key: str, op: str, ftype: FieldType) -> object | None:
    if op in ("present", "absent"):
        ok, value = reader.scalar(node)
        if ok and value is True:
            return True
        reader.problem(node, key, f"expected true (write `{op}: true`), got {_raw(node)}")
        return None
    if op == "regex":
        text = _string(node)
        if text is None:
            reader.problem(node, key, f"expected a regular expression (text), got {_raw(node)}")
            return None
        try:
            return re.compile(text)
        except re.error as exc:
            reader.problem(node, key, f"bad regular expression {text!r}: {exc}")
            return None
    if op in ("older-than-days", "newer-than-days", "within-days"):
        ok, value = reader.scalar(node)
        if ok and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        reader.problem(node, key, f"expected a number of days (an integer >= 0), got {_raw(node)}")
        return None
    if op in ("gt", "ge", "lt", "le"):
        ok, value = reader.scalar(node)
        if ok and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        reader.problem(node, key, f"expected a number, got {_raw(node)}")
        return None
    if op == "contains":
        text = _string(node)
        if text is None:
            reader.problem(node, key, f"expected a string to look for, got {_raw(node)}")
        return text
    if op in ("in", "not-in"):
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            reader.problem(node, key, f"expected a non-empty list of {ftype.value} values, got {_describe(node)}")
            return None
        items = [_typed(reader, item, f"{key}[{i}]", ftype) for i, item in enumerate(node.value)]
        if any(item is None for item in items):
            return None
        return tuple(items)
    return _typed(reader, node, key, ftype)  # eq / ne


def _typed(reader: NodeReader, node: yaml.Node, key: str, ftype: FieldType) -> object | None:
    if ftype is FieldType.STRING:
        text = _string(node)
        if text is None:
            reader.problem(node, key, f"expected a string, got {_raw(node)} (quote it if YAML reads it otherwise)")
        return text
    ok, value = reader.scalar(node)
    if ftype is FieldType.BOOLEAN and ok and isinstance(value, bool):
        return value
    if ftype is FieldType.NUMBER and ok and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    reader.problem(node, key, f"expected a {ftype.value}, got {_raw(node)}")
    return None


def _string(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
        return str(node.value)
    return None


def _raw(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value) if node.tag == _STR else str(node.value or "null")
    return _describe(node)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return "nothing" if node.tag == _NULL else _raw(node)
    return "something else"
