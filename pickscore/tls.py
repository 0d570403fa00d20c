"""A client's credentials (TLS and bearer tokens), shared by the Python clients and every command that talks to a
server (`score|rank --server`, `batch --server`, `evaluate-models --server`, `health`).

    credentials = channel_credentials(ca="ca.pem", cert="me.pem", key="me.key")   # grpc.ChannelCredentials
    add_client_flags(parser.add_argument_group("server security"))               # --tls*, --token-file, --token
    connection(args)    # the keyword arguments the clients take: tls, tls_ca, tls_cert, tls_key, tls_server_name, token

Neutral ground (grpc and the standard library only): the client and the server's health command both use it
without importing each other.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path

import grpc

PathLike = str | os.PathLike


def read_pem(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{what} {path}: cannot read it ({e.strerror or e})") from e


def channel_credentials(
    ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS from PEM files: ``ca`` the roots to trust (the system's when not given); ``cert`` and ``key`` a
    client certificate, for a server that requires one (mutual TLS)."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together: give both for a client certificate, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "--tls-ca") if ca else None,
        private_key=read_pem(key, "--tls-key") if key else None,
        certificate_chain=read_pem(cert, "--tls-cert") if cert else None,
    )


def ssl_context(
    ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> ssl.SSLContext | None:
    """The same files for an HTTPS client (the reward client, ``batch --server https://...``); None when neither a
    CA nor a client certificate is given (the system's roots, as any HTTPS client)."""
    if not ca and not cert:
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together: give both for a client certificate, or neither")
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        context.load_cert_chain(str(cert), str(key))
    return context


def wants_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key)


def read_token_file(path: PathLike) -> str:
    """The first token in a file (blank lines and # comments skipped)."""
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ValueError(f"--token-file {path} holds no token")


def add_client_flags(group: argparse._ArgumentGroup) -> None:
    """The TLS flags and --token-file / --token."""
    add_client_tls_flags(group)
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="send the first token in FILE (blank lines and # comments skipped) as `authorization: Bearer TOKEN`",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help="send `authorization: Bearer TOKEN` (visible in the process list: prefer --token-file)",
    )


def connection(args: argparse.Namespace) -> dict:
    """The clients' keyword arguments from the flags of ``add_client_flags``."""
    return {
        "tls": args.tls,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
        "token": read_token_file(args.token_file) if args.token_file else args.token,
    }


def add_client_tls_flags(group: argparse._ArgumentGroup, target: str = "--server host") -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, each with its help."""
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect with TLS and trust the server certificates this PEM CA bundle signed "
        "(without it, --tls uses the system's roots)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM client certificate (chain), for a server started with --tls-client-ca (mutual TLS)",
    )
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help=f"check the server certificate for this name instead of the {target} (when connecting by IP, or "
        "from a probe inside the pod to localhost)",
    )
