"""The models Tandem runs: `registry` (where they live, whether complete; no I/O on import, a
leaf the runtimes may import), `fetch` and `convert` (download, verify, build the ONNX drafter),
`tiny` (random-weight models for tests and benches).
"""
