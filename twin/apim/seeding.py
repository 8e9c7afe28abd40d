"""The estate section `apim`: services and their configuration, checked as the API checks them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twin.apim.apis import _api_props, _operation_props, _policy_body, store_api, store_operation, validate_policy_xml
from twin.apim.certificates import (
    make_certificate,
    now_plus,
    read_certificate,
    service_hostnames,
    upsert_certificate,
)
from twin.apim.children import COLLECTIONS, _product_apis, upsert_child
from twin.apim.common import (
    _ENTITY_ID,
    _SERVICE_NAME,
    IDENTITY_PROVIDERS,
    SUBSCRIPTION_STATES,
    _bool,
    _drop_secrets_under,
    _enum,
    _iso,
    _now,
    _parse_time,
    _secret,
    _service_id,
    _set_keys,
)
from twin.apim.named_values import _named_value, read_key_vault_reference, store_named_value
from twin.apim.service import _apply_service_update, _create_defaults, _new_service_body
from twin.apim.subscriptions import _full_scope, _owner, _subscription_body
from twin.apim.workspaces import KINDS as WORKSPACE_KINDS
from twin.apim.workspaces import WORKSPACE_TYPE, _workspace_props, link_api, store_workspace, upsert_workspace_child
from twin.estate import EstateError, SeedContext, register_finisher, register_seeder
from twin.state import Resource, TwinState, norm
from twin.web import (
    ServiceError,
)

# -- seeding --------------------------------------------------------------------------------------------------

_SEED_KEYS = {
    "name",
    "sku",
    "location",
    "tags",
    "identity",
    "properties",
    "publisher_email",
    "publisher_name",
    "subscriptions",
    "tenant_access",
    "git_access",
    "portal",
    "identity_providers",
    "named_values",
    "apis",
    "backends",
    "diagnostics",
    "loggers",
    "policies",
    "products",
    "users",
    "certificates",
    "gateways",
    "created_at",
    "workspaces",
}


def _seed_call(where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ServiceError as error:
        detail = "; ".join(d.get("message", "") for d in error.extra.get("details", [])) or error.message
        raise EstateError(f"{where}: {detail}") from error


def seed(state: TwinState, ctx: SeedContext, items: list[dict[str, Any]]) -> None:
    """Seed APIM services (estate section `apim`) and their configuration."""
    for i, item in enumerate(items):
        where = f"apim[{i}]"
        if not isinstance(item, dict):
            raise EstateError(f"{where}: expected a mapping")
        unknown = set(item) - _SEED_KEYS
        if unknown:
            raise EstateError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_SEED_KEYS))})")
        name = item.get("name")
        if not isinstance(name, str) or not _SERVICE_NAME.match(name) or len(name) > 50:
            raise EstateError(f"{where}.name: a service name (letters, digits, hyphens; 1-50) is required")
        _seed_service(state, ctx, item, f"{where}({name})")


register_seeder("apim", seed)


def _seed_service(state: TwinState, ctx: SeedContext, item: dict[str, Any], where: str) -> None:
    resource_id = _service_id(ctx.subscription_id, ctx.resource_group, item["name"])
    if state.store.get(resource_id) is not None:
        state.store.delete(resource_id)
        _drop_secrets_under(state, resource_id, include_self=True)
    props = dict(item.get("properties") or {})
    for key, with_key in (("hostnameConfigurations", True), ("certificates", False)):
        if isinstance(props.get(key), list):
            props[key] = [_seed_certificate_data(state, e, f"{where}.properties.{key}[{j}]", "encodedCertificate",
                                                 with_key) for j, e in enumerate(props[key])]  # fmt: skip
    hosts = props.get("hostnameConfigurations")
    if isinstance(hosts, list) and any(isinstance(h, dict) and h.get("keyVaultId") for h in hosts):
        # Read from Key Vault once the whole estate (vaults, role assignments) is there.
        _pending(state, "hostnames")[resource_id] = (props.pop("hostnameConfigurations"), where)
    created_at = str(item.get("created_at") or props.pop("createdAtUtc", None) or _iso(_now(state)))
    _seed_call(f"{where}.created_at", _parse_time, created_at, "created_at")
    props.setdefault("publisherEmail", item.get("publisher_email", "apim-admin@contoso.example"))
    props.setdefault("publisherName", item.get("publisher_name", "Contoso"))
    request_body = {
        "sku": item.get("sku") or {"name": "Developer", "capacity": 1},
        "tags": item.get("tags") or {},
        "identity": item.get("identity"),
    }
    readonly = {
        k: props.pop(k)
        for k in (
            "privateEndpointConnections",
            "platformVersion",
            "provisioningState",
            "publicIPAddresses",
            "privateIPAddresses",
        )
        if k in props
    }
    request_body["properties"] = props
    skeleton = _new_service_body(
        state, resource_id, item["name"], str(item.get("location") or ctx.location), {}, created_at
    )
    body = _seed_call(where, _apply_service_update, state, skeleton, request_body, replace=True)
    body["properties"].update(readonly)
    body["systemData"]["createdAt"] = created_at
    service = state.store.put(resource_id, body)
    _create_defaults(state, service)
    for section, seeder in (
        ("products", _seed_products),
        ("apis", _seed_apis),
        ("loggers", _seed_collection("loggers")),
        ("diagnostics", _seed_collection("diagnostics")),
        ("backends", _seed_collection("backends")),
        ("users", _seed_collection("users")),
        ("gateways", _seed_gateways),
        ("identity_providers", _seed_identity_providers),
        ("named_values", _seed_named_values),
        ("subscriptions", _seed_subscriptions),
        ("policies", _seed_policies),
        ("certificates", _seed_certificates),
        ("workspaces", _seed_workspaces),
    ):
        if section in item and item[section] is not None:
            seeder(state, service, item[section], f"{where}.{section}")
    for section, access in (("tenant_access", "access"), ("git_access", "gitAccess")):
        if section in item:
            value = item[section] or {}
            rid = f"{service.id}/tenant/{access}"
            resource = state.store.get(rid)
            assert resource is not None
            resource.body["properties"]["enabled"] = _seed_call(
                f"{where}.{section}.enabled", _bool, value.get("enabled", False), "enabled"
            )
            _set_keys(state, rid, value.get("primaryKey"), value.get("secondaryKey"))
    if "portal" in item:
        _seed_portal(state, service, item["portal"] or {}, f"{where}.portal")


def _seed_list(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EstateError(f"{where}: expected a list of mappings")
    return value


def _seed_id(entry: dict[str, Any], where: str) -> str:
    name = entry.get("id") or entry.get("name")
    if not isinstance(name, str) or not name:
        raise EstateError(f"{where}.id: required")
    return name


def _seed_collection(segment: str) -> Callable[[TwinState, Resource, Any, str], None]:
    def seeder(state: TwinState, service: Resource, value: Any, where: str) -> None:
        coll = COLLECTIONS[segment]
        for j, entry in enumerate(_seed_list(value, where)):
            name = _seed_id(entry, f"{where}[{j}]")
            given = {k: v for k, v in entry.items() if k not in ("id", "name")}
            _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)

    return seeder


def _seed_gateways(state: TwinState, service: Resource, value: Any, where: str) -> None:
    """Self-hosted gateways: `{id, locationData, description, primaryKey?, secondaryKey?}`."""
    coll = COLLECTIONS["gateways"]
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {k: v for k, v in entry.items() if k not in ("id", "name", "primaryKey", "secondaryKey")}
        given.setdefault("locationData", {"name": "on-premises"})
        resource, _ = _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)
        for slot in ("primary", "secondary"):
            if isinstance(entry.get(f"{slot}Key"), str):
                _secret(state, resource.id)[slot] = entry[f"{slot}Key"]


def _seed_certificate_data(state: TwinState, entry: Any, where: str, data_key: str, with_key: bool) -> Any:
    """An estate's shorthand for a certificate: `subject` and `expires_in_days` (the twin's clock)
    become a real certificate in `data_key`, read afterwards as any upload is."""
    if not isinstance(entry, dict) or "expires_in_days" not in entry:
        return entry
    days = entry["expires_in_days"]
    if not isinstance(days, int | float) or isinstance(days, bool):
        raise EstateError(f"{where}.expires_in_days: a number of days (negative: expired)")
    subject = entry.get("subject") or entry.get("hostName") or "twin-certificate"
    if not isinstance(subject, str):
        raise EstateError(f"{where}.subject: text")
    rest = {k: v for k, v in entry.items() if k not in ("expires_in_days", "subject")}
    rest[data_key] = make_certificate(subject, now_plus(state, days), with_key=with_key)
    return rest


def _seed_certificates(state: TwinState, service: Resource, value: Any, where: str) -> None:
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {k: v for k, v in entry.items() if k not in ("id", "name")}
        if isinstance(given.get("keyVault"), dict):
            # Read from Key Vault once the whole estate (vaults, role assignments) is there.
            _pending(state, "certificates")[f"{service.id}/certificates/{name}"] = (given, f"{where}[{j}]")
            continue
        given = _seed_certificate_data(state, given, f"{where}[{j}]", "data", True)
        _seed_call(f"{where}[{j}]", upsert_certificate, state, service, name, given)


def _pending(state: TwinState, what: str) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = state.extra.setdefault("apim", {}).setdefault(f"pending_{what}", {})
    return found


def _read_seeded_certificates(state: TwinState) -> None:
    """APIM's first read of the Key Vault-linked certificates and hostnames of the estate. What
    the estate states wins, as for named values: the world as it is. A certificate's
    `keyVault.lastStatus` (a later read that failed, or when APIM last read), and its copy as
    APIM holds it (`subject` + `expires_in_days`: read before the vault got a renewed
    version); a hostname's `certificateStatus` (a later sync that failed)."""
    for resource_id, (given, where) in _pending(state, "certificates").items():
        service = state.store.get(resource_id.rsplit("/certificates/", 1)[0])
        assert service is not None
        vault = dict(given["keyVault"])
        stated = vault.pop("lastStatus", None)
        name = resource_id.rsplit("/", 1)[1]
        resource, _ = _seed_call(where, upsert_certificate, state, service, name, {"keyVault": vault})
        props = resource.body["properties"]
        if "expires_in_days" in given:
            copy = _seed_certificate_data(state, given, where, "data", True)
            info = read_certificate(copy["data"], None, key_required=True)
            props.update(subject=info["subject"], thumbprint=info["thumbprint"], expirationDate=info["expiry"])
        if stated is not None:
            props["keyVault"]["lastStatus"] = {"message": None, "timeStampUtc": _iso(_now(state)), **stated}
        state.store.put(resource.id, resource.body)
    for resource_id, (hosts, where) in _pending(state, "hostnames").items():
        service = state.store.get(resource_id)
        assert service is not None
        stated = {j: h.get("certificateStatus") for j, h in enumerate(hosts) if isinstance(h, dict)}
        sent = [{k: v for k, v in h.items() if k != "certificateStatus"} if isinstance(h, dict) else h for h in hosts]
        body = service.body
        current = body["properties"].get("hostnameConfigurations")
        read = _seed_call(f"{where}.properties.hostnameConfigurations", service_hostnames, state, body, sent, current)
        for j, status in stated.items():
            if status is not None:
                read[j]["certificateStatus"] = status
        body["properties"]["hostnameConfigurations"] = read
        state.store.put(resource_id, body)
    state.extra.get("apim", {}).pop("pending_certificates", None)
    state.extra.get("apim", {}).pop("pending_hostnames", None)


