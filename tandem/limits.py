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

# Shutdown: on SIGTERM a node stops admitting and lets the work in flight finish this long.
DRAIN_S = 30.0
MAX_DRAIN_S = 3600.0

# Concurrency on the device.
MAX_CONCURRENT_GENERATIONS = 4  # the edge node's generation slots; the orchestrator admits as many
