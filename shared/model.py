"""The plain, immutable data that crosses module boundaries: a `Snapshot` of one APIM
instance as the rules see it, and the `Finding`s they produce.

A snapshot holds no secret value. Where a rule must compare secrets (a Key Vault copy of a
subscription key against APIM's current key) the snapshot carries keyed hashes made with
a per-process key (`shared.snapshot`), never the values.

Field values keep Azure's raw spelling (e.g. customProperties "True"/"false"); rules
normalise. `None` means "Azure did not say" (property absent), distinct from False.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from shared.signals import RuntimeSignals


def frozen_map(values: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """A read-only mapping for frozen dataclasses."""
    return MappingProxyType(dict(values or {}))


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    INFO = "info"

    @property
    def rank(self) -> int:
        """Higher is worse: critical 4 ... info 0."""
        return {"critical": 4, "high": 3, "medium": 2, "low": 1, "info": 0}[self.value]


class Mode(StrEnum):
    OFF = "off"
    DETECT = "detect"
    REMEDIATE = "remediate"


# -- the snapshot ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivateEndpointConnection:
    id: str
    name: str
    status: str | None  # privateLinkServiceConnectionState.status: Approved | Pending | Rejected | Disconnected


@dataclass(frozen=True)
class HostnameCertificate:
    """A custom hostname of the service (`properties.hostnameConfigurations[]`) and its certificate."""

    type: str  # Proxy | Portal | Management | Scm | DeveloperPortal | ConfigurationApi
    host_name: str
    certificate_source: str | None = None  # Managed | KeyVault | Custom | BuiltIn
    certificate_status: str | None = None  # Completed | Failed | InProgress
    key_vault_id: str | None = None  # the Key Vault secret the certificate is synced from
    expiry: datetime | None = None  # certificate.expiry
    thumbprint: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class CaCertificate:
    """A CA certificate uploaded to the service (`properties.certificates[]`)."""

    store_name: str  # CertificateAuthority | Root
    expiry: datetime | None = None
    thumbprint: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ApimCertificate:
    """A certificate entity (`.../service/{name}/certificates/{id}`): backend client certificates."""

    id: str
    name: str
    subject: str | None
    thumbprint: str | None
    expiration_date: datetime | None
    key_vault_secret_id: str | None = None  # keyVault.secretIdentifier
    key_vault_last_status_code: str | None = None  # keyVault.lastStatus.code
    key_vault_last_status_message: str | None = None
    key_vault_last_status_time: datetime | None = None


@dataclass(frozen=True)
class Service:
    """The APIM service resource (`Microsoft.ApiManagement/service`)."""

    id: str
    name: str
    subscription_id: str
    resource_group: str
    location: str
    sku_name: str
    sku_capacity: int
    etag: str | None
    tags: Mapping[str, str] = field(default_factory=frozen_map)
    identity_type: str | None = None  # None | "SystemAssigned" | "UserAssigned" | "SystemAssigned, UserAssigned"
    principal_id: str | None = None  # identity.principalId of the system-assigned identity
    public_network_access: str | None = None  # "Enabled" | "Disabled"
    virtual_network_type: str | None = None  # "None" | "External" | "Internal"
    subnet_id: str | None = None  # virtualNetworkConfiguration.subnetResourceId
    private_endpoints: tuple[PrivateEndpointConnection, ...] = ()
    custom_properties: Mapping[str, str] = field(default_factory=frozen_map)
    min_api_version: str | None = None  # apiVersionConstraint.minApiVersion
    platform_version: str | None = None  # stv1 | stv2 | stv2.1 | mtv1
    created_at: str | None = None  # createdAtUtc
    provisioning_state: str | None = None
    hostname_configurations: tuple[HostnameCertificate, ...] = ()
    ca_certificates: tuple[CaCertificate, ...] = ()


@dataclass(frozen=True)
class ApimSubscription:
    """An APIM subscription (`.../service/{name}/subscriptions/{sid}`); never its keys."""

    id: str
    sid: str
    display_name: str | None
    scope: str  # as returned: "/apis", "/apis/{id}", "/products/{id}" or a full ARM id
    state: str  # active | suspended | submitted | rejected | cancelled | expired
    owner_id: str | None = None
    created_date: datetime | None = None
    expiration_date: datetime | None = None
    allow_tracing: bool | None = None


@dataclass(frozen=True)
class AccessSetting:
    """Tenant access (direct management API) or git access."""

    id: str
    enabled: bool | None
    etag: str | None = None


@dataclass(frozen=True)
class Portal:
    signup_enabled: bool | None = None  # portalsettings/signup
    signin_enabled: bool | None = None  # portalsettings/signin (redirect anonymous users to sign-in)
    basic_auth_enabled: bool | None = None  # portalconfigs/default properties.enableBasicAuth
    portal_config_id: str | None = None
    portal_config_etag: str | None = None


@dataclass(frozen=True)
class IdentityProvider:
    id: str
    type: str  # aad | aadB2C | facebook | google | microsoft | twitter


@dataclass(frozen=True)
class NamedValue:
    id: str
    name: str
    display_name: str
    secret: bool
    key_vault_secret_id: str | None = None  # keyVault.secretIdentifier
    key_vault_last_status_code: str | None = None  # keyVault.lastStatus.code ("Success" when fine)
    key_vault_last_status_message: str | None = None
    key_vault_last_status_time: datetime | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Api:
    id: str
    name: str
    display_name: str | None
    path: str | None
    protocols: tuple[str, ...]  # http | https | ws | wss, as returned
    subscription_required: bool | None
    service_url: str | None = None
    api_type: str | None = None  # http | soap | websocket | graphql ...
    is_current: bool | None = None
    subscription_key_header: str | None = None  # subscriptionKeyParameterNames.header
    subscription_key_query: str | None = None  # subscriptionKeyParameterNames.query


@dataclass(frozen=True)
class Backend:
    id: str
    name: str
    url: str | None
    protocol: str | None
    validate_certificate_chain: bool | None  # tls.validateCertificateChain
    validate_certificate_name: bool | None  # tls.validateCertificateName
    has_credentials: bool  # any of credentials.certificate/certificateIds/authorization/header/query


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    state: str | None
    subscription_required: bool | None
    api_ids: tuple[str, ...] = ()  # names of the APIs in the product
    approval_required: bool | None = None  # approvalRequired: subscriptions wait for an administrator
    subscriptions_limit: int | None = None  # subscriptionsLimit per user; None = unlimited


class PolicyScope(StrEnum):
    SERVICE = "service"
    WORKSPACE = "workspace"  # a workspace's own policy: between the global one and its products/APIs
    PRODUCT = "product"
    API = "api"


@dataclass(frozen=True)
class Policy:
    id: str
    scope: PolicyScope
    owner: str  # "" for the service; else the product or API name
    xml: str


@dataclass(frozen=True)
class ApimDiagnostic:
    """An APIM diagnostic (`/diagnostics/azuremonitor`, `/diagnostics/applicationinsights`)."""

    id: str
    name: str
    logger_id: str | None
    frontend_request_headers: tuple[str, ...] = ()
    frontend_response_headers: tuple[str, ...] = ()
    backend_request_headers: tuple[str, ...] = ()
    backend_response_headers: tuple[str, ...] = ()
    sampling_percentage: float | None = None
    # The raw `properties.frontend` / `properties.backend` objects as JSON text (wire names,
    # sorted keys), so a write that replaces a side keeps its body and data-masking settings.
    # Diagnostics hold no secrets.
    frontend_json: str | None = None
    backend_json: str | None = None


@dataclass(frozen=True)
class Logger:
    id: str
    name: str
    logger_type: str  # azureMonitor | applicationInsights | azureEventHub
    resource_id: str | None = None


@dataclass(frozen=True)
class DiagnosticLog:
    category: str | None  # e.g. GatewayLogs
    category_group: str | None  # allLogs | audit
    enabled: bool


@dataclass(frozen=True)
class DiagnosticSetting:
    """An Azure Monitor diagnostic setting on the APIM service."""

    id: str
    name: str
    workspace_id: str | None
    destination_type: str | None  # "Dedicated" | None (AzureDiagnostics)
    logs: tuple[DiagnosticLog, ...] = ()
    storage_account_id: str | None = None
    event_hub_rule_id: str | None = None


@dataclass(frozen=True)
class TrackedKey:
    """One Key Vault secret of the key ledger: the key clients of an APIM subscription use.

    Tags on the secret name the APIM subscription (`apim-subscription-id`, its ARM id) and
    the slot (`apim-key-slot`: primary | secondary). Its current version's creation time is
    the key's age: ARM has no "key last rotated" field.
    """

    secret_id: str  # https://{vault}/secrets/{name}/{version}
    secret_name: str
    subscription_id: str  # the APIM subscription's ARM id (tag apim-subscription-id)
    slot: str  # primary | secondary
    created: datetime
    expires: datetime | None
    enabled: bool
    value_hash: str | None  # keyed hash of the secret value; None if it could not be read


@dataclass(frozen=True)
class KeyHashes:
    """Keyed hashes of an APIM subscription's current keys (from listSecrets)."""

    subscription_id: str  # ARM id
    primary: str
    secondary: str


