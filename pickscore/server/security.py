"""The credentials of the gRPC port, each re-read when its files change: rotation needs no restart.

    tls = ServerTls.from_settings(settings)     # None without --tls-cert; a bad file: ValueError/OSError naming it
    grpc_server.add_secure_port(address, tls.credentials())
    tls.reload()                                # SIGHUP: re-read now

    tokens = TokenSet.from_settings(settings)   # --auth-token and the lines of --auth-token-file
    tokens.accepts("s3cret")                    # constant time against every accepted token

TLS: gRPC asks ``ServerTls`` before every new connection's handshake whether the certificate changed (dynamic
server credentials); it answers from a ``stat`` of the files, and reads, checks and hands over new files only when
they changed. Connections already open keep the certificate they were made with. Tokens: the file is stat'ed at most
once per ``interval_s`` on the request path and read only when it changed. A reload that finds bad files (a
certificate that does not match its key, an empty or unreadable token file) logs an error and keeps what was
loaded before: a broken rotation never opens the server, nor takes its certificate away.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from pickscore.server.settings import Settings

log = logging.getLogger("pickscore.server")
# After a failed read, how long until the files are read again even if they did not change (a write may have
# been seen half done in the same clock tick as its end).
RETRY_S = 1.0

Signature = tuple[tuple[int, int, int, int] | str, ...]


def _signature(paths: Sequence[str]) -> Signature:
    """What changes when a file is rewritten or replaced (a Kubernetes Secret volume swaps a symlink)."""
    out: list[tuple[int, int, int, int] | str] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            out.append(type(e).__name__)
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(out)


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e


def _encrypted_key() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted PEM key (the file's permissions protect it)")


class ServerTls:
    """The server's certificate and key, and the CA bundle client certificates must chain to (mutual TLS)."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = [p for p in (cert, key, client_ca) if p]
        self._lock = threading.Lock()
        self._signature: Signature | None = _signature(self._paths)
        self._files = self._read()  # at start a bad file is an error, not a log line
        self._initial = self._configuration(self._files)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._retry_at = 0.0
        self._generation = 0  # files loaded since start: the HTTP port rebuilds its context when it moves
        self._http: tuple[int, ssl.SSLContext] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """For ``add_secure_port``: asks this object for the current certificate before each handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP port: the files as an SSLContext whose handshakes pick up rotated files too (a new
        certificate from the next connection on; a new client CA bundle needs a restart on this port)."""
        outer = self._ssl(self._files)
        self._http = (self._generation, outer)
        outer.sni_callback = self._swap  # called on every ClientHello, with or without a server name
        return outer

    def _swap(self, sock: ssl.SSLObject, server_name: str | None, outer: ssl.SSLContext) -> None:
        try:
            with self._lock:
                self._load_if_changed()
                generation, files = self._generation, self._files
            if self._http is None or self._http[0] != generation:
                self._http = (generation, self._ssl(files))
            sock.context = self._http[1]
        except Exception:  # never fail a handshake over a reload: keep the current certificate
            log.exception("TLS reload failed; serving the previous certificate")

    def _ssl(self, files: tuple[bytes, bytes, bytes | None]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key, password=_encrypted_key)
        if files[2] is not None:
            context.load_verify_locations(cadata=files[2].decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def reload(self) -> bool:
        """Re-read the files now (SIGHUP); True when they changed. Bad files are logged and the old ones kept."""
        with self._lock:
            changed = self._load()
        log.info("TLS files re-read", extra={"changed": changed, "tls_cert": self.cert})
        return changed

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback, on its own threads, before every new connection: a new configuration, or None."""
        try:
            with self._lock:
                if self._pending is None:  # else a reload already has one waiting for this connection
                    self._load_if_changed()
                pending, self._pending = self._pending, None
            return pending
        except Exception:  # never fail a handshake over a reload: keep the current certificate
            log.exception("TLS reload failed; serving the previous certificate")
            return None

    def _load_if_changed(self) -> None:
        """With the lock held: re-read the files when their stat says they changed (not sooner than RETRY_S after a
        failed read); both ports' handshakes call this."""
        if time.monotonic() >= self._retry_at and _signature(self._paths) != self._signature:
            self._load()

    def _load(self) -> bool:
        signature = _signature(self._paths)  # before reading: a write after this is seen at the next connection
        try:
            files = self._read()
        except (OSError, ValueError) as e:
            self._signature = None
            self._retry_at = time.monotonic() + RETRY_S
            log.error(f"TLS files not reloaded, serving the previous certificate: {e}")
            return False
        self._signature = signature
        if files == self._files:
            return False
        self._files = files
        self._generation += 1
        self._pending = self._configuration(files)
        log.info("TLS certificate reloaded; new connections use it", extra={"tls_cert": self.cert})
        return True

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        """The files' bytes, checked: the key matches the certificate, the CA bundle holds certificates."""
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key, password=_encrypted_key)
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(
                f"--tls-cert {self.cert} and --tls-key {self.key}: not a PEM certificate chain "
                f"and its private key ({e})"
            ) from None
        if (cert, key) != (_read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")):
            raise ValueError(f"--tls-cert {self.cert} or --tls-key {self.key} changed while being read; will retry")
        ca = None
        if self.client_ca:
            ca = _read(self.client_ca, "--tls-client-ca")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(
                    f"--tls-client-ca {self.client_ca}: not a PEM bundle of CA certificates ({e})"
                ) from None
        return cert, key, ca

    @staticmethod
    def _configuration(files: tuple[bytes, bytes, bytes | None]) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = files
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class TokenSet:
    """The accepted bearer tokens: ``token`` and the lines of ``file`` (blank lines and # comments skipped).

    ``required`` when either is given. The file is stat'ed at most once per ``interval_s`` (by the request
    that finds the interval over) and read again only when it changed.
    """

    def __init__(
        self, token: str = "", file: str = "", interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        self.token, self.file, self.interval_s, self._clock = token, file, interval_s, clock
        self.required = bool(token or file)
        self._signature: Signature | None = _signature([file]) if file else None
        self._checked = clock()
        self._tokens = self._with_token(self._read()) if file else self._with_token(frozenset())

    @classmethod
    def from_settings(cls, settings: Settings, interval_s: float = 1.0) -> TokenSet:
        return cls(settings.auth_token, settings.auth_token_file, interval_s)

    def __len__(self) -> int:
        return len(self._tokens)

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted tokens; the time taken does not depend on which nearly matched."""
        self._refresh()
        given = token.encode()
        ok = False
        for accepted in self._tokens:  # every one compared, no early exit
            ok |= hmac.compare_digest(given, accepted)
        return ok

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP); True when the set changed. A bad file is logged and the old set kept."""
        if not self.file:
            return False
        changed = self._load()
        log.info("auth token file re-read", extra={"changed": changed, "auth_token_file": self.file})
        return changed

    def _refresh(self) -> None:
        if not self.file or self._clock() - self._checked < self.interval_s:
            return
        self._checked = self._clock()
        if _signature([self.file]) != self._signature:
            self._load()

    def _load(self) -> bool:
        signature = _signature([self.file])
        try:
            tokens = self._with_token(self._read())
        except (OSError, ValueError) as e:
            self._signature = None  # read again at the next interval, changed or not
            log.error(f"auth tokens not reloaded, the previous {len(self._tokens)} still accepted: {e}")
            return False
        self._signature = signature
        if tokens == self._tokens:
            return False
        self._tokens = tokens
        log.info("auth tokens reloaded", extra={"tokens": len(tokens), "auth_token_file": self.file})
        return True

    def _read(self) -> frozenset[bytes]:
        text = _read(self.file, "--auth-token-file")
        try:
            lines = text.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--auth-token-file {self.file}: not UTF-8 text") from None
        tokens = frozenset(line.encode() for line in map(str.strip, lines) if line and not line.startswith("#"))
        if not tokens:
            raise ValueError(
                f"--auth-token-file {self.file} holds no token (one per line; blank lines and # comments are skipped)"
            )
        return tokens

    def _with_token(self, tokens: frozenset[bytes]) -> frozenset[bytes]:
        return tokens | {self.token.encode()} if self.token else tokens
