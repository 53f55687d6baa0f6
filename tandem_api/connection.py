"""How a client command reaches a secured server: the shared flags and reading their files.

Used by `tandem generate --server`, `tandem admin` and `tandem bench --server` (grpcio only;
no torch, no Ray, nothing of the server side).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--token-file, --tls-ca, --tls, --tls-cert, --tls-key."""
    parser.add_argument("--token-file", metavar="FILE", help="send the first token in FILE as a bearer token")
    parser.add_argument("--tls-ca", metavar="PEM", help="TLS, verifying the server with this CA bundle")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS, with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key")


def _read(path: str | None, flag: str, what: str = "") -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {what}{path}: {e.strerror}") from None


def token_lines(raw: bytes) -> list[str]:
    """The tokens of a token file (the server's and the client's): one per line, blanks and # comments skipped."""
    text = raw.decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def first_token(path: str) -> str:
    """The first token of a token file."""
    tokens = token_lines(_read(path, "--token-file", "the auth token file ") or b"")
    if not tokens:
        raise ValueError(f"--token-file: {path} holds no token")
    return tokens[0]


def connection_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TandemClient / GrpcTarget keywords from the flags; ValueError naming an unreadable file."""
    return {
        "token": first_token(args.token_file) if args.token_file else None,
        "tls": bool(args.tls),
        "tls_ca": _read(args.tls_ca, "--tls-ca"),
        "tls_cert": _read(args.tls_cert, "--tls-cert"),
        "tls_key": _read(args.tls_key, "--tls-key"),
    }
