"""The pure speculative-decoding core: sampling transforms, verification, statistics and the
speculative loop over small interfaces. numpy at most; no I/O, no torch, no onnxruntime."""
