"""Throw-away certificates for the TLS tests, made with the openssl command."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(d: Path) -> tuple[Path, Path]:
    ca, key = d / "ca.pem", d / "ca.key"
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(ca), "-days", "2", "-subj", "/CN=bootherd test CA")
    return ca, key


def issue(d: Path, ca: tuple[Path, Path], cn: str, ip: str | None = None) -> tuple[Path, Path]:
    """A certificate for `cn` (and IP SAN `ip`) signed by `ca`: (cert, key)."""
    cert, key, csr = d / f"{cn}.pem", d / f"{cn}.key", d / f"{cn}.csr"
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    ext = d / f"{cn}.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\n" if ip else "basicConstraints=CA:FALSE\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key
