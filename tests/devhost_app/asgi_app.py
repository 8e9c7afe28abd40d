"""The devhost test app's ASGI variant (loaded with script_file="asgi_app.py"): an
AsgiFunctionApp, like the product's HTTP API, with a bare ASGI callable (no framework)."""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = {
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode(),
        "body": body.decode(),
        "invocation_id": scope.get("azure_functions.invocation_id"),
    }
    status = 404 if scope["path"].endswith("/missing") else 200
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


app = func.AsgiFunctionApp(app=asgi, http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("asgi_tick")
@app.schedule(schedule="0 0 0 1 1 *", arg_name="timer")
def asgi_tick(timer: func.TimerRequest) -> None:
    pass
