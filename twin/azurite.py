"""Start and stop Azurite (from node_modules) over HTTPS with OAuth, for the twin.

Azurite's `--oauth basic` checks a bearer token's claims (iss, aud, iat/nbf/exp), not its
signature, so the twin's tokens reach it exactly as Entra tokens reach Azure Storage.
Accounts come from AZURITE_ACCOUNTS: the product's own plus the estate's.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from twin.certs import CertFiles

ROOT = Path(__file__).resolve().parents[1]
AZURITE_JS = ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Azurite:
    workdir: Path
    certs: CertFiles
    accounts: list[str]
    keys: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    external: bool = False  # somebody else runs it: never start or stop it

    @classmethod
    def running(cls, workdir: Path, certs: CertFiles, ports: tuple[int, int, int], accounts: str) -> Azurite:
        """An Azurite already listening (started with the twin's cert and key, `--oauth basic`
        and AZURITE_ACCOUNTS=`accounts`), on blob, queue and table `ports`."""
        keys = {}
        for pair in accounts.split(";"):
            name, sep, key = pair.partition(":")
            if not sep or not name or not key:
                raise ValueError(f"Azurite accounts must look like 'name:key;name2:key2', got {pair!r}")
            keys[name] = key
        found = cls(workdir, certs, list(keys), keys=keys, external=True)
        found.ports = dict(zip(("blob", "queue", "table"), ports, strict=True))
        return found

    def url(self, service: str, account: str) -> str:
        return f"https://127.0.0.1:{self.ports[service]}/{account}"

    def start(self) -> None:
        if self.external:
            for port in self.ports.values():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
                except OSError as error:
                    raise RuntimeError(f"no Azurite listening on 127.0.0.1:{port}: {error}") from error
            return
        if not AZURITE_JS.exists():
            raise RuntimeError(f"Azurite is not installed at {AZURITE_JS}: run `make node` (npm ci)")
        self.keys = {a: base64.b64encode(secrets.token_bytes(32)).decode() for a in self.accounts}
        self.ports = {s: free_port() for s in ("blob", "queue", "table")}
        location = self.workdir / "azurite"
        location.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["AZURITE_ACCOUNTS"] = ";".join(f"{a}:{k}" for a, k in self.keys.items())
        args = [
            "node", str(AZURITE_JS), "--silent", "--disableTelemetry", "--location", str(location),
            "--loose", "--skipApiVersionCheck", "--oauth", "basic",
            "--cert", str(self.certs.cert), "--key", str(self.certs.key),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.ports["blob"]),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.ports["queue"]),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.ports["table"]),
        ]  # fmt: skip
        log = (self.workdir / "azurite.log").open("wb")
        self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        for port in self.ports.values():
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"Azurite exited ({self.process.returncode}); see {self.workdir / 'azurite.log'}"
                    )
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Azurite did not listen on {port} within 30 s") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        if self.external:
            return
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
