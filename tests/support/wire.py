"""Protobuf wire-format pieces for fuzz tests that write raw bytes (unknown fields, bad lengths)."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
