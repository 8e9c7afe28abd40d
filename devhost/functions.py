"""The app as the host sees it: the module loaded from the app directory, each function's
bindings read from its own metadata (`app.get_functions()`, `get_raw_bindings()`), `%SETTING%`
references resolved, and one invocation of a function with real `azure.functions` objects."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import inspect
import json
import logging
import re
import sys
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import azure.functions as func
from azure.functions._abc import RetryContext, RpcException, TraceContext
from azure.functions.decorators.function_app import FunctionRegister
from azure.functions.queue import QueueMessage

from devhost.config import ConfigError, resolve
from devhost.ncrontab import CronError, CronSchedule
from devhost.routing import RouteTemplate

log = logging.getLogger("devhost")

TRIGGERS = ("httpTrigger", "timerTrigger", "queueTrigger", "eventGridTrigger")
OUTPUTS = ("http", "queue")
# Binding properties that are names or kinds, never `%SETTING%` templates.
NOT_RESOLVED = frozenset({"name", "type", "direction", "dataType", "authLevel", "methods"})
QUEUE_NAME = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
DEFAULT_CONNECTION = "AzureWebJobsStorage"


@dataclass(frozen=True)
class FunctionSpec:
    """One function: its trigger binding and output bindings (settings resolved) and code."""

    name: str
    trigger: Mapping[str, Any]
    outputs: tuple[Mapping[str, Any], ...]
    user_function: Callable[..., Any]
    parameters: tuple[str, ...]
    annotations: Mapping[str, Any]

    @property
    def trigger_type(self) -> str:
        return str(self.trigger["type"])

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.user_function)

    @property
    def schedule(self) -> CronSchedule:
        return CronSchedule.parse(str(self.trigger["schedule"]))

    @property
    def route(self) -> RouteTemplate:
        return RouteTemplate.parse(str(self.trigger.get("route") or self.name))

    @property
    def methods(self) -> frozenset[str]:
        methods = self.trigger.get("methods")
        return frozenset(str(m).upper() for m in methods) if methods else frozenset()

    @property
    def auth_level(self) -> str:
        return str(self.trigger.get("authLevel") or "FUNCTION").upper()

    @property
    def queue_name(self) -> str:
        return str(self.trigger["queueName"])

    @property
    def connection(self) -> str:
        return str(self.trigger.get("connection") or DEFAULT_CONNECTION)


@dataclass
class LoadedApp:
    module: ModuleType
    functions: dict[str, FunctionSpec]
    script: Path


def _find_app(module: ModuleType, script: Path) -> FunctionRegister:
    apps = [value for value in vars(module).values() if isinstance(value, FunctionRegister)]
    if not apps:
        raise ConfigError(f"{script}: no FunctionApp (or AsgiFunctionApp) instance at module level")
    if len(apps) > 1:
        raise ConfigError(f"{script}: {len(apps)} FunctionApp instances at module level; the host indexes exactly one")
    return apps[0]


@contextlib.contextmanager
def _importable(app_dir: Path) -> Iterator[None]:
    # The worker puts the app directory first on sys.path; the app's own packages import from it.
    entry = str(app_dir)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def load_module(script: Path) -> ModuleType:
    """Load the app's script afresh, as a new worker process would (indexing is once per app)."""
    if not script.is_file():
        raise ConfigError(f"{script}: the app's script file does not exist")
    name = script.stem
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{script}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        with _importable(script.parent):
            spec.loader.exec_module(module)
    finally:
        # Leave the interpreter's module table as it was: tests import the real app by name.
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
    return module


def _resolve_binding(raw: Mapping[str, Any], settings: Mapping[str, str], where: str) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and key not in NOT_RESOLVED:
            resolved[key] = resolve(value, settings, f"{where} property '{key}'")
        else:
            resolved[key] = value
    return resolved


