"""Azure RBAC in the twin: role definitions, role assignments, and the check every request passes.

Sources (facts copied, not code):
- Role definitions: "Azure built-in roles" (learn.microsoft.com/azure/role-based-access-control/
  built-in-roles; MicrosoftDocs/azure-docs articles/role-based-access-control/built-in-roles/
  {general,privileged,integration,security,monitor,storage}.md): ids, actions, notActions,
  dataActions, notDataActions as published.
- Evaluation: "Understand Azure role definitions" (role-definitions.md): `*` is a wildcard
  over any characters (`Microsoft.ApiManagement/service/*/read` matches every read under a
  service, not `Microsoft.ApiManagement/service/read`), operations compare case-insensitively,
  NotActions are subtracted from the Actions of the same permission block, and management
  wildcards never grant data actions. An assignment at a scope applies to every child scope
  ("Understand scope for Azure RBAC").
- ARM's refusal: 403 `AuthorizationFailed`, "The client '{c}' with object id '{oid}' does not
  have authorization to perform action '{action}' over scope '{scope}' or the scope is
  invalid. If access was recently granted, please refresh your credentials." (as ARM answers,
  quoted in many public reports, e.g. Azure/Enterprise-Scale docs). A service principal's
  client is shown as its object id.
- A linked check (diagnostic settings to a workspace): 403 `LinkedAuthorizationFailed`, "The
  client '{c}' with object id '{oid}' has permission to perform action '{action}' on scope
  '{scope}'; however, it does not have permission to perform action '{linked}' on the linked
  scope(s) '{linked scope}' or the linked scope(s) are invalid." (as ARM answers, e.g.
  CDCgov/prime-reportstream#7678, JimGBritt/AzurePolicy#17).
- Key Vault under RBAC authorization: 403 `{"error": {"code": "Forbidden", "message": "Caller is
  not authorized to perform action on resource.\\r\\n...Action: '...'\\r\\nResource: '...'...",
  "innererror": {"code": "ForbiddenByRbac"}}}` (as Key Vault answers, e.g. Azure/Commercial-
  Marketplace-SaaS-Accelerator#710, piyushsachdeva/Terraform_AKS#2), data actions from "Azure
  permissions for Security" (Microsoft.KeyVault/vaults/secrets/...).

Estate keys (top level): `rbac: on|off` (default on: strict), `custom_roles`, `role_assignments`.
An assignment's `principal` is an estate principal's name, an object id, or
`{managed_identity_of: <APIM service name or id | user-assigned identity id>}`: the managed
identity APIM reads Key Vault references with, resolved to its principal id when applied
(`managed_identity_object_id`).
State lives in `state.extra["rbac"]` so `reset()` restores the seeded assignments.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twin.estate import EstateError, EstateHook, register_estate_hook
from twin.state import TwinState

REPO_ROOT = Path(__file__).resolve().parents[1]
ARM_NAMESPACE_ROLE = "/providers/Microsoft.Authorization/roleDefinitions/"


class RbacError(ValueError):
    """An estate's RBAC section (or a Bicep file it names) is wrong; the message says where."""


@dataclass(frozen=True)
class Permission:
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    data_actions: tuple[str, ...] = ()
    not_data_actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoleDefinition:
    id: str  # the role definition name (a GUID)
    name: str  # roleName
    permissions: tuple[Permission, ...]
    role_type: str = "BuiltInRole"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": ARM_NAMESPACE_ROLE + self.id,
            "name": self.id,
            "type": "Microsoft.Authorization/roleDefinitions",
            "properties": {
                "roleName": self.name,
                "type": self.role_type,
                "permissions": [
                    {
                        "actions": list(p.actions),
                        "notActions": list(p.not_actions),
                        "dataActions": list(p.data_actions),
                        "notDataActions": list(p.not_data_actions),
                    }
                    for p in self.permissions
                ],
            },
        }


def _builtin(role_id: str, name: str, **permission: tuple[str, ...]) -> RoleDefinition:
    return RoleDefinition(id=role_id, name=name, permissions=(Permission(**permission),))


