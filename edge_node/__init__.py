"""The edge node: the small drafter on ONNX Runtime (onnxruntime-genai), with its KV cache and
exact rollback, and on-device generation."""