register_finisher("apim-key-vault-certificates", _read_seeded_certificates)


def _seed_identity_providers(state: TwinState, service: Resource, value: Any, where: str) -> None:
    coll = COLLECTIONS["identityproviders"]
    for j, entry in enumerate(_seed_list(value, where)):
        name = entry.get("type") or entry.get("id")
        if not isinstance(name, str):
            raise EstateError(f"{where}[{j}].type: required ({', '.join(IDENTITY_PROVIDERS)})")
        given = {"clientSecret": "seeded-client-secret", **{k: v for k, v in entry.items() if k not in ("id",)}}
        _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)


def _seed_products(state: TwinState, service: Resource, value: Any, where: str) -> None:
    coll = COLLECTIONS["products"]
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {
            "displayName": name,
            "state": "published",
            **{k: v for k, v in entry.items() if k not in ("id", "name", "apis", "policy")},
        }
        resource, _ = _seed_call(f"{where}[{j}]", upsert_child, state, service, coll, name, given, patch=False)
        state.extra.setdefault("apim", {}).setdefault("product_apis", {})[norm(resource.id)] = []
        for api in entry.get("apis") or []:
            _product_apis(state, resource).append(f"{service.id}/apis/{api}")


def _seed_apis(state: TwinState, service: Resource, value: Any, where: str) -> None:
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {
            "displayName": name,
            "path": name,
            **{k: v for k, v in entry.items() if k not in ("id", "name", "products", "operations")},
        }
        props = _seed_call(f"{where}[{j}]", _api_props, given, None, patch=False)
        api = store_api(state, service, name, props)
        for k, operation in enumerate(_seed_list(entry.get("operations") or [], f"{where}[{j}].operations")):
            op_name = _seed_id(operation, f"{where}[{j}].operations[{k}]")
            op_given = {"displayName": op_name, **{x: v for x, v in operation.items() if x not in ("id", "name")}}
            op_props = _seed_call(f"{where}[{j}].operations[{k}]", _operation_props, op_given)
            store_operation(state, api, op_name, op_props)
        for pid in entry.get("products") or []:
            product = state.store.get(f"{service.id}/products/{pid}")
            if product is None:
                raise EstateError(f"{where}[{j}].products: product '{pid}' is not seeded")
            _product_apis(state, product).append(api.id)
    # products seeded with `apis:` before the APIs existed: keep only links to real APIs' ids
    for links in state.extra.get("apim", {}).get("product_apis", {}).values():
        for k, link in enumerate(links):
            found = state.store.get(link)
            if found is not None:
                links[k] = found.id