# Copied from "Azure built-in roles" (MicrosoftDocs/azure-docs, built-in-roles/*.md, 2025-2026).
_COMMON = (
    "Microsoft.Authorization/*/read",
    "Microsoft.Insights/alertRules/*",
    "Microsoft.Resources/deployments/*",
    "Microsoft.Resources/subscriptions/resourceGroups/read",
    "Microsoft.Support/*",
)
BUILTIN_ROLES: tuple[RoleDefinition, ...] = (
    # general.md
    _builtin("acdd72a7-3385-48ef-bd42-f606fba81ae7", "Reader", actions=("*/read",)),
    # privileged.md
    _builtin(
        "b24988ac-6180-42a0-ab88-20f7382dd24c",
        "Contributor",
        actions=("*",),
        not_actions=(
            "Microsoft.Authorization/*/Delete",
            "Microsoft.Authorization/*/Write",
            "Microsoft.Authorization/elevateAccess/Action",
            "Microsoft.Blueprint/blueprintAssignments/write",
            "Microsoft.Blueprint/blueprintAssignments/delete",
            "Microsoft.Compute/galleries/share/action",
            "Microsoft.Purview/consents/write",
            "Microsoft.Purview/consents/delete",
        ),
    ),
    # integration.md
    _builtin(
        "312a565d-c81f-4fd8-895a-4e21e48d571c",
        "API Management Service Contributor",
        actions=(
            "Microsoft.ApiManagement/service/*",
            "Microsoft.Authorization/*/read",
            "Microsoft.Insights/alertRules/*",
            "Microsoft.ResourceHealth/availabilityStatuses/read",
            "Microsoft.Resources/deployments/*",
            "Microsoft.Resources/subscriptions/resourceGroups/read",
            "Microsoft.Support/*",
        ),
    ),
    _builtin(
        "71522526-b88f-4d52-b57f-d31fc3546d0d",
        "API Management Service Reader Role",
        actions=(
            "Microsoft.ApiManagement/service/*/read",
            "Microsoft.ApiManagement/service/read",
            "Microsoft.Authorization/*/read",
            "Microsoft.Insights/alertRules/*",
            "Microsoft.ResourceHealth/availabilityStatuses/read",
            "Microsoft.Resources/deployments/*",
            "Microsoft.Resources/subscriptions/resourceGroups/read",
            "Microsoft.Support/*",
        ),
        not_actions=("Microsoft.ApiManagement/service/users/keys/read",),
    ),
    # security.md
    _builtin(
        "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
        "Key Vault Secrets Officer",
        actions=(
            *_COMMON,
            "Microsoft.KeyVault/checkNameAvailability/read",
            "Microsoft.KeyVault/deletedVaults/read",
            "Microsoft.KeyVault/locations/*/read",
            "Microsoft.KeyVault/vaults/*/read",
            "Microsoft.KeyVault/operations/read",
        ),
        data_actions=("Microsoft.KeyVault/vaults/secrets/*",),
    ),
    _builtin(
        "4633458b-17de-408a-b874-0445c86b69e6",
        "Key Vault Secrets User",
        data_actions=(
            "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
        ),
    ),
    _builtin(
        "3e150937-b8fe-4cfb-8069-0eaf05ecd056",
        "Microsoft Sentinel Responder",
        actions=(
            "Microsoft.SecurityInsights/*/read",
            "Microsoft.SecurityInsights/dataConnectorsCheckRequirements/action",
            "Microsoft.SecurityInsights/automationRules/*",
            "Microsoft.SecurityInsights/cases/*",
            "Microsoft.SecurityInsights/incidents/*",
            "Microsoft.SecurityInsights/entities/runPlaybook/action",
            "Microsoft.SecurityInsights/threatIntelligence/indicators/appendTags/action",
            "Microsoft.SecurityInsights/threatIntelligence/indicators/query/action",
            "Microsoft.SecurityInsights/threatIntelligence/bulkTag/action",
            "Microsoft.SecurityInsights/threatIntelligence/indicators/replaceTags/action",
            "Microsoft.SecurityInsights/threatIntelligence/queryIndicators/action",
            "Microsoft.SecurityInsights/businessApplicationAgents/systems/undoAction/action",
            "Microsoft.OperationalInsights/workspaces/analytics/query/action",
            "Microsoft.OperationalInsights/workspaces/*/read",
            "Microsoft.OperationalInsights/workspaces/dataSources/read",
            "Microsoft.OperationalInsights/workspaces/savedSearches/read",
            "Microsoft.OperationsManagement/solutions/read",
            "Microsoft.OperationalInsights/workspaces/query/read",
            "Microsoft.OperationalInsights/workspaces/query/*/read",
            "Microsoft.OperationalInsights/querypacks/*/read",
            "Microsoft.Insights/workbooks/read",
            "Microsoft.Insights/myworkbooks/read",
            *_COMMON,
        ),
        not_actions=(
            "Microsoft.SecurityInsights/cases/*/Delete",
            "Microsoft.SecurityInsights/incidents/*/Delete",
            "Microsoft.SecurityInsights/ConfidentialWatchlists/*",
            "Microsoft.OperationalInsights/workspaces/query/ConfidentialWatchlist/*",
        ),
    ),
    # monitor.md
    _builtin(
        "73c42c96-874c-492b-b04d-ab87d138a893",
        "Log Analytics Reader",
        actions=(
            "*/read",
            "Microsoft.OperationalInsights/workspaces/analytics/query/action",
            "Microsoft.OperationalInsights/workspaces/search/action",
            "Microsoft.Support/*",
        ),
        not_actions=("Microsoft.OperationalInsights/workspaces/sharedKeys/read",),
    ),
    # storage.md
    _builtin(
        "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
        "Storage Blob Data Contributor",
        actions=(
            "Microsoft.Storage/storageAccounts/blobServices/containers/delete",
            "Microsoft.Storage/storageAccounts/blobServices/containers/read",
            "Microsoft.Storage/storageAccounts/blobServices/containers/write",
            "Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action",
        ),
        data_actions=(
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action",
        ),
    ),
)


