"""The composition root of one process: settings, policy and the client factory, built
once (cold start) and handed to the use cases as their narrow dependencies.

The Functions app (function_app.py) and the CLI both build their dependencies here, so a
use case runs the same way from a trigger, a command or a test. Handlers never construct
clients themselves; the factory memoises every client per process (async ones per event
loop), so building the dependency objects per invocation costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from handlers.events import EventScope, EventsDeps
from handlers.reconcile import LogSink, ReconcileDeps, ReconcileRequest, ReconcileResult, reconcile
from handlers.remediate import RemediationDeps
from handlers.rotate_keys import event_rotator
from handlers.sweep import SweepDeps
from handlers.work import WorkDeps
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.errors import SettingsError
from shared.evidence_source import AzureEvidenceSource
from shared.findings_store import FindingsStore
from shared.identity import own_object_id
from shared.journal import Journal
from shared.locks import InstanceLocks
from shared.message_ledger import MessageLedger
from shared.policy import Policy, load_policy
from shared.settings import Settings, load_settings
from shared.signals_source import AzureSignalsSource
from shared.source import AzureInstanceSource
from shared.work_queue import AzureWorkQueue

# Per-subscription leases of key rotation: a container of their own beside the instance leases.
ROTATION_LOCKS = "key-rotation-locks"

if TYPE_CHECKING:
    from handlers.backup import BackupJobDeps
    from handlers.incidents import RunIncidents
    from handlers.manual import ManualDeps
    from handlers.rotate_gateways import GatewayDeps
    from handlers.rotate_keys import RotationDeps
    from shared.entra import TokenValidator
    from shared.gateway_rotation import GatewayRotator
    from shared.incidents import IncidentReporter
    from shared.operations import OperationsStore
    from shared.rotation import Rotator


@dataclass
class AppContext:
    settings: Settings
    policy: Policy
    factory: ClientFactory
    # Where incidents and their outbox live (tests give each their own table).
    incidents_table: str = "incidents"
    # The product identity's object id, read once from its own token (own_object_id).
    _object_id: str | None = field(default=None, init=False, repr=False)
    # The API's token validator holds the authority's signing keys (cached): one per process.
    _validator: TokenValidator | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, env: dict[str, str] | None = None) -> AppContext:
        """Settings and policy from the environment (raises SettingsError / PolicyError)."""
        settings = load_settings(env)
        policy = load_policy(settings.policy_file, today=datetime.now(UTC).date())
        return cls(settings=settings, policy=policy, factory=ClientFactory(settings))

    def source(self) -> AzureInstanceSource:
        return AzureInstanceSource(self.factory, self.settings)

    def findings(self) -> FindingsStore:
        return FindingsStore(self.factory.table_service_async())

    def remediation_deps(self) -> RemediationDeps:
        return RemediationDeps(
            source=self.source(),
            arm=AzureArm(self.factory),
            secrets=AzureSecrets(self.factory),
            journal=Journal(self.factory.table_service_async()),
            locks=InstanceLocks(self.factory.blob_service_async(), duration=self.settings.lease_seconds),
            policy=self.policy,
            key_vault_url=self.settings.key_vault_url,
            evidence=AzureEvidenceSource(self.factory),
            rotator=self.rotator(),
        )

    # The HTTP API's dependencies import JWT, cryptography and the operations table only
    # when the API asks for them: the other triggers' cold start does not pay for them.
    def manual_deps(self) -> ManualDeps:
        from handlers.manual import ManualDeps

        return ManualDeps(
            settings=self.settings,
            policy=self.policy,
            source=self.source(),
            arm=AzureArm(self.factory),
            findings=self.findings(),
            operations=self.operations(),
            remediation=self.remediation_deps(),
            reconcile=self.reconcile_deps(),
        )

    def operations(self) -> OperationsStore:
        from shared.operations import OperationsStore

        return OperationsStore(self.factory.table_service_async())

    def token_validator(self) -> TokenValidator:
        from shared.entra import SigningKeys, TokenValidator, https_fetcher

        """The HTTP API's bearer-token check (raises SettingsError when the API is not configured)."""
        if self._validator is None:
            api = self.settings.api
            if api is None:
                raise SettingsError(["APIMR_API_AUDIENCE and APIMR_API_TENANT_ID are required for the HTTP API"])
            keys = SigningKeys(
                self.settings.cloud.authority_host, api.tenant_id, https_fetcher(self.factory.https_context())
            )
            self._validator = TokenValidator(api, keys)
        return self._validator

    def rotator(self) -> Rotator | None:
        """Key rotation through the ledger vault (None without APIMR_KEY_VAULT_URL); leases per
        APIM subscription in their own container."""
        from shared.rotation import Rotator
        from shared.rotation_azure import AzureKeyApi, AzureLedgerVault

        if self.settings.key_vault_url is None:
            return None
        return Rotator(
            keys=AzureKeyApi(AzureArm(self.factory)),
            vault=AzureLedgerVault(self.factory, self.settings.key_vault_url),
            journal=Journal(self.factory.table_service_async()),
            locks=InstanceLocks(
                self.factory.blob_service_async(), ROTATION_LOCKS, duration=self.settings.lease_seconds
            ),
        )

    def gateway_rotator(self) -> GatewayRotator | None:
        """Self-hosted gateway tokens through the ledger vault (None without APIMR_KEY_VAULT_URL);
        leases per gateway beside the subscriptions'."""
        from shared.gateway_rotation import GatewayRotator
        from shared.gateway_rotation_azure import AzureGatewayApi, AzureTokenVault

        if self.settings.key_vault_url is None:
            return None
        return GatewayRotator(
            api=AzureGatewayApi(AzureArm(self.factory)),
            vault=AzureTokenVault(self.factory, self.settings.key_vault_url),
            journal=Journal(self.factory.table_service_async()),
            locks=InstanceLocks(
                self.factory.blob_service_async(), ROTATION_LOCKS, duration=self.settings.lease_seconds
            ),
        )

    def gateway_deps(self) -> GatewayDeps:
        from handlers.rotate_gateways import GatewayDeps

        return GatewayDeps(source=self.source(), policy=self.policy, rotator=self.gateway_rotator())

    def rotation_deps(self) -> RotationDeps:
        from handlers.rotate_keys import RotationDeps

        return RotationDeps(
            source=self.source(),
            policy=self.policy,
            rotator=self.rotator(),
            vault_url=self.settings.key_vault_url,
            gateways=self.gateway_rotator(),
            incidents=self.incidents(),
        )

    def reconcile_deps(self) -> ReconcileDeps:
        return ReconcileDeps(
            remediation=self.remediation_deps(),
            findings=self.findings(),
            sink=LogSink(),
            incidents=self.run_incidents(),
            signals=AzureSignalsSource(self.factory),
            signals_interval=timedelta(minutes=self.settings.signals_interval_minutes),
        )

    def incidents(self) -> IncidentReporter:
        """The incident reporter with the sinks the settings name (the log is always on)."""
        from shared.incidents import (
            IncidentReporter,
            IncidentSink,
            IncidentStore,
            SentinelSink,
            WebhookFormat,
            WebhookSink,
            aiohttp_post,
            key_vault_secret,
        )

        config = self.settings.incidents
        sinks: list[IncidentSink] = []
        if config.sentinel_workspace:
            sinks.append(SentinelSink(AzureArm(self.factory), config.sentinel_workspace))
        if config.webhook_url is not None:
            secret = None
            if config.webhook_secret_name and self.settings.key_vault_url:
                client = self.factory.secrets_async(self.settings.key_vault_url)
                secret = key_vault_secret(client, config.webhook_secret_name)
            sinks.append(
                WebhookSink(
                    config.webhook_url.reveal(),
                    aiohttp_post(self.factory.https_context()),
                    fmt=WebhookFormat(config.webhook_format),
                    secret=secret,
                    timeout=config.webhook_timeout,
                )
            )
        return IncidentReporter(
            IncidentStore(self.factory.table_service_async(), self.incidents_table),
            sinks,
            max_new_per_batch=config.max_new_per_sweep,
        )

    def run_incidents(self) -> RunIncidents:
        from handlers.incidents import RunIncidents

        return RunIncidents(self.incidents())

    def messages(self) -> MessageLedger:
        return MessageLedger(self.factory.table_service_async())

    def work_queue(self) -> AzureWorkQueue:
        return AzureWorkQueue(self.factory.queue_async(self.settings.work_queue))

    async def run_reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        """Reconcile with fresh dependency objects (the clients under them are memoised)."""
        return await reconcile(request, self.reconcile_deps())

    async def own_object_id(self) -> str:
        if self._object_id is None:
            self._object_id = await own_object_id(self.factory.async_credential(), self.settings.cloud.arm_scope)
        return self._object_id

    def sweep_deps(self) -> SweepDeps:
        return SweepDeps(
            inventory=self.source(),
            policy=self.policy,
            queue=self.work_queue(),
            ledger=self.messages(),
            incidents=self.incidents(),
        )

    def work_deps(self) -> WorkDeps:
        return WorkDeps(
            reconcile=self.run_reconcile,
            failures=self.findings(),
            dead_letters=self.messages(),
            incidents=self.incidents(),
        )

    def backup_deps(self) -> BackupJobDeps:
        """The backup and test-restore jobs; without APIMR_BACKUP_STORAGE_ACCOUNT they report
        that backups are not configured and touch nothing."""
        from handlers.backup import BackupJobDeps
        from shared.backup_azure import AzureBackupApi, AzureBackupBlobs
        from shared.backup_store import BackupStore

        backup = self.settings.backup
        if backup is None:
            return BackupJobDeps(inventory=self.source(), policy=self.policy, azure=None, blobs=None, records=None)
        return BackupJobDeps(
            inventory=self.source(),
            policy=self.policy,
            azure=AzureBackupApi(self.factory, backup),
            blobs=AzureBackupBlobs(self.factory, backup),
            records=BackupStore(self.factory.table_service_async()),
            incidents=self.incidents(),
        )

    def events_deps(self) -> EventsDeps:
        scope = EventScope(
            subscription_ids=frozenset(s.lower() for s in self.settings.subscription_ids),
            resource_groups=frozenset(self.settings.scope.resource_groups),
        )
        return EventsDeps(
            reconcile=self.run_reconcile,
            claims=self.messages(),
            failures=self.findings(),
            own_object_id=self.own_object_id,
            scope=scope,
            rotate=event_rotator(self.rotation_deps()),
        )

    async def aclose(self) -> None:
        await self.factory.aclose()
        self.factory.close()
