"""The gRPC front door: validation, worker pools, the tandem.v1 servicer (see router/README.md)."""
