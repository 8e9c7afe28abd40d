"""Read one APIM instance into an immutable `Snapshot`: the one place that reads for the rules.

Every part is read concurrently with the async SDK clients, each list page and each
sub-resource exactly once. A part that cannot be read (403, a 404 of the whole collection,
a timeout after the client's retries) is named in `Snapshot.unreadable` as
"<part>: <status> <code>" and left empty, so the rules about it say nothing; only the
service itself is required (gone -> `PermanentError`). A part the settings leave out (the
key ledger and key hashes without APIMR_KEY_VAULT_URL) is named in
`Snapshot.not_configured` instead: its rules say nothing, but nothing failed.

Part names are the snapshot's field names: subscriptions, tenant_access, git_access, portal,
identity_providers, named_values, apis, backends, products, policies, apim_diagnostics,
loggers, diagnostic_settings, key_ledger, key_hashes, certificates, workspaces; a part of a
workspace is "workspaces/{id}/{part}" (apis, products, subscriptions, named_values, backends,
policies).

Secrets never enter the snapshot, the log or an exception: named values are listed (never
`listValue`); Key Vault values of the key ledger and APIM keys (`listSecrets`, only for
active subscriptions the ledger tracks) are reduced to keyed hashes (HMAC-SHA256 with a
per-process key) the moment they are read.

Azure actions: Microsoft.ApiManagement/service/read and service/*/read,
service/subscriptions/listSecrets/action, Microsoft.Insights/diagnosticSettings/read; Key
Vault secrets list + get on the key-ledger vault.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretProperties
from azure.keyvault.secrets.aio import SecretClient
from azure.mgmt.apimanagement import models as apim_models

from shared.azure import ClientFactory
from shared.errors import PermanentError
from shared.inventory import InstanceRef, describe_failure
from shared.model import (
    AccessSetting,
    Api,
    ApimCertificate,
    ApimDiagnostic,
    ApimSubscription,
    Backend,
    CaCertificate,
    DiagnosticLog,
    DiagnosticSetting,
    HostnameCertificate,
    IdentityProvider,
    KeyHashes,
    Logger,
    NamedValue,
    Policy,
    PolicyScope,
    Portal,
    PrivateEndpointConnection,
    Product,
    Service,
    Snapshot,
    TrackedKey,
    Workspace,
    frozen_map,
)

log = logging.getLogger(__name__)

LEDGER_SUBSCRIPTION_TAG = "apim-subscription-id"
LEDGER_SLOT_TAG = "apim-key-slot"
# "xml" is always well-formed XML (policy expressions escaped); "rawxml" need not be.
POLICY_FORMAT = "xml"
# Requests one snapshot has in flight at once; a scan runs a few snapshots side by side and
# ARM's read budget per principal and subscription is shared by all of them.
MAX_CONCURRENT_READS = 8
NOT_CONFIGURED = "not configured (APIMR_KEY_VAULT_URL is not set)"
# The tiers that have workspaces (Learn: "Create and manage a workspace", applies to Basic v2,
# Standard v2, Premium and Premium v2).
WORKSPACE_SKUS = ("Premium", "BasicV2", "StandardV2", "PremiumV2")

T = TypeVar("T")


# -- pure mapping: SDK models -> snapshot parts ---------------------------------------------------


def text(value: object) -> str | None:
    """A str from an SDK value (the SDK turns known enum values into Enum members)."""
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def utc(value: datetime | None) -> datetime | None:
    """An aware UTC datetime (naive values are UTC, as ARM and Key Vault send them)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def keyed_hash(hash_key: bytes, value: str) -> str:
    return hmac.new(hash_key, value.encode(), hashlib.sha256).hexdigest()


def map_service(model: apim_models.ApiManagementServiceResource, ref: InstanceRef) -> Service:
    vnet = model.virtual_network_configuration
    created = utc(model.created_at_utc)
    return Service(
        id=model.id or ref.id,
        name=model.name or ref.name,
        subscription_id=ref.subscription_id,
        resource_group=ref.resource_group,
        location=model.location,
        sku_name=text(model.sku.name) or "",
        sku_capacity=model.sku.capacity,
        etag=model.etag,
        tags=frozen_map(model.tags),
        identity_type=text(model.identity.type) if model.identity is not None else None,
        principal_id=model.identity.principal_id if model.identity is not None else None,
        public_network_access=text(model.public_network_access),
        virtual_network_type=text(model.virtual_network_type),
        subnet_id=vnet.subnet_resource_id if vnet is not None else None,
        private_endpoints=tuple(
            PrivateEndpointConnection(
                id=c.id or "",
                name=c.name or "",
                status=text(c.private_link_service_connection_state.status)
                if c.private_link_service_connection_state is not None
                else None,
            )
            for c in model.private_endpoint_connections or ()
        ),
        custom_properties=frozen_map(model.custom_properties),
        min_api_version=model.api_version_constraint.min_api_version if model.api_version_constraint else None,
        platform_version=text(model.platform_version),
        created_at=created.isoformat() if created is not None else None,
        provisioning_state=model.provisioning_state,
        hostname_configurations=tuple(map_hostname(h) for h in model.hostname_configurations or ()),
        ca_certificates=tuple(map_ca_certificate(c) for c in model.certificates or ()),
    )


