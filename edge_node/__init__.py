"""The edge node: the small drafter on ONNX Runtime (onnxruntime-genai) with its KV cache and exact
rollback (`drafter`), generation on each route around the core's one loop with mid-answer
fallback (`generation`), the resumable link to the cloud verifier (`cloud_link`), a
transport-free core (`core`) behind a thin gRPC servicer (`servicer`), and its config and CLI.

May import: `tandem_core`, `protos`, onnxruntime-genai, grpcio, and tandem's leaf modules
(`tandem.config`, `tandem.limits`, `tandem.models.registry`). Never another node or the CLI:
it talks to the cloud over gRPC only.
"""
