"""A locally made CA and one leaf certificate for 127.0.0.1/localhost (trustme)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    ca: Path  # PEM of the CA: what clients trust (REQUESTS_CA_BUNDLE / SSL_CERT_FILE)
    cert: Path  # leaf certificate chain (PEM)
    key: Path  # leaf private key (PEM)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def make_certs(directory: Path) -> CertFiles:
    """Create (or reuse) the CA and leaf files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    ca = trustme.CA(organization_name="apim-remediator twin")
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.private_key_pem.write_to_path(str(files.key))
    with files.cert.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    return files
