"""Certificates: the certificates collection, custom hostnames and CA certificates of a service.

As Azure does, the twin reads every certificate it is given (a PFX with its password, a DER
or PEM CA certificate, or a PFX held in a Key Vault secret read with the instance's managed
identity) and answers only what it learnt from it: subject, thumbprint and expiry. The
certificate data and passwords are write-only: they are never stored in a body nor
returned. Sources (azure-rest-api-specs, specification/apimanagement/resource-manager/
Microsoft.ApiManagement/stable/2022-08-01): apimcertificates.json (Certificate_ListByService,
_Get, _GetEntityTag, _CreateOrUpdate, _Delete, _RefreshSecret), definitions.json
(CertificateContractProperties: subject, thumbprint, expirationDate required, keyVault;
CertificateCreateOrUpdateProperties: data, password, keyVault; KeyVaultContractProperties
with lastStatus), apimdeployment.json (HostnameConfiguration: type, hostName required,
keyVaultId, identityClientId, encodedCertificate, certificatePassword, defaultSslBinding,
negotiateClientCertificate, certificate, certificateSource, certificateStatus;
CertificateConfiguration: encodedCertificate, certificatePassword, storeName required,
certificate; CertificateInformation: expiry, thumbprint, subject required).

[unverified] What Azure shows when a Key Vault-linked hostname cannot be read: the twin
keeps the previous certificate and sets `certificateStatus: Failed` (the spec's enum:
Completed | Failed | InProgress) instead of refusing the write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from twin import keyvault
from twin.apim.common import (
    _check_if_match,
    _child,
    _drop_secrets_under,
    _emit,
    _entity_name,
    _enum,
    _invalid,
    _iso,
    _list,
    _now,
    _props,
    _service,
    _str,
    _with_etag,
)
from twin.arm import write_context
from twin.state import Resource, TwinState
from twin.web import ServiceError, params, read_json, state_of

CERTIFICATE_TYPE = "Microsoft.ApiManagement/service/certificates"
HOSTNAME_TYPES = ("Proxy", "Portal", "Management", "Scm", "DeveloperPortal", "ConfigurationApi")
CERTIFICATE_SOURCES = ("Managed", "KeyVault", "Custom", "BuiltIn")
STORE_NAMES = ("CertificateAuthority", "Root")
MAX_CA_CERTIFICATES = 10  # Learn: "How to add a custom CA certificate in Azure API Management"
_ID_MAX = 80  # Certificate_CreateOrUpdate: certificateId maxLength 80


class CertificateError(ValueError):
    """The given certificate could not be read (the reason says why)."""


# -- making and reading certificates ---------------------------------------------------------------


def make_certificate(
    subject: str,
    not_after: datetime,
    *,
    not_before: datetime | None = None,
    password: str | None = None,
    with_key: bool = True,
) -> str:
    """A real self-signed certificate as base64: a PFX (with its key) or, without, DER (.cer).

    For estates and tests: what an operator uploads or keeps in Key Vault."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = not_before or min(not_after - timedelta(days=365), datetime.now(UTC) - timedelta(days=1))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    if not with_key:
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    protection = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return base64.b64encode(pkcs12.serialize_key_and_certificates(None, key, cert, None, protection)).decode()


def _info(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "expiry": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thumbprint": hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper(),  # noqa: S324
        "subject": cert.subject.rfc4514_string(),
    }


def read_certificate(encoded: Any, password: Any, *, key_required: bool) -> dict[str, Any]:
    """Subject, thumbprint and expiry of a base64 PFX (or, when no key is required, DER/PEM)."""
    if not isinstance(encoded, str) or not encoded.strip():
        raise CertificateError("the certificate data is empty")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CertificateError("the certificate data is not base64") from error
    if password is not None and not isinstance(password, str):
        raise CertificateError("the certificate password must be a string")
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(raw, password.encode() if password else None)
    except ValueError as pfx_error:
        if key_required:
            raise CertificateError(
                "the data is not a PFX (PKCS #12) this password opens"
                if password
                else "the data is not a PFX (PKCS #12) without a password"
            ) from pfx_error
        try:
            return _info(x509.load_der_x509_certificate(raw))
        except ValueError:
            try:
                return _info(x509.load_pem_x509_certificate(raw))
            except ValueError as error:
                raise CertificateError("the data is neither a certificate (DER, PEM) nor a PFX") from error
    if cert is None or (key_required and key is None):
        raise CertificateError("the PFX holds no certificate with its private key")
    return _info(cert)


def _principal(service_body: dict[str, Any], client_id: str | None) -> str | None:
    """The object id APIM reads Key Vault as (as for Key Vault named values)."""
    identity = service_body.get("identity") or {}
    if client_id:
        for entry in (identity.get("userAssignedIdentities") or {}).values():
            if str(entry.get("clientId", "")).lower() == client_id.lower():
                return str(entry.get("principalId") or "") or None
        return None
    if "SystemAssigned" in str(identity.get("type", "")):
        return str(identity.get("principalId") or "") or None
    return None


