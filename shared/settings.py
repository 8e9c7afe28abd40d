"""Typed settings read from app settings (environment), validated once at start-up.

This is the only module that reads the product's settings. `load_settings()` checks every
setting and raises one `SettingsError` naming each problem and the setting to fix, so an
operator fixes a misconfigured deployment in one pass instead of one error per restart.
Values of secret settings never appear in messages or reprs, and no message shows a URL's
user info, query or fragment (`shown`): they are where SAS tokens and passwords live.

Cloud profiles: the three public sovereign clouds have fixed endpoints; `Custom` takes
explicit endpoints (Azure Stack, or the local twin the tests use — it is just a custom
cloud, with no twin-only code path in the product).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import SettingsError

PREFIX = "APIMR_"

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Storage account names: 3-24 lowercase letters and digits.
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Azure Storage queue names: 3-63 lowercase letters, digits and single hyphens, starting and
# ending with a letter or digit. The host names the poison queue `<name>-poison`, so the work
# queue may have at most 56 characters.
_QUEUE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")
POISON_SUFFIX = "-poison"
_QUEUE_MAX = 63 - len(POISON_SUFFIX)
# One NCRONTAB field of the Functions timer: *, a number, a range, a list, each with an
# optional /step. Month and weekday names (Jan, Mon) are allowed too.
_CRON_ITEM = r"(?:\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/[0-9]+)?"
_CRON_FIELD = re.compile(rf"^{_CRON_ITEM}(?:,{_CRON_ITEM})*$")
DEFAULT_SWEEP_SCHEDULE = "0 0 */6 * * *"
DEFAULT_WORK_QUEUE = "apimr-work"
# The backup timers tick often: a tick resumes running LROs from their continuation tokens
# and starts a new backup / test-restore only when the policy says one is due
# (backups.every_hours, backups.restore_tests.every_days).
DEFAULT_BACKUP_SCHEDULE = "0 */15 * * * *"
DEFAULT_RESTORE_TEST_SCHEDULE = "0 7-59/15 * * * *"
DEFAULT_BACKUP_CONTAINER = "apim-backups"
# Blob container names: 3-63 lowercase letters, digits and single hyphens, starting with a
# letter or digit.
_CONTAINER = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){2,62}$")


# Parameter names whose value is a credential wherever they appear (SAS signatures, keys,
# passwords, function codes): a value carrying one is never echoed, not even in part.
_CREDENTIAL_PARAM = re.compile(r"(?i)(?:^|[?&;#\s])(?:sig|signature|key|accountkey|password|pwd|secret|token|code)=")


def shown(value: str) -> str:
    """A setting's value as a problem message may show it (quoted).

    Operators paste SAS URLs, connection strings and URLs with user info into the wrong
    setting, and the message ends up in logs: a URL loses its user info, query and
    fragment, and a value that still names a credential parameter is not shown at all.
    """
    text = value
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=-1)
    trimmed = cut >= 0
    if trimmed:
        text = text[:cut]
    scheme, sep, rest = text.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        text = f"{scheme}://{netloc}{slash}{path}"
    elif "@" in text.split("/", 1)[0]:
        text = "***@" + text.split("@", 1)[1]
    if _CREDENTIAL_PARAM.search(text):
        return "(a value that looks like a credential; not shown)"
    return repr(text + ("?***" if trimmed else ""))


class CloudName(StrEnum):
    AZURE_CLOUD = "AzureCloud"
    AZURE_US_GOVERNMENT = "AzureUSGovernment"
    AZURE_CHINA_CLOUD = "AzureChinaCloud"
    CUSTOM = "Custom"


@dataclass(frozen=True)
class CloudProfile:
    """Endpoints of one Azure cloud. URLs carry no trailing slash."""

    name: CloudName
    resource_manager: str
    arm_audience: str
    authority_host: str
    log_analytics: str
    resource_graph: str
    storage_suffix: str
    keyvault_verify_challenge_resource: bool = True

    @property
    def arm_scope(self) -> str:
        return f"{self.arm_audience}/.default"

    @property
    def log_analytics_scope(self) -> str:
        return f"{self.log_analytics}/.default"

    @property
    def is_custom(self) -> bool:
        return self.name is CloudName.CUSTOM


def _public(name: CloudName, arm: str, authority: str, la: str, suffix: str) -> CloudProfile:
    return CloudProfile(
        name=name,
        resource_manager=arm,
        arm_audience=arm,
        authority_host=authority,
        log_analytics=la,
        resource_graph=arm,
        storage_suffix=suffix,
    )


PUBLIC_CLOUDS: dict[CloudName, CloudProfile] = {
    CloudName.AZURE_CLOUD: _public(
        CloudName.AZURE_CLOUD,
        "https://management.azure.com",
        "https://login.microsoftonline.com",
        "https://api.loganalytics.io",
        "core.windows.net",
    ),
    CloudName.AZURE_US_GOVERNMENT: _public(
        CloudName.AZURE_US_GOVERNMENT,
        "https://management.usgovcloudapi.net",
        "https://login.microsoftonline.us",
        "https://api.loganalytics.us",
        "core.usgovcloudapi.net",
    ),
    CloudName.AZURE_CHINA_CLOUD: _public(
        CloudName.AZURE_CHINA_CLOUD,
        "https://management.chinacloudapi.cn",
        "https://login.chinacloudapi.cn",
        "https://api.loganalytics.azure.cn",
        "core.chinacloudapi.cn",
    ),
}

_CUSTOM_ONLY = (
    "ARM_ENDPOINT",
    "ARM_AUDIENCE",
    "AUTHORITY_HOST",
    "LOG_ANALYTICS_ENDPOINT",
    "RESOURCE_GRAPH_ENDPOINT",
    "KEYVAULT_VERIFY_CHALLENGE_RESOURCE",
    "STORAGE_ENDPOINT_SUFFIX",
)


class Secret:
    """A setting value that must never be printed; `reveal()` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class StorageSettings:
    """Where the product keeps its queue, journal and leases.

    Identity-based (account name or explicit service URLs) unless the operator configured a
    connection string.
    """

    blob_url: str | None = None
    queue_url: str | None = None
    table_url: str | None = None
    connection_string: Secret | None = None

    @property
    def uses_connection_string(self) -> bool:
        return self.connection_string is not None