def map_hostname(model: apim_models.HostnameConfiguration) -> HostnameCertificate:
    """Never encodedCertificate or certificatePassword (write-only in Azure; dropped if sent)."""
    info = model.certificate
    return HostnameCertificate(
        type=text(model.type) or "",
        host_name=model.host_name or "",
        certificate_source=text(model.certificate_source),
        certificate_status=text(model.certificate_status),
        key_vault_id=model.key_vault_id,
        expiry=utc(info.expiry) if info is not None else None,
        thumbprint=info.thumbprint if info is not None else None,
        subject=info.subject if info is not None else None,
    )


def map_ca_certificate(model: apim_models.CertificateConfiguration) -> CaCertificate:
    info = model.certificate
    return CaCertificate(
        store_name=text(model.store_name) or "",
        expiry=utc(info.expiry) if info is not None else None,
        thumbprint=info.thumbprint if info is not None else None,
        subject=info.subject if info is not None else None,
    )


def map_certificate(model: apim_models.CertificateContract) -> ApimCertificate:
    vault = model.key_vault
    status = vault.last_status if vault is not None else None
    return ApimCertificate(
        id=model.id or "",
        name=model.name or "",
        subject=model.subject,
        thumbprint=model.thumbprint,
        expiration_date=utc(model.expiration_date),
        key_vault_secret_id=vault.secret_identifier if vault is not None else None,
        key_vault_last_status_code=status.code if status is not None else None,
        key_vault_last_status_message=status.message if status is not None else None,
        key_vault_last_status_time=utc(status.time_stamp_utc) if status is not None else None,
    )


def map_service_body(body: Mapping[str, Any], ref: InstanceRef, etag: str | None = None) -> Service:
    """A raw ARM GET of the service (what the engine reads right before a service update)."""
    service = map_service(apim_models.ApiManagementServiceResource.deserialize(dict(body)), ref)
    return service if service.etag or not etag else replace(service, etag=etag)


def map_subscription(model: apim_models.SubscriptionContract) -> ApimSubscription:
    return ApimSubscription(
        id=model.id or "",
        sid=model.name or "",
        display_name=model.display_name,
        scope=model.scope or "",
        state=text(model.state) or "",
        owner_id=model.owner_id,
        created_date=utc(model.created_date),
        expiration_date=utc(model.expiration_date),
        allow_tracing=model.allow_tracing,
    )


def map_access(model: apim_models.AccessInformationContract, etag: str | None) -> AccessSetting:
    return AccessSetting(id=model.id or "", enabled=model.enabled, etag=etag)


def map_portal(
    signup: apim_models.PortalSignupSettings | None,
    signin: apim_models.PortalSigninSettings | None,
    config: tuple[apim_models.PortalConfigContract, str | None] | None,
) -> Portal:
    return Portal(
        signup_enabled=signup.enabled if signup is not None else None,
        signin_enabled=signin.enabled if signin is not None else None,
        basic_auth_enabled=config[0].enable_basic_auth if config is not None else None,
        portal_config_id=config[0].id if config is not None else None,
        portal_config_etag=config[1] if config is not None else None,
    )


def map_identity_provider(model: apim_models.IdentityProviderContract) -> IdentityProvider:
    return IdentityProvider(id=model.id or "", type=text(model.type_properties_type) or model.name or "")


def map_named_value(model: apim_models.NamedValueContract) -> NamedValue:
    """Never the value: only what a rule needs to know about where it comes from."""
    vault = model.key_vault
    status = vault.last_status if vault is not None else None
    return NamedValue(
        id=model.id or "",
        name=model.name or "",
        display_name=model.display_name or "",
        secret=bool(model.secret),
        key_vault_secret_id=vault.secret_identifier if vault is not None else None,
        key_vault_last_status_code=status.code if status is not None else None,
        key_vault_last_status_message=status.message if status is not None else None,
        key_vault_last_status_time=utc(status.time_stamp_utc) if status is not None else None,
        tags=tuple(model.tags or ()),
    )


