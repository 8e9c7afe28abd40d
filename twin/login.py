"""An Entra-like token service: OpenID configuration (v2 and v1), JWKS, and the v2 token
endpoint for the client-credentials grant, so azure-identity's real credentials work
against `AZURE_AUTHORITY_HOST` with instance discovery disabled.

As in Entra ID, the v2 document's issuer is `{authority}/{tenant}/v2.0` and the v1
document's is `https://sts.windows.net/{tenant}/` (the issuer of v1 access tokens, which
the twin mints by default); both point at the same signing keys."""

from __future__ import annotations

from aiohttp import web

from twin.state import TwinState
from twin.web import ISSUER_KEY, add_route, json_response, params, state_of


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return json_response({"error": error, "error_description": description, "error_codes": []}, status=status)


def _tenant(request: web.Request) -> TwinState:
    state = state_of(request)
    tenant = params(request)["tenant"]
    if tenant.lower() not in (state.tenant_id.lower(), "organizations", "common"):
        raise web.HTTPNotFound()
    return state


async def openid_configuration(request: web.Request) -> web.StreamResponse:
    state = _tenant(request)
    base = f"{state.urls['login']}/{state.tenant_id}"
    return json_response(
        {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "tenant_region_scope": "EU",
        }
    )


async def openid_configuration_v1(request: web.Request) -> web.StreamResponse:
    state = _tenant(request)
    base = f"{state.urls['login']}/{state.tenant_id}"
    return json_response(
        {
            "issuer": request.app[ISSUER_KEY].issuer,
            "authorization_endpoint": f"{base}/oauth2/authorize",
            "token_endpoint": f"{base}/oauth2/token",
            "jwks_uri": f"{base}/discovery/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "tenant_region_scope": "EU",
        }
    )


async def jwks(request: web.Request) -> web.StreamResponse:
    _tenant(request)
    return json_response(request.app[ISSUER_KEY].jwks())


async def token(request: web.Request) -> web.StreamResponse:
    state = _tenant(request)
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(
            400,
            "unsupported_grant_type",
            f"AADSTS70003: grant_type {form.get('grant_type')!r} is not supported by the twin.",
        )
    client_id = str(form.get("client_id", ""))
    secret = str(form.get("client_secret", ""))
    found = state.principals.get(client_id)
    if found is None:
        return _oauth_error(
            400,
            "unauthorized_client",
            f"AADSTS700016: Application with identifier '{client_id}' was not found in the directory.",
        )
    if secret != found[0]:
        return _oauth_error(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
    scope = str(form.get("scope", ""))
    resources = [s for s in scope.split() if s.endswith("/.default")]
    if len(resources) != 1:
        return _oauth_error(
            400,
            "invalid_scope",
            f"AADSTS1002012: The provided value for scope {scope!r} is not valid: "
            "one <resource>/.default scope is required.",
        )
    audience = resources[0][: -len("/.default")]
    issued = request.app[ISSUER_KEY].mint(found[1], audience)
    return json_response({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": issued})


def setup(app: web.Application) -> None:
    add_route(app, "GET", "/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration, versions=None)
    add_route(app, "GET", "/{tenant}/.well-known/openid-configuration", openid_configuration_v1, versions=None)
    add_route(app, "GET", "/{tenant}/discovery/v2.0/keys", jwks, versions=None)
    add_route(app, "GET", "/{tenant}/discovery/keys", jwks, versions=None)
    add_route(app, "POST", "/{tenant}/oauth2/v2.0/token", token, versions=None)