def _annotations(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an unresolvable annotation only loses the str/bytes shortcut
        return {}


def build_spec(fn: Any, settings: Mapping[str, str]) -> FunctionSpec:
    """A FunctionSpec from one `azure.functions` Function object and the app settings."""
    name = str(fn.get_function_name())
    bindings = [json.loads(raw) for raw in fn.get_raw_bindings()]
    trigger: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = []
    for binding in bindings:
        kind, direction = binding.get("type"), str(binding.get("direction", "")).upper()
        where = f"function '{name}' binding '{binding.get('name')}' ({kind})"
        if direction == "IN" and kind in TRIGGERS:
            if trigger is not None:
                raise ConfigError(f"function '{name}' has more than one trigger")
            trigger = _resolve_binding(binding, settings, where)
        elif direction == "OUT" and kind in OUTPUTS:
            outputs.append(_resolve_binding(binding, settings, where))
        else:
            raise ConfigError(f"{where}, direction {direction}: devhost does not support this binding")
    if trigger is None:
        raise ConfigError(f"function '{name}' has no trigger devhost supports ({', '.join(TRIGGERS)})")
    user_function = fn.get_user_function()
    parameters = tuple(inspect.signature(user_function).parameters)
    bound = {str(trigger["name"])} | {str(o["name"]) for o in outputs} | {"context"}
    unbound = [p for p in parameters if p not in bound]
    if unbound:
        raise ConfigError(f"function '{name}': parameters {unbound} have no binding")
    spec = FunctionSpec(name, trigger, tuple(outputs), user_function, parameters, _annotations(user_function))
    _validate(spec)
    return spec


def _validate(spec: FunctionSpec) -> None:
    where = f"function '{spec.name}'"
    try:
        if spec.trigger_type == "timerTrigger":
            spec.schedule.next_after(datetime.now(UTC))
        if spec.trigger_type == "httpTrigger":
            _ = spec.route
    except CronError as error:
        raise ConfigError(f"{where}: schedule {error}") from error
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
    queues = [spec.queue_name] if spec.trigger_type == "queueTrigger" else []
    queues += [str(o.get("queueName", "")) for o in spec.outputs if o["type"] == "queue"]
    for queue in queues:
        if not QUEUE_NAME.match(queue):
            raise ConfigError(f"{where}: {queue!r} is not a valid queue name (3-63 lowercase letters, digits, '-')")


def load_app(app_dir: Path, script_file: str, settings: Mapping[str, str]) -> LoadedApp:
    """Load the app module and read every function's metadata; ConfigError names what is wrong."""
    script = (app_dir / script_file).resolve()
    module = load_module(script)
    app = _find_app(module, script)
    functions: dict[str, FunctionSpec] = {}
    for fn in app.get_functions():
        spec = build_spec(fn, settings)
        if spec.name.lower() in (n.lower() for n in functions):
            raise ConfigError(f"{script}: two functions are named '{spec.name}'")
        functions[spec.name] = spec
    return LoadedApp(module, functions, script)


# -- invocation ------------------------------------------------------------------------------


class _TraceContext(TraceContext):
    def __init__(self) -> None:
        self._parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(RetryContext):
    def __init__(self, retry_count: int, max_retry_count: int) -> None:
        self._count, self._max = retry_count, max_retry_count

    @property
    def retry_count(self) -> int:
        return self._count

    @property
    def max_retry_count(self) -> int:
        return self._max

    @property
    def exception(self) -> RpcException:
        raise AttributeError("no exception: the host's retry policies are not used by devhost")


class InvocationContext(func.Context):
    """The `context` argument: invocation id, function name and directory, trace context."""

    def __init__(self, function_name: str, function_directory: str, invocation_id: str) -> None:
        self._name, self._directory, self._id = function_name, function_directory, invocation_id
        self._local = threading.local()
        self._local.invocation_id = invocation_id
        self._trace = _TraceContext()
        self._retry = _RetryContext(0, 0)

    @property
    def invocation_id(self) -> str:
        return self._id

    @property
    def thread_local_storage(self) -> Any:
        return self._local

    @property
    def function_name(self) -> str:
        return self._name

    @property
    def function_directory(self) -> str:
        return self._directory

    @property
    def trace_context(self) -> TraceContext:
        return self._trace

    @property
    def retry_context(self) -> RetryContext:
        return self._retry


class OutValue(func.Out[Any]):
    """The concrete `func.Out` the worker passes for an output binding parameter."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


@dataclass
class InvocationResult:
    function: str
    invocation_id: str
    reason: str
    outcome: str  # "Succeeded" | "Failed" | "TimedOut"
    duration: float
    return_value: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome == "Succeeded"


def queue_message(
    *,
    id: str,
    body: bytes,
    dequeue_count: int,
    insertion_time: datetime | None = None,
    expiration_time: datetime | None = None,
    time_next_visible: datetime | None = None,
    pop_receipt: str | None = None,
) -> func.QueueMessage:
    """The worker's concrete queue message (azure.functions.queue.QueueMessage)."""
    message: func.QueueMessage = QueueMessage(  # type: ignore[no-untyped-call]
        id=id,
        body=body,
        dequeue_count=dequeue_count,
        insertion_time=insertion_time,
        expiration_time=expiration_time,
        time_next_visible=time_next_visible,
        pop_receipt=pop_receipt,
    )
    return message


def _trigger_argument(spec: FunctionSpec, value: Any) -> Any:
    # The worker hands a queue message to a `str` / `bytes` parameter as its body.
    annotation = spec.annotations.get(str(spec.trigger["name"]))
    if isinstance(value, func.QueueMessage) and annotation in (str, bytes):
        body = value.get_body()
        return body.decode("utf-8") if annotation is str else body
    return value


async def invoke(
    spec: FunctionSpec,
    trigger_value: Any,
    *,
    reason: str,
    limit: float | None,
    executor: Executor,
    function_directory: str,
) -> InvocationResult:
    """Call the function once as the worker would: async functions on the host's loop,
    sync ones on the thread pool; log start and end with the invocation id and duration."""
    invocation_id = str(uuid.uuid4())
    context = InvocationContext(spec.name, function_directory, invocation_id)
    outs = {str(o["name"]): OutValue() for o in spec.outputs if o["name"] != "$return"}
    arguments: dict[str, Any] = {}
    for parameter in spec.parameters:
        if parameter == spec.trigger["name"]:
            arguments[parameter] = _trigger_argument(spec, trigger_value)
        elif parameter in outs:
            arguments[parameter] = outs[parameter]
        else:
            arguments[parameter] = context
    log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, invocation_id)
    started = time.monotonic()
    result = InvocationResult(spec.name, invocation_id, reason, "Succeeded", 0.0)
    try:
        if spec.is_async:
            call: Any = spec.user_function(**arguments)
        else:
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(executor, functools.partial(_run_sync, spec, context, arguments))
        result.return_value = await asyncio.wait_for(call, limit)
    except TimeoutError as error:
        result.outcome, result.error = "TimedOut", error
    except Exception as error:  # the host records any failure of user code
        result.outcome, result.error = "Failed", error
    result.duration = time.monotonic() - started
    result.outputs = {name: out.get() for name, out in outs.items()}
    _log_result(result, limit)
    return result


def _run_sync(spec: FunctionSpec, context: InvocationContext, arguments: dict[str, Any]) -> Any:
    context.thread_local_storage.invocation_id = context.invocation_id
    return spec.user_function(**arguments)


def _log_result(result: InvocationResult, timeout: float | None) -> None:
    millis = round(result.duration * 1000)
    if result.outcome == "Succeeded":
        log.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)", result.function, result.invocation_id, millis
        )
    elif result.outcome == "TimedOut":
        log.error(
            "Timeout value of %ss exceeded by function 'Functions.%s' (Id: '%s'); a sync function's thread keeps "
            "running (the real host would restart the worker)",
            timeout,
            result.function,
            result.invocation_id,
        )
        log.error(
            "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)", result.function, result.invocation_id, millis
        )
    else:
        log.error(
            "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)",
            result.function,
            result.invocation_id,
            millis,
            exc_info=result.error,
        )
