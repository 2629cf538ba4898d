"""TMCD over TLS, as Emulab's tmcc asks for it.

A client that wants TLS writes the 17 plain bytes `ISPEAKSSL_TMCDV10`, then
starts the handshake on the same connection; the request and the reply
travel inside TLS, and the server ends the reply with close_notify and the
close.  The request is the plaintext of the client's first TLS record (tmcd
reads it with one SSL_read; tmcc cannot half-close inside TLS).

`TlsSession` is sans-IO (ssl.SSLObject over memory BIOs): the transport feeds
it the bytes it reads and writes out what it returns, so bytes of the
handshake that arrived together with the 17-byte tag are never lost.
"""

from __future__ import annotations

import ssl
from typing import Any

from ..config import ConfigError


def server_context(cfg: Any) -> ssl.SSLContext | None:
    """The TLS context of `tmcd.tls_*`, or None when TLS is not configured.

    Raises ConfigError naming the key whose file cannot be used."""
    t = cfg.tmcd
    if not t.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.path(t.tls_cert)), str(cfg.path(t.tls_key)))
    except FileNotFoundError as e:
        raise ConfigError(f"tmcd.tls_cert / tmcd.tls_key: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tmcd.tls_cert / tmcd.tls_key: cannot load the certificate "
                          f"and key: {e}") from None
    if t.tls_client_ca and t.tls_client_certs != "none":
        try:
            ctx.load_verify_locations(cafile=str(cfg.path(t.tls_client_ca)))
        except (FileNotFoundError, ssl.SSLError, OSError) as e:
            raise ConfigError(f"tmcd.tls_client_ca: cannot load: {e}") from None
        ctx.verify_mode = (ssl.CERT_REQUIRED if t.tls_client_certs == "required"
                           else ssl.CERT_OPTIONAL)
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None,
                   server_name_check: bool = True) -> ssl.SSLContext:
    """What bootherd's tmcc uses: verify the server against `ca` (the system's
    CAs without one), present `cert`/`key` when given."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = server_name_check
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def common_name(peercert: dict | None) -> str | None:
    """The subject CN of a certificate as ssl.getpeercert() returns it."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


class TlsSession:
    """One server-side TLS connection over memory BIOs."""

    def __init__(self, ctx: ssl.SSLContext):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False
        self.peer_cn: str | None = None
        self.closed_by_peer = False

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the wire; return the plaintext now readable (b'' if
        none yet).  Raises ssl.SSLError on a failed handshake or bad record."""
        if data:
            self.incoming.write(data)
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
            self.peer_cn = common_name(self.obj.getpeercert())
        out = []
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed_by_peer = True
                break
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)

    def pending(self) -> bytes:
        """Bytes to send to the peer (handshake, records, close_notify)."""
        return self.outgoing.read()

    def send(self, plaintext: bytes) -> bytes:
        if plaintext:
            self.obj.write(plaintext)
        return self.pending()

    def close(self) -> bytes:
        """close_notify; the peer's answer is not waited for (the close follows)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        return self.pending()
