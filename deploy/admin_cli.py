"""`tandem admin`: grow and shrink a running server's pools (tandem.v1.Admin over gRPC).

    tandem admin --server HOST:PORT add --pool prefill [--count N]
    tandem admin --server HOST:PORT remove WORKER_ID [--drain-timeout S]
    tandem admin --server HOST:PORT scale --pool decode --replicas N [--drain-timeout S]
    (--token-file FILE, --tls-ca PEM / --tls, --tls-cert PEM --tls-key PEM for a secured server)

Prints the server's answer as one JSON line (workers added / removed, drained, the
topology after the change). A refused call prints the gRPC status and its message on
stderr and exits with 2 (bad argument, unknown worker, last worker of a pool) or 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict


def add_admin_parser(sub) -> None:
    a = sub.add_parser("admin", help="add, remove or scale workers of a running server")
    a.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT")
    add_connection_flags(a)
    ops = a.add_subparsers(dest="op", required=True)
    add = ops.add_parser("add", help="start workers in a pool")
    add.add_argument("--pool", required=True, choices=["prefill", "decode"])
    add.add_argument("--count", type=int, default=1)
    rm = ops.add_parser("remove", help="drain a worker, then stop it")
    rm.add_argument("worker_id")
    rm.add_argument("--drain-timeout", type=float, default=0.0, metavar="S", help="0: the server's default")
    sc = ops.add_parser("scale", help="grow or shrink a pool to N workers")
    sc.add_argument("--pool", required=True, choices=["prefill", "decode"])
    sc.add_argument("--replicas", type=int, required=True)
    sc.add_argument("--drain-timeout", type=float, default=0.0, metavar="S")


def add_connection_flags(parser) -> None:
    """How a client command reaches a server that uses TLS and / or bearer tokens."""
    parser.add_argument("--token-file", metavar="FILE", help="send the first token in FILE as a bearer token")
    parser.add_argument("--tls-ca", metavar="PEM", help="TLS, verifying the server with this CA bundle")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS, with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key")


def connect(args: argparse.Namespace):
    """A TandemClient for --server with the connection flags; ConfigError for an unreadable file."""
    from pathlib import Path

    from router.security import read_tokens
    from tandem_api.client import TandemClient

    def read(path):
        try:
            return Path(path).read_bytes() if path else None
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None

    try:
        token = read_tokens(args.token_file)[0] if args.token_file else None
        tls = dict(tls_ca=read(args.tls_ca), tls_cert=read(args.tls_cert), tls_key=read(args.tls_key))
    except ValueError as e:
        from engine.errors import ConfigError

        raise ConfigError(str(e)) from None
    return TandemClient(args.server, token=token, tls=args.tls, **tls)


def run_admin(args: argparse.Namespace) -> int:

    with connect(args) as client:
        try:
            if args.op == "add":
                reply = client.add_workers(args.pool, args.count)
            elif args.op == "remove":
                reply = client.remove_worker(args.worker_id, args.drain_timeout)
            else:
                reply = client.scale_pool(args.pool, args.replicas, args.drain_timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            bad = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            return 2 if exc.code() in bad else 1
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)))
    return 0
