"""`python -m twin serve --estate estates/demo.yaml [--env-file twin.env]`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from twin.estate import EstateError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twin", description="The local Azure twin.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the twin until interrupted")
    serve.add_argument("--estate", type=Path, default=Path("estates/demo.yaml"))
    serve.add_argument("--env-file", type=Path, help="write the client environment (KEY=value lines) here")
    serve.add_argument("--workdir", type=Path, default=Path(".twin"), help="certificates and Azurite data")
    serve.add_argument("--no-azurite", action="store_true", help="do not start Azurite (no storage, no backups)")
    serve.add_argument(
        "--azurite-ports",
        help="use an Azurite already running on these blob,queue,table ports (started with the twin's "
        "certs/cert.pem and certs/key.pem from --workdir, --oauth basic, and AZURITE_ACCOUNTS)",
    )
    serve.add_argument("--azurite-accounts", help="that Azurite's AZURITE_ACCOUNTS value ('name:key;...')")
    serve.add_argument(
        "--retry-after",
        help="seconds in the LROs' Retry-After (default: what APIM sends, 60; clients poll that slowly)",
    )
    args = parser.parse_args(argv)
    ports: tuple[int, int, int] | None = None
    if args.azurite_ports:
        try:
            blob, queue, table = (int(p) for p in args.azurite_ports.split(","))
        except ValueError:
            parser.error("--azurite-ports takes three ports: blob,queue,table")
        ports = (blob, queue, table)

    if args.env_file is not None and not args.env_file.parent.is_dir():
        return _refuse(f"--env-file {args.env_file}: the folder {args.env_file.parent} does not exist")

    from twin.server import TwinServer

    # Everything from here to "serving" is start-up: a failure prints one line, stops what
    # was started (Azurite is a separate process and would outlive us) and exits 2.
    server: TwinServer | None = None
    # A SIGTERM while starting must stop Azurite too: turn it into the same interruption as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server = TwinServer(
            args.estate,
            args.workdir,
            with_azurite=not args.no_azurite,
            azurite_ports=ports,
            azurite_accounts=args.azurite_accounts,
            retry_after=args.retry_after,
        )
        server.start()
        for name, url in sorted(server.state.urls.items()):
            print(f"{name:>12}  {url}")
        print(f"{'CA':>12}  {server.certs.ca}")
        if args.env_file:
            server.write_env_file(args.env_file)
            print(f"{'env file':>12}  {args.env_file}  (source it: set -a; . {args.env_file}; set +a)")
    except (Exception, KeyboardInterrupt) as error:
        if server is not None:
            server.stop()
        return _refuse(_one_line(error))
    print("serving; Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted while starting"
    text = " ".join(str(error).split())
    # Our own errors say what is wrong; anything else is named by its type so it can be found.
    if isinstance(error, EstateError | RuntimeError | ValueError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _refuse(message: str) -> int:
    print(f"twin: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
