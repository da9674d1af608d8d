"""The on-device orchestrator: routing, fallback and personalization (see issue 4)."""
