"""The cloud node: the target model's weights from transformers, run by Tandem's batched,
batch-invariant engine (`engine`, `batcher`, the per-CPU tile plan in `autotune`, a small-M
native kernel in `kernels`) behind per-session KV caches (`scorer`), the verifier core with its limits
and sessions (`verifier`, `session_store`, every bound a client must keep in `validation`), the
protocol both servers speak (`protocol`: bytes in, one status map in `status` over the errors of
`errors`), the plain gRPC servicer with its drain (`servicer`) and its Ray Serve hosting
(`serve_app`, with `serve_proxy` in Serve's proxy and the drain switch `serve_drain`), config and
CLI.

May import: `tandem_core`, `protos`, torch, transformers, Ray, grpcio, and tandem's leaf modules
(`tandem.config`, `tandem.limits`, `tandem.paths`, `tandem.models.registry`). Never another node
or the CLI.
"""