@dataclass(frozen=True)
class BackupStatus:
    """What the product's backup records (Table storage, `shared/backup_store.py`) say about
    one instance: the newest successful backup and the newest test-restore of one."""

    last_backup_at: datetime | None = None  # the newest backup whose LRO ended Succeeded
    last_backup_blob: str | None = None
    last_attempt_failed: str | None = None  # the newest attempt's failure, when it failed
    last_restore_test_at: datetime | None = None  # the newest finished test-restore
    last_restore_test_passed: bool | None = None
    last_restore_test_summary: str = ""  # the verdict in one line (differences, or why it failed)
    last_passing_restore_test_at: datetime | None = None


@dataclass(frozen=True)
class Workspace:
    """A workspace of the instance (`.../service/{name}/workspaces/{id}`) and what lives in it.

    The parts have the service level's types; their ids are the workspace resources' ids
    (`.../workspaces/{id}/apis/{api}`), so findings about them name the workspace. Its
    policies are the workspace policy (scope WORKSPACE) and its products' and APIs' policies;
    the global policy stays in `Snapshot.policies`. Parts of the workspace that could not be
    read are in the snapshot's `unreadable` as "workspaces/{id}/{part}: ...".
    """

    id: str
    name: str
    display_name: str | None = None
    apis: tuple[Api, ...] = ()
    products: tuple[Product, ...] = ()
    subscriptions: tuple[ApimSubscription, ...] = ()
    named_values: tuple[NamedValue, ...] = ()
    backends: tuple[Backend, ...] = ()
    policies: tuple[Policy, ...] = ()


