"""Stubs for CLI tests that check a bad flag is refused before anything starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Started(Exception):
    """What a stub raises: the thing it replaces (a model, a stack, a cluster) would have started."""


def starter(calls: list[str], what: str) -> Callable[..., Any]:
    """A stand-in for a function that starts `what`: records the call in `calls`, then raises Started."""
    def start(*_: Any, **__: Any) -> Any:
        calls.append(what)
        raise Started(what)
    return start
