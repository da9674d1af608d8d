"""The cloud node: the target model on transformers/PyTorch scoring drafts with a per-session KV
cache (`scorer`, with a small-M native kernel in `kernels`), the verifier core with its limits
and sessions (`verifier`, `session_store`), the gRPC servicer (`servicer`) and its Ray Serve
hosting (`serve_app`), config and CLI.

May import: `tandem_core`, `protos`, torch, transformers, Ray, grpcio, and tandem's leaf modules
(`tandem.config`, `tandem.limits`, `tandem.paths`, `tandem.models.registry`). Never another node
or the CLI.
"""