# -- matching ----------------------------------------------------------------------------------


def _pattern(operation: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in operation.split("*")) + "$", re.IGNORECASE)


@functools.lru_cache(maxsize=8192)
def action_matches(granted: str, action: str) -> bool:
    """Whether a role's operation string (wildcards allowed) covers `action`, as ARM compares them.
    Remembered: every request asks about the same few actions and roles."""
    return _pattern(granted).match(action) is not None


def permits(role: RoleDefinition, action: str, *, data: bool = False) -> bool:
    """Whether one role grants `action`: some permission block lists it and does not subtract it."""
    for block in role.permissions:
        allowed, denied = (block.data_actions, block.not_data_actions) if data else (block.actions, block.not_actions)
        if any(action_matches(a, action) for a in allowed) and not any(action_matches(n, action) for n in denied):
            return True
    return False


def scope_covers(assignment_scope: str, scope: str) -> bool:
    """An assignment at a scope applies to it and to every scope under it."""
    parent = assignment_scope.rstrip("/").lower()
    child = scope.rstrip("/").lower()
    return parent == "" or child == parent or child.startswith(parent + "/")


# -- state -------------------------------------------------------------------------------------


def _rbac(state: TwinState) -> dict[str, Any]:
    found: dict[str, Any] = state.extra.setdefault("rbac", {"enabled": True, "roles": {}, "assignments": []})
    return found


def enabled(state: TwinState) -> bool:
    return bool(_rbac(state).get("enabled", True))


def roles(state: TwinState) -> list[RoleDefinition]:
    custom = [_role_from_json(r) for r in _rbac(state)["roles"].values()]
    return [*BUILTIN_ROLES, *custom]


def _role_to_json(role: RoleDefinition) -> dict[str, Any]:
    return {
        "id": role.id,
        "name": role.name,
        "permissions": [
            {
                "actions": list(p.actions),
                "not_actions": list(p.not_actions),
                "data_actions": list(p.data_actions),
                "not_data_actions": list(p.not_data_actions),
            }
            for p in role.permissions
        ],
    }


def _role_from_json(raw: dict[str, Any]) -> RoleDefinition:
    return RoleDefinition(
        id=raw["id"],
        name=raw["name"],
        role_type="CustomRole",
        permissions=tuple(
            Permission(
                actions=tuple(p["actions"]),
                not_actions=tuple(p["not_actions"]),
                data_actions=tuple(p["data_actions"]),
                not_data_actions=tuple(p["not_data_actions"]),
            )
            for p in raw["permissions"]
        ),
    )


def find_role(state: TwinState, name_or_id: str) -> RoleDefinition | None:
    wanted = name_or_id.rsplit("/", 1)[-1].lower()
    for role in roles(state):
        if role.id.lower() == wanted or role.name.lower() == name_or_id.lower():
            return role
    return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    role: RoleDefinition | None = None
    scope: str | None = None  # the assignment's scope that granted it


def decide(state: TwinState, object_id: str | None, action: str, scope: str, *, data: bool = False) -> Decision:
    """Whether the principal `object_id` may perform `action` at `scope` (always yes with `rbac: off`)."""
    if not enabled(state):
        return Decision(True)
    if not object_id:
        return Decision(False)
    index = _index(state)
    mine = index.by_principal.get(object_id.lower(), {})
    # The assignments at the scope and above it, in the order they were made.
    candidates = sorted(entry for at in _ancestors(scope) for entry in mine.get(at, ()))
    for _, assignment in candidates:
        role = index.roles.get(assignment["role_id"].lower())
        if role is not None and permits(role, action, data=data):
            return Decision(True, role, assignment["scope"])
    return Decision(False)


@dataclass(frozen=True)
class _Index:
    """Assignments by principal and scope (lowercased), with their position; roles by id."""

    fingerprint: tuple[int, int, int, int]
    by_principal: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]]
    roles: dict[str, RoleDefinition]


