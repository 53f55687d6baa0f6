"""Generated code of the tandem.v1 API (scripts/gen_proto.py writes this package; do not edit)."""
