"""Tandem: hybrid edge-cloud LLM inference.

This package holds the `tandem` CLI and the tooling around the runtimes: model fetching
(`tandem.models`), the benchmark (`tandem.bench`) and shared paths. The pure algorithm core
lives in `tandem_core`, the runtimes in `edge_node` and `cloud_node`.
"""

__version__ = "0.1.0"