def map_api(model: apim_models.ApiContract) -> Api:
    names = model.subscription_key_parameter_names
    return Api(
        id=model.id or "",
        name=model.name or "",
        display_name=model.display_name,
        path=model.path,
        protocols=tuple(text(p) or "" for p in model.protocols or ()),
        subscription_required=model.subscription_required,
        service_url=model.service_url,
        api_type=text(model.api_type),
        is_current=model.is_current,
        subscription_key_header=names.header if names is not None else None,
        subscription_key_query=names.query if names is not None else None,
    )


def current_apis(models: Iterable[apim_models.ApiContract]) -> list[apim_models.ApiContract]:
    """Only current revisions (an API without `isCurrent` counts as current)."""
    return [m for m in models if m.is_current is not False]


def map_backend(model: apim_models.BackendContract) -> Backend:
    tls = model.tls
    creds = model.credentials
    has_credentials = creds is not None and any(
        (creds.certificate, creds.certificate_ids, creds.authorization, creds.header, creds.query)
    )
    return Backend(
        id=model.id or "",
        name=model.name or "",
        url=model.url,
        protocol=text(model.protocol),
        validate_certificate_chain=tls.validate_certificate_chain if tls is not None else None,
        validate_certificate_name=tls.validate_certificate_name if tls is not None else None,
        has_credentials=has_credentials,
    )


def map_product(model: apim_models.ProductContract, apis: Iterable[apim_models.ApiContract]) -> Product:
    return Product(
        id=model.id or "",
        name=model.name or "",
        state=text(model.state),
        subscription_required=model.subscription_required,
        api_ids=tuple(a.name or "" for a in apis),
        approval_required=model.approval_required,
        subscriptions_limit=model.subscriptions_limit,
    )


def map_workspace_product(
    model: apim_models.ProductContract, links: Iterable[apim_models.ProductApiLinkContract]
) -> Product:
    """A workspace product: its APIs are the `apiLinks` (apiId is the API's full id)."""
    names = tuple((link.api_id or "").rstrip("/").rsplit("/", 1)[-1] for link in links if link.api_id)
    return replace(map_product(model, ()), api_ids=names)


def map_policy(model: apim_models.PolicyContract, scope: PolicyScope, owner: str) -> Policy:
    return Policy(id=model.id or "", scope=scope, owner=owner, xml=model.value or "")


def _headers(settings: apim_models.PipelineDiagnosticSettings | None, which: str) -> tuple[str, ...]:
    message = getattr(settings, which, None) if settings is not None else None
    return tuple(message.headers or ()) if message is not None else ()


def _side_json(settings: apim_models.PipelineDiagnosticSettings | None) -> str | None:
    """One side's settings as Azure's JSON (camelCase wire names), sorted keys."""
    if settings is None:
        return None
    return json.dumps(settings.serialize(keep_readonly=True), sort_keys=True)


def map_diagnostic(model: apim_models.DiagnosticContract) -> ApimDiagnostic:
    return ApimDiagnostic(
        id=model.id or "",
        name=model.name or "",
        logger_id=model.logger_id,
        frontend_request_headers=_headers(model.frontend, "request"),
        frontend_response_headers=_headers(model.frontend, "response"),
        backend_request_headers=_headers(model.backend, "request"),
        backend_response_headers=_headers(model.backend, "response"),
        sampling_percentage=model.sampling.percentage if model.sampling is not None else None,
        frontend_json=_side_json(model.frontend),
        backend_json=_side_json(model.backend),
    )


def map_logger(model: apim_models.LoggerContract) -> Logger:
    """Never the credentials (they name secrets)."""
    return Logger(
        id=model.id or "",
        name=model.name or "",
        logger_type=text(model.logger_type) or "",
        resource_id=model.resource_id,
    )


def map_diagnostic_setting(model: Any) -> DiagnosticSetting:
    """An azure-mgmt-monitor DiagnosticSettingsResource (the multi-api client is untyped)."""
    return DiagnosticSetting(
        id=str(model.id or ""),
        name=str(model.name or ""),
        workspace_id=model.workspace_id,
        destination_type=text(model.log_analytics_destination_type),
        logs=tuple(
            DiagnosticLog(category=log_.category, category_group=log_.category_group, enabled=bool(log_.enabled))
            for log_ in model.logs or ()
        ),
        storage_account_id=model.storage_account_id,
        event_hub_rule_id=model.event_hub_authorization_rule_id,
    )


