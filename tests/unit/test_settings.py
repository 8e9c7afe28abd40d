"""Settings validation: every bad input gives one clear message naming the setting."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.settings import SETTING_NAMES, CloudName, Secret, load_settings

ROOT = Path(__file__).resolve().parents[2]
SUB = "11111111-2222-3333-4444-555555555555"


def base(**extra: str) -> dict[str, str]:
    env = {"APIMR_SUBSCRIPTION_IDS": SUB, "APIMR_STORAGE_ACCOUNT": "apimrstate"}
    env.update(extra)
    return env


def custom(**extra: str) -> dict[str, str]:
    env = base(
        APIMR_CLOUD="Custom",
        APIMR_ARM_ENDPOINT="https://127.0.0.1:8443/",
        APIMR_AUTHORITY_HOST="https://127.0.0.1:8443",
        APIMR_LOG_ANALYTICS_ENDPOINT="https://127.0.0.1:8443/la",
        APIMR_STORAGE_ENDPOINT_SUFFIX="storage.local",
    )
    env.update(extra)
    return env


def problems(env: Mapping[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_public_cloud_defaults() -> None:
    s = load_settings(base())
    assert s.cloud.name is CloudName.AZURE_CLOUD
    assert s.cloud.resource_manager == "https://management.azure.com"
    assert s.cloud.arm_scope == "https://management.azure.com/.default"
    assert s.cloud.log_analytics_scope == "https://api.loganalytics.io/.default"
    assert s.subscription_ids == (SUB,)
    assert s.storage.blob_url == "https://apimrstate.blob.core.windows.net"
    assert s.storage.table_url == "https://apimrstate.table.core.windows.net"
    assert s.retry.total == 5
    assert s.log_level == "INFO"


@pytest.mark.parametrize(
    ("cloud", "arm", "authority", "la", "blob"),
    [
        (
            "AzureUSGovernment",
            "https://management.usgovcloudapi.net",
            "https://login.microsoftonline.us",
            "https://api.loganalytics.us",
            "https://apimrstate.blob.core.usgovcloudapi.net",
        ),
        (
            "azurechinacloud",
            "https://management.chinacloudapi.cn",
            "https://login.chinacloudapi.cn",
            "https://api.loganalytics.azure.cn",
            "https://apimrstate.blob.core.chinacloudapi.cn",
        ),
    ],
)
def test_sovereign_clouds(cloud: str, arm: str, authority: str, la: str, blob: str) -> None:
    s = load_settings(base(APIMR_CLOUD=cloud))
    assert (s.cloud.resource_manager, s.cloud.authority_host, s.cloud.log_analytics) == (arm, authority, la)
    assert s.cloud.resource_graph == arm
    assert s.storage.blob_url == blob


def test_custom_cloud_endpoints_and_defaults() -> None:
    s = load_settings(custom(APIMR_KEYVAULT_VERIFY_CHALLENGE_RESOURCE="false"))
    assert s.cloud.is_custom
    assert s.cloud.resource_manager == "https://127.0.0.1:8443"  # trailing slash removed
    assert s.cloud.resource_graph == s.cloud.resource_manager
    assert s.cloud.arm_audience == s.cloud.resource_manager
    assert s.cloud.keyvault_verify_challenge_resource is False


def test_custom_cloud_requires_its_endpoints_all_named_at_once() -> None:
    found = problems(base(APIMR_CLOUD="Custom", APIMR_STORAGE_ENDPOINT_SUFFIX="storage.local"))
    assert any(p.startswith("APIMR_ARM_ENDPOINT: is required") for p in found)
    assert any(p.startswith("APIMR_AUTHORITY_HOST: is required") for p in found)
    assert any(p.startswith("APIMR_LOG_ANALYTICS_ENDPOINT: is required") for p in found)
    assert len(found) == 3


def test_custom_cloud_account_needs_suffix_or_urls() -> None:
    without_suffix = custom()
    del without_suffix["APIMR_STORAGE_ENDPOINT_SUFFIX"]
    assert any("APIMR_STORAGE_ENDPOINT_SUFFIX" in p for p in problems(without_suffix))
    s = load_settings(custom())
    assert s.storage.queue_url == "https://apimrstate.queue.storage.local"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (base(APIMR_CLOUD="Moon"), "APIMR_CLOUD: unknown cloud 'Moon'; allowed: AzureCloud"),
        (base(APIMR_ARM_ENDPOINT="https://x"), "APIMR_ARM_ENDPOINT: is only read when APIMR_CLOUD=Custom"),
        (custom(APIMR_ARM_ENDPOINT="http://127.0.0.1:1"), "APIMR_ARM_ENDPOINT: must be an https:// URL"),
        (custom(APIMR_AUTHORITY_HOST="https://h/?x=1"), "APIMR_AUTHORITY_HOST: must not carry a query"),
        (custom(APIMR_KEYVAULT_VERIFY_CHALLENGE_RESOURCE="maybe"), "must be true or false, got 'maybe'"),
        (base(APIMR_SUBSCRIPTION_IDS="abc, " + SUB), "APIMR_SUBSCRIPTION_IDS: not subscription ids (GUIDs): 'abc'"),
        (base(APIMR_SUBSCRIPTION_IDS=" , "), "APIMR_SUBSCRIPTION_IDS: names no subscription"),
        (base(APIMR_STORAGE_ACCOUNT="Bad_Name"), "APIMR_STORAGE_ACCOUNT: must be 3-24 lowercase letters and digits"),
        (base(APIMR_RETRY_TOTAL="many"), "APIMR_RETRY_TOTAL: must be a whole number from 0 to 20, got 'many'"),
        (base(APIMR_RETRY_TOTAL="21"), "APIMR_RETRY_TOTAL: must be from 0 to 20, got 21"),
        (base(APIMR_RETRY_BACKOFF_MAX="-1"), "APIMR_RETRY_BACKOFF_MAX: must be from 0 to 600, got -1"),
        (base(APIMR_RETRY_BACKOFF_FACTOR="x"), "APIMR_RETRY_BACKOFF_FACTOR: must be a number"),
        (base(APIMR_MANAGED_IDENTITY_CLIENT_ID="me"), "APIMR_MANAGED_IDENTITY_CLIENT_ID: must be a client id (GUID)"),
        (base(APIMR_CA_BUNDLE="/nonexistent/ca.pem"), "APIMR_CA_BUNDLE: no such file: '/nonexistent/ca.pem'"),
        (base(APIMR_LOG_LEVEL="chatty"), "APIMR_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_each_bad_value_is_named(env: dict[str, str], expected: str) -> None:
    found = problems(env)
    assert any(expected in p for p in found), found


def test_missing_required_settings_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({})
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "APIMR_SUBSCRIPTION_IDS: is required" in message
    assert "APIMR_STORAGE_ACCOUNT: storage is misconfigured (none is set)" in message


def test_storage_ways_are_exclusive() -> None:
    found = problems(base(APIMR_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true"))
    assert any("more than one is set" in p for p in found)


def test_storage_urls_must_come_as_a_set() -> None:
    env = {"APIMR_SUBSCRIPTION_IDS": SUB, "APIMR_STORAGE_BLOB_ENDPOINT": "https://127.0.0.1:10000/devstoreaccount1"}
    found = problems(env)
    assert "APIMR_STORAGE_QUEUE_ENDPOINT: is required when the other storage endpoints are set" in found
    assert "APIMR_STORAGE_TABLE_ENDPOINT: is required when the other storage endpoints are set" in found


def test_connection_string_is_secret_and_never_echoed() -> None:
    canary = "AccountKey=CANARY-c2VjcmV0LWtleS1kby1ub3QtcHJpbnQ="
    s = load_settings(
        {
            "APIMR_SUBSCRIPTION_IDS": SUB,
            "APIMR_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=https;AccountName=a;{canary}",
        }
    )
    assert isinstance(s.storage.connection_string, Secret)
    assert canary in s.storage.connection_string.reveal()
    assert "CANARY" not in repr(s)
    assert "CANARY" not in str(s.describe())
    bad = f"garbage;{canary}"
    with pytest.raises(SettingsError) as info:
        load_settings({"APIMR_SUBSCRIPTION_IDS": "nope", "APIMR_STORAGE_CONNECTION_STRING": bad})
    assert "CANARY" not in str(info.value)
    assert "APIMR_STORAGE_CONNECTION_STRING: is not a storage connection string" in str(info.value)


def test_duplicate_subscriptions_collapse_case_insensitively() -> None:
    s = load_settings(base(APIMR_SUBSCRIPTION_IDS=f"{SUB},{SUB.upper()}"))
    assert s.subscription_ids == (SUB,)


class RecordingEnv(Mapping[str, str]):
    """Records every key the settings module asks for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.values[key]

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def test_setting_names_are_exactly_what_is_read() -> None:
    env = RecordingEnv(custom())
    load_settings(env)
    assert env.asked == set(SETTING_NAMES)