def _index(state: TwinState) -> _Index:
    """Every request is authorized: look assignments up by scope instead of walking them all
    (a large estate has one or more per subscription). Rebuilt when they change: assignments
    are only ever appended (`apply_estate`), which also drops the index, and reset() empties
    `state.memo`."""
    rbac = _rbac(state)
    fingerprint = (id(rbac["assignments"]), len(rbac["assignments"]), id(rbac["roles"]), len(rbac["roles"]))
    found = state.memo.get("rbac")
    if isinstance(found, _Index) and found.fingerprint == fingerprint:
        return found
    by_principal: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for position, assignment in enumerate(rbac["assignments"]):
        scopes = by_principal.setdefault(str(assignment["principal_id"]).lower(), {})
        scopes.setdefault(str(assignment["scope"]).rstrip("/").lower(), []).append((position, assignment))
    built = _Index(fingerprint, by_principal, {r.id.lower(): r for r in roles(state)})
    state.memo["rbac"] = built
    return built


def _ancestors(scope: str) -> list[str]:
    """The scope and every scope above it, as `scope_covers` compares them ("" is the root)."""
    child = scope.rstrip("/").lower()
    return [child[:i] for i, char in enumerate(child) if char == "/"] + [child]


def allowed(state: TwinState, object_id: str | None, action: str, scope: str, *, data: bool = False) -> bool:
    return decide(state, object_id, action, scope, data=data).allowed


def has_any_assignment_under(state: TwinState, object_id: str | None, scope: str) -> bool:
    """Whether the principal holds any role at, above or below `scope` (what ARM's subscription list shows)."""
    if not enabled(state):
        return True
    if not object_id:
        return False
    mine = _index(state).by_principal.get(str(object_id).lower(), {})
    if any(at in mine for at in _ancestors(scope)):
        return True
    return any(scope_covers(scope, at) for at in mine)


# -- deriving the ARM operation of a request ---------------------------------------------------

_GUIDISH = re.compile(r"^[0-9a-f-]{36}$", re.IGNORECASE)


@dataclass(frozen=True)
class Operation:
    action: str
    scope: str  # the resource (or collection) the action is checked on


def arm_operation(method: str, path: str) -> Operation | None:
    """The ARM operation a request performs, derived from its path and method alone.

    `{scope}/providers/{Namespace}/{type}/{name}/{childType}/{childName}...` names a resource
    of type `{Namespace}/{type}/{childType}`: GET/HEAD -> `/read`, PUT/PATCH -> `/write`,
    DELETE -> `/delete`. A path ending in a type (a collection) is a list: `/read`. POST to
    `{resource}/{action}` is `{type}/{action}/action`, checked on the resource. An extension
    resource (`.../providers/Microsoft.Insights/diagnosticSettings/x` under another resource)
    takes its type from the last provider. Without a provider, `/subscriptions[/{id}]` is
    `Microsoft.Resources/subscriptions` and `/resourceGroups[/{name}]` under it
    `Microsoft.Resources/subscriptions/resourceGroups`. None: not an ARM resource path.
    """
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0].lower() != "subscriptions":
        return None
    lowered = [p.lower() for p in parts]
    if "providers" in lowered:
        start = len(lowered) - 1 - lowered[::-1].index("providers")
        namespace = parts[start + 1] if start + 1 < len(parts) else None
        rest = parts[start + 2 :]
        if namespace is None or not rest:
            return None
        types = [namespace, *rest[0::2]]
        is_collection = len(rest) % 2 == 1
    else:
        rest = parts
        types = ["Microsoft.Resources", *rest[0::2]]
        is_collection = len(rest) % 2 == 1
    base = "/" + "/".join(parts)
    method = method.upper()
    if method == "POST" and is_collection and len(types) > 2:
        # `{resource}/{action}`: the last "type" is the action's name.
        return Operation("/".join(types[:-1]) + f"/{types[-1]}/action", base.rsplit("/", 1)[0])
    verb = {"GET": "read", "HEAD": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method)
    if verb is None:
        return Operation("/".join(types) + "/action", base)
    return Operation("/".join(types) + f"/{verb}", base)


# -- refusals in the services' words -------------------------------------------------------------


def _client(claims: dict[str, Any]) -> tuple[str, str]:
    object_id = str(claims.get("oid") or "")
    # ARM names a service principal by its object id in both places (see the module docstring).
    return object_id, object_id


def authorization_failed(claims: dict[str, Any], action: str, scope: str) -> tuple[int, str, str]:
    client, object_id = _client(claims)
    return (
        403,
        "AuthorizationFailed",
        f"The client '{client}' with object id '{object_id}' does not have authorization to perform action "
        f"'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please "
        "refresh your credentials.",
    )


def linked_authorization_failed(
    claims: dict[str, Any], action: str, scope: str, linked_action: str, linked_scopes: Iterable[str]
) -> tuple[int, str, str]:
    client, object_id = _client(claims)
    return (
        403,
        "LinkedAuthorizationFailed",
        f"The client '{client}' with object id '{object_id}' has permission to perform action '{action}' on "
        f"scope '{scope}'; however, it does not have permission to perform action '{linked_action}' on the "
        f"linked scope(s) '{','.join(linked_scopes)}' or the linked scope(s) are invalid.",
    )


