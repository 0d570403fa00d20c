"""The ``serve`` and ``health`` subcommands."""

from __future__ import annotations

import argparse
import sys

from pickscore.server.settings import Settings
from pickscore.tls import add_client_tls_flags, channel_credentials, wants_tls


def add_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the scoring server (gRPC and HTTP)",
        description="Serve pickscore.v1.ScoringService, the KServe v2 (Triton) inference protocol, gRPC health "
        "and reflection on --port; KServe v2 REST, /v1/score, /v1/rank and /openapi.json on --http-port; and "
        "Prometheus metrics on --metrics-port. Every flag can also be set "
        "by the PICKSCORE_* environment variable named in its help; flags win. SIGTERM drains: "
        "NOT_SERVING, new requests refused with UNAVAILABLE, admitted ones finished, exit 0.",
    )
    Settings.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    health = sub.add_parser(
        "health",
        help="check a server's gRPC health (container health checks)",
        description="Ask a server's grpc.health.v1 service and print its status; exit 0 when SERVING, 1 otherwise "
        "(NOT_SERVING while warming up or draining, unreachable, unknown service).",
    )
    health.add_argument(
        "--server", default="localhost:8001", metavar="HOST:PORT", help="server address (default localhost:8001)"
    )
    health.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help='health service to ask: "" (default) is readiness, SERVING only while requests are '
        'taken; "liveness" is SERVING whenever the process answers, through warm-up and drain',
    )
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline (default 5)")
    add_client_tls_flags(health.add_argument_group("TLS (a server started with --tls-cert)"))
    health.set_defaults(func=_cmd_health)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_namespace(args)
    if settings.front_ends:  # this process owns the device and runs the front ends
        from pickscore.server.front_ends import serve_front_ends

        return serve_front_ends(settings)
    from pickscore.server.app import serve

    return serve(settings)


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if wants_tls(args):
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.server, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.server)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
