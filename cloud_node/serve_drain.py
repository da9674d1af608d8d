"""A drain switch for the Serve replicas: one call tells every replica of the app to drain.

Serve 2.60 tells a replica nothing when its controller stops it (it waits for the requests to
end, then calls `__del__`), and `serve.run` with a changed `user_config` replaces the replicas
instead of reconfiguring them (an imperative deploy gets a new code version). So the process
that owns the app (`python -m cloud_node`) creates this switch, a small named Ray actor, before
it deploys; each replica waits on it from a daemon thread and drains when it flips.

Guarantees:
- `create_switch()` returns the app's switch (creating it if needed); `flip(switch)` starts the
  drain of every replica that is waiting on it, and of any replica started later.
- A replica that finds no switch (an app deployed from a config file, `serve deploy`) runs as
  before; there `user_config: {draining: true}` is the operator's way to drain (a config deploy
  applies a user_config change in place).
- If the switch goes away without flipping (Ray shutting down), waiting replicas do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import ray

log = logging.getLogger(__name__)

SWITCH_NAME = "tandem-cloud-drain"
SWITCH_NAMESPACE = "tandem"


@ray.remote(num_cpus=0)
class _DrainSwitch:
    def __init__(self) -> None:
        self._flipped = asyncio.Event()

    async def wait(self) -> bool:
        await self._flipped.wait()
        return True

    def flip(self) -> None:
        self._flipped.set()


def create_switch() -> Any:
    """The app's drain switch (an actor handle), created in the connected cluster if missing."""
    return _DrainSwitch.options(name=SWITCH_NAME, namespace=SWITCH_NAMESPACE,  # type: ignore[attr-defined]
                                get_if_exists=True).remote()


def flip(switch: Any, timeout_s: float = 10.0) -> None:
    """Start the drain of every replica."""
    ray.get(switch.flip.remote(), timeout=timeout_s)


def watch(on_drain: Callable[[], None]) -> None:
    """In a replica: call `on_drain` (from a daemon thread) once the switch flips."""
    def wait() -> None:
        try:
            switch = ray.get_actor(SWITCH_NAME, namespace=SWITCH_NAMESPACE)
        except ValueError:
            log.info("no drain switch: this replica drains only through user_config")
            return
        try:
            ray.get(switch.wait.remote())
        except Exception:  # noqa: BLE001 - the switch went away: not a drain
            log.info("the drain switch went away without flipping")
            return
        on_drain()

    threading.Thread(target=wait, daemon=True, name="cloud-drain-switch").start()
