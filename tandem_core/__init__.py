"""The pure core of speculative decoding: sampling transforms (`sampling`), lossless verification
(`verify`, Leviathan et al. 2023, arXiv 2211.17192), the check of a remote verdict against its
draft (`verdict_check`), statistics (`stats`), the one speculative loop over small interfaces
(`loop`, pipelined rounds included), retrieval drafts (`suffix_index`, `lookup`), the round
deadline learnt from the link (`deadline`), draft trees and their verification (`tree`), and the
routing and link-health policies (`routing`, `link_health`).

May import: numpy and the standard library only. No I/O, no gRPC, no torch, no onnxruntime; every
other package may import it.
"""