def test_sample_settings_list_every_setting_and_load() -> None:
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    product_keys = {k for k in sample if k.startswith("APIMR_")}
    assert product_keys == set(SETTING_NAMES)
    load_settings(sample)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in SETTING_NAMES if f"`{name}`" not in readme]
    assert not missing, f"README settings table lacks {missing}"


def test_scope_key_vault_and_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    s = load_settings(
        base(
            APIMR_RESOURCE_GROUPS="rg-APIM-prod, rg-edge",
            APIMR_TAG_SELECTOR="env=prod, owner = platform",
            APIMR_KEY_VAULT_URL="https://kv-apim.vault.azure.net/",
            APIMR_POLICY_FILE=str(policy),
        )
    )
    assert s.scope.resource_groups == ("rg-apim-prod", "rg-edge")
    assert s.scope.tags == (("env", "prod"), ("owner", "platform"))
    assert s.key_vault_url == "https://kv-apim.vault.azure.net"
    assert s.policy_file == str(policy)
    assert Path(load_settings(base()).policy_file).name == "baseline.yaml"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (base(APIMR_TAG_SELECTOR="env"), "APIMR_TAG_SELECTOR: must be name=value pairs"),
        (base(APIMR_LEASE_SECONDS="5"), "APIMR_LEASE_SECONDS: must be from 15 to 60, got 5"),
        (base(APIMR_RESOURCE_GROUPS="rg/bad"), "APIMR_RESOURCE_GROUPS: not resource group names: 'rg/bad'"),
        (base(APIMR_KEY_VAULT_URL="http://kv"), "APIMR_KEY_VAULT_URL: must be an https:// URL"),
        (base(APIMR_POLICY_FILE="/nope/policy.yaml"), "APIMR_POLICY_FILE: no such file: '/nope/policy.yaml'"),
    ],
)
def test_scope_settings_problems(env: dict[str, str], expected: str) -> None:
    assert any(expected in p for p in problems(env))


