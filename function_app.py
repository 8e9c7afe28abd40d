"""Azure Functions entry points (Python v2 model): thin adapters only.

Each function parses its trigger input, calls one handler and turns the result into the
trigger's output. Logic lives in handlers/ and shared/.
"""

from __future__ import annotations

import json

import azure.functions as func

from handlers.health import check_health

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    report = check_health()
    body = json.dumps(report.public_body())
    return func.HttpResponse(body, status_code=report.status_code, mimetype="application/json")