def ledger_entry(tags: Mapping[str, str] | None, service_id: str) -> tuple[str, str] | None:
    """(APIM subscription ARM id, slot) when a Key Vault secret's tags put it in this
    instance's key ledger; tag names compare case-insensitively, ids too."""
    lowered = {name.lower(): value for name, value in (tags or {}).items()}
    subscription_id = (lowered.get(LEDGER_SUBSCRIPTION_TAG) or "").strip().rstrip("/")
    prefix = service_id.lower().rstrip("/") + "/subscriptions/"
    if not subscription_id.lower().startswith(prefix) or "/" in subscription_id[len(prefix) :]:
        return None
    if len(subscription_id) == len(prefix):
        return None
    return subscription_id, (lowered.get(LEDGER_SLOT_TAG) or "").strip().lower()


def map_tracked_key(
    listed: SecretProperties,
    current: SecretProperties | None,
    subscription_id: str,
    slot: str,
    value_hash: str | None,
) -> TrackedKey | None:
    """The ledger entry from the list item and, when the value could be read, the current
    version's properties (which carry the versioned id)."""
    props = current or listed
    created = utc(props.created_on)
    if created is None:
        return None
    return TrackedKey(
        secret_id=props.id or listed.id or "",
        secret_name=listed.name or "",
        subscription_id=subscription_id,
        slot=slot,
        created=created,
        expires=utc(props.expires_on),
        enabled=bool(props.enabled),
        value_hash=value_hash,
    )


def align_ledger(ledger: Iterable[TrackedKey], subscriptions: Iterable[ApimSubscription]) -> tuple[TrackedKey, ...]:
    """Ledger entries with the APIM subscription id spelled as APIM returns it (tags may
    differ in case), so rules can match key_ledger, key_hashes and subscriptions by id."""
    spelled = {s.id.lower(): s.id for s in subscriptions}
    return tuple(replace(k, subscription_id=spelled.get(k.subscription_id.lower(), k.subscription_id)) for k in ledger)


# -- reading ----------------------------------------------------------------------------------


async def _value(value: T) -> T:
    return value


async def _all(pager: AsyncIterable[T]) -> list[T]:
    return [item async for item in pager]


def _with_etag(_response: Any, deserialized: Any, headers: Mapping[str, Any]) -> tuple[Any, str | None]:
    etag = headers.get("ETag")
    return deserialized, str(etag) if etag else None


def _etagged(call: Callable[..., Awaitable[Any]], *args: Any) -> Callable[[], Awaitable[tuple[Any, str | None]]]:
    """A GET that also returns the response's ETag header (the models carry no etag)."""

    async def run() -> tuple[Any, str | None]:
        result: tuple[Any, str | None] = await call(*args, cls=_with_etag)
        return result

    return run


