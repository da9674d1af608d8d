"""`tandem serve {cloud,edge,orchestrator}`: the long-running node processes.

Each node defines its own subcommand (`cloud_node.cli.add_cloud_parser`,
`edge_node.cli.add_edge_parser`); a node whose package is not installed is simply not offered.
Importing this module imports neither node.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# subcommand -> (module, function adding it to a subparsers object)
_NODES = {
    "cloud": ("cloud_node.cli", "add_cloud_parser"),
    "edge": ("edge_node.cli", "add_edge_parser"),
    "orchestrator": ("orchestrator.cli", "add_orchestrator_parser"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("serve", help="run a node process (cloud verifier, edge node, orchestrator)")
    sub = parser.add_subparsers(dest="node", metavar="NODE")
    sub.required = True
    for module, function in _NODES.values():
        if _available(module):
            getattr(importlib.import_module(module), function)(sub)
