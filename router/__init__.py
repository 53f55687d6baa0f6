"""The gRPC front door: validation, worker pools, the tandem.v1 servicer (see router/README.md)."""

TANDEM_PACKAGE = "tandem-serve"  # deploy/import_names.py: this import name is Tandem's