@dataclass(frozen=True)
class RetrySettings:
    """The one retry configuration every client gets."""

    total: int = 5
    backoff_factor: float = 0.8
    backoff_max: float = 60.0


@dataclass(frozen=True)
class ScopeSettings:
    """Which APIM instances the product looks at, within the subscriptions."""

    resource_groups: tuple[str, ...] = ()  # lowercase; empty = all
    tags: tuple[tuple[str, str], ...] = ()  # every (name, value) must match; empty = no tag filter


@dataclass(frozen=True)
class ApiSettings:
    """Who may call the HTTP API: Entra ID access tokens for this audience from this tenant."""

    audience: str  # the API app registration's App ID URI (v1 tokens) or client id (v2 tokens)
    tenant_id: str  # the tenant whose tokens are accepted (issuer and JWKS)


class BackupAccess(StrEnum):
    """How APIM reaches the backup storage account (the Backup/Restore body's accessType)."""

    # The instance's own managed identity: system-assigned when it has one, else its
    # user-assigned identity (the one APIMR_BACKUP_IDENTITY_CLIENT_ID names, or its only one).
    MANAGED_IDENTITY = "ManagedIdentity"
    SYSTEM_ASSIGNED = "SystemAssignedManagedIdentity"
    USER_ASSIGNED = "UserAssignedManagedIdentity"
    ACCESS_KEY = "AccessKey"  # only when the operator insists; the key is read from Key Vault


@dataclass(frozen=True)
class BackupSettings:
    """Where native APIM backups go and how APIM authenticates to that storage account."""

    storage_account: str  # the name APIM's Backup/Restore body takes
    blob_url: str  # the account's blob endpoint (the product writes manifests and prunes there)
    container: str = DEFAULT_BACKUP_CONTAINER
    access: BackupAccess = BackupAccess.MANAGED_IDENTITY
    identity_client_id: str | None = None  # a user-assigned identity's client id
    access_key_secret: str | None = None  # a Key Vault secret URL holding the account key (AccessKey)


