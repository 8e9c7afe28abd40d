"""`python -m twin serve` as a person runs it: prints where it listens, writes the env file,
serves until stopped, and refuses a bad estate with a clear message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_serve_prints_urls_and_writes_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "twin.env"
    process = subprocess.Popen(
        [sys.executable, "-m", "twin", "serve", "--estate", "estates/test.yaml", "--env-file", str(env_file),
         "--workdir", str(tmp_path / "work"), "--no-azurite"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if "serving" in line or not line:
                break
        output = "".join(lines)
        assert "serving; Ctrl-C stops" in output, output
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_AUTHORITY_HOST",
                    "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "APIMR_CLOUD", "APIMR_ARM_ENDPOINT"):  # fmt: skip
            assert values.get(key), key
        assert values["APIMR_ARM_ENDPOINT"] in output
        answer = requests.get(
            values["APIMR_ARM_ENDPOINT"] + "/metadata/endpoints?api-version=2022-09-01",
            verify=values["REQUESTS_CA_BUNDLE"],
            timeout=10,
        )
        assert answer.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_bad_estate_is_refused_clearly(tmp_path: Path) -> None:
    estate = tmp_path / "bad.yaml"
    estate.write_text("subscriptions:\n  - id: not-a-guid\n")
    result = subprocess.run(
        [sys.executable, "-m", "twin", "serve", "--estate", str(estate), "--workdir", str(tmp_path), "--no-azurite"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "subscriptions[0].id: a subscription id (GUID) is required" in result.stderr


def test_twin_uses_an_azurite_somebody_else_runs(tmp_path: Path) -> None:
    from azure.identity import ClientSecretCredential
    from azure.storage.blob import BlobServiceClient

    from twin.azurite import Azurite
    from twin.certs import make_certs
    from twin.server import TwinServer

    certs = make_certs(tmp_path / "certs")
    own = Azurite(tmp_path / "own", certs, ["apimrstate", "apimrbackups"])
    own.start()
    try:
        accounts = ";".join(f"{name}:{key}" for name, key in own.keys.items())
        ports = (own.ports["blob"], own.ports["queue"], own.ports["table"])
        server = TwinServer(ROOT / "estates" / "test.yaml", tmp_path, azurite_ports=ports, azurite_accounts=accounts)
        server.start()
        try:
            env = server.env()
            credential = ClientSecretCredential(
                env["AZURE_TENANT_ID"], env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"],
                authority=env["AZURE_AUTHORITY_HOST"], disable_instance_discovery=True, connection_verify=str(certs.ca),
            )  # fmt: skip
            blobs = BlobServiceClient(
                env["APIMR_STORAGE_BLOB_ENDPOINT"], credential=credential, connection_verify=str(certs.ca)
            )
            blobs.create_container("external")
            assert [c.name for c in blobs.list_containers()] == ["external"]
        finally:
            server.stop()
        assert own.process is not None
        assert own.process.poll() is None  # the twin left somebody else's Azurite running
    finally:
        own.stop()


def test_external_azurite_missing_an_estate_account_is_refused(tmp_path: Path) -> None:
    from twin.azurite import free_port
    from twin.server import TwinServer

    with pytest.raises(ValueError, match="name:key"):
        TwinServer(ROOT / "estates" / "test.yaml", tmp_path, azurite_ports=(1, 2, 3), azurite_accounts="broken")
    server = TwinServer(
        ROOT / "estates" / "test.yaml", tmp_path, azurite_ports=(free_port(), free_port(), free_port()),
        azurite_accounts="apimrstate:a2V5",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="lacks the estate's storage accounts \\['apimrbackups'\\]"):
        server.start()


# -- start-up failures (issue 10, item 5): one line on stderr, exit 2, nothing left running ------------


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (e.g. an Azurite's --location)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def serve_failing(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "twin", "serve", "--estate", "estates/test.yaml",
         "--workdir", str(tmp_path / "work"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("twin: ")
    return result


def test_env_file_in_a_missing_folder_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = serve_failing(tmp_path, "--env-file", str(tmp_path / "nowhere" / "twin.env"))
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert processes_mentioning(str(tmp_path / "work")) == []


def test_a_failure_after_azurite_started_stops_azurite(tmp_path: Path) -> None:
    # The env file is written after every service (Azurite included) is up; a directory in its
    # place fails only then.
    (tmp_path / "taken").mkdir()
    result = serve_failing(tmp_path, "--env-file", str(tmp_path / "taken"))
    assert "IsADirectoryError" in result.stderr
    assert (tmp_path / "work" / "azurite").is_dir()  # it did start
    assert processes_mentioning(str(tmp_path / "work" / "azurite")) == []


def test_a_workdir_that_cannot_be_made_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("a file where the workdir should be")
    result = serve_failing(tmp_path, "--no-azurite")
    assert "work" in result.stderr


def test_a_missing_estate_file_is_refused_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twin", "serve", "--estate", str(tmp_path / "none.yaml"), "--no-azurite",
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot read the estate" in result.stderr
