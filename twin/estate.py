"""Estate files: the world a test or the demo starts from (YAML).

Top level: `tenant_id`, `principals` (service principals that can get tokens),
`storage_accounts` (Azurite accounts), `subscriptions` with `resource_groups`, and inside
a resource group one section per service (`apim`, `key_vaults`, `workspaces`, ...),
seeded by the module that serves it. An unknown key is an error naming where it is.
Azure RBAC (`twin/rbac.py`): `rbac` (on, the default, or off), `custom_roles` and
`role_assignments`; with RBAC on and no assignment every call is refused, as in Azure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from twin.state import TwinState
from twin.tokens import Principal

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


class EstateError(ValueError):
    """The estate file is wrong; the message names where and what."""


@dataclass(frozen=True)
class SeedContext:
    subscription_id: str
    resource_group: str
    location: str

    @property
    def group_id(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"


Seeder = Callable[[TwinState, SeedContext, list[dict[str, Any]]], None]


# Section name -> seeder. Each provider module registers its own at import (`register_seeder`),
# so this module never imports a provider: the providers import it (EstateError, SeedContext).
_SEEDERS: dict[str, Seeder] = {}


def register_seeder(section: str, seeder: Seeder) -> None:
    """Make `section` (a key inside a resource group) seeded by `seeder`; one provider per section."""
    known = _SEEDERS.get(section)
    if known is not None and (known.__module__, known.__qualname__) != (seeder.__module__, seeder.__qualname__):
        raise ValueError(f"estate section '{section}' is already seeded by {known.__module__}.{known.__qualname__}")
    _SEEDERS[section] = seeder


def registered_sections() -> tuple[str, ...]:
    return tuple(sorted(_SEEDERS))


# Run after every section of an estate (or fragment) is seeded, for what depends on other
# sections whatever their order (e.g. APIM reading the Key Vault secrets its named values name).
_FINISHERS: dict[str, Callable[[TwinState], None]] = {}


def register_finisher(name: str, finisher: Callable[[TwinState], None]) -> None:
    _FINISHERS[name] = finisher


@dataclass(frozen=True)
class EstateHook:
    """Top-level estate keys a module owns (e.g. `twin/rbac.py`: `rbac`, `custom_roles`,
    `role_assignments`), applied after every resource group is seeded. `apply` gets the
    whole estate mapping, its name for messages, and whether it is the estate file itself
    rather than a fragment merged later."""

    keys: tuple[str, ...]
    apply: Callable[[TwinState, dict[str, Any], str, bool], None]


_ESTATE_HOOKS: dict[str, EstateHook] = {}


def register_estate_hook(name: str, hook: EstateHook) -> None:
    _ESTATE_HOOKS[name] = hook


def load_estate_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise EstateError(f"{path}: cannot read the estate: {error}") from error
    if not isinstance(data, dict):
        raise EstateError(f"{path}: the estate must be a mapping at the top level")
    return data


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise EstateError(f"{where}: expected a {kind.__name__}, got {type(value).__name__}")
    return value


def apply_estate(state: TwinState, data: dict[str, Any], *, source: str = "estate", top_level: bool = False) -> None:
    """Seed (or merge into) `state` from an estate mapping.

    `top_level`: the estate file itself (not a fragment merged later): RBAC is on unless it
    says `rbac: off`."""
    known = {"tenant_id", "principals", "storage_accounts", "subscriptions", "description"}
    known.update(key for hook in _ESTATE_HOOKS.values() for key in hook.keys)
    for key in data:
        if key not in known:
            raise EstateError(f"{source}: unknown key '{key}' (allowed: {', '.join(sorted(known))})")
    if "tenant_id" in data and data["tenant_id"] != state.tenant_id:
        raise EstateError(f"{source}.tenant_id: the twin runs tenant {state.tenant_id}; an estate cannot change it")
    for i, item in enumerate(_expect(data.get("principals", []), list, f"{source}.principals")):
        where = f"{source}.principals[{i}]"
        _expect(item, dict, where)
        for field in ("client_id", "client_secret", "object_id"):
            if not isinstance(item.get(field), str):
                raise EstateError(f"{where}.{field}: required (a string)")
        principal = Principal(
            client_id=item["client_id"],
            object_id=item["object_id"],
            display_name=str(item.get("name", item["client_id"])),
            roles=tuple(item.get("roles", [])),
        )
        state.principals[item["client_id"]] = (item["client_secret"], principal)
    accounts = state.extra.setdefault("storage_accounts", [])
    for i, item in enumerate(_expect(data.get("storage_accounts", []), list, f"{source}.storage_accounts")):
        name = _expect(item, dict, f"{source}.storage_accounts[{i}]").get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]{3,24}", name):
            raise EstateError(f"{source}.storage_accounts[{i}].name: 3-24 lowercase letters and digits")
        if name not in accounts:
            accounts.append(name)
        # The account's ARM id, for Azure RBAC on its data (an APIM identity writing backups).
        account_id = item.get("id")
        if account_id is not None:
            if not isinstance(account_id, str) or not re.fullmatch(
                r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Storage/storageAccounts/" + name,
                account_id,
                re.IGNORECASE,
            ):
                raise EstateError(
                    f"{source}.storage_accounts[{i}].id: the account's resource id "
                    f"(/subscriptions/.../resourceGroups/.../providers/Microsoft.Storage/storageAccounts/{name})"
                )
            state.extra.setdefault("storage_ids", {})[name] = account_id
    seeders = _SEEDERS
    for i, sub in enumerate(_expect(data.get("subscriptions", []), list, f"{source}.subscriptions")):
        where = f"{source}.subscriptions[{i}]"
        _expect(sub, dict, where)
        sub_id = sub.get("id")
        if not isinstance(sub_id, str) or not _GUID.match(sub_id):
            raise EstateError(f"{where}.id: a subscription id (GUID) is required")
        record = state.subscriptions.setdefault(
            sub_id.lower(),
            {"subscriptionId": sub_id, "displayName": sub.get("display_name", sub_id), "resourceGroups": {}},
        )
        for j, group in enumerate(_expect(sub.get("resource_groups", []), list, f"{where}.resource_groups")):
            gwhere = f"{where}.resource_groups[{j}]"
            _expect(group, dict, gwhere)
            name = group.get("name")
            if not isinstance(name, str) or not name:
                raise EstateError(f"{gwhere}.name: required")
            location = str(group.get("location", "westeurope"))
            record["resourceGroups"].setdefault(
                name.lower(), {"name": name, "location": location, "tags": dict(group.get("tags", {}))}
            )
            ctx = SeedContext(subscription_id=sub_id, resource_group=name, location=location)
            for key, items in group.items():
                if key in ("name", "location", "tags"):
                    continue
                seeder = seeders.get(key)
                if seeder is None:
                    raise EstateError(f"{gwhere}: unknown section '{key}' (allowed: {', '.join(sorted(seeders))})")
                try:
                    seeder(state, ctx, _expect(items, list, f"{gwhere}.{key}"))
                except EstateError as error:
                    raise EstateError(f"{gwhere}.{key}: {error}") from error
    # Whole-estate sections (RBAC: assignments name principals, custom roles and the scopes
    # seeded above), then what depends on every section (finishers).
    for hook in _ESTATE_HOOKS.values():
        hook.apply(state, data, source, top_level)
    for finish in _FINISHERS.values():
        finish(state)
