"""A test app for devhost: one function of each trigger kind, recording what it receives.

Not the product: tests/devhost/ load it to test the local Functions host generically. Each
invocation appends one JSON line to the file the DEVHOST_RECORDS setting names.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
_lock = threading.Lock()


def record(function: str, **fields: object) -> None:
    line = json.dumps({"function": function, **fields}, default=str)
    with _lock, open(os.environ["DEVHOST_RECORDS"], "a", encoding="utf-8") as out:
        out.write(line + "\n")


@app.function_name("tick")
@app.schedule(schedule="%TICK_SCHEDULE%", arg_name="timer", run_on_startup=False)
def tick(timer: func.TimerRequest) -> None:
    time.sleep(float(os.environ.get("TICK_SLEEP") or 0))
    record("tick", past_due=timer.past_due, status=timer.schedule_status, type=type(timer).__module__)


@app.function_name("work")
@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="DevhostStorage")
@app.queue_output(arg_name="out", queue_name="%OUT_QUEUE%", connection="DevhostStorage")
def work(msg: func.QueueMessage, out: func.Out[str]) -> None:
    body = msg.get_body().decode("utf-8")
    record(
        "work",
        id=msg.id,
        body=body,
        dequeue_count=msg.dequeue_count,
        insertion_time=msg.insertion_time,
        expiration_time=msg.expiration_time,
        pop_receipt=bool(msg.pop_receipt),
    )
    if body.startswith("fail"):
        raise RuntimeError(f"asked to fail: {body}")
    if body.startswith("sleep:"):
        time.sleep(float(body.removeprefix("sleep:")))
    if body.startswith("forward:"):
        out.set(body.removeprefix("forward:"))


@app.function_name("events")
@app.event_grid_trigger(arg_name="event")
def events(event: func.EventGridEvent) -> None:
    record(
        "events",
        id=event.id,
        event_type=event.event_type,
        subject=event.subject,
        topic=event.topic,
        data=event.get_json(),
        event_time=event.event_time,
        data_version=event.data_version,
    )
    if event.subject == "fail":
        raise RuntimeError("asked to fail")


@app.function_name("hello")
@app.route(route="hello/{name}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def hello(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(f"hello {req.route_params['name']}", mimetype="text/plain")


@app.function_name("items_new")
@app.route(route="items/new", methods=["GET"])
def items_new(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("literal")


@app.function_name("items_any")
@app.route(route="items/{name}", methods=["GET"])
def items_any(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(f"parameter {req.route_params['name']}")


@app.function_name("items_by_id")
@app.route(route="items/{id:int}", methods=["GET"])
def items_by_id(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(f"constrained {req.route_params['id']}")


@app.function_name("files")
@app.route(route="files/{*path}", methods=["GET"])
def files(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(f"catch-all {req.route_params.get('path', '')}")


@app.function_name("secret")
@app.route(route="secret", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def secret(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("admin only")


@app.function_name("echo")
@app.route(route="echo/{kind}", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def echo(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    await asyncio.sleep(0)
    body = {
        "method": req.method,
        "url": req.url,
        "header": req.headers.get("x-test"),
        "params": dict(req.params),
        "route_params": dict(req.route_params),
        "body": req.get_body().decode("utf-8"),
        "invocation_id": context.invocation_id,
        "function_name": context.function_name,
    }
    return func.HttpResponse(json.dumps(body), status_code=201, mimetype="application/json", headers={"X-Echo": "yes"})


@app.function_name("slow")
@app.route(route="slow", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def slow(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(float(req.params.get("seconds", "5")))
    return func.HttpResponse("finished")


@app.function_name("crash")
@app.route(route="crash", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def crash(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("a stack trace the caller must never see")
