"""The cloud node: the target model on transformers/PyTorch, scoring drafts with a per-session KV
cache, and cloud-only generation."""