WEBHOOK_FORMATS = ("json", "teams", "slack")
_WORKSPACE_ID = re.compile(
    r"^/subscriptions/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/resourceGroups/"
    r"[-\w._()]{1,90}/providers/Microsoft\.OperationalInsights/workspaces/[A-Za-z0-9][A-Za-z0-9-]{2,62}$",
    re.IGNORECASE,
)
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class IncidentSettings:
    """Where incidents go besides the structured log (always on)."""

    sentinel_workspace: str | None = None  # a Log Analytics workspace resource id with Sentinel on it
    webhook_url: Secret | None = None  # Teams and Slack URLs carry their own signature: a secret
    webhook_format: str = "json"  # json | teams | slack
    webhook_secret_name: str | None = None  # the HMAC key: a secret in APIMR_KEY_VAULT_URL's vault
    webhook_timeout: float = 10.0  # seconds per attempt
    max_new_per_sweep: int = 10  # beyond this, one summary incident

    @property
    def webhook_host(self) -> str | None:
        if self.webhook_url is None:
            return None
        return urlsplit(self.webhook_url.reveal()).hostname


DEFAULT_POLICY_FILE = str(Path(__file__).resolve().parent / "baseline.yaml")


@dataclass(frozen=True)
class Settings:
    cloud: CloudProfile
    subscription_ids: tuple[str, ...]
    storage: StorageSettings
    retry: RetrySettings = field(default_factory=RetrySettings)
    scope: ScopeSettings = field(default_factory=ScopeSettings)
    key_vault_url: str | None = None  # the key ledger: one secret per tracked APIM subscription
    policy_file: str = DEFAULT_POLICY_FILE
    lease_seconds: int = 30  # per-instance blob lease while remediating (renewed while held)
    managed_identity_client_id: str | None = None
    ca_bundle: str | None = None
    log_level: str = "INFO"
    sweep_schedule: str = DEFAULT_SWEEP_SCHEDULE  # six-field NCRONTAB (seconds first), read by the host
    work_queue: str = DEFAULT_WORK_QUEUE  # one message per instance to reconcile; `<name>-poison` after it
    # Runtime signals (LOG-004, THR-*) cost Log Analytics queries: a reconcile runs them only
    # when the instance's last signals run is at least this old (0: never).
    signals_interval_minutes: int = 15

    @property
    def poison_queue(self) -> str:
        return self.work_queue + POISON_SUFFIX

    api: ApiSettings | None = None  # None: the HTTP API refuses every request (not configured)
    backup: BackupSettings | None = None  # None: backups are not configured (BAK rules stay silent)
    backup_schedule: str = DEFAULT_BACKUP_SCHEDULE  # NCRONTAB, read by the host (`backup` timer)
    restore_test_schedule: str = DEFAULT_RESTORE_TEST_SCHEDULE  # NCRONTAB (`restore_test` timer)
    incidents: IncidentSettings = field(default_factory=IncidentSettings)

    def describe(self) -> dict[str, object]:
        """A secret-free view for logs."""
        return {
            "cloud": self.cloud.name.value,
            "resource_manager": self.cloud.resource_manager,
            "authority_host": self.cloud.authority_host,
            "subscriptions": len(self.subscription_ids),
            "storage": "connection string" if self.storage.uses_connection_string else self.storage.blob_url,
            "log_level": self.log_level,
        }


