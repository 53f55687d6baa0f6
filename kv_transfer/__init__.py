"""KV cache transfer between prefill and decode workers: layouts, plans, conversions, transports.

Read kv_transfer/README.md first. NIXL is optional: importing this package never
imports it; creating a `NixlTransport` does, and raises TransportUnavailableError
(with the import error's text) where it is not installed.
"""

from kv_transfer.conversion_plan import ConversionPlan, Piece
from kv_transfer.errors import (
    IncompatiblePeerError,
    InvalidLayoutError,
    InvalidPlanError,
    TransferError,
    TransportUnavailableError,
    TransportVersionError,
    UnknownPeerError,
    UnsupportedConversionError,
)
from kv_transfer.faulty import FaultPlan, FaultyTransport
from kv_transfer.inproc import InProcessRegistry, InProcessTransport
from kv_transfer.layout import COMPAT_FIELDS, KVLayout, check_compatible
from kv_transfer.nixl_settings import NixlSettings
from kv_transfer.nixl_transport import NixlTransport
from kv_transfer.pair import check_pair
from kv_transfer.plan import Region, TransferPlan, plan_transfer
from kv_transfer.planner import describe_pair, plan_conversion
from kv_transfer.rounds import Round, RowScatter, ScatterSegment
from kv_transfer.scatter import apply_scatter, execute_locally
from kv_transfer.transport import (
    PROTOCOL_VERSION,
    Handshake,
    TransferHandle,
    TransferOp,
    TransferState,
    Transport,
    decode_handshake,
    encode_handshake,
)

__all__ = [
    "COMPAT_FIELDS",
    "PROTOCOL_VERSION",
    "ConversionPlan",
    "FaultPlan",
    "FaultyTransport",
    "Handshake",
    "IncompatiblePeerError",
    "InProcessRegistry",
    "InProcessTransport",
    "InvalidLayoutError",
    "InvalidPlanError",
    "KVLayout",
    "NixlSettings",
    "NixlTransport",
    "Piece",
    "Region",
    "Round",
    "RowScatter",
    "ScatterSegment",
    "TransferError",
    "TransferHandle",
    "TransferOp",
    "TransferPlan",
    "TransferState",
    "Transport",
    "TransportUnavailableError",
    "TransportVersionError",
    "UnknownPeerError",
    "UnsupportedConversionError",
    "apply_scatter",
    "check_compatible",
    "check_pair",
    "decode_handshake",
    "describe_pair",
    "encode_handshake",
    "execute_locally",
    "plan_conversion",
    "plan_transfer",
]

TANDEM_PACKAGE = "tandem-serve"  # deploy/import_names.py: this import name is Tandem's