def _read_from_vault(
    state: TwinState, service_body: dict[str, Any], secret_id: str, client_id: str | None
) -> tuple[dict[str, Any] | None, str, str | None]:
    """(certificate info or None, status code, message): the vault's secret holds a PFX."""
    read = keyvault.read_secret_reference(state, secret_id, _principal(service_body, client_id))
    if read.code != "Success" or read.value is None:
        return None, read.code, read.message
    try:
        return read_certificate(read.value, None, key_required=True), "Success", None
    except CertificateError as error:
        return None, "InvalidCertificate", f"The Key Vault secret does not hold a PFX certificate: {error}."


# -- the certificates collection ----------------------------------------------------------------------


def _certificate_props(
    state: TwinState, service: Resource, given: dict[str, Any], current: dict[str, Any] | None
) -> dict[str, Any]:
    vault = given.get("keyVault")
    if vault is not None:
        if not isinstance(vault, dict):
            raise _invalid("properties.keyVault", "'keyVault' must be an object.")
        if "data" in given or "password" in given:
            raise _invalid("properties.data", "Give either data (and password) or keyVault, not both.")
        secret_id = _str(vault.get("secretIdentifier"), "properties.keyVault.secretIdentifier", min_len=1)
        client_id = vault.get("identityClientId")
        if client_id is not None:
            _str(client_id, "properties.keyVault.identityClientId")
        info, code, message = _read_from_vault(state, service.body, secret_id, client_id)
        if info is None and current is None:
            raise _invalid("properties.keyVault", f"Cannot read the certificate from Key Vault ({code}): {message}")
        props = (
            dict(current or {})
            if info is None
            else {
                "subject": info["subject"],
                "thumbprint": info["thumbprint"],
                "expirationDate": info["expiry"],
            }
        )
        props["keyVault"] = {
            "secretIdentifier": secret_id,
            **({"identityClientId": client_id} if client_id else {}),
            "lastStatus": {"code": code, "message": message, "timeStampUtc": _iso(_now(state))},
        }
        return props
    if "data" not in given:
        raise _invalid("properties.data", "'data' (a base64 PFX) or 'keyVault' is required.")
    try:
        info = read_certificate(given.get("data"), given.get("password"), key_required=True)
    except CertificateError as error:
        raise _invalid("properties.data", f"Invalid certificate: {error}.") from error
    return {"subject": info["subject"], "thumbprint": info["thumbprint"], "expirationDate": info["expiry"]}


def upsert_certificate(state: TwinState, service: Resource, name: str, given: dict[str, Any]) -> tuple[Resource, bool]:
    """Validate and store one certificate; (resource, created). Raises ServiceError."""
    name = _entity_name(name, "certificateId")
    if len(name) > _ID_MAX:
        raise _invalid("certificateId", f"'{name}' is longer than {_ID_MAX} characters.")
    resource_id = f"{service.id}/certificates/{name}"
    existing = state.store.get(resource_id)
    props = _certificate_props(state, service, given, existing.body["properties"] if existing else None)
    body = {
        "id": existing.id if existing else resource_id,
        "type": CERTIFICATE_TYPE,
        "name": existing.body["name"] if existing else name,
        "properties": props,
    }
    return state.store.put(resource_id, body), existing is None


