"""The cloud verifier's error types: what went wrong, transport-free.

Guarantees: each error's message is one line written by this package, naming the field or the
limit, and never carries a traceback, a path, a pid, an address or a replica id; a client's
text appears in it only as `echo` allows. The one map from these errors to gRPC statuses is
`cloud_node.status.status_for`; anything not listed there is a server fault.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,40}")


def echo(value: str) -> str:
    """A client's string quoted in a message if it is a short plain name, else only its length."""
    return repr(value) if _NAME.fullmatch(value) else f"<{len(value)} characters>"


class BadRequest(ValueError):
    """Invalid client input (a field, or the order of messages); the message names the field.
    INVALID_ARGUMENT."""


class ResourceExhausted(Exception):
    """A limit of the replica is reached (concurrent sessions, message size). RESOURCE_EXHAUSTED."""


class Draining(Exception):
    """The replica is shutting down: it admits no session and ends open streams after their
    round in flight. UNAVAILABLE, so the edge resumes on another replica."""


class SessionGone(Exception):
    """The call's stream was cancelled or broke (the session was closed while a call on it ran,
    or the request stream failed under it). CANCELLED."""


class SessionIdle(Exception):
    """A Verify stream sent no request for the replica's idle limit; its session is closed.
    UNAVAILABLE, so an edge that still wants it resumes on a new stream."""


class Unauthenticated(Exception):
    """The call did not come through the cloud's gateway (no or a wrong gateway secret).
    UNAUTHENTICATED."""