def _seed_named_values(state: TwinState, service: Resource, value: Any, where: str) -> None:
    for j, entry in enumerate(_seed_list(value, where)):
        name = _seed_id(entry, f"{where}[{j}]")
        given = {"displayName": name, **{k: v for k, v in entry.items() if k not in ("id", "name")}}
        stated_status = None
        if isinstance(given.get("keyVault"), dict) and "lastStatus" in given["keyVault"]:
            given["keyVault"] = dict(given["keyVault"])
            stated_status = given["keyVault"].pop("lastStatus")
        props, nv_value = _seed_call(
            f"{where}[{j}]",
            _named_value,
            state,
            f"{service.id}/namedValues/{name}",
            name,
            given,
            None,
            patch=False,
        )
        if "keyVault" in props:
            # Read once the whole estate is seeded (its vault may come later in the file).
            props["keyVault"]["lastStatus"] = _PENDING_READ
            _secret(state, f"{service.id}/namedValues/{name}")["seeded_status"] = stated_status
        store_named_value(state, service, name, props, nv_value)


_PENDING_READ = {"code": "Pending", "message": None, "timeStampUtc": None}


def _read_seeded_references(state: TwinState) -> None:
    """APIM's first read of each seeded Key Vault named value; a status the estate states wins
    (the world as it is, e.g. access revoked since), but the value is still read if it can be."""
    for resource in list(state.store.resources.values()):
        if resource.body.get("type") != "Microsoft.ApiManagement/service/namedValues":
            continue
        vault = resource.body["properties"].get("keyVault")
        if not vault or vault.get("lastStatus") != _PENDING_READ:
            continue
        service = state.store.get(resource.id.rsplit("/namedValues/", 1)[0])
        assert service is not None
        read_key_vault_reference(state, service, resource)
        stated = _secret(state, resource.id).pop("seeded_status", None)
        if stated is not None:
            vault["lastStatus"] = {"message": None, "timeStampUtc": _iso(_now(state)), **stated}