def key_vault_forbidden(
    claims: dict[str, Any], issuer: str, action: str, resource: str, vault: str, location: str
) -> dict[str, Any]:
    """Key Vault's 403 body under RBAC authorization (the resource id lowercased, as it prints it)."""
    caller = f"appid={claims.get('appid') or claims.get('azp') or ''};oid={claims.get('oid') or ''};iss={issuer}"
    message = (
        "Caller is not authorized to perform action on resource.\r\n"
        "If role assignments, deny assignments or role definitions were changed recently, please observe "
        "propagation time.\r\n"
        f"Caller: {caller}\r\n"
        f"Action: '{action}'\r\n"
        f"Resource: '{resource.lower()}'\r\n"
        "Assignment: (not found)\r\n"
        "DenyAssignmentId: null\r\n"
        "DecisionReason: 'DeniedWithNoValidRBAC' \r\n"
        f"Vault: {vault};location={location}\r\n"
    )
    return {"error": {"code": "Forbidden", "message": message, "innererror": {"code": "ForbiddenByRbac"}}}


# -- the product's custom role from its Bicep file -----------------------------------------------

_ARRAY_START = re.compile(r"^var (readActions|writeActions) = \[$")
_QUOTED = re.compile(r"^'([A-Za-z0-9.*/]+)'$")
_REQUIRED_LINES = (
    "actions: allowRemediation ? concat(readActions, writeActions) : readActions",
    "notActions: []",
    "dataActions: []",
    "notDataActions: []",
)


