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

from tandem_api.connection import add_connection_flags, connection_settings


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


def connect(args: argparse.Namespace):
    """A TandemClient for --server with the connection flags; ConfigError for an unreadable file."""
    from tandem_api.client import TandemClient

    try:
        settings = connection_settings(args)
    except ValueError as e:
        from common.errors import ConfigError

        raise ConfigError(str(e)) from None
    return TandemClient(args.server, **settings)


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