async def list_certificates(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    return _list(request, [r.body for r in state.store.children(service.id, "certificates")])


async def get_certificate(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["name"]
    found = _child(state, service, f"certificates/{name}", "Certificate", name)
    return _with_etag(found.body, found)


async def put_certificate(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["name"]
    _check_if_match(request, state.store.get(f"{service.id}/certificates/{name}"), required=False)
    resource, created = upsert_certificate(state, service, name, _props(await read_json(request)))
    _emit(state, write_context(request), resource.id, "write")
    return _with_etag(resource.body, resource, status=201 if created else 200)


async def delete_certificate(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    service = _service(request)
    name = params(request)["name"]
    found = state.store.get(f"{service.id}/certificates/{name}")
    _check_if_match(request, found, required=True)
    if found is None:
        return web.Response(status=204)
    state.store.delete(found.id)
    _drop_secrets_under(state, found.id, include_self=True)
    _emit(state, write_context(request), found.id, "delete")
    return web.Response(status=200)


async def refresh_certificate(request: web.Request) -> web.StreamResponse:
    """Certificate_RefreshSecret: read the Key Vault secret again (200 with the certificate)."""
    state = state_of(request)
    service = _service(request)
    name = params(request)["name"]
    found = _child(state, service, f"certificates/{name}", "Certificate", name)
    vault = found.body["properties"].get("keyVault")
    if not vault:
        raise ServiceError(400, "ValidationError", f"Certificate '{name}' is not a Key Vault reference.")
    resource, _ = upsert_certificate(
        state,
        service,
        name,
        {"keyVault": {k: v for k, v in vault.items() if k in ("secretIdentifier", "identityClientId")}},
    )
    _emit(state, write_context(request), resource.id, "action", "refreshSecret")
    return _with_etag(resource.body, resource)


# -- the service's hostnames and CA certificates ----------------------------------------------------------


def service_hostnames(
    state: TwinState, service_body: dict[str, Any], given: Any, current: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Validated `hostnameConfigurations`: certificates read, write-only fields dropped."""
    if not isinstance(given, list):
        raise _invalid("properties.hostnameConfigurations", "'hostnameConfigurations' must be an array.")
    before = {str(h.get("hostName", "")).lower(): h for h in current or [] if isinstance(h, dict)}
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(given):
        field = f"properties.hostnameConfigurations[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(field, "Each hostname configuration must be an object.")
        kind = _enum(entry.get("type"), HOSTNAME_TYPES, f"{field}.type")
        host = _str(entry.get("hostName"), f"{field}.hostName", min_len=1, max_len=253).lower()
        result: dict[str, Any] = {"type": kind, "hostName": host}
        for flag in ("negotiateClientCertificate", "defaultSslBinding"):
            if flag in entry and entry[flag] is not None:
                if not isinstance(entry[flag], bool):
                    raise _invalid(f"{field}.{flag}", f"'{flag}' must be a boolean.")
                result[flag] = entry[flag]
        previous = before.get(host, {})
        source = entry.get("certificateSource")
        if source is not None:
            source = _enum(source, CERTIFICATE_SOURCES, f"{field}.certificateSource")
        if entry.get("keyVaultId"):
            secret_id = _str(entry["keyVaultId"], f"{field}.keyVaultId", min_len=1)
            client_id = entry.get("identityClientId")
            info, code, _ = _read_from_vault(state, service_body, secret_id, client_id)
            result.update({"keyVaultId": secret_id, "certificateSource": "KeyVault"})
            if client_id:
                result["identityClientId"] = client_id
            if info is None:
                if not previous.get("certificate"):
                    raise _invalid(f"{field}.keyVaultId", f"Cannot read the certificate from Key Vault ({code}).")
                result.update({"certificate": previous["certificate"], "certificateStatus": "Failed"})
            else:
                result.update({"certificate": info, "certificateStatus": "Completed"})
        elif entry.get("encodedCertificate"):
            try:
                info = read_certificate(
                    entry["encodedCertificate"], entry.get("certificatePassword"), key_required=True
                )
            except CertificateError as error:
                raise _invalid(f"{field}.encodedCertificate", f"Invalid certificate: {error}.") from error
            result.update({"certificate": info, "certificateSource": "Custom", "certificateStatus": "Completed"})
        elif source in ("BuiltIn", "Managed") or previous.get("certificateSource") in ("BuiltIn", "Managed"):
            result["certificateSource"] = source or previous["certificateSource"]
            if previous.get("certificate"):
                result["certificate"] = previous["certificate"]
        elif previous.get("certificate"):
            # Sent back as read (no certificate data): the certificate stays.
            for key in ("certificate", "certificateSource", "certificateStatus", "keyVaultId", "identityClientId"):
                if key in previous:
                    result[key] = previous[key]
        else:
            raise _invalid(
                field, f"Host name '{host}' needs a certificate: encodedCertificate, keyVaultId or certificateSource."
            )
        out.append(result)
    return out


def service_ca_certificates(given: Any, current: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validated `certificates` (CA certificates): at most 10, each read; data never kept."""
    if given is None:
        return None
    if not isinstance(given, list):
        raise _invalid("properties.certificates", "'certificates' must be an array.")
    if len(given) > MAX_CA_CERTIFICATES:
        raise _invalid("properties.certificates", f"At most {MAX_CA_CERTIFICATES} CA certificates are allowed.")
    known = {str((c.get("certificate") or {}).get("thumbprint", "")).upper(): c for c in current or []}
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(given):
        field = f"properties.certificates[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(field, "Each certificate configuration must be an object.")
        store = _enum(entry.get("storeName"), STORE_NAMES, f"{field}.storeName")
        if entry.get("encodedCertificate"):
            try:
                info = read_certificate(
                    entry["encodedCertificate"], entry.get("certificatePassword"), key_required=False
                )
            except CertificateError as error:
                raise _invalid(f"{field}.encodedCertificate", f"Invalid certificate: {error}.") from error
        else:
            sent_info = entry.get("certificate")
            sent: dict[str, Any] = sent_info if isinstance(sent_info, dict) else {}
            previous = known.get(str(sent.get("thumbprint", "")).upper())
            if previous is None:
                raise _invalid(f"{field}.encodedCertificate", "'encodedCertificate' is required for a new certificate.")
            info = previous["certificate"]
        out.append({"storeName": store, "certificate": info})
    return out


def now_plus(state: TwinState, days: float) -> datetime:
    """The twin's clock plus `days`, to the second (what a seeded certificate's expiry is)."""
    return (_now(state) + timedelta(days=days)).replace(microsecond=0)


__all__ = [
    "CERTIFICATE_TYPE",
    "CertificateError",
    "delete_certificate",
    "get_certificate",
    "list_certificates",
    "make_certificate",
    "now_plus",
    "put_certificate",
    "read_certificate",
    "refresh_certificate",
    "service_ca_certificates",
    "service_hostnames",
    "upsert_certificate",
]