def bicep_actions(path: Path) -> dict[str, tuple[str, ...]]:
    """The `readActions` and `writeActions` arrays of infra/subscription-role.bicep.

    A deliberately small reader: each array is `var NAME = [`, then lines that are blank, a
    `//` comment or one single-quoted operation string, then `]`. Anything else in them, a
    missing or repeated array, or a role body other than the one this reader understands
    (`actions: allowRemediation ? concat(readActions, writeActions) : readActions` with empty
    notActions/dataActions/notDataActions) is refused with the file, line and reason.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise RbacError(f"{path}: cannot read the Bicep file: {error}") from error
    arrays: dict[str, list[str]] = {}
    current: str | None = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if current is None:
            match = _ARRAY_START.match(line)
            if match:
                current = match.group(1)
                if current in arrays:
                    raise RbacError(f"{path}:{number}: '{current}' is declared twice")
                arrays[current] = []
            elif re.match(r"^var (readActions|writeActions)\b", line):
                raise RbacError(f"{path}:{number}: expected 'var NAME = [' on its own line, got {line!r}")
            continue
        if line == "]":
            current = None
            continue
        if not line or line.startswith("//"):
            continue
        quoted = _QUOTED.match(line)
        if quoted is None:
            raise RbacError(
                f"{path}:{number}: inside '{current}' the twin understands only one quoted operation per line "
                f"(letters, digits, '.', '/', '*'), a blank line or a // comment; got {line!r}"
            )
        arrays[current].append(quoted.group(1))
    if current is not None:
        raise RbacError(f"{path}: the array '{current}' is never closed with ']'")
    missing = [name for name in ("readActions", "writeActions") if name not in arrays]
    if missing:
        raise RbacError(f"{path}: no {' or '.join(missing)} array (expected 'var NAME = [' ... ']')")
    stripped = {raw.strip() for raw in lines}
    for required in _REQUIRED_LINES:
        if required not in stripped:
            raise RbacError(
                f"{path}: the role's permissions are not the form the twin understands; missing the line {required!r}"
            )
    return {name: tuple(values) for name, values in arrays.items()}


def role_from_bicep(name: str, path: Path, *, allow_remediation: bool) -> RoleDefinition:
    arrays = bicep_actions(path)
    actions = arrays["readActions"] + (arrays["writeActions"] if allow_remediation else ())
    return RoleDefinition(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"twin-role:{name}")),
        name=name,
        role_type="CustomRole",
        permissions=(Permission(actions=actions),),
    )


# -- estate -----------------------------------------------------------------------------------

_SCOPE = re.compile(r"^/(subscriptions/[0-9a-fA-F-]{36}(/resourceGroups/[^/]+(/providers/.+)?)?)?$", re.IGNORECASE)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RbacError(f"{where}: expected a list of operation strings")
    return tuple(value)


def _custom_role(item: Any, where: str) -> RoleDefinition:
    if not isinstance(item, dict):
        raise RbacError(f"{where}: expected a mapping")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise RbacError(f"{where}.name: required")
    if "from_bicep" in item:
        unknown = set(item) - {"name", "from_bicep", "allow_remediation"}
        if unknown:
            raise RbacError(
                f"{where}: unknown keys {sorted(unknown)} (allowed with from_bicep: allow_remediation, name)"
            )
        remediation = item.get("allow_remediation", False)
        if not isinstance(remediation, bool):
            raise RbacError(f"{where}.allow_remediation: true or false")
        path = Path(str(item["from_bicep"]))
        if not path.is_absolute():
            path = REPO_ROOT / path
        return role_from_bicep(name, path, allow_remediation=remediation)
    unknown = set(item) - {"name", "id", "actions", "not_actions", "data_actions", "not_data_actions"}
    if unknown:
        raise RbacError(
            f"{where}: unknown keys {sorted(unknown)} "
            "(allowed: name, id, actions, not_actions, data_actions, not_data_actions; or from_bicep)"
        )
    role_id = str(item.get("id") or uuid.uuid5(uuid.NAMESPACE_URL, f"twin-role:{name}"))
    if not _GUIDISH.match(role_id):
        raise RbacError(f"{where}.id: a role definition id is a GUID, got {role_id!r}")
    return RoleDefinition(
        id=role_id,
        name=name,
        role_type="CustomRole",
        permissions=(
            Permission(
                actions=_strings(item.get("actions"), f"{where}.actions"),
                not_actions=_strings(item.get("not_actions"), f"{where}.not_actions"),
                data_actions=_strings(item.get("data_actions"), f"{where}.data_actions"),
                not_data_actions=_strings(item.get("not_data_actions"), f"{where}.not_data_actions"),
            ),
        ),
    )


def apply_estate(state: TwinState, data: dict[str, Any], *, source: str, top_level: bool) -> None:
    """Seed `rbac`, `custom_roles` and `role_assignments` (a fragment adds to what is there).

    `top_level`: the estate file itself, where a missing `rbac` means on (strict)."""
    rbac = _rbac(state)
    if "rbac" in data:
        value = data["rbac"]
        # YAML reads a bare on/off as a boolean.
        if value in (True, "on"):
            rbac["enabled"] = True
        elif value in (False, "off"):
            rbac["enabled"] = False
        else:
            raise RbacError(f"{source}.rbac: 'on' or 'off', got {value!r}")
    elif top_level:
        rbac["enabled"] = True
    custom = data.get("custom_roles", [])
    if not isinstance(custom, list):
        raise RbacError(f"{source}.custom_roles: expected a list")
    for i, item in enumerate(custom):
        role = _custom_role(item, f"{source}.custom_roles[{i}]")
        clash = find_role(state, role.name)
        if clash is not None and clash.id != role.id:
            raise RbacError(f"{source}.custom_roles[{i}].name: a role '{role.name}' already exists ({clash.id})")
        rbac["roles"][role.id] = _role_to_json(role)
    assignments = data.get("role_assignments", [])
    if not isinstance(assignments, list):
        raise RbacError(f"{source}.role_assignments: expected a list")
    for i, item in enumerate(assignments):
        where = f"{source}.role_assignments[{i}]"
        if not isinstance(item, dict):
            raise RbacError(f"{where}: expected a mapping")
        unknown = set(item) - {"principal", "role", "scope"}
        if unknown:
            raise RbacError(f"{where}: unknown keys {sorted(unknown)} (allowed: principal, role, scope)")
        principal = item.get("principal")
        if isinstance(principal, dict):
            object_id = managed_identity_object_id(state, principal, f"{where}.principal")
        elif isinstance(principal, str) and principal:
            found_id = _principal_object_id(state, principal)
            if found_id is None:
                raise RbacError(
                    f"{where}.principal: '{principal}' is neither a principal of the estate nor an object id (GUID)"
                )
            object_id = found_id
        else:
            raise RbacError(
                f"{where}.principal: a principal's name or object id, or {{managed_identity_of: <APIM service "
                "name or id, or a user-assigned identity id>}} is required"
            )
        role_name = item.get("role")
        found_role = find_role(state, role_name) if isinstance(role_name, str) else None
        if found_role is None:
            known = ", ".join(sorted(r.name for r in roles(state)))
            raise RbacError(f"{where}.role: unknown role {role_name!r} (known: {known})")
        scope = item.get("scope")
        if not isinstance(scope, str) or not _SCOPE.match(scope):
            raise RbacError(
                f"{where}.scope: '/', '/subscriptions/{{id}}', '.../resourceGroups/{{name}}' or a resource id, "
                f"got {scope!r}"
            )
        entry = {"principal_id": object_id, "role_id": found_role.id, "scope": scope.rstrip("/") or "/"}
        if entry not in rbac["assignments"]:
            rbac["assignments"].append(entry)
    state.memo.pop("rbac", None)


_APIM_SERVICE = "Microsoft.ApiManagement/service"
_USER_IDENTITY = "/providers/microsoft.managedidentity/userassignedidentities/"


def managed_identity_object_id(state: TwinState, principal: dict[str, Any], where: str) -> str:
    """The object id of a managed identity an estate grants a role to, resolved when it is applied.

    `{managed_identity_of: X}`: X is an APIM service's name (unique in the twin) or resource
    id, meaning its system-assigned identity, or a user-assigned identity's resource id that
    some APIM service carries. The identity must exist by then (seeded earlier in the same
    estate or fragment, or enabled since): its principal id is made when it is enabled, as in
    Azure, where an operator assigns the role to that principal id afterwards."""
    unknown = set(principal) - {"managed_identity_of"}
    if unknown or not isinstance(principal.get("managed_identity_of"), str) or not principal["managed_identity_of"]:
        raise RbacError(
            f"{where}: a mapping principal is {{managed_identity_of: <APIM service name or id, or a "
            f"user-assigned identity id>}}, got {principal!r}"
        )
    target = str(principal["managed_identity_of"]).strip().rstrip("/")
    services = state.store.by_type(_APIM_SERVICE)
    if _USER_IDENTITY in target.lower():
        for service in services:
            assigned = (service.body.get("identity") or {}).get("userAssignedIdentities") or {}
            for ident_id, entry in assigned.items():
                if ident_id.lower() == target.lower() and entry.get("principalId"):
                    return str(entry["principalId"])
        raise RbacError(f"{where}.managed_identity_of: no APIM service carries the user-assigned identity '{target}'")
    if target.startswith("/"):
        matches = [s for s in services if s.id.lower() == target.lower()]
    else:
        matches = [s for s in services if str(s.body.get("name", "")).lower() == target.lower()]
    if not matches:
        raise RbacError(
            f"{where}.managed_identity_of: no APIM service '{target}' (seed it before the assignment that names it)"
        )
    if len(matches) > 1:
        raise RbacError(
            f"{where}.managed_identity_of: '{target}' names {len(matches)} APIM services; give its resource id "
            f"({', '.join(s.id for s in matches)})"
        )
    identity = matches[0].body.get("identity") or {}
    principal_id = identity.get("principalId")
    if "SystemAssigned" not in str(identity.get("type", "")) or not principal_id:
        raise RbacError(
            f"{where}.managed_identity_of: APIM service '{matches[0].id}' has no system-assigned identity "
            "(its principal id exists once the identity is enabled: identity: {type: SystemAssigned})"
        )
    return str(principal_id)


def _principal_object_id(state: TwinState, name_or_id: str) -> str | None:
    for _, principal in state.principals.values():
        if name_or_id.lower() in (principal.display_name.lower(), principal.object_id.lower()):
            return principal.object_id
    return name_or_id if _GUIDISH.match(name_or_id) else None


def assignments_json(state: TwinState) -> list[dict[str, Any]]:
    by_id = {r.id: r for r in roles(state)}
    return [
        {**a, "role": by_id[a["role_id"]].name if a["role_id"] in by_id else None} for a in _rbac(state)["assignments"]
    ]


# -- the checks each service runs after the token is accepted ------------------------------------
# (imported late: twin.web imports nothing from here, so there is no cycle)

from aiohttp import web  # noqa: E402

from twin.web import CLAIMS, ServiceError, clean_path, routes_for, state_of  # noqa: E402

_SUBSCRIPTION_ONLY = re.compile(r"^/subscriptions/[^/]+/?$", re.IGNORECASE)

DECISION: web.RequestKey[Decision] = web.RequestKey("rbac_decision", Decision)


def _claims(request: web.Request) -> dict[str, Any]:
    return dict(request.get(CLAIMS) or {})


async def authorize_arm(request: web.Request) -> None:
    """ARM: the operation derived from the path must be granted at its scope (403 AuthorizationFailed).

    Not checked here: the subscription list (ARM lists the subscriptions where the caller
    holds a role: `arm.list_subscriptions`), tenant-level provider calls (Resource Graph
    filters its rows: `graph.py`) and paths that are no ARM resource."""
    path = clean_path(request)
    if path.rstrip("/").lower() == "/subscriptions":
        return
    if not any(route.regex.match(path) for route in routes_for(request.app, path)):
        return  # ARM resolves the resource type first: an unknown one is its 404, not a 403
    operation = arm_operation(request.method, path)
    if operation is None:
        return
    claims = _claims(request)
    state = state_of(request)
    if path.split("/")[2].lower() not in state.subscriptions:
        return  # ARM answers SubscriptionNotFound before it authorizes
    # Like the list: a subscription is visible to whoever holds a role in it.
    visible = has_any_assignment_under(state, claims.get("oid"), path)
    if _SUBSCRIPTION_ONLY.match(path) and request.method in ("GET", "HEAD") and visible:
        return
    decision = decide(state, claims.get("oid"), operation.action, operation.scope)
    if not decision.allowed:
        status, code, message = authorization_failed(claims, operation.action, operation.scope)
        raise ServiceError(status, code, message)
    request[DECISION] = decision


def require_linked(request: web.Request, action: str, scope: str, linked_action: str, linked_scope: str) -> None:
    """A write that reaches another resource (a diagnostic setting's workspace): the caller must
    hold `linked_action` there too, or ARM answers 403 LinkedAuthorizationFailed."""
    claims = _claims(request)
    if not allowed(state_of(request), claims.get("oid"), linked_action, linked_scope):
        status, code, message = linked_authorization_failed(claims, action, scope, linked_action, [linked_scope])
        raise ServiceError(status, code, message)


_KV = "Microsoft.KeyVault/vaults/secrets/"


def key_vault_data_action(method: str, parts: list[str]) -> str | None:
    """The data action of a Key Vault secrets call ("Azure permissions for Security", Microsoft.KeyVault)."""
    method = method.upper()
    head = parts[0].lower() if parts else ""
    if head == "secrets":
        if len(parts) == 1 or (len(parts) == 3 and parts[2].lower() == "versions" and method == "GET"):
            return _KV + "readMetadata/action"
        if method == "GET":
            return _KV + "getSecret/action"
        return {"PUT": _KV + "setSecret/action", "PATCH": _KV + "update/action", "DELETE": _KV + "delete"}.get(method)
    if head == "deletedsecrets":
        if len(parts) == 3 and parts[2].lower() == "recover":
            return _KV + "recover/action"
        return _KV + "purge/action" if method == "DELETE" else _KV + "readMetadata/action"
    return None


def vault_authorizer(vault_name: str) -> Any:
    """The check for one vault's data plane (403 Forbidden / ForbiddenByRbac)."""

    async def authorize(request: web.Request) -> None:
        state = state_of(request)
        vault = state.extra.get("vaults", {}).get(vault_name)
        parts = [p for p in clean_path(request).split("/") if p]
        action = key_vault_data_action(request.method, parts)
        if vault is None or action is None:
            return
        resource = vault["resource_id"] + (f"/secrets/{parts[1]}" if len(parts) > 1 else "")
        claims = _claims(request)
        if allowed(state, claims.get("oid"), action, resource, data=True):
            return
        found = state.store.get(vault["resource_id"])
        location = str((found.body if found else {}).get("location", "westeurope"))
        body = key_vault_forbidden(claims, str(claims.get("iss", "")), action, resource, vault_name, location)
        raise ServiceError(403, "Forbidden", body["error"]["message"], innererror=body["error"]["innererror"])

    return authorize


QUERY_ACTION = "Microsoft.OperationalInsights/workspaces/query/read"
WORKSPACE_KEYS_ACTION = "Microsoft.OperationalInsights/workspaces/sharedKeys/action"


async def authorize_logs(request: web.Request) -> None:
    """Log Analytics query: the workspace's `query/read` (403 InsufficientAccessError, the shape
    azure-monitor-query's TROUBLESHOOTING.md shows)."""
    state = state_of(request)
    parts = [p for p in clean_path(request).split("/") if p]
    if len(parts) < 3 or parts[1].lower() != "workspaces":
        return
    workspace = state.extra.get("workspaces", {}).get(parts[2].lower())
    if workspace is None:
        return  # the handler answers WorkspaceNotFoundError
    if not allowed(state, _claims(request).get("oid"), QUERY_ACTION, workspace["resource_id"]):
        raise ServiceError(
            403,
            "InsufficientAccessError",
            "The provided credentials have insufficient access to perform the requested operation",
            correlationId=str(uuid.uuid4()),
        )


def arm_challenge(login_url: str) -> Any:
    """ARM's 401 `WWW-Authenticate` (azure-mgmt-core's and azure-sdk-for-go's challenge tests quote
    ARM: `Bearer authorization_uri="https://login.windows.net/", error="invalid_token",
    error_description="The authentication failed because of missing 'Authorization' header."`);
    the twin's authority stands in for login.windows.net."""

    def challenge(error: Any) -> str:
        if getattr(error, "code", "") == "AuthenticationFailed":
            description = "The authentication failed because of missing 'Authorization' header."
        else:
            description = str(getattr(error, "message", "")).replace('"', "'")
        authority = login_url.rstrip("/") + "/"
        return f'Bearer authorization_uri="{authority}", error="invalid_token", error_description="{description}"'

    return challenge


def _apply_estate_hook(state: TwinState, data: dict[str, Any], source: str, top_level: bool) -> None:
    try:
        apply_estate(state, data, source=source, top_level=top_level)
    except RbacError as error:
        raise EstateError(str(error)) from error


register_estate_hook("rbac", EstateHook(("rbac", "custom_roles", "role_assignments"), _apply_estate_hook))
