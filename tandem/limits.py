"""Protocol limits and shared defaults: the one place every process reads them from.

Guarantees: plain constants, no imports, no I/O; a leaf the runtimes may import. A node may be
configured tighter (e.g. the cloud's `--max-context`), never looser than `MAX_*` here, and each
default below is the default of every process that has the setting, so an edge, an
orchestrator and a cloud started with no flags agree.
"""

# Per request.
MAX_NEW_TOKENS = 4096       # tokens one answer may generate
MAX_DRAFT_LEN = 16          # drafts per verification round
DEFAULT_DRAFT_LEN = 4
MAX_CONTEXT = 4096          # prompt + generated tokens the deployed cloud keeps (its default)

# Deadlines (milliseconds).
ROUND_DEADLINE_MS = 1000    # a verdict later than this: resume, or continue on the device
OPEN_DEADLINE_MS = 60000    # opening a cloud session, prefill included
MAX_DEADLINE_MS = 3_600_000

# Liveness of a call to a node on the device (the orchestrator's to the edge node): while a call
# is open the client pings every KEEPALIVE_S, data or not, and fails the call (UNAVAILABLE) when a
# ping is not answered within as long: a frozen or hung process, which a silent but alive one
# (a long prefill, a cloud open that waits for its deadline) is not, since its gRPC threads
# still answer. A server accepts pings down to MIN_PING_S apart.
KEEPALIVE_S = 10.0
MIN_PING_S = 1.0

# A cloud Verify stream that sends no request for this long is closed with UNAVAILABLE (the edge
# resumes on a new stream): a client that opens sessions and goes silent cannot hold a
# replica's session slots. An edge sends a round at least every few seconds while it answers.
SESSION_IDLE_S = 120.0

# Shutdown: on SIGTERM a node stops admitting and lets the work in flight finish this long.
DRAIN_S = 30.0
MAX_DRAIN_S = 3600.0

# Concurrency on the device.
MAX_CONCURRENT_GENERATIONS = 4  # the edge node's generation slots; the orchestrator admits as many
