"""netshape: a user-space TCP link shaper (latency, jitter, bandwidth, outages) for testing the
edge <-> cloud gRPC link on kernels without netem. See `netshape.shaper` for the guarantees,
`netshape.link` for the pure delay model and `netshape.control` for run-time control from
another process.

May import: the standard library and aiohttp (the control endpoint's server only). No other
Tandem package: it only forwards bytes."""

from netshape.control import ShaperControl
from netshape.link import LinkConditions, LinkStats, format_address, parse_address
from netshape.shaper import LinkShaper

__all__ = ["LinkConditions", "LinkShaper", "LinkStats", "ShaperControl", "format_address",
           "parse_address"]