class _Reader:
    """One snapshot's reads; collects the parts that could not be read."""

    def __init__(
        self, factory: ClientFactory, ref: InstanceRef, hash_key: bytes, parts: frozenset[str] | None = None
    ) -> None:
        self.parts = parts  # None: every part
        self.factory = factory
        self.ref = ref
        self.hash_key = hash_key
        self.apim = factory.apim_async(ref.subscription_id)
        self.rg = ref.resource_group
        self.name = ref.name
        self.failures: dict[str, str] = {}
        self.not_configured: dict[str, str] = {}  # parts the settings leave out, not failures
        self.skipped: set[str] = set()  # parts no rule the policy runs reads
        self.gate = asyncio.Semaphore(MAX_CONCURRENT_READS)

    def wants(self, part: str) -> bool:
        """Whether `part` is read; one the policy's rules do not read is recorded as skipped."""
        if self.parts is None or part in self.parts:
            return True
        self.skipped.add(part)
        return False

    def fail(self, part: str, what: str, reason: str) -> None:
        self.failures.setdefault(part, f"{part}: {reason}")
        log.warning("snapshot of %s: could not read %s (%s)", self.ref.id, what, reason)

    async def read(
        self, part: str, what: str, call: Callable[[], Awaitable[T]], *, absent_ok: bool = False
    ) -> T | None:
        """One request (or one pager, each page once); None when it failed or (absent_ok)
        the thing does not exist."""
        try:
            async with self.gate:
                return await call()
        except ResourceNotFoundError as error:
            if absent_ok:
                return None
            self.fail(part, what, describe_failure(error))
        except AzureError as error:
            self.fail(part, what, describe_failure(error))
        return None

    # -- the parts --------------------------------------------------------------------------

    async def service(self) -> Service:
        try:
            # Through the gate like every other read: a scan's requests in flight (and so its
            # pooled connections) stay within instances x MAX_CONCURRENT_READS.
            async with self.gate:
                model = await self.apim.api_management_service.get(self.rg, self.name)
        except ResourceNotFoundError as error:
            raise PermanentError(f"APIM instance {self.ref.id} no longer exists ({describe_failure(error)})") from error
        return map_service(model, self.ref)

    async def subscriptions(self) -> tuple[ApimSubscription, ...] | None:
        found = await self.read(
            "subscriptions", "APIM subscriptions", lambda: _all(self.apim.subscription.list(self.rg, self.name))
        )
        return None if found is None else tuple(map_subscription(m) for m in found)

    async def access(self, part: str, access_name: str) -> AccessSetting | None:
        found = await self.read(
            part,
            f"tenant/{access_name}",
            _etagged(self.apim.tenant_access.get, self.rg, self.name, access_name),
        )
        return None if found is None else map_access(*found)

    async def portal(self) -> Portal:
        signup, signin, config = await asyncio.gather(
            self.read("portal", "portal sign-up settings", lambda: self.apim.sign_up_settings.get(self.rg, self.name)),
            self.read("portal", "portal sign-in settings", lambda: self.apim.sign_in_settings.get(self.rg, self.name)),
            self.read(
                "portal",
                "portal config 'default'",
                _etagged(self.apim.portal_config.get, self.rg, self.name, "default"),
            ),
        )
        return map_portal(signup, signin, config)

    async def identity_providers(self) -> tuple[IdentityProvider, ...]:
        found = await self.read(
            "identity_providers",
            "identity providers",
            lambda: _all(self.apim.identity_provider.list_by_service(self.rg, self.name)),
        )
        return tuple(map_identity_provider(m) for m in found or ())

    async def named_values(self) -> tuple[NamedValue, ...]:
        found = await self.read(
            "named_values",
            "named values",
            lambda: _all(self.apim.named_value.list_by_service(self.rg, self.name)),
        )
        return tuple(map_named_value(m) for m in found or ())

    async def backends(self) -> tuple[Backend, ...]:
        found = await self.read(
            "backends", "backends", lambda: _all(self.apim.backend.list_by_service(self.rg, self.name))
        )
        return tuple(map_backend(m) for m in found or ())

    async def apim_diagnostics(self) -> tuple[ApimDiagnostic, ...]:
        found = await self.read(
            "apim_diagnostics",
            "APIM diagnostics",
            lambda: _all(self.apim.diagnostic.list_by_service(self.rg, self.name)),
        )
        return tuple(map_diagnostic(m) for m in found or ())

    async def certificates(self) -> tuple[ApimCertificate, ...]:
        found = await self.read(
            "certificates",
            "certificates",
            lambda: _all(self.apim.certificate.list_by_service(self.rg, self.name)),
        )
        return tuple(map_certificate(m) for m in found or ())

    async def loggers(self) -> tuple[Logger, ...]:
        found = await self.read(
            "loggers", "loggers", lambda: _all(self.apim.logger.list_by_service(self.rg, self.name))
        )
        return tuple(map_logger(m) for m in found or ())

    async def diagnostic_settings(self) -> tuple[DiagnosticSetting, ...]:
        monitor = self.factory.monitor_async(self.ref.subscription_id)
        found = await self.read(
            "diagnostic_settings",
            "Azure Monitor diagnostic settings",
            lambda: _all(monitor.diagnostic_settings.list(self.ref.id)),
        )
        return tuple(map_diagnostic_setting(m) for m in found or ())

    async def service_policy(self) -> tuple[Policy, ...]:
        found = await self.read(
            "policies",
            "the global policy",
            lambda: self.apim.policy.get(self.rg, self.name, "policy", format=POLICY_FORMAT),
            absent_ok=True,
        )
        return () if found is None else (map_policy(found, PolicyScope.SERVICE, ""),)

    async def apis(self) -> tuple[tuple[Api, ...], tuple[Policy, ...]]:
        found = await self.read("apis", "APIs", lambda: _all(self.apim.api.list_by_service(self.rg, self.name)))
        apis = current_apis(found or ())

        async def policy(api: apim_models.ApiContract) -> Policy | None:
            api_name = api.name or ""
            model = await self.read(
                "policies",
                f"the policy of API {api_name}",
                lambda: self.apim.api_policy.get(self.rg, self.name, api_name, "policy", format=POLICY_FORMAT),
                absent_ok=True,
            )
            return None if model is None else map_policy(model, PolicyScope.API, api_name)

        if not self.wants("policies"):
            return tuple(map_api(a) for a in apis), ()
        policies = await asyncio.gather(*(policy(a) for a in apis))
        return tuple(map_api(a) for a in apis), tuple(p for p in policies if p is not None)

    async def products(self) -> tuple[tuple[Product, ...], tuple[Policy, ...]]:
        found = await self.read(
            "products", "products", lambda: _all(self.apim.product.list_by_service(self.rg, self.name))
        )

        async def absent() -> None:
            return None

        async def one(product: apim_models.ProductContract) -> tuple[Product, Policy | None]:
            pid = product.name or ""
            apis, model = await asyncio.gather(
                self.read(
                    "products",
                    f"the APIs of product {pid}",
                    lambda: _all(self.apim.product_api.list_by_product(self.rg, self.name, pid)),
                ),
                self.read(
                    "policies",
                    f"the policy of product {pid}",
                    lambda: self.apim.product_policy.get(self.rg, self.name, pid, "policy", format=POLICY_FORMAT),
                    absent_ok=True,
                )
                if self.wants("policies")
                else absent(),
            )
            policy = None if model is None else map_policy(model, PolicyScope.PRODUCT, pid)
            return map_product(product, apis or ()), policy

        results = await asyncio.gather(*(one(p) for p in found or ()))
        return tuple(p for p, _ in results), tuple(pol for _, pol in results if pol is not None)

    async def workspaces(self, service: Awaitable[Service]) -> tuple[Workspace, ...]:
        """Every workspace and its APIs (current revisions), products (with their API links),
        subscriptions, named values, backends and policies (workspace, product, API).

        Only tiers with workspaces (WORKSPACE_SKUS) are asked: the others have none."""
        if (await service).sku_name.lower() not in {s.lower() for s in WORKSPACE_SKUS}:
            return ()
        found = await self.read(
            "workspaces", "workspaces", lambda: _all(self.apim.workspace.list_by_service(self.rg, self.name))
        )
        return tuple(await asyncio.gather(*(self._workspace(w) for w in found or ())))

    async def _workspace(self, model: apim_models.WorkspaceContract) -> Workspace:
        ws = model.name or ""
        rg, name = self.rg, self.name

        def part(what: str) -> str:
            return f"workspaces/{ws}/{what}"

        async def apis() -> tuple[tuple[Api, ...], tuple[Policy, ...]]:
            listed = await self.read(
                part("apis"),
                f"the APIs of workspace {ws}",
                lambda: _all(self.apim.workspace_api.list_by_service(rg, name, ws)),
            )
            current = current_apis(listed or ())

            async def policy(api: apim_models.ApiContract) -> Policy | None:
                api_name = api.name or ""
                found = await self.read(
                    part("policies"),
                    f"the policy of API {api_name} in workspace {ws}",
                    lambda: self.apim.workspace_api_policy.get(rg, name, ws, api_name, "policy", format=POLICY_FORMAT),
                    absent_ok=True,
                )
                return None if found is None else map_policy(found, PolicyScope.API, api_name)

            policies = await asyncio.gather(*(policy(a) for a in current))
            return tuple(map_api(a) for a in current), tuple(p for p in policies if p is not None)

        async def products() -> tuple[tuple[Product, ...], tuple[Policy, ...]]:
            listed = await self.read(
                part("products"),
                f"the products of workspace {ws}",
                lambda: _all(self.apim.workspace_product.list_by_service(rg, name, ws)),
            )

            async def one(product: apim_models.ProductContract) -> tuple[Product, Policy | None]:
                pid = product.name or ""
                links, found = await asyncio.gather(
                    self.read(
                        part("products"),
                        f"the API links of product {pid} in workspace {ws}",
                        lambda: _all(self.apim.workspace_product_api_link.list_by_product(rg, name, ws, pid)),
                    ),
                    self.read(
                        part("policies"),
                        f"the policy of product {pid} in workspace {ws}",
                        lambda: self.apim.workspace_product_policy.get(
                            rg, name, ws, pid, "policy", format=POLICY_FORMAT
                        ),
                        absent_ok=True,
                    ),
                )
                policy = None if found is None else map_policy(found, PolicyScope.PRODUCT, pid)
                return map_workspace_product(product, links or ()), policy

            results = await asyncio.gather(*(one(p) for p in listed or ()))
            return tuple(p for p, _ in results), tuple(pol for _, pol in results if pol is not None)

        async def listed(what: str, label: str, call: Callable[[], Awaitable[list[T]]]) -> list[T]:
            return await self.read(part(what), f"the {label} of workspace {ws}", call) or []

        (api_list, api_policies), (product_list, product_policies), subs, named, backends, own = await asyncio.gather(
            apis(),
            products(),
            listed("subscriptions", "subscriptions", lambda: _all(self.apim.workspace_subscription.list(rg, name, ws))),
            listed(
                "named_values",
                "named values",
                lambda: _all(self.apim.workspace_named_value.list_by_service(rg, name, ws)),
            ),
            listed("backends", "backends", lambda: _all(self.apim.workspace_backend.list_by_workspace(rg, name, ws))),
            self.read(
                part("policies"),
                f"the policy of workspace {ws}",
                lambda: self.apim.workspace_policy.get(rg, name, ws, "policy", format=POLICY_FORMAT),
                absent_ok=True,
            ),
        )
        workspace_policy = () if own is None else (map_policy(own, PolicyScope.WORKSPACE, ""),)
        return Workspace(
            id=model.id or f"{self.ref.id}/workspaces/{ws}",
            name=ws,
            display_name=model.display_name,
            apis=api_list,
            products=product_list,
            subscriptions=tuple(map_subscription(m) for m in subs),
            named_values=tuple(map_named_value(m) for m in named),
            backends=tuple(map_backend(m) for m in backends),
            policies=(*workspace_policy, *product_policies, *api_policies),
        )

    async def key_ledger(self, vault_url: str | None) -> tuple[TrackedKey, ...] | None:
        if vault_url is None:
            self.not_configured["key_ledger"] = f"key_ledger: {NOT_CONFIGURED}"
            return None
        client = self.factory.secrets_async(vault_url)
        listed = await self.read("key_ledger", "the key ledger", lambda: _all(client.list_properties_of_secrets()))
        if listed is None:
            return None
        mine = [(p, entry) for p in listed if (entry := ledger_entry(p.tags, self.ref.id)) is not None]
        keys = await asyncio.gather(*(self._tracked(client, p, sub, slot) for p, (sub, slot) in mine))
        return tuple(sorted((k for k in keys if k is not None), key=lambda k: k.secret_name.lower()))

    async def _tracked(
        self, client: SecretClient, listed: SecretProperties, subscription_id: str, slot: str
    ) -> TrackedKey | None:
        name = listed.name or ""
        value_hash: str | None = None
        current: SecretProperties | None = None
        if listed.enabled is not False:
            try:
                async with self.gate:
                    secret = await client.get_secret(name)
            except AzureError as error:
                # The entry stays (its age is known); only the comparison is lost.
                log.warning(
                    "snapshot of %s: could not read key-ledger secret %s (%s)",
                    self.ref.id,
                    name,
                    describe_failure(error),
                )
            else:
                value_hash = keyed_hash(self.hash_key, secret.value) if secret.value is not None else None
                current = secret.properties
                del secret
        tracked = map_tracked_key(listed, current, subscription_id, slot, value_hash)
        if tracked is None:
            log.warning("snapshot of %s: key-ledger secret %s has no creation time; skipped", self.ref.id, name)
        return tracked

    async def key_hashes(
        self,
        subscriptions: Awaitable[tuple[ApimSubscription, ...] | None],
        ledger: Awaitable[tuple[TrackedKey, ...] | None],
    ) -> tuple[KeyHashes, ...]:
        subs, tracked_keys = await subscriptions, await ledger
        if tracked_keys is None and "key_ledger" in self.not_configured:
            # No ledger to compare with: nothing failed, the deployment did not ask for it.
            self.not_configured["key_hashes"] = f"key_hashes: {NOT_CONFIGURED}"
            return ()
        if tracked_keys is None or subs is None:
            # Which subscriptions to compare is unknown: say so rather than compare none.
            part = "key_ledger" if tracked_keys is None else "subscriptions"
            reason = self.failures.get(part, f"{part}: unreadable").split(": ", 1)[1]
            self.failures.setdefault("key_hashes", f"key_hashes: {reason}")
            return ()
        tracked = {k.subscription_id.lower() for k in tracked_keys}
        targets = [s for s in subs if s.id.lower() in tracked and s.state.lower() == "active"]

        async def one(sub: ApimSubscription) -> KeyHashes | None:
            keys = await self.read(
                "key_hashes",
                f"the keys of subscription {sub.sid}",
                lambda: self.apim.subscription.list_secrets(self.rg, self.name, sub.sid),
                absent_ok=True,
            )
            if keys is None:
                return None
            primary, secondary = keys.primary_key, keys.secondary_key
            del keys
            if primary is None or secondary is None:
                log.warning("snapshot of %s: listSecrets of %s returned no keys", self.ref.id, sub.sid)
                return None
            return KeyHashes(
                subscription_id=sub.id,
                primary=keyed_hash(self.hash_key, primary),
                secondary=keyed_hash(self.hash_key, secondary),
            )

        hashes = await asyncio.gather(*(one(s) for s in targets))
        return tuple(h for h in hashes if h is not None)


