"""The on-device orchestrator: routing and link health around the edge node (`core`,
`link_monitor`), personal documents kept on the device (`store`, `retrieval`, `embedder`,
`personal`), its gRPC servicer (`servicer`), the OpenAI-compatible HTTP endpoint (`http_api`,
`openai_schema`), and its config and CLI (`app` composes them).

May import: `tandem_core`, `protos`, grpcio, aiohttp, pydantic, torch/transformers (the
embedder), and tandem's leaf modules (`tandem.config`, `tandem.limits`, `tandem.paths`, `tandem.security`,
`tandem.models.registry`). It reaches the edge over gRPC only, never by import.
"""
