"""netshape: a user-space TCP link shaper (latency, jitter, bandwidth, outages) for testing the
edge <-> cloud gRPC link on kernels without netem. See `netshape.shaper` for the guarantees and
`netshape.control` for run-time control from another process.

May import: the standard library and aiohttp. No other Tandem package: it only forwards bytes."""

from netshape.control import ShaperControl
from netshape.shaper import LinkConditions, LinkShaper, LinkStats, format_address, parse_address

__all__ = ["LinkConditions", "LinkShaper", "LinkStats", "ShaperControl", "format_address",
           "parse_address"]
