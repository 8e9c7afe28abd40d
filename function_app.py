"""Azure Functions entry points (Python v2 model): thin adapters only.

Each function parses its trigger input, calls one handler and turns the result into the
trigger's output. Logic lives in handlers/ and shared/.

The app is an AsgiFunctionApp: the HTTP API (handlers/api.py, FastAPI) is its catch-all
function `http_app_func` on `api/{*route}` (function key: the host checks it; the app
checks an Entra ID bearer token on every route). The other triggers register beside it as
on a FunctionApp. Literal routes such as `health` win over the catch-all (ASP.NET Core
route precedence), so the anonymous health check stays outside the API.
"""

from __future__ import annotations

import functools
import json

import azure.functions as func

from handlers.api import create_api
from handlers.context import AppContext
from handlers.health import check_health


@functools.cache
def app_context() -> AppContext:
    """The composition root, built once per process (cold start); a settings error is not
    cached, so the next invocation tries again."""
    return AppContext.load()


api = create_api(app_context)
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    report = check_health()
    body = json.dumps(report.public_body())
    return func.HttpResponse(body, status_code=report.status_code, mimetype="application/json")