register_finisher("apim-key-vault-references", _read_seeded_references)


def _seed_subscriptions(state: TwinState, service: Resource, value: Any, where: str) -> None:
    entries: list[dict[str, Any]] = []
    if isinstance(value, dict) and "generate" in value:
        value = [value]
    for j, entry in enumerate(_seed_list(value, where)):
        if "generate" in entry:
            spec = entry["generate"] or {}
            count = spec.get("count")
            if not isinstance(count, int) or count < 0:
                raise EstateError(f"{where}[{j}].generate.count: a whole number is required")
            prefix = str(spec.get("prefix", "gen-"))
            for n in range(count):
                entries.append(
                    {
                        "sid": f"{prefix}{n:05d}",
                        "displayName": f"{spec.get('display_prefix', 'Generated subscription')} {n}",
                        "scope": spec.get("scope", "/apis"),
                        "state": spec.get("state", "active"),
                        "ownerId": spec.get("ownerId"),
                    }
                )
        else:
            entries.append(entry)
    allowed = {
        "sid",
        "name",
        "displayName",
        "scope",
        "state",
        "ownerId",
        "expirationDate",
        "primaryKey",
        "secondaryKey",
        "createdDate",
        "startDate",
        "stateComment",
        "allowTracing",
        "notificationDate",
        "endDate",
    }
    for j, entry in enumerate(entries):
        spot = f"{where}[{j}]"
        unknown = set(entry) - allowed
        if unknown:
            raise EstateError(f"{spot}: unknown keys {sorted(unknown)}")
        sid = entry.get("sid") or entry.get("name")
        if not isinstance(sid, str) or not _ENTITY_ID.match(sid):
            raise EstateError(f"{spot}.sid: required")
        rid = f"{service.id}/subscriptions/{sid}"
        created = str(entry.get("createdDate") or _iso(_now(state)))
        props: dict[str, Any] = {
            "ownerId": _seed_call(f"{spot}.ownerId", _owner, service, entry.get("ownerId")),
            "scope": _seed_call(f"{spot}.scope", _full_scope, state, service, entry.get("scope", "/apis")),
            "displayName": entry.get("displayName", sid),
            "state": _seed_call(
                f"{spot}.state",
                _enum,
                entry.get("state", "active"),
                SUBSCRIPTION_STATES,
                "state",
                case_sensitive=True,
            ),
            "createdDate": created,
            "allowTracing": bool(entry.get("allowTracing", False)),
        }
        if props["state"] == "active":
            props["startDate"] = entry.get("startDate") or created
        for field in ("expirationDate", "stateComment", "notificationDate", "endDate"):
            if entry.get(field) is not None:
                props[field] = (
                    _iso(_seed_call(f"{spot}.{field}", _parse_time, entry[field], field))
                    if field != "stateComment"
                    else entry[field]
                )
        state.store.put(rid, _subscription_body(rid, sid, props))
        _set_keys(state, rid, entry.get("primaryKey"), entry.get("secondaryKey"))