class _Reader:
    """Reads raw values and collects problems instead of failing on the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, key: str) -> str | None:
        value = self.env.get(PREFIX + key)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{PREFIX}{key}: {message}")

    def https_url(self, key: str, *, required: bool) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "is required (an https:// URL)")
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.netloc:
            self.problem(key, f"must be an https:// URL, got {shown(value)}")
            return None
        if parts.query or parts.fragment:
            self.problem(key, f"must not carry a query or fragment, got {shown(value)}")
            return None
        return value.rstrip("/")

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        self.problem(key, f"must be true or false, got {shown(value)}")
        return default

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self.problem(key, f"must be a whole number from {low} to {high}, got {shown(value)}")
            return default
        if not low <= number <= high:
            self.problem(key, f"must be from {low} to {high}, got {number}")
            return default
        return number

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            self.problem(key, f"must be a number from {low:g} to {high:g}, got {shown(value)}")
            return default
        if not low <= number <= high:
            self.problem(key, f"must be from {low:g} to {high:g}, got {number:g}")
            return default
        return number


def _cloud(r: _Reader) -> CloudProfile:
    raw = r.raw("CLOUD") or CloudName.AZURE_CLOUD.value
    names = {c.value.lower(): c for c in CloudName}
    name = names.get(raw.lower())
    if name is None:
        allowed = ", ".join(c.value for c in CloudName)
        r.problem("CLOUD", f"unknown cloud {shown(raw)}; allowed: {allowed}")
        name = CloudName.AZURE_CLOUD
    if name is not CloudName.CUSTOM:
        for key in _CUSTOM_ONLY:
            if r.raw(key) is not None:
                r.problem(key, f"is only read when {PREFIX}CLOUD=Custom (it is {name.value}); remove it")
        return PUBLIC_CLOUDS[name]
    arm = r.https_url("ARM_ENDPOINT", required=True)
    authority = r.https_url("AUTHORITY_HOST", required=True)
    la = r.https_url("LOG_ANALYTICS_ENDPOINT", required=True)
    audience = r.https_url("ARM_AUDIENCE", required=False) or arm
    graph = r.https_url("RESOURCE_GRAPH_ENDPOINT", required=False) or arm
    verify = r.boolean("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", True)
    suffix = r.raw("STORAGE_ENDPOINT_SUFFIX") or ""
    if suffix and ("/" in suffix or ":" in suffix or suffix.startswith(".")):
        r.problem("STORAGE_ENDPOINT_SUFFIX", f"must be a DNS suffix like core.windows.net, got {shown(suffix)}")
    return CloudProfile(
        name=CloudName.CUSTOM,
        resource_manager=arm or "https://invalid",
        arm_audience=audience or "https://invalid",
        authority_host=authority or "https://invalid",
        log_analytics=la or "https://invalid",
        resource_graph=graph or "https://invalid",
        storage_suffix=suffix,
        keyvault_verify_challenge_resource=verify,
    )


def _subscriptions(r: _Reader) -> tuple[str, ...]:
    raw = r.raw("SUBSCRIPTION_IDS")
    if raw is None:
        r.problem("SUBSCRIPTION_IDS", "is required: the comma-separated subscription ids in scope")
        return ()
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [i for i in ids if not _GUID.match(i)]
    if bad:
        r.problem("SUBSCRIPTION_IDS", f"not subscription ids (GUIDs): {', '.join(shown(b) for b in bad)}")
    if not ids:
        r.problem("SUBSCRIPTION_IDS", "names no subscription")
    seen: dict[str, None] = {}
    for i in ids:
        seen.setdefault(i.lower(), None)
    return tuple(seen)


def _storage(r: _Reader, cloud: CloudProfile) -> StorageSettings:
    account = r.raw("STORAGE_ACCOUNT")
    conn = r.raw("STORAGE_CONNECTION_STRING")
    urls = {k: r.raw(f"STORAGE_{k}_ENDPOINT") for k in ("BLOB", "QUEUE", "TABLE")}
    given_urls = [k for k, v in urls.items() if v is not None]
    ways = [w for w, present in (("account", account), ("connection", conn), ("urls", given_urls)) if present]
    hint = (
        f"set exactly one of {PREFIX}STORAGE_ACCOUNT (identity-based), "
        f"{PREFIX}STORAGE_BLOB_ENDPOINT + _QUEUE_ENDPOINT + _TABLE_ENDPOINT (identity-based), "
        f"or {PREFIX}STORAGE_CONNECTION_STRING"
    )
    if len(ways) != 1:
        what = "none is set" if not ways else "more than one is set"
        r.problem("STORAGE_ACCOUNT", f"storage is misconfigured ({what}): {hint}")
        return StorageSettings()
    if conn is not None:
        if "AccountName=" not in conn and "UseDevelopmentStorage=" not in conn and "Endpoint=" not in conn:
            # Never echo the value: it may hold an account key.
            r.problem("STORAGE_CONNECTION_STRING", "is not a storage connection string (no AccountName= or *Endpoint=)")
        return StorageSettings(connection_string=Secret(conn))
    if account is not None:
        if not _ACCOUNT.match(account):
            r.problem("STORAGE_ACCOUNT", f"must be 3-24 lowercase letters and digits, got {shown(account)}")
            return StorageSettings()
        if not cloud.storage_suffix:
            r.problem(
                "STORAGE_ACCOUNT",
                f"needs {PREFIX}STORAGE_ENDPOINT_SUFFIX with a Custom cloud, "
                f"or use {PREFIX}STORAGE_BLOB_ENDPOINT/_QUEUE_ENDPOINT/_TABLE_ENDPOINT",
            )
            return StorageSettings()
        return StorageSettings(
            blob_url=f"https://{account}.blob.{cloud.storage_suffix}",
            queue_url=f"https://{account}.queue.{cloud.storage_suffix}",
            table_url=f"https://{account}.table.{cloud.storage_suffix}",
        )
    missing = [k for k, v in urls.items() if v is None]
    for k in missing:
        r.problem(f"STORAGE_{k}_ENDPOINT", "is required when the other storage endpoints are set")
    blob = r.https_url("STORAGE_BLOB_ENDPOINT", required=False)
    queue = r.https_url("STORAGE_QUEUE_ENDPOINT", required=False)
    table = r.https_url("STORAGE_TABLE_ENDPOINT", required=False)
    return StorageSettings(blob_url=blob, queue_url=queue, table_url=table)


def _scope(r: _Reader) -> ScopeSettings:
    groups_raw = r.raw("RESOURCE_GROUPS")
    groups = tuple(g.strip().lower() for g in (groups_raw or "").split(",") if g.strip())
    bad_groups = [g for g in groups if not re.fullmatch(r"[-\w._()]{1,90}", g)]
    if bad_groups:
        r.problem("RESOURCE_GROUPS", f"not resource group names: {', '.join(shown(g) for g in bad_groups)}")
    tags: list[tuple[str, str]] = []
    for pair in (r.raw("TAG_SELECTOR") or "").split(","):
        if not pair.strip():
            continue
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            r.problem("TAG_SELECTOR", f"must be name=value pairs separated by commas, got {shown(pair.strip())}")
            continue
        tags.append((name.strip(), value.strip()))
    return ScopeSettings(resource_groups=groups, tags=tuple(tags))


def _sweep_schedule(r: _Reader) -> str:
    """The timer's schedule: the Functions host reads it itself (`%APIMR_SWEEP_SCHEDULE%`),
    so a bad value would only show as a timer that never fires; check its shape here."""
    return _schedule(r, "SWEEP_SCHEDULE", DEFAULT_SWEEP_SCHEDULE, "every six hours")


def _schedule(r: _Reader, key: str, default: str, meaning: str) -> str:
    value = r.raw(key)
    if value is None:
        return default
    fields = value.split()
    if len(fields) != 6 or not all(_CRON_FIELD.match(f) for f in fields):
        r.problem(
            key,
            f"must be a six-field NCRONTAB expression, seconds first (e.g. {default!r}: {meaning}), got {shown(value)}",
        )
        return default
    if fields[0] in ("*", "*/1"):
        r.problem(key, f"fires every second (seconds field {fields[0]!r}); got {shown(value)}")
    return " ".join(fields)


def _backup(r: _Reader, cloud: CloudProfile) -> BackupSettings | None:
    """Backups are configured by naming the storage account; everything else has defaults."""
    account = r.raw("BACKUP_STORAGE_ACCOUNT")
    dependents = ("BACKUP_CONTAINER", "BACKUP_BLOB_ENDPOINT", "BACKUP_ACCESS", "BACKUP_IDENTITY_CLIENT_ID")
    if account is None:
        for key in (*dependents, "BACKUP_ACCESS_KEY_SECRET"):
            if r.raw(key) is not None:
                r.problem(key, f"is only read with {PREFIX}BACKUP_STORAGE_ACCOUNT (backups are not configured)")
        return None
    if not _ACCOUNT.match(account):
        r.problem("BACKUP_STORAGE_ACCOUNT", f"must be 3-24 lowercase letters and digits, got {shown(account)}")
        return None
    container = r.raw("BACKUP_CONTAINER") or DEFAULT_BACKUP_CONTAINER
    if not _CONTAINER.match(container) or container.endswith("-"):
        r.problem(
            "BACKUP_CONTAINER",
            "must be a blob container name (3-63 lowercase letters, digits and single hyphens), "
            f"got {shown(container)}",
        )
    blob_url = r.https_url("BACKUP_BLOB_ENDPOINT", required=False)
    if blob_url is None:
        if not cloud.storage_suffix:
            r.problem(
                "BACKUP_STORAGE_ACCOUNT",
                f"needs {PREFIX}BACKUP_BLOB_ENDPOINT (or {PREFIX}STORAGE_ENDPOINT_SUFFIX) with a Custom cloud",
            )
            return None
        blob_url = f"https://{account}.blob.{cloud.storage_suffix}"
    raw_access = r.raw("BACKUP_ACCESS") or BackupAccess.MANAGED_IDENTITY.value
    access = {a.value.lower(): a for a in BackupAccess}.get(raw_access.lower())
    if access is None:
        r.problem(
            "BACKUP_ACCESS", f"unknown access {shown(raw_access)}; allowed: {', '.join(a.value for a in BackupAccess)}"
        )
        access = BackupAccess.MANAGED_IDENTITY
    client_id = r.raw("BACKUP_IDENTITY_CLIENT_ID")
    if client_id is not None and not _GUID.match(client_id):
        r.problem("BACKUP_IDENTITY_CLIENT_ID", f"must be a client id (GUID), got {shown(client_id)}")
    if client_id is None and access is BackupAccess.USER_ASSIGNED:
        r.problem("BACKUP_IDENTITY_CLIENT_ID", f"is required with {PREFIX}BACKUP_ACCESS={access.value}")
    key_secret = r.https_url("BACKUP_ACCESS_KEY_SECRET", required=access is BackupAccess.ACCESS_KEY)
    if key_secret is not None and access is not BackupAccess.ACCESS_KEY:
        r.problem("BACKUP_ACCESS_KEY_SECRET", f"is only read with {PREFIX}BACKUP_ACCESS=AccessKey; remove it")
    if key_secret is not None and "/secrets/" not in key_secret:
        r.problem(
            "BACKUP_ACCESS_KEY_SECRET",
            f"must be a Key Vault secret URL (https://<vault>/secrets/<name>), got {shown(key_secret)}",
        )
    return BackupSettings(
        storage_account=account,
        blob_url=blob_url,
        container=container,
        access=access,
        identity_client_id=client_id,
        access_key_secret=key_secret if access is BackupAccess.ACCESS_KEY else None,
    )


def _work_queue(r: _Reader) -> str:
    value = r.raw("WORK_QUEUE")
    if value is None:
        return DEFAULT_WORK_QUEUE
    if not (3 <= len(value) <= _QUEUE_MAX and _QUEUE.match(value)):
        r.problem(
            "WORK_QUEUE",
            f"must be a storage queue name of 3-{_QUEUE_MAX} lowercase letters, digits and single hyphens, "
            f"starting and ending with a letter or digit (the host adds {POISON_SUFFIX!r}), got {shown(value)}",
        )
        return DEFAULT_WORK_QUEUE
    return value


def _api(r: _Reader) -> ApiSettings | None:
    audience = r.raw("API_AUDIENCE")
    tenant = r.raw("API_TENANT_ID")
    if audience is None and tenant is None:
        return None
    if audience is None or tenant is None:
        missing = "API_AUDIENCE" if audience is None else "API_TENANT_ID"
        r.problem(missing, f"is required when {PREFIX}API_AUDIENCE or {PREFIX}API_TENANT_ID is set (the HTTP API)")
        return None
    if not _GUID.match(tenant):
        r.problem("API_TENANT_ID", f"must be a tenant id (GUID), got {shown(tenant)}")
        return None
    if any(c.isspace() or c == "," for c in audience):
        r.problem("API_AUDIENCE", f"must be one audience (App ID URI or client id), got {shown(audience)}")
        return None
    return ApiSettings(audience=audience, tenant_id=tenant.lower())


def _incidents(r: _Reader, key_vault_url: str | None) -> IncidentSettings:
    workspace = r.raw("INCIDENT_SENTINEL_WORKSPACE")
    if workspace is not None and not _WORKSPACE_ID.match(workspace.rstrip("/")):
        r.problem(
            "INCIDENT_SENTINEL_WORKSPACE",
            "must be a Log Analytics workspace resource id (/subscriptions/<id>/resourceGroups/<group>/providers/"
            f"Microsoft.OperationalInsights/workspaces/<name>), got {shown(workspace)}",
        )
        workspace = None
    url = r.raw("INCIDENT_WEBHOOK_URL")
    webhook: Secret | None = None
    if url is not None:
        # Never echo the URL: Teams Workflows and Slack URLs are credentials themselves.
        parts = urlsplit(url)
        loopback = parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK
        if not parts.netloc or (parts.scheme != "https" and not loopback):
            r.problem("INCIDENT_WEBHOOK_URL", "must be an https:// URL (http:// only to localhost); value not shown")
        else:
            webhook = Secret(url)
    fmt = (r.raw("INCIDENT_WEBHOOK_FORMAT") or "json").lower()
    if fmt not in WEBHOOK_FORMATS:
        r.problem("INCIDENT_WEBHOOK_FORMAT", f"must be one of {', '.join(WEBHOOK_FORMATS)}, got {shown(fmt)}")
        fmt = "json"
    secret_name = r.raw("INCIDENT_WEBHOOK_SECRET_NAME")
    if secret_name is not None and not re.fullmatch(r"[0-9A-Za-z-]{1,127}", secret_name):
        r.problem("INCIDENT_WEBHOOK_SECRET_NAME", f"must be a Key Vault secret name, got {shown(secret_name)}")
    if secret_name is not None and key_vault_url is None:
        r.problem("INCIDENT_WEBHOOK_SECRET_NAME", f"needs {PREFIX}KEY_VAULT_URL (the vault that holds the secret)")
    if webhook is not None and fmt == "json" and secret_name is None:
        r.problem(
            "INCIDENT_WEBHOOK_SECRET_NAME",
            "is required for a json webhook: the receiver verifies the HMAC-SHA256 signature made with it",
        )
    if secret_name is not None and webhook is None and url is None:
        r.problem("INCIDENT_WEBHOOK_SECRET_NAME", f"is only read with {PREFIX}INCIDENT_WEBHOOK_URL; remove it")
    return IncidentSettings(
        sentinel_workspace=workspace.rstrip("/") if workspace else None,
        webhook_url=webhook,
        webhook_format=fmt,
        webhook_secret_name=secret_name,
        webhook_timeout=r.number("INCIDENT_WEBHOOK_TIMEOUT", 10.0, 1.0, 120.0),
        max_new_per_sweep=r.integer("INCIDENT_MAX_NEW_PER_SWEEP", 10, 1, 1000),
    )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise one SettingsError listing all problems."""
    r = _Reader(os.environ if env is None else env)
    cloud = _cloud(r)
    subscriptions = _subscriptions(r)
    storage = _storage(r, cloud)
    retry = RetrySettings(
        total=r.integer("RETRY_TOTAL", 5, 0, 20),
        backoff_factor=r.number("RETRY_BACKOFF_FACTOR", 0.8, 0.0, 30.0),
        backoff_max=r.number("RETRY_BACKOFF_MAX", 60.0, 0.0, 600.0),
    )
    scope = _scope(r)
    key_vault_url = r.https_url("KEY_VAULT_URL", required=False)
    policy_file = r.raw("POLICY_FILE") or DEFAULT_POLICY_FILE
    if not Path(policy_file).is_file():
        r.problem("POLICY_FILE", f"no such file: {shown(policy_file)} (the policy-as-code YAML)")
    lease_seconds = r.integer("LEASE_SECONDS", 30, 15, 60)
    mi_client = r.raw("MANAGED_IDENTITY_CLIENT_ID")
    if mi_client is not None and not _GUID.match(mi_client):
        r.problem("MANAGED_IDENTITY_CLIENT_ID", f"must be a client id (GUID), got {shown(mi_client)}")
    ca_bundle = r.raw("CA_BUNDLE")
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        r.problem("CA_BUNDLE", f"no such file: {shown(ca_bundle)} (a PEM file of CA certificates to trust)")
    api = _api(r)
    log_level = (r.raw("LOG_LEVEL") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        r.problem("LOG_LEVEL", f"must be one of {', '.join(_LOG_LEVELS)}, got {shown(log_level)}")
        log_level = "INFO"
    sweep_schedule = _sweep_schedule(r)
    work_queue = _work_queue(r)
    backup = _backup(r, cloud)
    backup_schedule = _schedule(r, "BACKUP_SCHEDULE", DEFAULT_BACKUP_SCHEDULE, "every 15 minutes")
    restore_test_schedule = _schedule(
        r, "RESTORE_TEST_SCHEDULE", DEFAULT_RESTORE_TEST_SCHEDULE, "every 15 minutes from :07"
    )
    incidents = _incidents(r, key_vault_url)
    signals_interval = r.integer("SIGNALS_INTERVAL_MINUTES", 15, 0, 1440)
    if r.problems:
        raise SettingsError(r.problems)
    return Settings(
        cloud=cloud,
        subscription_ids=subscriptions,
        storage=storage,
        retry=retry,
        scope=scope,
        key_vault_url=key_vault_url,
        policy_file=policy_file,
        lease_seconds=lease_seconds,
        managed_identity_client_id=mi_client,
        ca_bundle=ca_bundle,
        log_level=log_level,
        sweep_schedule=sweep_schedule,
        work_queue=work_queue,
        signals_interval_minutes=signals_interval,
        api=api,
        backup=backup,
        backup_schedule=backup_schedule,
        restore_test_schedule=restore_test_schedule,
        incidents=incidents,
    )


# Every setting this module reads, for local.settings.sample.json and the README (a test
# keeps the three in agreement).
SETTING_NAMES: tuple[str, ...] = tuple(
    PREFIX + key
    for key in (
        "CLOUD",
        *_CUSTOM_ONLY,
        "SUBSCRIPTION_IDS",
        "STORAGE_ACCOUNT",
        "STORAGE_BLOB_ENDPOINT",
        "STORAGE_QUEUE_ENDPOINT",
        "STORAGE_TABLE_ENDPOINT",
        "STORAGE_CONNECTION_STRING",
        "RETRY_TOTAL",
        "RETRY_BACKOFF_FACTOR",
        "RETRY_BACKOFF_MAX",
        "RESOURCE_GROUPS",
        "TAG_SELECTOR",
        "KEY_VAULT_URL",
        "POLICY_FILE",
        "LEASE_SECONDS",
        "MANAGED_IDENTITY_CLIENT_ID",
        "CA_BUNDLE",
        "LOG_LEVEL",
        "SWEEP_SCHEDULE",
        "WORK_QUEUE",
        "SIGNALS_INTERVAL_MINUTES",
        "API_AUDIENCE",
        "API_TENANT_ID",
        "BACKUP_STORAGE_ACCOUNT",
        "BACKUP_CONTAINER",
        "BACKUP_BLOB_ENDPOINT",
        "BACKUP_ACCESS",
        "BACKUP_IDENTITY_CLIENT_ID",
        "BACKUP_ACCESS_KEY_SECRET",
        "BACKUP_SCHEDULE",
        "RESTORE_TEST_SCHEDULE",
        "INCIDENT_SENTINEL_WORKSPACE",
        "INCIDENT_WEBHOOK_URL",
        "INCIDENT_WEBHOOK_FORMAT",
        "INCIDENT_WEBHOOK_SECRET_NAME",
        "INCIDENT_WEBHOOK_TIMEOUT",
        "INCIDENT_MAX_NEW_PER_SWEEP",
    )
)