async def read_snapshot(
    factory: ClientFactory,
    ref: InstanceRef,
    *,
    key_vault_url: str | None,
    hash_key: bytes,
    now: datetime,
    parts: frozenset[str] | None = None,
) -> Snapshot:
    """Read `ref` and every sub-resource the rules need, concurrently, into a Snapshot.

    `parts` (see `read_plan.parts_needed`): only these optional parts are read; the others
    are named in `Snapshot.not_configured`. None reads everything.

    Raises PermanentError when the service is gone; other failures of the service GET
    propagate as the SDK's errors (the caller tells transient from permanent). Failures of
    any other part are listed in `Snapshot.unreadable`.
    """
    reader = _Reader(factory, ref, hash_key, parts)

    def part(name: str, read: Coroutine[Any, Any, T], skipped: T) -> Coroutine[Any, Any, T]:
        if reader.wants(name):
            return read
        read.close()  # never started
        return _value(skipped)

    try:
        async with asyncio.TaskGroup() as group:
            service = group.create_task(reader.service())
            subscriptions = group.create_task(part("subscriptions", reader.subscriptions(), None))
            tenant_access = group.create_task(part("tenant_access", reader.access("tenant_access", "access"), None))
            git_access = group.create_task(part("git_access", reader.access("git_access", "gitAccess"), None))
            portal = group.create_task(part("portal", reader.portal(), map_portal(None, None, None)))
            identity_providers = group.create_task(part("identity_providers", reader.identity_providers(), ()))
            named_values = group.create_task(part("named_values", reader.named_values(), ()))
            apis = group.create_task(part("apis", reader.apis(), ((), ())))
            backends = group.create_task(part("backends", reader.backends(), ()))
            products = group.create_task(part("products", reader.products(), ((), ())))
            service_policy = group.create_task(part("policies", reader.service_policy(), ()))
            apim_diagnostics = group.create_task(part("apim_diagnostics", reader.apim_diagnostics(), ()))
            loggers = group.create_task(part("loggers", reader.loggers(), ()))
            certificates = group.create_task(part("certificates", reader.certificates(), ()))
            diagnostic_settings = group.create_task(part("diagnostic_settings", reader.diagnostic_settings(), ()))
            workspaces = group.create_task(part("workspaces", reader.workspaces(service), ()))
            # Without a vault the key parts are "not configured" (what the settings say),
            # whatever the policy reads; they make no request then.
            ledger_read = reader.key_ledger(key_vault_url)
            ledger = group.create_task(part("key_ledger", ledger_read, None) if key_vault_url else ledger_read)
            hashes_read = reader.key_hashes(subscriptions, ledger)
            key_hashes = group.create_task(part("key_hashes", hashes_read, ()) if key_vault_url else hashes_read)
    except BaseExceptionGroup as failed:
        # One task's error cancelled the rest: raise it as itself, not wrapped in a group,
        # keeping its own cause.
        error = failed.exceptions[0]
        raise error from error.__cause__
    api_list, api_policies = apis.result()
    product_list, product_policies = products.result()
    return Snapshot(
        service=service.result(),
        read_at=now.astimezone(UTC) if now.tzinfo is not None else now.replace(tzinfo=UTC),
        subscriptions=subscriptions.result() or (),
        tenant_access=tenant_access.result(),
        git_access=git_access.result(),
        portal=portal.result(),
        identity_providers=identity_providers.result(),
        named_values=named_values.result(),
        apis=api_list,
        backends=backends.result(),
        products=product_list,
        policies=(*service_policy.result(), *product_policies, *api_policies),
        apim_diagnostics=apim_diagnostics.result(),
        loggers=loggers.result(),
        diagnostic_settings=diagnostic_settings.result(),
        key_ledger=align_ledger(ledger.result() or (), subscriptions.result() or ()),
        key_hashes=key_hashes.result(),
        certificates=certificates.result(),
        workspaces=workspaces.result(),
        unreadable=tuple(sorted(reader.failures.values())),
        not_configured=tuple(sorted(reader.not_configured.values())),
        skipped=tuple(sorted(reader.skipped)),
    )
