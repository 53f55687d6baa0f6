"""Tandem's public API for Python callers: generated stubs (`tandem_api.v1`) and a small client.

    from tandem_api.client import TandemClient        # grpcio only; no torch, no Ray
    from tandem_api.v1 import generation_pb2           # messages of tandem.v1

`tandem_api/v1/` is generated from proto/tandem/v1/*.proto by scripts/gen_proto.py.
"""

TANDEM_PACKAGE = "tandem-serve"  # deploy/import_names.py: this import name is Tandem's