# The parts a workspace holds (the `Workspace` fields of the same names).
WORKSPACE_PARTS = ("apis", "products", "subscriptions", "named_values", "backends", "policies")


@dataclass(frozen=True)
class Snapshot:
    """Everything the rules know about one APIM instance, read at one time."""

    service: Service
    read_at: datetime
    subscriptions: tuple[ApimSubscription, ...] = ()
    tenant_access: AccessSetting | None = None
    git_access: AccessSetting | None = None
    portal: Portal = field(default_factory=Portal)
    identity_providers: tuple[IdentityProvider, ...] = ()
    named_values: tuple[NamedValue, ...] = ()
    apis: tuple[Api, ...] = ()
    backends: tuple[Backend, ...] = ()
    products: tuple[Product, ...] = ()
    policies: tuple[Policy, ...] = ()
    apim_diagnostics: tuple[ApimDiagnostic, ...] = ()
    loggers: tuple[Logger, ...] = ()
    diagnostic_settings: tuple[DiagnosticSetting, ...] = ()
    key_ledger: tuple[TrackedKey, ...] = ()
    key_hashes: tuple[KeyHashes, ...] = ()
    # The backup and test-restore records (part "backups"); None when not read or not configured.
    backups: BackupStatus | None = None
    certificates: tuple[ApimCertificate, ...] = ()  # the certificates collection (backend client certificates)
    workspaces: tuple[Workspace, ...] = ()  # part "workspaces"; rules see their contents through views
    # Parts that could not be read (e.g. "diagnostic_settings: 403 AuthorizationFailed"): rules
    # whose input is missing say nothing rather than guess, and the result is partial.
    unreadable: tuple[str, ...] = ()
    # Parts the deployment does not ask for (e.g. "key_ledger: not configured (APIMR_KEY_VAULT_URL
    # is not set)"): their rules say nothing too, but nothing failed, so the result is complete.
    not_configured: tuple[str, ...] = ()
    # What the gateway logs say now (LOG-004, THR-*): read on the signals schedule only, so
    # None on most snapshots; the signal rules are silent without it.
    signals: RuntimeSignals | None = None
    # Parts not read because no rule the policy runs reads them (shared/read_plan.py): not
    # reported (nobody asked about them), but a rule that reads one anyway stays silent.
    skipped: tuple[str, ...] = ()

    def policy(self, scope: PolicyScope, owner: str = "") -> Policy | None:
        for p in self.policies:
            if p.scope is scope and p.owner.lower() == owner.lower():
                return p
        return None

    def readable(self, part: str) -> bool:
        """Whether `part` was read: neither failed nor left out by configuration or the policy."""
        if part in self.skipped:
            return False
        return not any(u.split(":", 1)[0] == part for u in (*self.unreadable, *self.not_configured))


# -- findings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """Where and what: the property path, what Azure has, what the rule expects."""

    path: str
    actual: str
    expected: str


@dataclass(frozen=True)
class Exemption:
    reason: str
    source: str  # "tag" or "policy"
    expires: str | None = None  # ISO date, for policy exemptions


@dataclass(frozen=True)
class Finding:
    rule_id: str
    resource_id: str  # the APIM service, or the sub-resource at fault
    instance_id: str  # the APIM service the finding belongs to
    severity: Severity
    title: str
    message: str  # one sentence naming the resource and the problem; never a secret
    evidence: Evidence
    remediable: bool
    exemption: Exemption | None = None
    # Which entry of a list at `evidence.path` the finding is about, when one resource and path
    # can carry several findings (LOG-003: a header name, lowercased). Part of the finding's
    # identity (the SARIF fingerprint); empty when rule, resource and path already identify it.
    entry: str = ""

    @property
    def exempt(self) -> bool:
        return self.exemption is not None


@dataclass(frozen=True)
class RuleFailure:
    """A rule that raised on one instance: its checks are missing from that instance's result."""

    rule_id: str
    instance_id: str
    reason: str  # the exception's class and the first line of its message

    def __str__(self) -> str:
        return f"rule {self.rule_id} failed on {self.instance_id}: {self.reason}"
