"""`python -m devhost start [--app-dir .] [--port 7071] [--settings local.settings.json]`:
the local stand-in for `func start`; prints the functions' URLs and the keys, runs until
interrupted. `python -m devhost.demo` is the demo (`make demo`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from devhost.config import ConfigError
from devhost.host import DevHost, HostKeys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devhost", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the function app until interrupted")
    start.add_argument("--app-dir", type=Path, default=Path("."), help="the app directory (host.json, the script)")
    start.add_argument("--script-file", help="the app's script (default: PYTHON_SCRIPT_FILE_NAME or function_app.py)")
    start.add_argument("--settings", type=Path, help="local settings file (default: APP_DIR/local.settings.json)")
    start.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=7071, help="port (default 7071, as func start; 0 = any free)")
    start.add_argument("--master-key", help="the master key (default: generated)")
    start.add_argument("--function-key", help="the host's default function key (default: generated)")
    start.add_argument("--system-key", help="the eventgrid_extension system key (default: generated)")
    start.add_argument("--max-polling-interval", type=float, help="cap queue polling backoff (seconds)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    generated = HostKeys.generate()
    keys = HostKeys(
        master=args.master_key or generated.master,
        function=args.function_key or generated.function,
        eventgrid=args.system_key or generated.eventgrid,
    )
    host = DevHost(
        args.app_dir,
        script_file=args.script_file,
        settings_file=args.settings,
        host=args.host,
        port=args.port,
        keys=keys,
        max_polling_interval=args.max_polling_interval,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await host.start()
    except ConfigError as error:
        print(f"devhost: {error}", file=sys.stderr)
        return 2
    try:
        print("devhost: a local stand-in for the Azure Functions host (production: `func start` or Azure)")
        print(host.describe())
        print(f"Host ready: {host.base_url}  (Ctrl+C to stop)", flush=True)
        await stopping.wait()
    finally:
        await host.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