CANARY = "CANARY-0d6e"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        # A SAS URL where a plain endpoint belongs: the query carries the signature.
        (base(APIMR_KEY_VAULT_URL=f"https://kv.vault.azure.net/?sv=2022-11-02&sig={CANARY}"), "APIMR_KEY_VAULT_URL"),
        (base(APIMR_KEY_VAULT_URL=f"http://admin:{CANARY}@kv.vault.azure.net/"), "APIMR_KEY_VAULT_URL"),
        (custom(APIMR_ARM_ENDPOINT=f"https://127.0.0.1:8443/#access_token={CANARY}"), "APIMR_ARM_ENDPOINT"),
        (
            {
                "APIMR_SUBSCRIPTION_IDS": SUB,
                "APIMR_STORAGE_BLOB_ENDPOINT": f"https://acct.blob.core.windows.net/?sp=r&sig={CANARY}",
                "APIMR_STORAGE_QUEUE_ENDPOINT": "https://acct.queue.core.windows.net",
                "APIMR_STORAGE_TABLE_ENDPOINT": "https://acct.table.core.windows.net",
            },
            "APIMR_STORAGE_BLOB_ENDPOINT",
        ),
        # Pasted into a setting that is not a URL at all.
        (base(APIMR_SUBSCRIPTION_IDS=f"https://x.example/?code={CANARY}"), "APIMR_SUBSCRIPTION_IDS"),
        (base(APIMR_SUBSCRIPTION_IDS=f"sv=2022-11-02&sig={CANARY}"), "APIMR_SUBSCRIPTION_IDS"),
        (base(APIMR_CA_BUNDLE=f"https://user:{CANARY}@ca.example/bundle.pem"), "APIMR_CA_BUNDLE"),
    ],
)
def test_no_problem_echoes_a_urls_user_info_or_query(env: dict[str, str], setting: str) -> None:
    found = problems(env)
    assert any(p.startswith(f"{setting}:") for p in found), found
    assert all(CANARY not in p for p in found), found


def test_a_redacted_url_still_shows_where_it_points() -> None:
    [problem] = problems(base(APIMR_KEY_VAULT_URL=f"http://admin:{CANARY}@kv.example.net/x?sig={CANARY}"))
    assert problem == "APIMR_KEY_VAULT_URL: must be an https:// URL, got 'http://***@kv.example.net/x?***'"


def test_sweep_schedule_and_work_queue_defaults() -> None:
    s = load_settings(base())
    assert (s.sweep_schedule, s.work_queue, s.poison_queue) == ("0 0 */6 * * *", "apimr-work", "apimr-work-poison")