def _seed_policies(state: TwinState, service: Resource, value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise EstateError(f"{where}: expected a mapping {{service, apis, products}}")
    if value.get("service") is not None:
        xml_text = _seed_call(f"{where}.service", validate_policy_xml, value["service"])
        rid = f"{service.id}/policies/policy"
        state.store.put(rid, _policy_body(rid, "Microsoft.ApiManagement/service/policies", xml_text))
    for section, segment, rtype in (
        ("apis", "apis", "Microsoft.ApiManagement/service/apis/policies"),
        ("products", "products", "Microsoft.ApiManagement/service/products/policies"),
    ):
        for name, xml_value in (value.get(section) or {}).items():
            parent = state.store.get(f"{service.id}/{segment}/{name}")
            if parent is None:
                raise EstateError(f"{where}.{section}.{name}: no such {segment[:-1]} is seeded")
            xml_text = _seed_call(f"{where}.{section}.{name}", validate_policy_xml, xml_value)
            rid = f"{parent.id}/policies/policy"
            state.store.put(rid, _policy_body(rid, rtype, xml_text))


def _seed_portal(state: TwinState, service: Resource, value: dict[str, Any], where: str) -> None:
    unknown = set(value) - {"signup_enabled", "signin_enabled", "basic_auth_enabled"}
    if unknown:
        raise EstateError(f"{where}: unknown keys {sorted(unknown)}")
    for key, kind in (("signup_enabled", "signup"), ("signin_enabled", "signin")):
        if key in value:
            resource = state.store.get(f"{service.id}/portalsettings/{kind}")
            assert resource is not None
            resource.body["properties"]["enabled"] = _seed_call(f"{where}.{key}", _bool, value[key], key)
    config = state.store.get(f"{service.id}/portalconfigs/default")
    assert config is not None
    if "basic_auth_enabled" in value:
        config.body["properties"]["enableBasicAuth"] = _seed_call(
            f"{where}.basic_auth_enabled", _bool, value["basic_auth_enabled"], "basic_auth_enabled"
        )
    if "signin_enabled" in value:
        config.body["properties"]["signin"] = {"require": bool(value["signin_enabled"])}


_WORKSPACE_KEYS = {"id", "name", "displayName", "description", "apis", "products", "backends", "named_values",
                   "subscriptions", "policies"}  # fmt: skip


def _seed_workspaces(state: TwinState, service: Resource, value: Any, where: str) -> None:
    """Workspaces and their children, each validated as the workspace routes validate it.

    `named_values[].keyVault.lastStatus` states APIM's last read of a reference (the twin does
    not read workspace references itself); `products[].apis` links APIs of the workspace."""
    for j, entry in enumerate(_seed_list(value, where)):
        spot = f"{where}[{j}]"
        unknown = set(entry) - _WORKSPACE_KEYS
        if unknown:
            raise EstateError(f"{spot}: unknown keys {sorted(unknown)}")
        name = _seed_id(entry, spot)
        given = {"displayName": entry.get("displayName", name), "description": entry.get("description")}
        props = _seed_call(spot, _workspace_props, given, None, patch=False)
        ws = _seed_call(spot, store_workspace, state, service, name, props)
        for section, segment in (("apis", "apis"), ("backends", "backends"), ("products", "products"),
                                 ("named_values", "namedvalues"), ("subscriptions", "subscriptions")):  # fmt: skip
            kind = WORKSPACE_KINDS[segment]
            for k, child in enumerate(_seed_list(entry.get(section) or [], f"{spot}.{section}")):
                at = f"{spot}.{section}[{k}]"
                child_name = str(child.get("sid") or _seed_id(child, at))
                child_given = {x: v for x, v in child.items() if x not in ("id", "name", "sid", "apis")}
                if segment == "apis":
                    child_given = {"displayName": child_name, "path": f"{name}/{child_name}", **child_given}
                if segment in ("products", "namedvalues", "subscriptions"):
                    child_given.setdefault("displayName", child_name)
                if segment == "products":
                    child_given.setdefault("state", "published")
                if segment == "subscriptions":
                    child_given.setdefault("scope", "/apis")
                    child_given.setdefault("state", "active")
                stated = None
                if segment == "namedvalues" and isinstance(child_given.get("keyVault"), dict):
                    child_given["keyVault"] = dict(child_given["keyVault"])
                    stated = child_given["keyVault"].pop("lastStatus", None)
                resource, _ = _seed_call(
                    at, upsert_workspace_child, state, ws, kind, child_name, child_given, patch=False
                )
                if stated is not None:
                    resource.body["properties"]["keyVault"]["lastStatus"] = {
                        "message": None,
                        "timeStampUtc": _iso(_now(state)),
                        **stated,
                    }
                for api in child.get("apis") or [] if segment == "products" else []:
                    _seed_call(f"{at}.apis", link_api, state, ws, resource, f"{api}-link", f"{ws.id}/apis/{api}")
        policies = entry.get("policies") or {}
        if not isinstance(policies, dict):
            raise EstateError(f"{spot}.policies: expected a mapping {{workspace, apis, products}}")
        targets: list[tuple[str, str, Any]] = []
        if policies.get("workspace") is not None:
            targets.append((f"{ws.id}/policies/policy", f"{WORKSPACE_TYPE}/policies", policies["workspace"]))
        for section in ("apis", "products"):
            for owner, xml_value in (policies.get(section) or {}).items():
                parent = state.store.get(f"{ws.id}/{section}/{owner}")
                if parent is None:
                    raise EstateError(f"{spot}.policies.{section}.{owner}: no such {section[:-1]} in the workspace")
                targets.append((f"{parent.id}/policies/policy", f"{WORKSPACE_TYPE}/{section}/policies", xml_value))
        for rid, rtype, xml_value in targets:
            xml_text = _seed_call(f"{spot}.policies", validate_policy_xml, xml_value)
            state.store.put(rid, _policy_body(rid, rtype, xml_text))
