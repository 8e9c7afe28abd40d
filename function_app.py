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

from handlers.asgi import AsgiApp, LazyAsgiApp
from handlers.backup import BackupRequest, run_backups
from handlers.context import AppContext
from handlers.events import GridEvent, handle_event, parse_data
from handlers.health import check_health
from handlers.restore_test import RestoreTestRequest, run_restore_tests
from handlers.sweep import SweepRequest
from handlers.sweep import sweep as run_sweep
from handlers.work import QueueDelivery, handle_poison, handle_work


@functools.cache
def app_context() -> AppContext:
    """The composition root, built once per process (cold start); a settings error is not
    cached, so the next invocation tries again."""
    return AppContext.load()


def _build_api() -> AsgiApp:
    # Imported here, on the first HTTP API request: a timer's or a queue's cold start does
    # not pay for FastAPI (handlers/asgi.py).
    from handlers.api import create_api

    return create_api(app_context)


api = LazyAsgiApp(_build_api)
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    report = check_health()
    body = json.dumps(report.public_body())
    return func.HttpResponse(body, status_code=report.status_code, mimetype="application/json")


# The work queue lives in the product's storage account (APIMR_STORAGE_*), which is the
# account AzureWebJobsStorage names (identity-based: AzureWebJobsStorage__accountName).
STORAGE_CONNECTION = "AzureWebJobsStorage"


def _delivery(msg: func.QueueMessage, queue: str) -> QueueDelivery:
    return QueueDelivery(body=msg.get_body(), message_id=msg.id or "", dequeue_count=msg.dequeue_count, queue=queue)


def _grid_event(event: func.EventGridEvent | func.CloudEvent) -> GridEvent:
    if isinstance(event, func.CloudEvent):  # CloudEvents 1.0 schema: same type, source and data
        return GridEvent(
            event.id or "", event.type or "", event.subject or "", event.source or "", event.time, event.get_json()
        )
    return GridEvent(
        event.id or "",
        event.event_type or "",
        event.subject or "",
        event.topic or "",
        event.event_time,
        parse_data(event.get_json()),
        event.data_version or "",
    )


@app.function_name("sweep")
@app.timer_trigger(schedule="%APIMR_SWEEP_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def sweep(timer: func.TimerRequest) -> None:
    await run_sweep(SweepRequest(past_due=timer.past_due), app_context().sweep_deps())


@app.function_name("work")
@app.queue_trigger(arg_name="msg", queue_name="%APIMR_WORK_QUEUE%", connection=STORAGE_CONNECTION)
async def work(msg: func.QueueMessage) -> None:
    context = app_context()
    await handle_work(_delivery(msg, context.settings.work_queue), context.work_deps())


@app.function_name("poison")
@app.queue_trigger(arg_name="msg", queue_name="%APIMR_WORK_QUEUE%-poison", connection=STORAGE_CONNECTION)
async def poison(msg: func.QueueMessage) -> None:
    context = app_context()
    await handle_poison(_delivery(msg, context.settings.poison_queue), context.work_deps())


@app.function_name("events")
@app.event_grid_trigger(arg_name="event")
async def events(event: func.EventGridEvent) -> None:
    await handle_event(_grid_event(event), app_context().events_deps())


@app.function_name("backup")
@app.timer_trigger(schedule="%APIMR_BACKUP_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def backup(timer: func.TimerRequest) -> None:
    await run_backups(BackupRequest(), app_context().backup_deps())


@app.function_name("restore_test")
@app.timer_trigger(schedule="%APIMR_RESTORE_TEST_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def restore_test(timer: func.TimerRequest) -> None:
    await run_restore_tests(RestoreTestRequest(), app_context().backup_deps())