@pytest.mark.parametrize("schedule", ["0 */5 * * * *", "0 30 9 * * Mon-Fri", "0 0 0,12 1-15/2 * *", " 0  0 */6 * * * "])
def test_sweep_schedule_accepts_six_field_ncrontab(schedule: str) -> None:
    assert load_settings(base(APIMR_SWEEP_SCHEDULE=schedule)).sweep_schedule == " ".join(schedule.split())


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        ("0 */6 * * *", "six-field NCRONTAB"),  # five-field cron: the host would read minutes as seconds
        ("0 0 */6 * * * *", "six-field NCRONTAB"),
        ("0 0 */6 * * ?", "six-field NCRONTAB"),
        ("00:05:00", "six-field NCRONTAB"),  # a TimeSpan schedule: not allowed on Consumption
        ("* 0 */6 * * *", "fires every second"),
    ],
)
def test_sweep_schedule_refuses_other_shapes(schedule: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(base(APIMR_SWEEP_SCHEDULE=schedule))
    assert f"APIMR_SWEEP_SCHEDULE: {'must be a' if why.startswith('six') else ''}" in str(info.value)
    assert why in str(info.value)


@pytest.mark.parametrize("name", ["Work", "ab", "a--b", "-work", "work-", "work_q", "w" * 57])
def test_work_queue_must_be_a_queue_name_with_room_for_poison(name: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(base(APIMR_WORK_QUEUE=name))
    assert "APIMR_WORK_QUEUE: must be a storage queue name of 3-56" in str(info.value)


def test_work_queue_of_56_characters_is_accepted() -> None:
    name = "w" * 56
    s = load_settings(base(APIMR_WORK_QUEUE=name))
    assert len(s.poison_queue) == 63


def test_api_settings_come_together_or_not_at_all() -> None:
    assert load_settings(base()).api is None  # no API configured: it refuses every request
    tenant = "7A1B2C3D-0000-4000-8000-00000000A001"
    api = load_settings(base(APIMR_API_AUDIENCE="api://apim-remediator", APIMR_API_TENANT_ID=tenant)).api
    assert api is not None
    assert (api.audience, api.tenant_id) == ("api://apim-remediator", tenant.lower())
    assert problems(base(APIMR_API_AUDIENCE="api://x")) == [
        "APIMR_API_TENANT_ID: is required when APIMR_API_AUDIENCE or APIMR_API_TENANT_ID is set (the HTTP API)"
    ]
    assert problems(base(APIMR_API_AUDIENCE="api://x", APIMR_API_TENANT_ID="contoso")) == [
        "APIMR_API_TENANT_ID: must be a tenant id (GUID), got 'contoso'"
    ]
    [problem] = problems(base(APIMR_API_AUDIENCE="api://a,api://b", APIMR_API_TENANT_ID=tenant))
    assert problem.startswith("APIMR_API_AUDIENCE: must be one audience")


# -- backups ----------------------------------------------------------------------------------


def test_backups_are_off_unless_an_account_is_named() -> None:
    s = load_settings(base())
    assert s.backup is None
    assert s.backup_schedule == "0 */15 * * * *"
    assert problems(base(APIMR_BACKUP_CONTAINER="x-backups")) == [
        "APIMR_BACKUP_CONTAINER: is only read with APIMR_BACKUP_STORAGE_ACCOUNT (backups are not configured)"
    ]


def test_backup_settings_default_to_the_instance_identity() -> None:
    from shared.settings import BackupAccess

    s = load_settings(base(APIMR_BACKUP_STORAGE_ACCOUNT="apimbackups"))
    assert s.backup is not None
    assert s.backup.blob_url == "https://apimbackups.blob.core.windows.net"
    assert s.backup.container == "apim-backups"
    assert s.backup.access is BackupAccess.MANAGED_IDENTITY
    assert s.backup.access_key_secret is None


def test_backup_settings_name_every_problem() -> None:
    found = problems(
        base(
            APIMR_BACKUP_STORAGE_ACCOUNT="apimbackups",
            APIMR_BACKUP_CONTAINER="No_Such--name",
            APIMR_BACKUP_ACCESS="AccessKey",
            APIMR_RESTORE_TEST_SCHEDULE="every sunday",
        )
    )
    assert any(p.startswith("APIMR_BACKUP_CONTAINER: must be a blob container name") for p in found)
    assert "APIMR_BACKUP_ACCESS_KEY_SECRET: is required (an https:// URL)" in found
    assert any(p.startswith("APIMR_RESTORE_TEST_SCHEDULE: must be a six-field NCRONTAB") for p in found)
    user = problems(base(APIMR_BACKUP_STORAGE_ACCOUNT="apimbackups", APIMR_BACKUP_ACCESS="UserAssignedManagedIdentity"))
    assert user == ["APIMR_BACKUP_IDENTITY_CLIENT_ID: is required with APIMR_BACKUP_ACCESS=UserAssignedManagedIdentity"]


def test_an_access_key_is_a_key_vault_reference_never_a_value() -> None:
    found = problems(
        base(
            APIMR_BACKUP_STORAGE_ACCOUNT="apimbackups",
            APIMR_BACKUP_ACCESS="AccessKey",
            APIMR_BACKUP_ACCESS_KEY_SECRET="https://kv.vault.azure.net/keys/x",
        )
    )
    assert found == [
        "APIMR_BACKUP_ACCESS_KEY_SECRET: must be a Key Vault secret URL (https://<vault>/secrets/<name>), "
        "got 'https://kv.vault.azure.net/keys/x'"
    ]
