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
